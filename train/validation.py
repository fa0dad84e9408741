"""Validation bookkeeping: when to validate, which slices, the moving average, the best checkpoint, early stopping.

Validation (reference-method §3, §10 D5): from ``val_start`` every ``val_every`` steps, the EMA
weights on the held-out subjects corrupted with the fold's held-out tasks, the reference objective
(mask weight 1), with task draws, t and eps re-drawn every evaluation (keys ``(step, index)``, so
deterministic given the step). m ← 0.9·m + 0.1·L (m starts at the first L); a lower m than ever
before is the new best and its EMA weights are written to ``best/``; training stops when
``step − best_step > patience``. The raw weights are never swapped out, so nothing needs restoring
after validation.

Under DDP the validation batches are sharded over the ranks and the sums all-reduced by the caller
(``loop.Trainer.validate``), so every rank reaches the same decisions without a broadcast.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from condiff.train.data import collate

ValHook = Callable[[int, nn.Module], dict]
ValKey = tuple[int, int]   # (step, index into the validation set)


@dataclass
class ValState:
    """Moving average of the validation loss and the best-checkpoint bookkeeping (§3).

    Its fields are the ``val`` block of a checkpoint's ``state.json``.
    """

    ma: float | None = None
    best: float | None = None
    best_step: int | None = None
    last: float | None = None
    n_evals: int = 0

    def update(self, loss: float, step: int, alpha: float = 0.9) -> bool:
        self.last = loss
        self.ma = loss if self.ma is None else alpha * self.ma + (1.0 - alpha) * loss
        self.n_evals += 1
        if self.best is None or self.ma < self.best:
            self.best, self.best_step = self.ma, step
            return True
        return False

    def patience_exceeded(self, step: int, patience: int) -> bool:
        """The early-stopping rule: more than ``patience`` steps since the best moving average."""
        return self.best_step is not None and step - self.best_step > patience


def should_validate(step: int, val_start: int, val_every: int) -> bool:
    """Whether ``step`` is a validation step (from ``val_start``, every ``val_every`` steps)."""
    return step >= val_start and val_every > 0 and step % val_every == 0


def val_indices(n: int, max_slices: int | None) -> np.ndarray:
    """All ``n`` validation slices, or a fixed, evenly spaced subset of ``max_slices`` of them."""
    if max_slices is None or max_slices >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_slices).round().astype(np.int64))


def val_batches(n: int, step: int, batch_size: int, max_slices: int | None, rank: int = 0,
                world_size: int = 1) -> list[list[ValKey]]:
    """This rank's validation batches at ``step``: keys ``(step, index)``, batches dealt round-robin."""
    keys = [(step, int(i)) for i in val_indices(n, max_slices)]
    batches = [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
    return batches[rank::world_size]


def sum_val_loss(val_set, batches: list[list[ValKey]], per_sample_loss: Callable[[dict], torch.Tensor],
                 num_workers: int = 0) -> tuple[float, int]:
    """(sum, count) of the per-sample losses over ``batches`` of ``val_set`` (this rank's share only).

    ``per_sample_loss(batch) -> (B,)`` gets each collated CPU batch; the caller owns devices and no_grad.
    """
    total, count = 0.0, 0
    if batches:
        loader = torch.utils.data.DataLoader(val_set, batch_sampler=batches, collate_fn=collate,
                                             num_workers=min(num_workers, len(batches)))
        for batch in loader:
            per = per_sample_loss(batch)
            total += float(per.double().sum())
            count += len(per)
    return total, count


def val_record(step: int, loss: float, state: ValState, improved: bool) -> dict:
    """The ``metrics.jsonl`` record of one validation (before hooks and timings are added)."""
    return {"kind": "val", "step": step, "val_loss": loss, "val_ma": state.ma, "best_ma": state.best,
            "best_step": state.best_step, "improved": improved}


def run_hooks(hooks: Sequence[ValHook], step: int, ema_module: nn.Module) -> dict:
    """Extra validation metrics: each hook's dict, merged in order."""
    record: dict = {}
    for hook in hooks:
        record.update(hook(step, ema_module))
    return record


def write_best(work_dir: Path, ema_state: dict[str, torch.Tensor], step: int, state: ValState) -> Path:
    """Write the best EMA weights (float32) and ``best.json`` into ``work_dir/best``, atomically."""
    from safetensors.torch import save as st_save

    from condiff.io.atomic import write_bytes_atomic, write_json_atomic

    best = work_dir / "best"
    best.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in ema_state.items()}
    write_bytes_atomic(best / "ema.safetensors", st_save(tensors, metadata={"step": str(step)}))
    write_json_atomic(best / "best.json", {"step": step, "val_ma": state.ma, "val_loss": state.last})
    return best


def best_weights_path(work_dir: Path, state: ValState) -> Path | None:
    """``best/ema.safetensors`` when a best step was recorded and its weights exist."""
    p = work_dir / "best" / "ema.safetensors"
    return p if state.best_step is not None and p.is_file() else None
