"""Task 4: smooth Perlin-noise intensity change (reference-method §5, ``SmoothNoiseAdditionTask``).

The anomaly adds ρ · sign_c · a · N to the patch: N is fractal Perlin noise min–max normalised to [0, 1],
a = 0.05 + Gamma(3, 0.1) one amplitude for all channels, sign_c = ±1 per channel, and ρ a ramp that
rises from 0 at the mask's edge to 1 at distance w inside it (distance transform of the mask).

numpy only at import; scipy is imported inside ``intensity_anomaly``.
"""
from __future__ import annotations

import numpy as np

INTENSITY_SCALE = 0.1  # task kwarg intensity_task_scale: a = scale/2 + Gamma(3, scale)
RAMP_OFFSET, RAMP_GAMMA_SHAPE, RAMP_GAMMA_SCALE = 0.02, 3.0, 0.01  # w = min side · (0.02 + Gamma(3, 0.01))


def smootherstep(t: np.ndarray) -> np.ndarray:
    """6t⁵ − 15t⁴ + 10t³."""
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(shape: tuple[int, int], periods: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One Perlin layer (h, w) with ``periods`` (2,) (float) lattice intervals across each axis.

    A lattice of ceil(I + 1) points per axis carries random unit gradients; pixel i on an axis of length n
    sits at lattice coordinate i·I/n; the four corner dot products are blended with the smootherstep.
    """
    n_points = tuple(int(np.ceil(p + 1)) for p in periods)
    vectors = rng.standard_normal(n_points + (2,))
    gradients = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)

    grid = np.stack(np.meshgrid(*[np.arange(n) * p / n for n, p in zip(shape, periods)], indexing="ij"), -1)
    lo = np.floor(grid).astype(int)
    hi = np.ceil(grid).astype(int)  # equals lo on lattice lines, where the weight of hi is 0 anyway
    t = smootherstep(grid - lo)

    def dot(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        corner = np.stack([rows, cols], axis=-1)
        return np.sum(gradients[rows, cols] * (grid - corner), axis=-1)

    top = dot(lo[..., 0], lo[..., 1]) * (1 - t[..., 1]) + dot(lo[..., 0], hi[..., 1]) * t[..., 1]
    bottom = dot(hi[..., 0], lo[..., 1]) * (1 - t[..., 1]) + dot(hi[..., 0], hi[..., 1]) * t[..., 1]
    return top * (1 - t[..., 0]) + bottom * t[..., 0]


def draw_layer_periods(shape: tuple[int, int], rng: np.random.Generator) -> list[np.ndarray]:
    """Per-layer periods (2,) for fractal noise on ``shape`` (h, w).

    L = mean(h, w); I_max = L/3; I_1 = 1 + Exp((I_max − 1)/4.5); n_layers = min(floor(log2(I_max/I_1)) + 1,
    1 + Poisson(1)); I_{j+1} = I_j·2·N(1, 0.1) while fewer layers and I_j < I_max; per-axis jitter N(1, 0.1).
    """
    max_intervals = np.mean(shape) / 3
    # Patches under 3 px across would give a negative scale (the reference would raise): use I_1 = 1.
    first = 1 + rng.exponential(max((max_intervals - 1) / 4.5, 0.0))
    max_layers = np.floor(np.log2(max_intervals / first)) + 1
    n_layers = min(max_layers, 1 + rng.poisson(1))
    cores = [first]
    while len(cores) < n_layers and cores[-1] < max_intervals:
        cores.append(cores[-1] * 2 * rng.normal(1, 0.1))
    return [rng.normal(1, 0.1, size=2) * core for core in cores]


def fractal_noise(shape: tuple[int, int], layer_periods: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Sum of Perlin layers with amplitudes 2^−j, min–max normalised to [0, 1]; (h, w) float64.

    A constant sum (a patch whose pixels all sit on lattice points) gives zeros: no change.
    """
    noise = sum(2.0 ** -j * perlin_noise(shape, p, rng) for j, p in enumerate(layer_periods))
    noise = noise - noise.min()
    top = noise.max()
    return noise / top if top > 0 else np.zeros(shape)


def intensity_anomaly(image: np.ndarray, corner: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                      scale: float = INTENSITY_SCALE) -> np.ndarray:
    """Apply one smooth noise intensity change to ``image`` (C, H, W) in the patch box at ``corner`` (2,).

    ``mask`` (h, w) bool is the anomaly shape. Returns a new image of the same dtype, changed only inside
    the mask and clipped to the image's per-channel range.
    """
    from scipy.ndimage import distance_transform_edt

    dist = distance_transform_edt(mask)  # to the nearest non-mask pixel of the patch array
    width = min(min(image.shape[1:]) * (RAMP_OFFSET + rng.gamma(RAMP_GAMMA_SHAPE, RAMP_GAMMA_SCALE)), dist.max())
    ramp = np.minimum(dist / width, 1.0)

    signs = rng.choice([1.0, -1.0], size=image.shape[0])
    amplitude = scale / 2 + rng.gamma(3, scale)
    noise = fractal_noise(mask.shape, draw_layer_periods(mask.shape, rng), rng)

    box = (slice(None), slice(corner[0], corner[0] + mask.shape[0]), slice(corner[1], corner[1] + mask.shape[1]))
    patch = np.asarray(image[box], dtype=np.float64)
    changed = patch + ramp[None] * (amplitude * signs)[:, None, None] * noise[None]
    out = image.copy()
    out[box] = np.clip(changed, image.min(axis=(1, 2), keepdims=True), image.max(axis=(1, 2), keepdims=True))
    return out
