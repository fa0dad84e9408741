"""From restorations to maps and scores: background zeroing, member mean, slice scores."""
from __future__ import annotations

import torch


def background_mask(y: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) bool: True where any channel of the input lies above its own per-image minimum.

    reference-method.md §10 D2: per image, not the reference's per-column batch minimum; for MRI
    (background exactly 0) this is ``y > 0``.
    """
    flat_min = y.flatten(1).min(dim=1).values.view(-1, 1, 1, 1)
    return (y > flat_min).any(dim=1, keepdim=True)


def zero_background(amap: torch.Tensor, y: torch.Tensor, foreground: torch.Tensor | None = None) -> torch.Tensor:
    """Zero the map outside the foreground (an explicit mask if given, else ``background_mask(y)``)."""
    keep = background_mask(y) if foreground is None else foreground.view_as(amap).bool()
    return amap * keep


def slice_scores(amap: torch.Tensor) -> torch.Tensor:
    """Score = mean of the map over all pixels, background zeros included (reference §6 item 5)."""
    return amap.flatten(1).mean(dim=1)


def ensemble_mean(maps: torch.Tensor) -> torch.Tensor:
    """(M, B, 1, H, W) member maps -> (B, 1, H, W) arithmetic mean."""
    return maps.mean(dim=0)
