"""Noise schedule and inference timesteps (pure functions).

Symbols (diffusers name in brackets): beta_t [betas], alpha_bar_t = prod_{s<=t}(1 - beta_s)
[alphas_cumprod]. Everything is float32 and computed in the same order as diffusers 0.24,
so coefficients agree bit for bit (reference-method.md §4).
"""
from __future__ import annotations

import torch

from condiff.config import ScheduleConfig


def alpha_bar(cfg: ScheduleConfig = ScheduleConfig()) -> torch.Tensor:
    """(num_train_timesteps,) float32 cumulative product of 1 - beta."""
    if cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, cfg.num_train_timesteps,
                               dtype=torch.float32) ** 2
    else:
        raise ValueError(f"unsupported beta_schedule {cfg.beta_schedule!r}")
    return torch.cumprod(1.0 - betas, dim=0)


def leading_timesteps(n_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 0) -> list[int]:
    """diffusers "leading" spacing: n_steps=50 -> [980, 960, ..., 20, 0]."""
    if not 1 <= n_steps <= num_train_timesteps:
        raise ValueError(f"n_steps must be in 1..{num_train_timesteps}, got {n_steps}")
    ratio = num_train_timesteps // n_steps
    return [i * ratio + steps_offset for i in range(n_steps)][::-1]


def min_snr_weight(t: torch.Tensor, alpha_bar_table: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Min-SNR loss weight for eps prediction: min(SNR, gamma) / SNR (reference-method.md §3)."""
    ab = alpha_bar_table.to(t.device)[t]
    snr = ab / (1.0 - ab)
    return torch.clamp(snr, max=gamma) / snr
