"""Argument checks shared by the public API: counts, indices, choices and index lists.

Each returns the value it accepted (indices normalised to ``0..size-1``) or raises
:class:`~depass_lens.errors.DePassInputError` naming the bad value and what is allowed. Nothing
here imports torch, so any module may use it.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Collection, Iterable
from typing import Any

from depass_lens.errors import DePassInputError


def as_int(value: Any, what: str) -> int:
    """``value`` as a Python int (ints, NumPy/torch integer scalars); bools and floats refused."""
    if isinstance(value, bool):
        raise DePassInputError(f"{what} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise DePassInputError(f"{what} must be an int, got {value!r}") from None


def check_count(k: Any, what: str = "k", *, minimum: int = 1) -> int:
    """A count such as a top-``k``: an int of at least ``minimum``."""
    k = as_int(k, what)
    if k < minimum:
        raise DePassInputError(f"{what} must be at least {minimum}, got {k}")
    return k


def check_index(index: Any, size: int, what: str, *, of: str = "") -> int:
    """An index into ``size`` things (``-size..size-1``, negatives counting from the end)."""
    index = as_int(index, what)
    if not -size <= index < size:
        where = f" {of}" if of else ""
        valid = f"0..{size - 1} (or -{size}..-1)" if size else "none: it is empty"
        raise DePassInputError(f"{what} {index} is out of range{where}: valid {valid}")
    return index % size


def check_choice(value: Any, choices: Collection[str], what: str) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise DePassInputError(
            f"{what} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}"
        )
    return value


def check_unique(values: Iterable[Any], what: str) -> list[int]:
    """Ints without repeats (a repeated layer, head or neuron would be counted twice)."""
    out = [as_int(v, what) for v in values]
    repeated = sorted(v for v, n in Counter(out).items() if n > 1)
    if repeated:
        raise DePassInputError(
            f"{what} {repeated} given more than once; each would be counted twice"
        )
    return out


__all__ = ["as_int", "check_choice", "check_count", "check_index", "check_unique"]
