"""Exponential moving average of the weights with the reference's decay schedule (reference-method §3).

The reference uses diffusers' ``EMAModel`` with all defaults (decay 0.9999, min_decay 0, no warm-up,
update_after_step 0). With n the number of updates so far including this one and k = max(0, n − 1):

    decay_n = 0                                   if k = 0 (the first update copies the weights)
    decay_n = min(0.9999, (1 + k) / (10 + k))     otherwise
    ema ← ema − (1 − decay_n) · (ema − θ)

e.g. n = 2: 2/11 = 0.1818…; n = 1001: 1001/1010 = 0.99109…; the cap is reached at k = 89,991.

The shadow copy is a whole module (same class as the trained network), so validation, export and
``save_model`` use it directly and the raw weights are never swapped out (§10 D5).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

MAX_DECAY = 0.9999


def ema_decay(n_updates: int, max_decay: float = MAX_DECAY) -> float:
    """Decay used by the ``n_updates``-th update (1-based), as diffusers 0.24 ``EMAModel.get_decay``."""
    if n_updates < 1:
        raise ValueError(f"n_updates counts from 1, got {n_updates}")
    k = n_updates - 1
    if k == 0:
        return 0.0
    return min(max_decay, (1 + k) / (10 + k))


class EMA:
    """Shadow weights of ``model``: ``update(model)`` after every optimiser step.

    ``module``: the float32 shadow network (eval mode, no gradients). ``n_updates``: updates so far.
    Buffers (the UNet has none, GroupNorm keeps no running statistics) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, max_decay: float = MAX_DECAY):
        self.module = copy.deepcopy(model).float().eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.max_decay = max_decay
        self.n_updates = 0
        self.last_decay: float | None = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Apply one update towards ``model``'s current weights; returns the decay used."""
        self.n_updates += 1
        decay = ema_decay(self.n_updates, self.max_decay)
        one_minus = 1.0 - decay
        shadow = list(self.module.parameters())
        params = [p.detach().float() for p in model.parameters()]
        if len(shadow) != len(params):
            raise ValueError("EMA shadow and model have different parameter lists")
        for s, p in zip(shadow, params):
            # The reference's arithmetic exactly (diffusers EMAModel.step), also for decay 0, where it
            # equals a copy up to float32 rounding.
            s.sub_(one_minus * (s - p))
        for sb, b in zip(self.module.buffers(), model.buffers()):
            sb.copy_(b)
        self.last_decay = decay
        return decay

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], n_updates: int) -> None:
        self.module.load_state_dict(state, strict=True)
        self.n_updates = int(n_updates)
        self.last_decay = ema_decay(self.n_updates, self.max_decay) if self.n_updates else None
