"""Numeric ranges for config keys and component specs, declared with the field
(``Annotated[int, Range(ge=1)]``) and checked by the config loader. No dependencies, so a
component module can declare its spec's ranges without importing ``dist_ft.config``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric key, declared with it (``Annotated[int, Range(ge=1)]``) and
    checked when a config loads, so a bad value fails in the loader naming the key, not 30 s
    later inside DeepSpeed or peft. Values must also be finite."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    why: str = ""

    def __contains__(self, x: float) -> bool:
        return math.isfinite(x) and not (
            (self.ge is not None and x < self.ge)
            or (self.gt is not None and x <= self.gt)
            or (self.le is not None and x > self.le)
            or (self.lt is not None and x >= self.lt)
        )

    def __str__(self) -> str:
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt)
        high = ("]", self.le) if self.le is not None else (")", self.lt)
        if low[1] is not None and high[1] is not None:
            text = f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
        elif low[1] is not None:
            text = f"{'>=' if low[0] == '[' else '>'} {low[1]:g}"
        elif high[1] is not None:
            text = f"{'<=' if high[0] == ']' else '<'} {high[1]:g}"
        else:
            text = "finite"
        return f"{text} ({self.why})" if self.why else text


# The common ranges. A count of 0 (steps, prompts, tokens, ranks) is never a valid run.
PosInt = Annotated[int, Range(ge=1)]
NonNegInt = Annotated[int, Range(ge=0)]
PosFloat = Annotated[float, Range(gt=0)]
NonNegFloat = Annotated[float, Range(ge=0)]
