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
