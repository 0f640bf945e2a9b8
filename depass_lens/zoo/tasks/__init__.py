"""The zoo's synthetic tasks."""

from depass_lens.zoo.tasks.base import Example, Task, ZooBatch
from depass_lens.zoo.tasks.bilingual import BilingualTask
from depass_lens.zoo.tasks.induction import InductionTask
from depass_lens.zoo.tasks.ioi import IOITask
from depass_lens.zoo.tasks.recall import RecallTask

TASKS: dict[str, type[Task]] = {
    "ioi": IOITask,
    "induction": InductionTask,
    "recall": RecallTask,
    "bilingual": BilingualTask,
}

__all__ = [
    "TASKS",
    "BilingualTask",
    "Example",
    "IOITask",
    "InductionTask",
    "RecallTask",
    "Task",
    "ZooBatch",
]
