"""Synthetic training images shared by the training tests."""
import numpy as np

SIZE = 32


def phantoms(n=12, size=SIZE, seed=0):
    """(n, 1, size, size) float32: textured ellipses in [0.05, 1] on an exact-zero background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / (size - 1) * 2 - 1
    out = np.zeros((n, 1, size, size), np.float32)
    for i in range(n):
        a, b = rng.uniform(0.6, 0.85, 2)
        inside = (xx / a) ** 2 + (yy / b) ** 2 <= 1
        tex = 0.5 + 0.3 * np.sin(3 * xx + rng.uniform(0, 6)) * np.cos(2 * yy + rng.uniform(0, 6))
        out[i, 0] = np.where(inside, np.clip(tex, 0.05, 1), 0)
    return out


def null_val_hook(context):
    """A ``--val-hook`` factory for tests: logs one constant metric."""
    return lambda step, ema_module: {"null_hook": 0.0}


def phantom_volume(path, seed=0, shape=(40, 40, 12), mask_path=None, series=0, nan=False):
    """Write a textured-ellipsoid NIfTI volume (4 mm voxels) to ``path``, and its brain mask to ``mask_path``.
    ``series`` > 0 writes a 4-D file of that many volumes; ``nan`` puts one NaN voxel in it."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    x, y, z = np.mgrid[:shape[0], :shape[1], :shape[2]]
    cx, cy, cz = shape[0] / 2, shape[1] / 2, shape[2] / 2
    inside = ((x - cx) / (0.38 * shape[0])) ** 2 + ((y - cy) / (0.3 * shape[1])) ** 2 + ((z - cz) / (0.58 * shape[2])) ** 2 <= 1
    data = np.where(inside, 300 + 100 * np.sin(x / 3 + seed) * np.cos(y / 4) + rng.normal(0, 5, x.shape), 0).astype(np.float32)
    if nan:
        data[tuple(s // 2 for s in shape)] = np.nan
    if series:
        data = np.stack([data] * series, axis=-1)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(path))
    if mask_path is not None:
        nib.save(nib.Nifti1Image(inside.astype(np.uint8), affine), str(mask_path))
