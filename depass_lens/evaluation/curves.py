"""Protocol curves: metric values along a masking grid, with their areas."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: Fractions of tokens / components masked: 0%, 10%, ..., 100%.
DEFAULT_GRID: tuple[float, ...] = tuple(i / 10 for i in range(11))


def trapezoid_area(x: Sequence[float], y: Sequence[float]) -> float:
    """Area under ``y(x)`` by the trapezoid rule (``x`` is a fraction in [0, 1] here)."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} x values for {len(y)} y values")
    return float(sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1)))


@dataclass
class Curve:
    """One protocol run: ``values[key][i]`` is the mean of ``key`` at ``grid[i]`` (a fraction).

    ``areas`` integrates each key over the grid (trapezoid; over [0, 1] for the default grid).
    ``info`` holds the settings and reference values (clean, fully masked) of the run.
    """

    name: str
    grid: list[float]
    values: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def area(self, key: str) -> float:
        return trapezoid_area(self.grid, self.values[key])

    @property
    def areas(self) -> dict[str, float]:
        return {key: self.area(key) for key in self.values}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "grid": list(self.grid),
            "values": {k: list(v) for k, v in self.values.items()},
            "areas": self.areas,
            "info": dict(self.info),
        }
