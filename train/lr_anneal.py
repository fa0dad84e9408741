"""Learning-rate annealing: the recipe's constant rate, then a cosine fall to a fraction of it.

Why: the reference trains at a constant rate and relies on the EMA weights; a run that has reached a
plateau at that rate (bench/results/landmarks-cpu-2026-12-06/continued-37k/) may still gain from a
final phase at a falling rate. The rate is a pure function of the optimiser step, so a resumed run
takes exactly the steps an uninterrupted one would.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LrAnneal:
    """Factor 1 up to step ``start``, a half cosine to ``final`` at step ``end``, then ``final``."""

    start: int = 0
    end: int = 0
    final: float = 0.01

    def __post_init__(self):
        if self.start < 0 or self.end < 0:
            raise ValueError(f"learning-rate anneal steps must be >= 0, got {self.start}:{self.end}")
        if self.active and self.end <= self.start:
            raise ValueError(f"learning-rate anneal must end after it starts, got {self.start}:{self.end}")
        if not 0 < self.final <= 1:
            raise ValueError(f"learning-rate anneal final factor must be in (0, 1], got {self.final}")

    @property
    def active(self) -> bool:
        return self.end > 0

    def factor(self, step: int) -> float:
        """Multiplier of the base rate for the optimiser step taken after ``step`` completed steps."""
        if not self.active or step <= self.start:
            return 1.0
        if step >= self.end:
            return self.final
        progress = (step - self.start) / (self.end - self.start)
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parse_lr_anneal(text: str | None) -> LrAnneal:
    """``'START:END'`` or ``'START:END:FINAL'`` (e.g. ``'38000:42000:0.01'``) -> ``LrAnneal``; None/'none' -> off."""
    if not text or text.strip().lower() in ("none", "off"):
        return LrAnneal()
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        start, end = int(parts[0]), int(parts[1])
        final = float(parts[2]) if len(parts) == 3 else LrAnneal.final
    except ValueError:
        raise ValueError(f"learning-rate anneal {text!r}: expected START:END[:FINAL] (e.g. 38000:42000:0.01) "
                         "or none") from None
    anneal = LrAnneal(start, end, final)
    if not anneal.active:
        raise ValueError(f"learning-rate anneal {text!r}: END must be > 0 (or give none)")
    return anneal
