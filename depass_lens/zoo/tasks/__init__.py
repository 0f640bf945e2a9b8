"""The zoo's synthetic tasks."""

from depass_lens.zoo.tasks.base import Example, Task, ZooBatch
from depass_lens.zoo.tasks.bilingual import BilingualTask
from depass_lens.zoo.tasks.binding import BindingTask
from depass_lens.zoo.tasks.induction import InductionTask
from depass_lens.zoo.tasks.ioi import IOITask
from depass_lens.zoo.tasks.recall import RecallTask

TASKS: dict[str, type[Task]] = {
    "ioi": IOITask,
    "induction": InductionTask,
    "recall": RecallTask,
    "bilingual": BilingualTask,
    "binding": BindingTask,
}

__all__ = [
    "TASKS",
    "BilingualTask",
    "BindingTask",
    "Example",
    "IOITask",
    "InductionTask",
    "RecallTask",
    "Task",
    "ZooBatch",
]
