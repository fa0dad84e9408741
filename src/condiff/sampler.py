"""DDPM and DDIM reverse diffusion as plain functions over a denoiser callable.

``restore(denoise, cond, plan, noise)`` runs the whole loop; ``eps = denoise(x_t, cond, t)``
is all it knows of the network (k-diffusion's lesson). Per-step coefficients are computed
once, in float32 and in the same order as diffusers 0.24's ``DDPMScheduler.step`` /
``DDIMScheduler.step``, and kept as a table so a CUDA graph can replay the loop.

DDPM step from t to p = t - k (reference-method.md §4):
    x0   = clamp((x_t - sqrt(1 - ab_t) * eps) / sqrt(ab_t), -1, 1)
    x_p  = c_x0 * x0 + c_xt * x_t + sigma_t * z        (z only for t > 0)
DDIM (eta = 0):  x_p = sqrt(ab_p) * x0 + sqrt(1 - ab_p) * eps
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from condiff.config import ScheduleConfig
from condiff.schedule import alpha_bar, leading_timesteps

Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# columns of SamplerPlan.coefficients
SQRT_1M_AB, SQRT_AB, C_X0, C_XT, SIGMA, C_EPS = range(6)


@dataclass
class SamplerPlan:
    kind: str                   # "ddpm" | "ddim"
    timesteps: list[int]        # descending, e.g. [980, ..., 0]
    coefficients: torch.Tensor  # (n_steps, 6) float32, columns above
    clip: float | None          # x0 clip range (1.0 as the reference), None = no clip

    @property
    def n_steps(self) -> int:
        return len(self.timesteps)

    @property
    def n_noise_draws(self) -> int:
        """Start noise plus one draw per stochastic step."""
        return 1 + sum(1 for i in range(self.n_steps) if self.coefficients[i, SIGMA] != 0)

    def noise_slot(self, i: int) -> int:
        """Index into the per-slice noise draws for step i (0 is the start noise)."""
        return 1 + int((self.coefficients[:i, SIGMA] != 0).sum())

    def to(self, device) -> "SamplerPlan":
        return SamplerPlan(self.kind, self.timesteps, self.coefficients.to(device), self.clip)


def make_plan(kind: str = "ddpm", n_steps: int = 50, schedule: ScheduleConfig = ScheduleConfig()) -> SamplerPlan:
    if kind not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {kind!r}")
    if schedule.prediction_type != "epsilon":
        raise ValueError("only epsilon prediction is supported")
    ab = alpha_bar(schedule)
    one = torch.tensor(1.0)
    timesteps = leading_timesteps(n_steps, schedule.num_train_timesteps)
    ratio = schedule.num_train_timesteps // n_steps
    rows = []
    for t in timesteps:
        p = t - ratio
        ab_t = ab[t]
        ab_p = ab[p] if p >= 0 else one
        beta_prod_t = 1 - ab_t
        beta_prod_p = 1 - ab_p
        if kind == "ddpm":
            alpha_t = ab_t / ab_p
            beta_t = 1 - alpha_t
            c_x0 = (ab_p ** 0.5 * beta_t) / beta_prod_t
            c_xt = alpha_t ** 0.5 * beta_prod_p / beta_prod_t
            var = torch.clamp((1 - ab_p) / (1 - ab_t) * beta_t, min=1e-20)
            sigma = var ** 0.5 if t > 0 else torch.tensor(0.0)
            c_eps = torch.tensor(0.0)
        else:
            c_x0 = ab_p ** 0.5
            c_xt = torch.tensor(0.0)
            sigma = torch.tensor(0.0)
            c_eps = (1 - ab_p) ** 0.5
        rows.append(torch.stack([beta_prod_t ** 0.5, ab_t ** 0.5, c_x0, c_xt, sigma, c_eps]).float())
    clip = schedule.clip_sample_range if schedule.clip_sample else None
    return SamplerPlan(kind, timesteps, torch.stack(rows), clip)


def step(plan: SamplerPlan, i: int, x_t: torch.Tensor, eps: torch.Tensor,
         z: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse step i of the plan; returns (x_prev, x0_hat). All float32."""
    c = plan.coefficients[i]
    eps = eps.to(x_t.dtype)
    x0 = (x_t - c[SQRT_1M_AB] * eps) / c[SQRT_AB]
    if plan.clip is not None:
        x0 = x0.clamp(-plan.clip, plan.clip)
    if plan.kind == "ddpm":
        prev = c[C_X0] * x0 + c[C_XT] * x_t
        if z is not None:
            prev = prev + c[SIGMA] * z
    else:
        prev = c[C_X0] * x0 + c[C_EPS] * eps
    return prev, x0


def restore(denoise: Denoise, cond: torch.Tensor, plan: SamplerPlan, noise: torch.Tensor,
            callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Reverse diffusion conditioned on ``cond`` (B, C, H, W); returns the restoration x0 (float32).

    ``noise``: (B, n_noise_draws, C, H, W) from ``condiff.noise.draw_noise``; moved to cond's device.
    """
    if noise.shape[1] < plan.n_noise_draws:
        raise ValueError(f"noise has {noise.shape[1]} draws, the plan needs {plan.n_noise_draws}")
    device = cond.device
    plan = plan.to(device)
    noise = noise.to(device)
    cond = cond.float()
    x = noise[:, 0]
    slot = 1
    for i, t in enumerate(plan.timesteps):
        t_batch = torch.full((cond.shape[0],), t, dtype=torch.int64, device=device)
        eps = denoise(x, cond, t_batch)
        z = None
        if plan.kind == "ddpm" and t > 0:
            z = noise[:, slot]
            slot += 1
        x, _ = step(plan, i, x, eps.float(), z)
        if callback is not None:
            callback(i, plan.n_steps)
    return x
