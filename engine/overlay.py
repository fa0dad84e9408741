"""The overlay PNG: a case's highest-scoring slices as rows of model input | restoration | map | map on
input, under a header band naming the case, a colour bar band and a band of column titles, and above
each row its slice and score.

Drawn in model slice space (every case the same size), with numpy only and written through
``condiff.io.images.png_bytes`` (fixed settings, no metadata), so identical arrays give
identical bytes. MRI slices are shown anterior up (the canonical slice transposed and flipped) in the
neurological convention, patient right on image right, and every MRI panel says so with an "L" at its
left edge and an "R" at its right edge. The map uses a black-red-yellow ramp (``ramp``: it stops at
yellow, short of white, so it stays visible on bright tissue) scaled to the case's largest map value,
and the colour bar says so: colours are per case, never to be compared across cases; or, with a fixed
scale (``vmax``: ``condiff-infer --overlay-max``), the same colour means the same map value in every
case, values above it saturate, and the bar says that and gives the case's own maximum. The last
panel lays that ramp over the input, transparent below ``OVERLAY_FROM`` of the case's largest
value and rising to ``OVERLAY_OPACITY`` at ``OVERLAY_FULL``, the grey under it dimmed by up to
``OVERLAY_DIM`` as the colour rises, so the brain stays readable where nothing is coloured and the
strongest responses stand out where they sit in the anatomy. Panels of
low-resolution models (32 or 64 px) are enlarged by pixel replication to at least ``MIN_PANEL``
pixels, so the image stays readable and every model pixel is still shown as it is.
"""
from __future__ import annotations

import math

import numpy as np

from condiff.io.images import png_bytes, to_png8
from condiff.preprocess import input_slice

N_ROWS = 3
MIN_PANEL = 128  # pixels; smaller panels are repeated by an integer factor
OVERLAY_FROM, OVERLAY_FULL, OVERLAY_OPACITY = 0.2, 0.8, 0.85  # shares of the case's largest map value; opacity
OVERLAY_DIM = 0.5  # the grey under the colour is dimmed by up to this share (at OVERLAY_FULL and above)
RAMP = ((0.0, (0, 0, 0)), (0.5, (255, 0, 0)), (1.0, (255, 215, 0)))  # (value, RGB) anchors: black, red, golden yellow
LABEL_BAND = 16  # pixels: the text bands above the panels
LABEL_FONT_PX = 12
SIDE_FONT_PX = 10  # the "L" / "R" side markers
BAR_BAND = 62  # pixels: the colour bar band (text line, "map" strip, "on input" strip, ticks, tick labels)
BAR_ROWS = ((18, 29), (31, 42))  # the band's rows of the "map" and "on input" strips
BAR_LEFT, BAR_RIGHT = 62, 26  # pixels: room left of the bar (strip names) and right of it (the last value)
BAR_GREY = 180  # the grey under the colour bar's "on input" strip (bright tissue)
BAR_TEXT = "colours scaled to this case's maximum: do not compare colours across cases"
BAR_TEXT_FIXED = "fixed colour scale, comparable across cases; case max {case_max:.3g}{above}"


def colour_scale(maps: np.ndarray, fixed: float | None = None) -> tuple[float, float]:
    """(the top of the colour scale, the case's largest map value): the case's own maximum, or ``fixed``
    (a positive map value, the same for every case) when given."""
    case_max = float(np.max(maps)) if np.size(maps) else 0.0
    if fixed is not None and not (math.isfinite(fixed) and fixed > 0):
        raise ValueError(f"a fixed colour scale must be a positive map value, not {fixed!r}")
    return (case_max if fixed is None else float(fixed)), case_max


def scaled(values: np.ndarray, vmax: float) -> np.ndarray:
    """Map values as shares of the colour scale's top ``vmax``, clipped to [0, 1] (above it: saturated)."""
    values = np.asarray(values, dtype=np.float64)
    return np.clip(values / vmax, 0.0, 1.0) if vmax > 0 else np.zeros(values.shape)


def top_slices(scores: np.ndarray, k: int = N_ROWS) -> np.ndarray:
    """Indices of the ``k`` highest scores, highest first; ties keep slice order."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    return order[:k]


def ramp(values01: np.ndarray) -> np.ndarray:
    """(...) in [0, 1] -> (..., 3) uint8 on the ``RAMP`` anchors: black -> red -> golden yellow (never white)."""
    v = np.clip(np.asarray(values01, dtype=np.float64), 0.0, 1.0)
    at = [a for a, _ in RAMP]
    rgb = np.stack([np.interp(v, at, [c[j] for _, c in RAMP]) for j in range(3)], axis=-1)
    return np.round(rgb).astype(np.uint8)


def _grey(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(C, H, W) -> (H, W, 3) uint8; one channel is repeated."""
    u8 = to_png8(np.asarray(img), lo, hi)
    u8 = np.moveaxis(u8, 0, -1)
    return np.repeat(u8, 3, axis=-1) if u8.shape[-1] == 1 else u8


def map_on(grey: np.ndarray, values01: np.ndarray) -> np.ndarray:
    """``ramp`` over a grey (H, W, 3) uint8 panel: opacity and the dimming of the grey rise together from
    0 at ``OVERLAY_FROM`` to ``OVERLAY_OPACITY`` and ``OVERLAY_DIM`` at ``OVERLAY_FULL``; the grey as it
    is below ``OVERLAY_FROM``."""
    v = np.clip(np.asarray(values01, dtype=np.float64), 0.0, 1.0)
    weight = np.clip((v - OVERLAY_FROM) / (OVERLAY_FULL - OVERLAY_FROM), 0.0, 1.0)[..., None]
    alpha = OVERLAY_OPACITY * weight
    base = np.asarray(grey, dtype=np.float64) * (1.0 - OVERLAY_DIM * weight)
    return np.round(base * (1.0 - alpha) + ramp(v) * alpha).astype(np.uint8)


def display_transform(orientation: str = "RAS") -> tuple[bool, bool, bool, bool]:
    """How a slice of a model contract in ``orientation`` (rows along its first axis code, columns along
    its second) is shown: (swap axes, flip rows, flip columns, L/R marked). Axial slices (third code S
    or I): anterior up, patient right on image right (neurological); coronal: superior up, right on the
    right; sagittal: superior up, anterior left. L/R markers only where the columns run left-right."""
    code = str(orientation).upper()
    plane = code[:2]
    vertical = next(c for c in plane if c in ("AP" if code[2] in "SI" else "SI"))
    horizontal = plane[1 - plane.index(vertical)]
    return plane.index(vertical) == 1, vertical in "AS", horizontal in "LA", horizontal in "LR"


def show_slice(a: np.ndarray, orientation: str = "RAS") -> np.ndarray:
    """``a`` ``(H, W[, C])``, a slice of the contract's grid, as ``display_transform`` shows it."""
    swap, flip_rows, flip_cols, _ = display_transform(orientation)
    a = np.swapaxes(a, 0, 1) if swap else a
    a = a[::-1] if flip_rows else a
    return np.ascontiguousarray(a[:, ::-1] if flip_cols else a)


def overlay_image(slices: np.ndarray, restorations: np.ndarray, maps: np.ndarray, scores: np.ndarray,
                  kind: str = "volume", k: int = N_ROWS, vmax: float | None = None,
                  orientation: str = "RAS") -> np.ndarray:
    """uint8 ``(rows * f·H, 4 * f·W, 3)`` for the top ``k`` slices; f = ceil(MIN_PANEL / min(H, W)) or 1.

    ``slices``, ``restorations``: ``(S, C, H, W)`` in the model's range ([0, 1] for MRI volumes,
    [-1, 1] for RGB images); ``maps``: ``(S, H, W)``; ``scores``: ``(S,)``; ``vmax``: a fixed top of
    the colour scale (``colour_scale``), else the case's largest map value; ``orientation``: the model
    contract's (``display_transform``).
    """
    lo, hi = (0.0, 1.0) if kind == "volume" else (-1.0, 1.0)
    vmax, _ = colour_scale(maps, vmax)
    rows = []
    for i in top_slices(scores, k):
        values = scaled(maps[i], vmax)
        grey = _grey(slices[i], lo, hi)
        panels = [grey, _grey(restorations[i], lo, hi), ramp(values), map_on(grey, values)]
        if kind == "volume":  # a contract slice: anterior up, patient right on the right (display_transform)
            panels = [show_slice(p, orientation) for p in panels]
        rows.append(np.concatenate(panels, axis=1))
    return enlarge(np.concatenate(rows, axis=0), min(maps.shape[-2:]))


def enlarge(image: np.ndarray, side: int, min_panel: int | None = None) -> np.ndarray:
    """Repeat every pixel f = ceil(min_panel / side) times per axis (f >= 1; ``min_panel`` default
    ``MIN_PANEL``), so panels of ``side`` pixels become at least ``min_panel`` wide and every pixel is
    still shown as it is."""
    factor = max(1, -(-(MIN_PANEL if min_panel is None else min_panel) // side))
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1) if factor > 1 else image


def _font(size: int = LABEL_FONT_PX):
    """PIL's built-in font: fixed for a given Pillow install."""
    from PIL import ImageFont

    try:  # Pillow >= 10.1 with FreeType: its embedded font at a readable size
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError):  # older Pillow: the built-in bitmap font
        return ImageFont.load_default()


def text_band(texts: list[str], width: int, n_panels: int) -> np.ndarray:
    """A black (LABEL_BAND, width, 3) strip with ``texts`` in white: one text per panel, centred, or one
    text at the left when only one is given."""
    from PIL import Image, ImageDraw

    band = Image.new("RGB", (width, LABEL_BAND))
    draw = ImageDraw.Draw(band)
    font = _font()
    panel = width // n_panels
    for j, text in enumerate(texts):
        left, _, right, _ = draw.textbbox((0, 0), text, font=font)
        x = 3 if len(texts) == 1 else j * panel + max(0, (panel - (right - left)) // 2)
        draw.text((x, 2), text, fill=(255, 255, 255), font=font)
    return np.asarray(band, dtype=np.uint8)


def bar_span(width: int) -> tuple[int, int]:
    """The colour bar's first column and its length in a band ``width`` wide."""
    x0 = min(BAR_LEFT, width // 3)
    return x0, max(2, width - BAR_RIGHT - x0)


def colour_bar(width: int, vmax: float, mark: float | None = None, case_max: float | None = None) -> np.ndarray:
    """A black (BAR_BAND, width, 3) band: ``BAR_TEXT`` (as ``text_band`` draws it; with ``case_max``, the
    case's largest value on a fixed scale topped by ``vmax``: ``BAR_TEXT_FIXED``), then the ramp as two
    horizontal strips (rows ``BAR_ROWS``) from 0 (left) to ``vmax`` (right): "map" (``ramp``, as the map panel colours) and "on
    input" (``map_on`` over a ``BAR_GREY`` grey, as the map-on-input panel does), white ticks and values
    at 0, where colour starts to show on the input (``OVERLAY_FROM`` x ``vmax``) and ``vmax``; ``mark``
    (a map value in [0, vmax], e.g. a threshold): a magenta tick there. On a fixed scale that the case
    exceeds, the top value reads "X+" (its colour stands for X and above)."""
    from PIL import Image, ImageDraw

    x0, n = bar_span(width)
    v = np.linspace(0.0, 1.0, n)
    (m0, m1), (g0, g1) = BAR_ROWS
    band = np.zeros((BAR_BAND, width, 3), dtype=np.uint8)
    above = case_max is not None and case_max > vmax
    text = BAR_TEXT if case_max is None else BAR_TEXT_FIXED.format(
        case_max=case_max, above=" (saturated)" if above else "")
    band[:LABEL_BAND] = text_band([text], width, 1)
    band[m0:m1, x0:x0 + n] = ramp(v)[None]
    band[g0:g1, x0:x0 + n] = map_on(np.full((1, n, 3), BAR_GREY, dtype=np.uint8), v[None])
    ticks = [(0.0, "0"), (OVERLAY_FROM, f"{OVERLAY_FROM * vmax:.3g}"), (1.0, f"{vmax:.3g}{'+' if above else ''}")]
    for share, _ in ticks:
        band[g1:g1 + 4, x0 + int(round(share * (n - 1)))] = 255
    if mark is not None and vmax > 0 and 0.0 <= mark <= vmax:
        x = x0 + int(round(mark / vmax * (n - 1)))
        band[g1:g1 + 5, max(x0, x - 1):x + 1] = (255, 0, 255)
    image = Image.fromarray(band)
    draw, font = ImageDraw.Draw(image), _font()
    _, t, _, b = draw.textbbox((0, 0), "on input", font=font)  # one text height for both strip names
    for (top, bottom), name in zip(BAR_ROWS, ("map", "on input")):
        draw.text((3, (top + bottom - (b - t)) // 2 - t + 1), name, fill=(255, 255, 255), font=font)
    for share, text in ticks:
        left, _, right, _ = draw.textbbox((0, 0), text, font=font)
        x = x0 + int(round(share * (n - 1))) - (right - left) // 2
        draw.text((min(max(0, x), width - (right - left) - 1), g1 + 3), text, fill=(255, 255, 255), font=font)
    return np.asarray(image, dtype=np.uint8)


def side_letter(letter: str) -> np.ndarray:
    """A side marker: ``letter`` in white on a small black box, (h, w, 3) uint8."""
    from PIL import Image, ImageDraw

    font = _font(SIDE_FONT_PX)
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), letter, font=font)
    box = Image.new("RGB", (right - left + 4, bottom - top + 4))
    ImageDraw.Draw(box).text((2 - left, 2 - top), letter, fill=(255, 255, 255), font=font)
    return np.asarray(box, dtype=np.uint8)


def mark_sides(strip: np.ndarray, n_panels: int) -> np.ndarray:
    """A copy of a row of ``n_panels`` MRI panels with "L" at each panel's left edge and "R" at its right
    edge, half way down (neurological convention: patient right on image right)."""
    out = strip.copy()
    panel = strip.shape[1] // n_panels
    marks = {letter: side_letter(letter) for letter in "LR"}
    if any(m.shape[0] > strip.shape[0] or 2 * (m.shape[1] + 1) > panel for m in marks.values()):
        return out  # panels too small to carry them
    for j in range(n_panels):
        for letter, mark in marks.items():
            h, w = mark.shape[:2]
            y = (strip.shape[0] - h) // 2
            x = (j + 1) * panel - w - 1 if letter == "R" else j * panel + 1
            out[y:y + h, x:x + w] = mark
    return out


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


def case_band(case: str, width: int) -> np.ndarray:
    """The header band naming the case."""
    return text_band([f"case {case}"], width, 1)


def labelled_overlay(slices, restorations, maps, scores, kind: str = "volume", k: int = N_ROWS,
                     row_names: list[str] | None = None, case: str | None = None,
                     vmax: float | None = None, orientation: str = "RAS") -> np.ndarray:
    """``overlay_image`` under a header band naming ``case`` (when given), the ``colour_bar`` and a title
    band (what each panel is: the first, the model input at the model's image size), and above each row
    a band naming its slice (``row_names[i]``, else its position in ``slices``) and score. The panels
    are ``overlay_image``'s, pixel for pixel, except the side markers of MRI panels (``mark_sides``).
    ``vmax``: a fixed top of the colour scale (the bar then says so and gives the case's maximum)."""
    grid = overlay_image(slices, restorations, maps, scores, kind=kind, k=k, vmax=vmax, orientation=orientation)
    marked = kind == "volume" and display_transform(orientation)[3]
    order = top_slices(scores, k)
    width, rows = grid.shape[1], len(order)
    row_h = grid.shape[0] // max(rows, 1)
    top, case_max = colour_scale(maps, vmax)
    h, w = np.shape(slices)[-2:]
    size = f"{w} px" if h == w else f"{w}x{h} px"
    titles = [f"model input ({size})", "restoration", "map", "map on input"]
    parts = [case_band(case, width)] if case is not None else []
    parts += [colour_bar(width, top, case_max=None if vmax is None else case_max), text_band(titles, width, 4)]
    for r, i in enumerate(order):
        where = row_names[i] if row_names is not None else f"{'slice' if kind == 'volume' else 'image'} {int(i)}"
        parts.append(text_band([f"{where}   score {float(scores[i]):.4g}   (rank {r + 1})"], width, 4))
        row = grid[r * row_h:(r + 1) * row_h]
        parts.append(mark_sides(row, 4) if marked else row)
    return np.concatenate(parts, axis=0)


def overlay_png(slices, restorations, maps, scores, kind: str = "volume", k: int = N_ROWS,
                row_names: list[str] | None = None, case: str | None = None, vmax: float | None = None,
                orientation: str = "RAS") -> bytes:
    """PNG bytes of ``labelled_overlay``."""
    return png_bytes(labelled_overlay(slices, restorations, maps, scores, kind=kind, k=k, row_names=row_names,
                                      case=case, vmax=vmax, orientation=orientation))


__all__ = ["display_transform", "show_slice", "overlay_image", "labelled_overlay", "slice_name", "input_slice_names", "text_band", "overlay_png",
           "top_slices", "map_on", "ramp", "enlarge", "colour_bar", "bar_span", "mark_sides", "side_letter",
           "case_band", "colour_scale", "scaled"]
