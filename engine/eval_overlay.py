"""condiff-eval's picture of a case: where the map responds against where the label says the lesion is.

One row per slice, two panels: the input with the label's outline | the map on the input (the
overlay PNG's fourth panel) with the same outline and, dashed in magenta around them, the pixels the
table's threshold calls; a header band naming the case, a legend band (what the outlines are, the
threshold), the colour bar (``overlay.colour_bar``: per case, or one fixed scale), a title band, and above each row the
slice as the input file numbers it, its label pixels and score. Volumes show the ``ROWS`` analysed
slices holding the most label voxels (the top-scoring slices when the label is empty), anterior up
and patient right on the right, "L"/"R" at the panel edges, like ``overlay.py``; photographs show one
row. Drawn on the input grid (the written map), so the outline is the user's label exactly as
``--protocol native`` scores it; panels are enlarged by pixel replication to at least ``MIN_PANEL``
pixels, so the outlines are at least 2 pixels wide, each with a dark edge that keeps it apart from
the ramp's yellow.
"""
from __future__ import annotations

import math

import numpy as np

from condiff.io.images import to_png8

from .overlay import (case_band, colour_bar, colour_scale, display_transform, enlarge, map_on, mark_sides, scaled,
                      show_slice, text_band)

ROWS = 3
MIN_PANEL = 360  # pixels: a panel's short side at least, by integer pixel replication
OUTLINE = np.array([0, 255, 255], dtype=np.uint8)  # cyan: apart from every colour of the map's ramp
CALLED = np.array([255, 0, 255], dtype=np.uint8)  # magenta, dashed: the called pixels' outer boundary
EDGE = np.array([0, 0, 0], dtype=np.uint8)  # the 1-pixel dark edge around both outlines


def outline(mask: np.ndarray) -> np.ndarray:
    """The label's boundary: its pixels with a 4-neighbour outside it (or on the image edge)."""
    m = np.asarray(mask, dtype=bool)
    padded = np.pad(m, 1, constant_values=False)
    interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return m & ~interior


def _grow(mask: np.ndarray, diagonal: bool = False) -> np.ndarray:
    """``mask`` grown by one pixel: 4-neighbours (8 with ``diagonal``)."""
    p = np.pad(np.asarray(mask, dtype=bool), 1, constant_values=False)
    h, w = mask.shape
    out = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    if diagonal:
        out |= p[:-2, :-2] | p[:-2, 2:] | p[2:, :-2] | p[2:, 2:]
    return out[:h, :w]


def outer_outline(mask: np.ndarray) -> np.ndarray:
    """The pixels just outside ``mask``: not in it, with a 4-neighbour in it (so a called region is
    outlined without covering its own pixels, and beside the label's outline when both agree)."""
    m = np.asarray(mask, dtype=bool)
    return _grow(m) & ~m


def dashes(mask: np.ndarray) -> np.ndarray:
    """``mask`` cut into dashes: pixels (i, j) with (i + 2j) mod 4 < 2 kept, so every horizontal,
    vertical and diagonal line runs at most 2 pixels on, 2 off."""
    i, j = np.indices(np.shape(mask))
    return np.asarray(mask, dtype=bool) & ((i + 2 * j) % 4 < 2)


def legend(threshold: float | None = None, given: bool = False) -> str:
    """The legend band's text: the label outline and, with ``threshold``, the called pixels' outline."""
    if threshold is None:
        return "label: cyan outline"
    if not math.isfinite(threshold):
        return "label: cyan outline; no called pixels drawn (no threshold: no lesion pixel in the table)"
    which = "given" if given else "the table's best Dice"
    return (f"label: cyan outline; called at threshold {threshold:.4g} ({which}; magenta tick on the bar): "
            "magenta dashes around them")


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


def _panel(rgb: np.ndarray, lines: np.ndarray, side: int) -> np.ndarray:
    """``rgb`` enlarged (``MIN_PANEL``), with a 1-pixel ``EDGE`` around its ``lines`` pixels."""
    big, big_lines = enlarge(rgb, side, MIN_PANEL), enlarge(lines, side, MIN_PANEL)
    big = big.copy()
    big[_grow(big_lines, diagonal=True) & ~big_lines] = EDGE
    return big


def _row(grey: np.ndarray, values01: np.ndarray, label: np.ndarray, called: np.ndarray | None, side: int) -> np.ndarray:
    edge = outline(label)
    dash = np.zeros_like(edge) if called is None else dashes(outer_outline(called))
    left, right = grey.copy(), map_on(grey, values01)
    left[edge] = OUTLINE  # the input panel: the label's outline whole
    right[edge] = OUTLINE
    right[dash] = CALLED  # on top: where the two coincide they alternate, cyan between the dashes
    return np.concatenate([_panel(left, edge, side), _panel(right, edge | dash, side)], axis=1)


def _head(width: int, vmax: float, threshold: float | None, given: bool, case: str | None,
          case_max: float | None = None) -> list[np.ndarray]:
    """The bands above the rows: the case, the ``legend``, the colour bar (the threshold a magenta tick;
    ``case_max``: the case's maximum on a fixed scale) and the panel titles."""
    bands = [case_band(case, width)] if case is not None else []
    mark = threshold if threshold is not None and math.isfinite(threshold) else None
    return bands + [text_band([legend(threshold, given)], width, 1), colour_bar(width, vmax, mark, case_max),
                    text_band(["input, label outline", "map on input, label and called pixels"], width, 2)]


def volume_figure(image: np.ndarray, amap: np.ndarray, label: np.ndarray, slice_scores: dict[int, float],
                  k: int = ROWS, name=None, called: np.ndarray | None = None, threshold: float | None = None,
                  given: bool = False, case: str | None = None, vmax: float | None = None, orientation: str = "RAS",
                  voxel_mm: tuple[float, float, float] | None = None) -> np.ndarray:
    """uint8 (head + rows * (H' + band), 2 * W', 3) from arrays of one case on the model contract's axes
    (``orientation``, shown as ``overlay.display_transform`` says; ``voxel_mm`` their voxel sizes, so
    anisotropic in-plane voxels are drawn in millimetre proportions) (``image``
    float, ``amap`` >= 0, ``label`` bool, ``called`` bool: the pixels called at ``threshold``, or None);
    grey from the 1st-99th percentile of the non-zero input, the map scaled to the case's largest value
    or to a fixed ``vmax`` (``condiff-eval --overlay-max``).
    The head: a band naming ``case`` (when given), the ``legend``, the colour bar and the titles; above
    each row its slice (``name(s)``, default the canonical index), label pixels and slice score."""
    nonzero = image[image != 0]
    lo, hi = (np.percentile(nonzero, [1, 99]) if nonzero.size else (0.0, 1.0))
    top, case_max = colour_scale(amap, vmax)
    swap, _, _, marked = display_transform(orientation)
    rows_cols = square_pixels((image.shape[1], image.shape[0]) if swap else image.shape[:2],
                              None if voxel_mm is None else ((voxel_mm[1], voxel_mm[0]) if swap else voxel_mm[:2]))
    side = min(len(rows_cols[0]), len(rows_cols[1]))
    parts = []
    for s in pick_slices(label, slice_scores, k):
        def show(a):  # anterior up, patient right on the right; square millimetres
            return np.ascontiguousarray(show_slice(a[:, :, s], orientation)[np.ix_(*rows_cols)])
        values = scaled(show(amap), top)
        row = _row(_grey(show(image), float(lo), float(hi)), values, show(label),
                   None if called is None else show(called), side)
        where = name(s) if name is not None else f"slice {s}"
        parts += [text_band([f"{where}: {int(label[:, :, s].sum())} label px, score {slice_scores[s]:.4g}"],
                            row.shape[1], 2), mark_sides(row, 2) if marked else row]
    return np.concatenate([*_head(parts[1].shape[1], top, threshold, given, case,
                                  None if vmax is None else case_max), *parts], axis=0)


def square_pixels(shape: tuple[int, int], pixel_mm: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices that show a ``shape`` slice of ``pixel_mm`` (rows, columns) pixels with square
    pixels of the smaller size (nearest neighbour, so outlines stay crisp): 1 x 2 mm voxels are drawn twice
    as wide, not squashed. None or equal sizes: every index once."""
    if pixel_mm is None or not all(np.isfinite(pixel_mm)) or min(pixel_mm) <= 0 or pixel_mm[0] == pixel_mm[1]:
        return np.arange(shape[0]), np.arange(shape[1])
    unit = min(pixel_mm)
    out = []
    for n, mm in zip(shape, pixel_mm):
        m = max(1, int(round(n * mm / unit)))
        out.append(np.minimum(((np.arange(m) + 0.5) * n / m).astype(np.int64), n - 1))
    return out[0], out[1]


def image_figure(rgb01: np.ndarray, amap: np.ndarray, label: np.ndarray, called: np.ndarray | None = None,
                 threshold: float | None = None, given: bool = False, case: str | None = None,
                 vmax: float | None = None) -> np.ndarray:
    """uint8 (head + H', 2 * W', 3) for a photograph (``rgb01`` (H, W, 3) in [0, 1]), under the head
    ``volume_figure`` draws; no side markers (a photograph has no patient left and right)."""
    top, case_max = colour_scale(amap, vmax)
    row = _row(_grey(rgb01, 0.0, 1.0), scaled(amap, top), label, called, min(amap.shape))
    return np.concatenate([*_head(row.shape[1], top, threshold, given, case, None if vmax is None else case_max), row],
                          axis=0)


__all__ = ["ROWS", "MIN_PANEL", "OUTLINE", "CALLED", "EDGE", "outline", "outer_outline", "dashes", "legend",
           "pick_slices", "volume_figure", "image_figure"]
