"""The overlay PNG: a case's highest-scoring slices as rows of input | restoration | map | map on input,
under a band of column titles (with the map's colour scale) and, above each row, its slice and score.

Drawn in model slice space (every case the same size), with numpy only and written through
``condiff.io.images.png_bytes`` (fixed settings, no metadata), so identical arrays give
identical bytes. MRI slices are shown anterior up (the canonical slice transposed and flipped);
the map uses a black-red-yellow-white ramp scaled to the case's largest map value. The last
panel lays that ramp over the input, transparent below ``OVERLAY_FROM`` of the case's largest
value and rising to ``OVERLAY_OPACITY`` at ``OVERLAY_FULL``, so the brain stays readable and the
strongest responses show where they sit in the anatomy. Panels of
low-resolution models (32 or 64 px) are enlarged by pixel replication to at least ``MIN_PANEL``
pixels, so the image stays readable and every model pixel is still shown as it is.
"""
from __future__ import annotations

import numpy as np

from condiff.io.images import png_bytes, to_png8
from condiff.preprocess import input_slice

N_ROWS = 3
MIN_PANEL = 128  # pixels; smaller panels are repeated by an integer factor
OVERLAY_FROM, OVERLAY_FULL, OVERLAY_OPACITY = 0.2, 0.8, 0.85  # shares of the case's largest map value; opacity
LABEL_BAND = 16  # pixels: the text bands above the panels
LABEL_FONT_PX = 12


def top_slices(scores: np.ndarray, k: int = N_ROWS) -> np.ndarray:
    """Indices of the ``k`` highest scores, highest first; ties keep slice order."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    return order[:k]


def _hot(values01: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 black -> red -> yellow -> white."""
    v = np.clip(np.asarray(values01, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return np.round(rgb * 255.0).astype(np.uint8)


def _grey(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(C, H, W) -> (H, W, 3) uint8; one channel is repeated."""
    u8 = to_png8(np.asarray(img), lo, hi)
    u8 = np.moveaxis(u8, 0, -1)
    return np.repeat(u8, 3, axis=-1) if u8.shape[-1] == 1 else u8


def map_on(grey: np.ndarray, values01: np.ndarray) -> np.ndarray:
    """The hot ramp over a grey (H, W, 3) uint8 panel, opacity rising with the map value."""
    v = np.clip(np.asarray(values01, dtype=np.float64), 0.0, 1.0)
    alpha = OVERLAY_OPACITY * np.clip((v - OVERLAY_FROM) / (OVERLAY_FULL - OVERLAY_FROM), 0.0, 1.0)[..., None]
    return np.round(grey * (1.0 - alpha) + _hot(v) * alpha).astype(np.uint8)


def overlay_image(slices: np.ndarray, restorations: np.ndarray, maps: np.ndarray, scores: np.ndarray,
                  kind: str = "volume", k: int = N_ROWS) -> np.ndarray:
    """uint8 ``(rows * f·H, 4 * f·W, 3)`` for the top ``k`` slices; f = ceil(MIN_PANEL / min(H, W)) or 1.

    ``slices``, ``restorations``: ``(S, C, H, W)`` in the model's range ([0, 1] for MRI volumes,
    [-1, 1] for RGB images); ``maps``: ``(S, H, W)``; ``scores``: ``(S,)``.
    """
    lo, hi = (0.0, 1.0) if kind == "volume" else (-1.0, 1.0)
    vmax = float(np.max(maps)) if maps.size else 0.0
    rows = []
    for i in top_slices(scores, k):
        values = maps[i] / vmax if vmax > 0 else np.zeros(maps[i].shape)
        grey = _grey(slices[i], lo, hi)
        panels = [grey, _grey(restorations[i], lo, hi), _hot(values), map_on(grey, values)]
        if kind == "volume":  # canonical (R->, A->) slice: show anterior up, patient right on the right
            panels = [np.ascontiguousarray(np.swapaxes(p, 0, 1)[::-1]) for p in panels]
        rows.append(np.concatenate(panels, axis=1))
    return enlarge(np.concatenate(rows, axis=0), min(maps.shape[-2:]))


def enlarge(image: np.ndarray, side: int) -> np.ndarray:
    """Repeat every pixel f = ceil(MIN_PANEL / side) times per axis (f >= 1), so panels of ``side``
    pixels become at least ``MIN_PANEL`` wide and every model pixel is still shown as it is."""
    factor = max(1, -(-MIN_PANEL // side))
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1) if factor > 1 else image


def text_band(texts: list[str], width: int, n_panels: int) -> np.ndarray:
    """A black (LABEL_BAND, width, 3) strip with ``texts`` in white: one text per panel, centred, or one
    text at the left when only one is given. PIL's built-in font: fixed for a given Pillow install."""
    from PIL import Image, ImageDraw, ImageFont

    band = Image.new("RGB", (width, LABEL_BAND))
    draw = ImageDraw.Draw(band)
    try:  # Pillow >= 10.1 with FreeType: its embedded font at a readable size
        font = ImageFont.load_default(size=LABEL_FONT_PX)
    except (TypeError, ImportError):  # older Pillow: the built-in bitmap font
        font = ImageFont.load_default()
    panel = width // n_panels
    for j, text in enumerate(texts):
        left, _, right, _ = draw.textbbox((0, 0), text, font=font)
        x = 3 if len(texts) == 1 else j * panel + max(0, (panel - (right - left)) // 2)
        draw.text((x, 2), text, fill=(255, 255, 255), font=font)
    return np.asarray(band, dtype=np.uint8)


def slice_name(geometry: dict, k: int) -> str:
    """Canonical axial slice ``k`` as the input file numbers it, e.g. ``slice 52 of axis 1``, so a viewer
    finds it (the model slices along the canonical inferior-superior axis, which may be any stored
    axis, reversed or not)."""
    axis, index = input_slice(geometry, k)
    return f"slice {index} of axis {axis}"


def input_slice_names(geometry: dict) -> list[str] | None:
    """``slice_name`` of every model slice of a volume; None for photographs."""
    if geometry.get("kind") != "volume":
        return None
    return [slice_name(geometry, k) for k in geometry["slice_index"]]


def labelled_overlay(slices, restorations, maps, scores, kind: str = "volume", k: int = N_ROWS,
                     row_names: list[str] | None = None) -> np.ndarray:
    """``overlay_image`` with a title band (what each panel is, the map's colour scale) and above each row
    a band naming its slice (``row_names[i]``, else its position in ``slices``) and score. The panels
    themselves are ``overlay_image``'s, pixel for pixel."""
    grid = overlay_image(slices, restorations, maps, scores, kind=kind, k=k)
    order = top_slices(scores, k)
    width, rows = grid.shape[1], len(order)
    row_h = grid.shape[0] // max(rows, 1)
    vmax = float(np.max(maps)) if maps.size else 0.0
    titles = ["input", "restoration", f"map, 0 to {vmax:.3g}", "map on input"]
    parts = [text_band(titles, width, 4)]
    for r, i in enumerate(order):
        where = row_names[i] if row_names is not None else f"{'slice' if kind == 'volume' else 'image'} {int(i)}"
        parts.append(text_band([f"{where}   score {float(scores[i]):.4g}   (rank {r + 1})"], width, 4))
        parts.append(grid[r * row_h:(r + 1) * row_h])
    return np.concatenate(parts, axis=0)


def overlay_png(slices, restorations, maps, scores, kind: str = "volume", k: int = N_ROWS,
                row_names: list[str] | None = None) -> bytes:
    """PNG bytes of ``labelled_overlay``."""
    return png_bytes(labelled_overlay(slices, restorations, maps, scores, kind=kind, k=k, row_names=row_names))


__all__ = ["overlay_image", "labelled_overlay", "slice_name", "input_slice_names", "text_band", "overlay_png", "top_slices", "map_on", "enlarge"]
