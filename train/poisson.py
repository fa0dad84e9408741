"""Tasks 0 and 1: Poisson blending of a resampled source patch, mixed gradients (reference-method §5).

Two layers:

- the solver (pie-torch ``blend_dst_numpy`` with mixed gradients, steps 1–7): on a patch box, build the
  guidance field (target gradient outside the mask; per axis, per pixel and channel the larger of target
  and source gradient inside), take its divergence, and solve the Poisson equation on the interior with
  the target's border as Dirichlet condition, diagonalised by a type-I DST;
- the task (``blend_anomaly``): draw the source geometry (rotation φ, scale e, source corner), resample
  the source crop with a cubic ``affine_transform``, blend it in, clip, and update the anomaly mask.

Differences are per axis with scipy's "mirror" boundary (x[N] = x[N − 2]); only interior values reach the
solution, so the boundary rule never matters, but it is kept so every array matches the reference.
Arithmetic is float64 (the reference runs in float32); the result takes the image's dtype.

numpy only at import; scipy is imported inside the functions that use it.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

SourceDraw = Callable[[], "tuple[np.ndarray, np.ndarray | None]"]  # -> (source (C, H, W), F_src or None)

MAX_ROTATION = np.pi / 4  # φ ~ U(−π/4, π/4)
SCALE_EXP_MEAN = 0.1  # e = 1 + Exp(0.1), scale e or 1/e
MAX_SOURCE_PROP = 0.8  # the source crop spans at most 80 % of the source per axis
CHANGED_THRESHOLD = 1e-3  # channel-mean |Δ| that puts a pixel in the anomaly mask (bookkeeping)
MAX_SOURCE_DRAWS = 100  # the reference retries forever; we give up loudly


def forward_differences(x: np.ndarray, axis: int) -> np.ndarray:
    """g[i] = x[i+1] − x[i] along ``axis``, last entry x[N−2] − x[N−1] (mirror boundary)."""
    x = np.moveaxis(x, axis, -1)
    g = np.empty_like(x)
    g[..., :-1] = x[..., 1:] - x[..., :-1]
    g[..., -1] = x[..., -2] - x[..., -1]
    return np.moveaxis(g, -1, axis)


def backward_differences(g: np.ndarray, axis: int) -> np.ndarray:
    """d[i] = g[i] − g[i−1] along ``axis``, first entry g[0] − g[1] (mirror boundary)."""
    g = np.moveaxis(g, axis, -1)
    d = np.empty_like(g)
    d[..., 1:] = g[..., 1:] - g[..., :-1]
    d[..., 0] = g[..., 0] - g[..., 1]
    return np.moveaxis(d, -1, axis)


def mixed_guidance(target: np.ndarray, source: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """Guidance field [g_rows, g_cols], each (C, h, w), for patches ``target``/``source`` (C, h, w).

    Outside ``mask`` (h, w) the target's forward difference; inside, per axis/pixel/channel, the target's
    if |g_target| ≥ |g_source| else the source's. ``mask[i]`` selects the gradient between i and i + 1.
    """
    fields = []
    for axis in (1, 2):
        g_t = forward_differences(target, axis)
        g_s = forward_differences(source, axis)
        mixed = np.where(np.abs(g_t) >= np.abs(g_s), g_t, g_s)
        fields.append(np.where(mask[None], mixed, g_t))
    return fields


def solve_poisson_dst(divergence: np.ndarray, boundary: np.ndarray) -> np.ndarray:
    """Solve Δu = ``divergence`` on the interior with u = ``boundary`` on the border; both (C, h, w).

    Δ is the 5-point Laplacian. The border's pull on the interior is moved to the right-hand side
    (subtract the Laplacian of the border-only image), then the zero-Dirichlet problem is diagonal in the
    DST-I basis with eigenvalues Σ_axes 2·cos(π(k+1)/(N−1)) − 2, k = 0…N−3. Returns (C, h, w): the border
    copied from ``boundary``, the interior solved. Patches thinner than 3 have no interior: returned as is.
    """
    from scipy import fft

    boundary = np.asarray(boundary, dtype=np.float64)
    out = boundary.copy()
    _, h, w = boundary.shape
    if h < 3 or w < 3:
        return out
    border_only = boundary.copy()
    border_only[:, 1:-1, 1:-1] = 0.0
    # Laplacian of the border-only image at interior pixels = the sum of their border neighbours.
    border_pull = (border_only[:, :-2, 1:-1] + border_only[:, 2:, 1:-1]
                   + border_only[:, 1:-1, :-2] + border_only[:, 1:-1, 2:])
    rhs = np.asarray(divergence, dtype=np.float64)[:, 1:-1, 1:-1] - border_pull

    eig_rows = 2 * np.cos(np.pi * (np.arange(h - 2) + 1) / (h - 1)) - 2
    eig_cols = 2 * np.cos(np.pi * (np.arange(w - 2) + 1) / (w - 1)) - 2
    spectrum = fft.dstn(rhs, type=1, axes=(1, 2)) / (eig_rows[:, None] + eig_cols[None, :])
    out[:, 1:-1, 1:-1] = fft.idstn(spectrum, type=1, axes=(1, 2))
    return out


def blend_mixed_gradients(target: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Poisson-blend ``source`` into ``target`` (both (C, h, w)) inside ``mask`` (h, w); returns float64 (C, h, w).

    Step 1 of the reference zeroes the mask's first/last row and column; that is done here on a copy
    (``blend_anomaly`` applies it to the anomaly mask too, as the reference's in-place edit does).
    """
    target = np.asarray(target, dtype=np.float64)
    source = np.asarray(source, dtype=np.float64)
    mask = zero_mask_edges(mask)
    g_rows, g_cols = mixed_guidance(target, source, mask)
    divergence = backward_differences(g_rows, 1) + backward_differences(g_cols, 2)
    return solve_poisson_dst(divergence, target)


def zero_mask_edges(mask: np.ndarray) -> np.ndarray:
    """Copy of ``mask`` (h, w) with its first and last row and column set to False."""
    mask = np.array(mask, dtype=bool)
    mask[[0, -1], :] = False
    mask[:, [0, -1]] = False
    return mask


def match_channels(source: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Give ``source`` the channel count of ``target`` (both (C, H, W), spatial sizes may differ).

    Fewer: append channels drawn with replacement from the target itself (the reference's rule, which
    needs equal spatial sizes). More: keep C_target source channels drawn without replacement.
    """
    n_src, n_tgt = source.shape[0], target.shape[0]
    if n_src < n_tgt:
        if source.shape[1:] != target.shape[1:]:
            raise ValueError(f"cannot fill a {source.shape} source from a {target.shape} target: "
                             "spatial sizes differ")
        extra = target[rng.choice(n_tgt, size=n_tgt - n_src, replace=True)]
        return np.concatenate([source, extra.astype(source.dtype)], axis=0)
    if n_src > n_tgt:
        return source[rng.choice(n_src, size=n_tgt, replace=False)]
    return source


def _extent(matrix: np.ndarray, corners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mapped = matrix @ corners
    return np.floor(mapped.min(axis=1)), np.ceil(mapped.max(axis=1))


def resample_source(source: np.ndarray, patch_hw: tuple[int, int], rng: np.random.Generator,
                    source_fg: np.ndarray | None = None) -> np.ndarray | None:
    """Draw a rotated, rescaled crop of ``source`` (C, H, W) at the patch size; (C, h, w) float64 or None.

    Backward map M = s·R(φ) from patch to source coordinates; s = min(e or 1/e, max_scale) with
    max_scale = min over axes of 0.8·(source size)/(extent of R(φ)·patch box). With ``source_fg`` the crop
    is centred on a foreground pixel; None when no foreground pixel allows a crop inside the source (the
    caller then draws another source, as the reference does).
    """
    from scipy.ndimage import affine_transform

    src_hw = np.array(source.shape[1:])
    phi = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    matrix = np.array([[np.cos(phi), -np.sin(phi)], [np.sin(phi), np.cos(phi)]])
    corners = np.array(np.meshgrid([0, patch_hw[0]], [0, patch_hw[1]], indexing="ij"), float).reshape(2, 4)
    lo, hi = _extent(matrix, corners)
    max_scale = np.min(MAX_SOURCE_PROP * src_hw / (hi - lo))
    e = 1 + rng.exponential(SCALE_EXP_MEAN)
    scale = min(e if rng.random() < 0.5 else 1 / e, max_scale)
    matrix = scale * matrix
    lo, hi = _extent(matrix, corners)
    crop_hw = (hi - lo).astype(int)
    max_corner = src_hw - crop_hw
    if np.any(max_corner < 0):  # only for sources a few pixels wide; the reference would crash
        return None

    if source_fg is None:
        corner = rng.integers(0, max_corner, endpoint=True)
    else:
        centres = np.argwhere(source_fg)
        starts = centres - crop_hw // 2
        valid = np.all((starts >= 0) & (starts <= max_corner), axis=1)
        if not valid.any():
            return None
        corner = starts[valid][rng.integers(np.count_nonzero(valid))]

    crop = np.asarray(source[:, corner[0]:corner[0] + crop_hw[0], corner[1]:corner[1] + crop_hw[1]], np.float64)
    # M is already the backward map (patch -> crop), so affine_transform takes it as is.
    out = np.stack([affine_transform(ch, matrix, offset=-lo, output_shape=tuple(patch_hw), order=3,
                                     mode="constant", cval=0.0, prefilter=True) for ch in crop])
    # Cubic splines overshoot; clip to the source's own per-channel range.
    return np.clip(out, source.min(axis=(1, 2), keepdims=True), source.max(axis=(1, 2), keepdims=True))


def blend_anomaly(image: np.ndarray, corner: np.ndarray, mask: np.ndarray, draw_source: SourceDraw,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Apply one Poisson-blend anomaly to ``image`` (C, H, W) in the patch box at ``corner`` (2,).

    ``mask`` (h, w) bool is the anomaly shape; ``draw_source()`` returns a fresh source (C', H', W') and its
    foreground mask (or None). Returns the blended image (dtype of ``image``), clipped to the image's
    per-channel range, and the patch mask (h, w): ``mask`` with edges zeroed, plus every patch pixel
    whose channel-mean change exceeds 0.001. Pixels outside the patch box are never changed.
    """
    for _ in range(MAX_SOURCE_DRAWS):
        source, source_fg = draw_source()
        source = match_channels(source, image, rng)
        source_patch = resample_source(source, mask.shape, rng, source_fg)
        if source_patch is not None:
            break
    else:
        raise ValueError(f"no usable blending source in {MAX_SOURCE_DRAWS} draws for a {mask.shape} patch: "
                         "the sources' foreground is too small or off-centre")

    box = (slice(None), slice(corner[0], corner[0] + mask.shape[0]), slice(corner[1], corner[1] + mask.shape[1]))
    target_patch = np.asarray(image[box], dtype=np.float64)
    blended = blend_mixed_gradients(target_patch, source_patch, mask)
    blended = np.clip(blended, image.min(axis=(1, 2), keepdims=True), image.max(axis=(1, 2), keepdims=True))

    out = image.copy()
    out[box] = blended
    changed = np.mean(np.abs(out[box].astype(np.float64) - target_patch), axis=0) > CHANGED_THRESHOLD
    return out, zero_mask_edges(mask) | changed
