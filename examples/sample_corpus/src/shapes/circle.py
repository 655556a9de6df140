"""Circles."""

import math
from dataclasses import dataclass

from shapes.measures import check_non_negative


@dataclass(frozen=True)
class Circle:
    """A circle of the given radius."""

    radius: float

    def __post_init__(self) -> None:
        check_non_negative("radius", self.radius)

    def area(self) -> float:
        """Pi times the radius squared."""
        return math.pi * self.radius ** 2

    def perimeter(self) -> float:
        """Two pi times the radius."""
        return 2 * math.pi * self.radius
