"""Formulas shared by the figures, as plain functions."""

import math


def check_non_negative(name: str, value: float) -> float:
    """Return `value`, or raise a ValueError naming it when it is negative."""
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (got {value})")
    return value


def polygon_apothem(sides: int, length: float) -> float:
    """Distance from the centre of a regular polygon to the middle of a side."""
    return length / (2 * math.tan(math.pi / sides))


def polygon_area(sides: int, length: float) -> float:
    """Half the perimeter times the apothem."""
    return 0.5 * sides * length * polygon_apothem(sides, length)
