"""Forward hooks that remember what flows through a hook point (live, or detached: frozen)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

HookFn = Callable[..., Tensor | None]


def store(seen: dict[str, Tensor], key: str, frozen: bool = False) -> HookFn:
    """A hook that keeps its value in ``seen[key]`` and passes it on; ``frozen`` detaches it
    first, so nothing upstream of the hook receives gradient through it."""

    def fn(value: Tensor, hook) -> Tensor:
        seen[key] = value.detach() if frozen else value
        return seen[key]

    return fn
