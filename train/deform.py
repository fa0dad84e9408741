"""Tasks 2 and 3: sink and source deformations (reference-method §5, "Bend" variants).

Inside the anomaly, every pixel p (except those on the patch's outer border and the centre c itself)
samples the patch at c + r'·u, with r = |p − c|, u = (p − c)/r, R the distance from c to the shape's edge
along u, and

    source (task 3):  r' = r^k / R^(k−1)              (r' ≤ r: content is pushed away from c)
    sink   (task 2):  r' = R − (R − r)^k / R^(k−1)    (r' ≥ r: content is pulled towards c)

The exponent k > 1 is chosen so the curve passes a point displaced by the push distance δ from the
diagonal at its midpoint. Sampling is a cubic spline over the patch (mode "nearest").

numpy only at import; scipy is imported inside the functions that use it.
"""
from __future__ import annotations

import numpy as np

from condiff.train.shapes import AnomalyShape

SINK = "sink"
SOURCE = "source"
MIN_PUSH_DIST = 0.5  # task kwargs min_push_dist / max_push_dist, in pixels
MAX_PUSH_DIST = 5.0


def mean_edge_distance(centre: np.ndarray, mask: np.ndarray) -> float:
    """A: mean distance from ``centre`` (2,) to the mask's inner edge (mask XOR its binary erosion)."""
    from scipy.ndimage import binary_erosion

    edge = np.argwhere(mask ^ binary_erosion(mask))
    return float(np.mean(np.linalg.norm(edge - np.asarray(centre)[None], axis=1)))


def push_distance(mean_edge: float, rng: np.random.Generator,
                  min_push: float = MIN_PUSH_DIST, max_push: float = MAX_PUSH_DIST) -> float:
    """δ ~ U(max(0.1·m, min_push), min(0.9·m, max_push)) with m = A/√2, falling back to 0.9·m or 0.1·m."""
    m = np.sqrt(mean_edge ** 2 / 2)
    lo, hi = 0.1 * m, 0.9 * m
    if min_push >= hi:
        return hi
    if max_push <= lo:
        return lo
    return rng.uniform(max(lo, min_push), min(hi, max_push))


def bend_exponent(kind: str, mean_edge: float, push: float) -> float:
    """k such that the (normalised) radial curve passes (x*, y*), δ/√2 off the diagonal's midpoint."""
    a, off = mean_edge, np.sqrt(push ** 2 / 2)
    if kind == SOURCE:
        x, y = a / 2 + off, a / 2 - off
        return float(np.log(y / a) / np.log(x / a))
    if kind == SINK:
        x, y = a / 2 - off, a / 2 + off
        return float(np.log(1 - y / a) / np.log(1 - x / a))
    raise ValueError(f"unknown deformation kind {kind!r}; expected {SINK!r} or {SOURCE!r}")


def new_radius(kind: str, r: np.ndarray, edge: np.ndarray, k: float) -> np.ndarray:
    """r' for radii ``r`` with edge distances ``edge`` (same shape), r ≤ edge."""
    r = np.minimum(r, edge)  # convexity gives r ≤ R; clamp rounding so the powers stay real
    safe_edge = np.where(edge > 0, edge, 1.0)  # R = 0 only when r = 0, and then r' = 0 either way
    if kind == SOURCE:
        return r ** k / safe_edge ** (k - 1)
    return edge - (edge - r) ** k / safe_edge ** (k - 1)


def deformation_targets(shape: AnomalyShape, centre: np.ndarray, k: float,
                        kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Pixels that move and where they sample from: (pixels (N, 2) int, coordinates (2, N) float).

    Moving pixels are the mask's pixels off the patch border, except ``centre``; every other pixel maps
    to itself, so it is left out.
    """
    inner = np.zeros_like(shape.mask)
    inner[1:-1, 1:-1] = shape.mask[1:-1, 1:-1]
    inner[tuple(centre)] = False
    pixels = np.argwhere(inner)
    offsets = (pixels - centre[None]).T.astype(np.float64)  # (2, N)
    r = np.linalg.norm(offsets, axis=0)
    u = offsets / r
    edge = shape.edge_distance(centre, u)
    coords = centre[:, None] + new_radius(kind, r, edge, k)[None] * u
    return pixels, coords


def deform_anomaly(image: np.ndarray, corner: np.ndarray, shape: AnomalyShape, rng: np.random.Generator,
                   kind: str, min_push: float = MIN_PUSH_DIST, max_push: float = MAX_PUSH_DIST,
                   centre: np.ndarray | None = None) -> np.ndarray:
    """Apply one sink or source deformation to ``image`` (C, H, W) in the patch box at ``corner`` (2,).

    The centre c (patch index) is a uniformly random mask pixel unless ``centre`` fixes it. Returns a new
    image of the same dtype; only the mask's inner pixels can change. No clip here (the anomaly loop's
    clip follows).
    """
    from scipy.ndimage import map_coordinates

    if centre is None:
        mask_pixels = np.argwhere(shape.mask)
        centre = mask_pixels[rng.integers(len(mask_pixels))]
    centre = np.asarray(centre, dtype=int)
    if not shape.mask[tuple(centre)]:
        raise ValueError(f"deformation centre {tuple(centre)} is not inside the anomaly mask")
    a = mean_edge_distance(centre, shape.mask)
    out = image.copy()
    if a <= 0:  # a one-pixel shape: nothing to bend
        return out
    k = bend_exponent(kind, a, push_distance(a, rng, min_push, max_push))
    pixels, coords = deformation_targets(shape, centre, k, kind)
    if len(pixels) == 0:
        return out

    h, w = shape.mask.shape
    rows, cols = corner[0] + pixels[:, 0], corner[1] + pixels[:, 1]
    for c in range(image.shape[0]):
        patch = np.asarray(image[c, corner[0]:corner[0] + h, corner[1]:corner[1] + w], dtype=np.float64)
        # The spline is fitted to the whole patch (as the reference's map_coordinates over the patch);
        # evaluating only the moving pixels gives the same values there.
        out[c, rows, cols] = map_coordinates(patch, coords, order=3, mode="nearest")
    return out
