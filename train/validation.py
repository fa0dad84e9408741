"""Validation bookkeeping: when to validate, which slices, the moving average, the best checkpoint, early stopping.

Validation (reference-method §3, §10 D5): from ``val_start`` every ``val_every`` steps, the EMA
weights on the held-out subjects corrupted with the fold's held-out tasks, the reference objective
(mask weight 1), with task draws, t and eps re-drawn every evaluation (keys ``(step, index)``, so
deterministic given the step). m ← 0.9·m + 0.1·L (m starts at the first L); a lower m than ever
before is the new best and its EMA weights are written to ``best/ema-<step>.safetensors`` (keyed by
step, so the exported best is provably the one the checkpoint's ``best_step`` names); training stops when
``step − best_step > patience``. The raw weights are never swapped out, so nothing needs restoring
after validation.

Under DDP the validation batches are sharded over the ranks and the sums all-reduced by the caller
(``loop.Trainer.validate``), so every rank reaches the same decisions without a broadcast.
"""
from __future__ import annotations

import json
import re
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


BEST_DIR = "best"
_BEST_NAME = re.compile(r"^ema-(\d+)\.safetensors$")
LEGACY_BEST = "ema.safetensors"  # condiff before best weights were keyed by step


def best_name(step: int) -> str:
    return f"ema-{step:09d}.safetensors"


def _weights_step(path: Path) -> int | None:
    """The step recorded in a best-weights file's metadata (None: unreadable or none recorded)."""
    from safetensors import safe_open

    from condiff.io.atomic import is_utf8_path

    try:
        if not is_utf8_path(path):  # safetensors opens UTF-8 paths only
            return _step_from_bytes(Path(path).read_bytes())
        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {})["step"])
    except Exception:  # a torn or foreign file (safetensors raises its own error type)
        return None


def _step_from_bytes(data: bytes) -> int:
    """The metadata step of a safetensors file's bytes, after safetensors has checked them whole (the
    header: an 8-byte little-endian length, then JSON whose ``__metadata__`` holds the step)."""
    import json

    from safetensors.torch import load

    load(data)  # raises for a torn or foreign file
    length = int.from_bytes(data[:8], "little")
    return int(json.loads(data[8:8 + length])["__metadata__"]["step"])


def best_files(work_dir: Path) -> dict[int, Path]:
    """step -> ``best/ema-<step>.safetensors`` for every keyed best-weights file of a run."""
    found = {}
    folder = Path(work_dir) / BEST_DIR
    if folder.is_dir():
        for p in folder.iterdir():
            m = _BEST_NAME.match(p.name)
            if m and p.is_file():
                found[int(m.group(1))] = p
    return found


def write_best(work_dir: Path, ema_state: dict[str, torch.Tensor], step: int, state: ValState) -> Path:
    """Write the best EMA weights (float32) as ``best/ema-<step>.safetensors`` and ``best.json``, atomically.

    The weights are keyed by step: a best found after the newest checkpoint (by a run killed before it
    checkpointed) never replaces the best that checkpoint records. ``prune_best`` drops the files no
    checkpoint needs, ``reconcile_best`` those of an abandoned future when a run resumes."""
    from safetensors.torch import save as st_save

    from condiff.io.atomic import write_bytes_atomic, write_json_atomic

    best = Path(work_dir) / BEST_DIR
    best.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in ema_state.items()}
    path = best / best_name(step)
    write_bytes_atomic(path, st_save(tensors, metadata={"step": str(step)}))
    write_json_atomic(best / "best.json", {"step": step, "val_ma": state.ma, "val_loss": state.last,
                                           "weights": path.name})
    return path


def best_weights_path(work_dir: Path, state: ValState) -> Path | None:
    """The EMA weights of ``state.best_step``: ``best/ema-<best_step>.safetensors`` when it exists and its
    metadata records that step; None otherwise (no best recorded, or its weights are gone)."""
    if state.best_step is None:
        return None
    p = Path(work_dir) / BEST_DIR / best_name(state.best_step)
    return p if p.is_file() and _weights_step(p) == state.best_step else None


def prune_best(work_dir: Path, keep_steps: set[int]) -> list[Path]:
    """Delete the best-weights files of steps not in ``keep_steps`` (the best steps the kept checkpoints and
    the live state record); returns what went."""
    removed = []
    for step, p in best_files(work_dir).items():
        if step not in keep_steps:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def reconcile_best(work_dir: Path, step: int, state: ValState) -> list[Path]:
    """Make ``best/`` agree with a training state at ``step`` (a resumed checkpoint, or step 0 for a fresh
    start): best weights of later steps belong to a run that died before checkpointing them (an
    abandoned future) and are deleted; a legacy ``best/ema.safetensors`` is kept (renamed to its step) only
    when it holds ``state.best_step``; ``best.json`` is rewritten to describe ``state``'s best, or removed
    when there is none. Returns the files deleted."""
    from condiff.io.atomic import write_json_atomic

    folder = Path(work_dir) / BEST_DIR
    if not folder.is_dir():
        return []
    removed = []
    legacy = folder / LEGACY_BEST
    if legacy.is_file():
        legacy_step = _weights_step(legacy)
        target = None if state.best_step is None else folder / best_name(state.best_step)
        if legacy_step is not None and legacy_step == state.best_step and legacy_step <= step and not target.exists():
            legacy.rename(target)
        else:
            legacy.unlink()
            removed.append(legacy)
    for s, p in best_files(work_dir).items():
        if s > step:
            p.unlink(missing_ok=True)
            removed.append(p)
    meta = folder / "best.json"
    path = best_weights_path(work_dir, state)
    if path is None:
        meta.unlink(missing_ok=True)
    else:
        try:
            current = json.loads(meta.read_text())
        except (OSError, ValueError):
            current = None
        if not isinstance(current, dict) or current.get("step") != state.best_step or current.get("weights") != path.name:
            write_json_atomic(meta, {"step": state.best_step, "val_ma": state.best, "weights": path.name})
    return removed
