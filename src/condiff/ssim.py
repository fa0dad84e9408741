"""The reference SSIM anomaly map in torch (reference-method.md §6); the CUDA kernel's specification.

11x11 Gaussian window (sigma 1.5) applied per channel with zero padding 5; C1 = (0.01*255)^2,
C2 = (0.03*255)^2 although images are NOT scaled to 0-255 (a quirk of the reference kept on
purpose: maps behave like a Gaussian-weighted squared error and stay small).
map = mean over channels of clamp(1 - SSIM, 0, 1), shape (B, 1, H, W).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

WINDOW = 11
SIGMA = 1.5
C1 = (0.01 * 255) ** 2  # 6.5025
C2 = (0.03 * 255) ** 2  # 58.5225


@functools.lru_cache(maxsize=8)
def _window(device: str, dtype: torch.dtype) -> torch.Tensor:
    x = torch.arange(WINDOW, dtype=torch.float32) - WINDOW // 2
    g = torch.exp(-(x ** 2) / (2 * SIGMA ** 2))
    g = g / g.sum()
    return torch.outer(g, g).to(device=device, dtype=dtype)


def ssim_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Anomaly map of restoration ``x`` against input ``y``, both (B, C, H, W) float32 -> (B, 1, H, W)."""
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(y.shape)}")
    x = x.float()
    y = y.float()
    b, c, h, w = x.shape
    k = _window(str(x.device), torch.float32).expand(c, 1, WINDOW, WINDOW)
    # one grouped convolution over the five statistics of every channel
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    filt = F.conv2d(stack, k.repeat(5, 1, 1, 1), padding=WINDOW // 2, groups=5 * c)
    mu_x, mu_y, e_xx, e_yy, e_xy = filt.split(c, dim=1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x, var_y, cov = e_xx - mu_xx, e_yy - mu_yy, e_xy - mu_xy
    ssim = ((2 * mu_xy + C1) * (2 * cov + C2)) / ((mu_xx + mu_yy + C1) * (var_x + var_y + C2))
    return torch.clamp(1 - ssim, 0, 1).mean(dim=1, keepdim=True)
