"""Anomaly shapes and their placement (reference-method §5.0 items 2–5).

A shape is an axis-aligned rectangle or ellipse with integer side lengths ``sides`` = (d_0, d_1), mapped by
the linear map ``A = R(θ)·S`` (shear S, rotation R) and rasterised on the integer grid that bounds the
mapped corners. Coordinates are (row, col) throughout; the grid centre is the shape's centre, at patch
index ``(h - 1) / 2`` per axis (the corners are symmetric about 0, so the grid is too).

Placement puts the patch's top-left corner inside the image; with a foreground mask F it prefers corners
where the shape overlaps F (threshold τ, halved for every 1000 rejected attempts).

numpy only at import; scikit-image is imported inside ``foreground_regions``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from condiff.errors import TrainingDataError

MIN_ANOM_PROP = 0.06  # lb = ceil(0.06 · s)
MAX_ANOM_PROP = 0.8  # ub = max(ceil(0.8 · s), lb + 1)
GAMMA_OFFSET, GAMMA_SHAPE, GAMMA_SCALE = 0.03, 2.0, 0.1  # side = (0.03 + Gamma(2, 0.1)) · image side
SHEAR_STD = 0.2
OVERLAP_START = 0.25  # τ for attempts 0–999, halved for each further block
ATTEMPTS_PER_BLOCK = 1000
MAX_ATTEMPTS = 5000
MIN_VISIBLE_PROP = MIN_ANOM_PROP / 3  # area ≥ |F|·0.02² (or (0.02·H)·(0.02·W) without F)

RECTANGLE = "rectangle"
ELLIPSE = "ellipse"


@dataclass(frozen=True)
class Region:
    """Bounding box of one connected component of the foreground: rows/cols ``start`` (incl.) to ``stop`` (excl.)."""

    start: np.ndarray  # (2,) int
    stop: np.ndarray  # (2,) int

    @property
    def bbox_area(self) -> int:
        return int(np.prod(self.stop - self.start))


def foreground_regions(fg_mask: np.ndarray) -> list[Region]:
    """Bounding boxes of the connected components of ``fg_mask`` (H, W) bool, full (8-) connectivity."""
    from skimage import measure

    props = measure.regionprops(measure.label(fg_mask))  # label's default connectivity is full
    return [Region(np.array(p.bbox[:2]), np.array(p.bbox[2:])) for p in props]


def size_bounds(image_hw: tuple[int, int], regions: list[Region] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis side bounds (lb, ub), each (2,) int.

    The reference size s is the image size without a mask, else the sides of the component bounding box
    with the largest area (first one on ties, as Python's ``max``).
    """
    if regions is None:
        s = np.asarray(image_hw)
    else:
        biggest = max(regions, key=lambda r: r.bbox_area)
        s = biggest.stop - biggest.start
    lb = np.ceil(MIN_ANOM_PROP * s).astype(int)
    ub = np.maximum(np.ceil(MAX_ANOM_PROP * s).astype(int), lb + 1)
    return lb, ub


def sample_side_lengths(lb: np.ndarray, ub: np.ndarray, image_hw: tuple[int, int],
                        rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Side lengths d (2,) int: int(clip(scale · (0.03 + Gamma(2, 0.1)) · image side, lb, ub)), one side ≥ 2.

    ``scale`` (1 in the reference) stretches the draw before the clip, for a size curriculum
    (``train/curriculum.py``); it consumes the same random numbers whatever its value.
    """
    g = rng.gamma(GAMMA_SHAPE, GAMMA_SCALE, size=2)
    # The image size, not the foreground size s, scales the draw (reference quirk, kept).
    d = np.clip(scale * (GAMMA_OFFSET + g) * np.asarray(image_hw), lb, ub).astype(int)  # astype truncates like int()
    d[d < 1] = 1
    if np.all(d == 1):
        d[rng.integers(2)] = 2
    return d


@dataclass(frozen=True)
class AnomalyShape:
    """A rasterised anomaly: ``mask`` (h, w) bool on the grid bounding ``matrix`` applied to the aligned shape."""

    kind: str  # RECTANGLE or ELLIPSE
    sides: np.ndarray  # (2,) int, aligned side lengths d
    matrix: np.ndarray  # (2, 2) A, aligned coordinates -> patch coordinates relative to the centre
    mask: np.ndarray  # (h, w) bool

    @property
    def centre(self) -> np.ndarray:
        """Patch index of the shape's centre, (2,) float."""
        return (np.array(self.mask.shape) - 1) / 2

    def edge_distance(self, origin: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """Distance from ``origin`` (2,) patch index, inside the shape, to its edge along each unit vector.

        ``directions`` is (2, N); returns (N,). Solved analytically in the aligned frame (ray against the
        rectangle's slabs or the ellipse's quadratic), as the reference's intersection functions do.
        """
        inv = np.linalg.inv(self.matrix)
        q0 = inv @ (np.asarray(origin, float) - self.centre)  # (2,)
        dq = inv @ directions  # (2, N)
        dq = dq / np.linalg.norm(dq, axis=0)
        half = self.sides / 2
        if self.kind == RECTANGLE:
            t = _ray_to_rectangle(q0, dq, half)
        else:
            t = _ray_to_ellipse(q0, dq, half)
        # Back in patch coordinates the edge point is A·(q0 + t·dq); its distance from A·q0 is t·|A·dq|.
        return t * np.linalg.norm(self.matrix @ dq, axis=0)


def _ray_to_rectangle(q0: np.ndarray, dq: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Smallest t ≥ 0 with q0 + t·dq on the boundary of the box |q_i| ≤ half_i; dq (2, N)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.concatenate([(half[:, None] - q0[:, None]) / dq, (-half[:, None] - q0[:, None]) / dq])
    t[~np.isfinite(t) | (t < 0)] = np.inf  # a slab parallel to the ray, or behind the origin
    return t.min(axis=0)


def _ray_to_ellipse(q0: np.ndarray, dq: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Smallest t ≥ 0 with q0 + t·dq on the ellipse Σ q_i² / half_i² = 1; dq (2, N)."""
    r2 = (half ** 2)[:, None]
    a = np.sum(dq ** 2 / r2, axis=0)
    b = np.sum(2 * q0[:, None] * dq / r2, axis=0)
    c = np.sum(q0[:, None] ** 2 / r2, axis=0) - 1
    root = np.sqrt(np.maximum(b * b - 4 * a * c, 0.0))  # ≥ 0 for an origin inside; clamp rounding
    t = (-b[None] + np.array([[1.0], [-1.0]]) * root[None]) / (2 * a[None])
    t[t < 0] = np.inf
    return t.min(axis=0)


def make_shape(lb: np.ndarray, ub: np.ndarray, image_hw: tuple[int, int], rng: np.random.Generator,
               kind: str | None = None, scale: float = 1.0) -> AnomalyShape:
    """Draw one anomaly shape (§5.0 item 4): type, sides, shear N(0, 0.2²), rotation U(−π/2, π/2).

    If the rasterised grid is longer than ``ub`` on any axis, A is shrunk by the largest excess factor.
    ``scale`` stretches the side-length draw (``sample_side_lengths``).
    """
    if kind is None:
        kind = RECTANGLE if rng.random() < 0.5 else ELLIPSE
    sides = sample_side_lengths(lb, ub, image_hw, rng, scale)

    shear = np.identity(2)
    shear[0, 1] = rng.normal(0.0, SHEAR_STD)
    shear[1, 0] = rng.normal(0.0, SHEAR_STD)
    theta = rng.uniform(-np.pi / 2, np.pi / 2)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    matrix = rot @ shear

    half = (sides - 1) / 2
    corners = np.array(np.meshgrid([half[0], -half[0]], [half[1], -half[1]], indexing="ij")).reshape(2, 4)
    lo, hi = _grid_extent(matrix, corners)
    grid = hi + 1 - lo
    if np.any(grid > ub):
        matrix = matrix / np.max(grid / ub)
        lo, hi = _grid_extent(matrix, corners)
        grid = hi + 1 - lo

    rows, cols = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
    q = np.linalg.inv(matrix) @ np.stack([rows.ravel(), cols.ravel()])  # preimages in the aligned frame
    half_side = (sides / 2)[:, None]
    if kind == RECTANGLE:
        inside = np.all(np.abs(q) <= half_side, axis=0)
    else:
        inside = np.sum(q ** 2 / half_side ** 2, axis=0) <= 1
    return AnomalyShape(kind, sides, matrix, inside.reshape(grid.astype(int)))


def _grid_extent(matrix: np.ndarray, corners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mapped = matrix @ corners
    return np.floor(mapped.min(axis=1)), np.ceil(mapped.max(axis=1))


def is_large_enough(mask: np.ndarray, image_hw: tuple[int, int], fg_mask: np.ndarray | None) -> bool:
    """The reference's visibility floor: area ≥ |F|·0.02² with a mask, (0.02·H)·(0.02·W) without."""
    if fg_mask is None:
        floor = np.prod(MIN_VISIBLE_PROP * np.asarray(image_hw))
    else:
        floor = fg_mask.sum() * MIN_VISIBLE_PROP ** 2
    return bool(mask.sum() >= floor)


def place_anomaly(mask: np.ndarray, image_hw: tuple[int, int], rng: np.random.Generator,
                  fg_mask: np.ndarray | None = None, regions: list[Region] | None = None) -> np.ndarray:
    """Top-left corner (2,) int for the patch ``mask`` (h, w), so that the patch lies inside the image.

    Without ``fg_mask`` the corner is uniform on [0, H − h] × [0, W − w]. With it, each attempt picks a
    component ∝ its bounding-box area, draws a corner whose patch box overlaps that bounding box, and
    accepts when |mask ∩ F| / |mask| ≥ τ (τ = 0.25, then halved every 1000 rejections). After 5000
    rejections raises ``TrainingDataError``.
    """
    shape = np.array(mask.shape)
    max_corner = np.asarray(image_hw) - shape
    if np.any(max_corner < 0):
        raise ValueError(f"anomaly patch {tuple(shape)} does not fit in the image {tuple(image_hw)}")
    if fg_mask is None:
        return rng.integers(0, max_corner, endpoint=True)

    if regions is None:
        regions = foreground_regions(fg_mask)
    areas = np.array([r.bbox_area for r in regions], dtype=float)
    weights = areas / areas.sum()
    lows = [np.maximum(0, r.start - shape + 1) for r in regions]
    highs = [np.minimum(max_corner, r.stop - 1) for r in regions]
    area = mask.sum()
    tau = 2 * OVERLAP_START
    for attempt in range(MAX_ATTEMPTS):
        if attempt % ATTEMPTS_PER_BLOCK == 0:
            tau /= 2
        k = rng.choice(len(regions), p=weights)
        corner = rng.integers(lows[k], highs[k], endpoint=True)
        fg_patch = fg_mask[corner[0]:corner[0] + shape[0], corner[1]:corner[1] + shape[1]]
        if np.count_nonzero(fg_patch & mask) / area >= tau:
            return corner
    raise TrainingDataError(
        None,
        f"could not place a {tuple(shape)} anomaly overlapping the foreground by ≥ {tau} "
        f"in {MAX_ATTEMPTS} attempts (foreground has {int(fg_mask.sum())} pixels)",
        "Drop nearly empty slices from the training data or train without a background mask",
    )
