"""condiff-eval's picture of a case: where the map responds against where the label says the lesion is.

One row per slice, two panels: the input with the label's outline | the map on the input (the
overlay PNG's fourth panel) with the same outline; a title band, and above each row the slice as
the input file numbers it, its label pixels and score. Volumes show the ``ROWS`` analysed slices
holding the most label voxels (the top-scoring slices when the label is empty), anterior up
like ``overlay.py``; photographs show one row. Drawn on the input grid (the written map), so
the outline is the user's label exactly as ``--protocol native`` scores it.
"""
from __future__ import annotations

import numpy as np

from condiff.io.images import to_png8

from .overlay import enlarge, map_on, text_band

ROWS = 3
OUTLINE = np.array([0, 255, 255], dtype=np.uint8)  # cyan: apart from every colour of the map's ramp


def outline(mask: np.ndarray) -> np.ndarray:
    """The label's boundary: its pixels with a 4-neighbour outside it (or on the image edge)."""
    m = np.asarray(mask, dtype=bool)
    padded = np.pad(m, 1, constant_values=False)
    interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return m & ~interior


def pick_slices(label: np.ndarray, slice_scores: dict[int, float], k: int = ROWS) -> list[int]:
    """Among the analysed slices (keys of ``slice_scores``, canonical axis 2), the ``k`` with the most
    label voxels (ties: the higher slice score, then the lower index); the top-scoring ones when
    the label is empty. Returned in slice order."""
    ks = sorted(slice_scores)
    counts = {s: int(label[:, :, s].sum()) for s in ks}
    order = sorted(ks, key=lambda s: (-counts[s], -slice_scores[s], s))
    return sorted(order[:k])


def _grey(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(H, W) or (H, W, 3) -> (H, W, 3) uint8 on [lo, hi]."""
    u8 = to_png8(image, lo, hi)
    return np.repeat(u8[..., None], 3, axis=-1) if u8.ndim == 2 else u8


def _row(grey: np.ndarray, values01: np.ndarray, label: np.ndarray) -> np.ndarray:
    edge = outline(label)
    left, right = grey.copy(), map_on(grey, values01)
    left[edge] = OUTLINE
    right[edge] = OUTLINE
    return np.concatenate([left, right], axis=1)


def _titles(width: int, vmax: float) -> np.ndarray:
    return text_band(["input, label in cyan", f"map on input, 0 to {vmax:.3g}"], width, 2)


def volume_figure(image: np.ndarray, amap: np.ndarray, label: np.ndarray, slice_scores: dict[int, float],
                  k: int = ROWS, name=None) -> np.ndarray:
    """uint8 (rows * (H' + band) + band, 2 * W', 3) from canonical (R, A, S) arrays of one case (``image``
    float, ``amap`` >= 0, ``label`` bool); grey from the 1st-99th percentile of the non-zero input, the
    map scaled to the case's largest value. A title band, and above each row its slice (``name(s)``,
    default the canonical index), label pixels and slice score."""
    nonzero = image[image != 0]
    lo, hi = (np.percentile(nonzero, [1, 99]) if nonzero.size else (0.0, 1.0))
    vmax = float(amap.max()) if amap.size else 0.0
    parts = []
    for s in pick_slices(label, slice_scores, k):
        def show(a):  # canonical (R->, A->) slice: anterior up, patient right on the right
            return np.ascontiguousarray(np.swapaxes(a[:, :, s], 0, 1)[::-1])
        values = show(amap) / vmax if vmax > 0 else np.zeros(show(amap).shape)
        row = enlarge(_row(_grey(show(image), float(lo), float(hi)), values, show(label)),
                      min(image.shape[0], image.shape[1]))
        where = name(s) if name is not None else f"slice {s}"
        parts += [text_band([f"{where}: {int(label[:, :, s].sum())} label px, score {slice_scores[s]:.4g}"],
                            row.shape[1], 2), row]
    return np.concatenate([_titles(parts[1].shape[1], vmax), *parts], axis=0)


def image_figure(rgb01: np.ndarray, amap: np.ndarray, label: np.ndarray) -> np.ndarray:
    """uint8 (band + H', 2 * W', 3) for a photograph (``rgb01`` (H, W, 3) in [0, 1]), under a title band."""
    vmax = float(amap.max()) if amap.size else 0.0
    values = amap / vmax if vmax > 0 else np.zeros(amap.shape)
    row = enlarge(_row(_grey(rgb01, 0.0, 1.0), values, label), min(amap.shape))
    return np.concatenate([_titles(row.shape[1], vmax), row], axis=0)


__all__ = ["ROWS", "OUTLINE", "outline", "pick_slices", "volume_figure", "image_figure"]
