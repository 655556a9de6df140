"""Areas and perimeters of simple plane figures."""

from shapes.circle import Circle
from shapes.polygon import RegularPolygon, Square, Triangle

__all__ = ["Circle", "RegularPolygon", "Square", "Triangle"]
