"""Regular polygons, with squares and triangles by name."""

from dataclasses import dataclass

from shapes.measures import check_non_negative, polygon_apothem, polygon_area


@dataclass(frozen=True)
class RegularPolygon:
    """A regular polygon with `sides` sides of length `length`."""

    sides: int
    length: float

    def __post_init__(self) -> None:
        if self.sides < 3:
            raise ValueError(f"sides must be >= 3 (got {self.sides})")
        check_non_negative("length", self.length)

    def apothem(self) -> float:
        return polygon_apothem(self.sides, self.length)

    def area(self) -> float:
        return polygon_area(self.sides, self.length)

    def perimeter(self) -> float:
        return self.sides * self.length


def Square(length: float) -> RegularPolygon:
    """A square: a regular polygon with four sides."""
    return RegularPolygon(4, length)


def Triangle(length: float) -> RegularPolygon:
    """An equilateral triangle: a regular polygon with three sides."""
    return RegularPolygon(3, length)
