"""Anomaly-size curriculum: large synthetic anomalies early in training, the reference's sizes later.

Why: a young model minimises the loss by copying its condition, which is right on every pixel outside
the anomalies (training-notes.md). Stretching the anomalies' side lengths by ``start`` at step 0 puts
more of each image inside the masks, where copying is wrong (and weighted up by the ``healing``
recipe); the stretch falls linearly to 1 at ``steps``, after which the task distribution is the
reference's again, so the model ends on the sizes it will be validated and compared on.

The scale is a function of the data epoch, not of the optimiser step, so a sample's corruption depends
only on its key ``(epoch, index)`` and a resumed run draws exactly what an uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SizeCurriculum:
    """Side-length scale ``start`` at step 0, falling linearly to 1 at step ``steps`` (then 1)."""

    start: float = 1.0
    steps: int = 0

    def __post_init__(self):
        if not self.start > 0:
            raise ValueError(f"size curriculum start scale must be > 0, got {self.start}")
        if self.steps < 0:
            raise ValueError(f"size curriculum steps must be >= 0, got {self.steps}")

    @property
    def active(self) -> bool:
        return self.steps > 0 and self.start != 1.0

    def scale_at_step(self, step: float) -> float:
        if not self.active or step >= self.steps:
            return 1.0
        return self.start + (1.0 - self.start) * max(0.0, step) / self.steps

    def epoch_scale(self, n_samples: int, global_batch: int):
        """``epoch -> scale`` for ``TaskSamples``: an epoch of ``n_samples`` starts at step n·epoch/batch."""
        if n_samples < 1 or global_batch < 1:
            raise ValueError("n_samples and global_batch must be >= 1")
        return lambda epoch: self.scale_at_step(epoch * n_samples / global_batch)


def parse_size_curriculum(text: str | None) -> SizeCurriculum:
    """``'START:STEPS'`` (e.g. ``'2:4000'``) -> ``SizeCurriculum``; None, '' or 'none' -> no curriculum.

    Every value that stretches nothing (``1:500``, ``3:0``) comes back as the one "off" value, ``(1, 0)``.
    """
    if not text or text.strip().lower() in ("none", "off"):
        return SizeCurriculum()
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, steps = float(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"size curriculum {text!r}: expected START:STEPS (e.g. 2:4000) or none") from None
    curriculum = SizeCurriculum(start, steps)
    return curriculum if curriculum.active else SizeCurriculum()
