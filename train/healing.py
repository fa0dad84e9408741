"""The healing metric: does a model remove synthetic anomalies, or copy them?

training-notes.md: a model conditioned on the corrupted image first learns to *copy* it; the
loss hardly shows when it starts to heal. This metric does. Held-out healthy slices x0 are
corrupted with each task at fixed seeds (c, anomaly mask A), restored (x̂0), and per task:

- removed = 1 - mean_A |x̂0 - x0| / mean_A |c - x0|   (0 for a copier, 1 for a perfect healer)
- AP of the anomaly map against A, pixels pooled over the slices, with chance (the share of
  positives) beside it.

A is the task's mask restricted to pixels the task actually changed (channel-mean change
> 1e-3), so "the anomaly" is what there is to remove.

A stochastic restorer also errs where there is nothing to remove, and for a subtle anomaly (a
Poisson blend changes pixels by ~0.06 on average) that error alone can push ``removed`` below 0.
So the clean slices are restored too, with the same noise, and two reference figures sit beside it:

- clean_error = mean_A |R(x0) - x0| / mean_A |c - x0|: the restorer's own error on healthy input,
  as a share of the anomaly (``removed`` can reach 1 - clean_error at best, roughly);
- copier_removed = 1 - mean_A |(c - x0) + (R(x0) - x0)| / mean_A |c - x0|: what a model scores that
  keeps the anomaly and adds its own healthy-input error. ``removed`` above it is healing; equal to
  it is copying, however negative both are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from condiff.metrics import average_precision
from condiff.train.tasks import TASK_NAMES, RestorationTask

CHANGE_THRESHOLD = 1e-3


@dataclass
class HealingCase:
    clean: np.ndarray      # (C, H, W) uncentred [0, 1]
    corrupted: np.ndarray  # (C, H, W) uncentred [0, 1]
    mask: np.ndarray       # (H, W) bool: changed anomaly pixels


def make_cases(clean: np.ndarray, task_id: int, *, seed: int = 0, same_pool=None, other_pools=(),
               has_background: bool = True) -> list[HealingCase]:
    """Corrupt every clean slice (N, C, H, W) with ``task_id`` at fixed seeds (always a task, never identity)."""
    task = RestorationTask([task_id], p_no_task=0.0, same_pool=same_pool, other_pools=other_pools,
                           has_background=has_background)
    cases = []
    for i, x0 in enumerate(clean):
        rng = np.random.default_rng([seed, task_id, i])
        c, mask, _ = task(x0, rng)
        changed = np.abs(c - x0).mean(axis=0) > CHANGE_THRESHOLD
        cases.append(HealingCase(x0, c, mask & changed))
    return cases


def removed_share(clean: np.ndarray, corrupted: np.ndarray, restored: np.ndarray, mask: np.ndarray) -> float:
    """1 - mean|x̂0 - x0| / mean|c - x0| inside the mask (pooled over slices); NaN for an empty mask."""
    m = np.broadcast_to(mask[:, None], clean.shape)
    before = np.abs(corrupted - clean)[m].mean() if m.any() else np.nan
    after = np.abs(restored - clean)[m].mean() if m.any() else np.nan
    return float(1.0 - after / before) if before and before > 0 else float("nan")


Restorer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def copier_reference(clean: np.ndarray, corrupted: np.ndarray, restored_clean: np.ndarray,
                     mask: np.ndarray) -> tuple[float, float]:
    """(clean_error, copier_removed) of the module docstring, pooled over slices; NaN for an empty mask.

    Both are ``removed_share`` of a stand-in restoration: R(x0) itself (clean_error = 1 - its share),
    and the copier's c + (R(x0) - x0).
    """
    clean_error = 1.0 - removed_share(clean, corrupted, restored_clean, mask)
    copier_removed = removed_share(clean, corrupted, corrupted + (restored_clean - clean), mask)
    return clean_error, copier_removed


def healing_report(restore_fn: Restorer, clean: np.ndarray, task_ids: Sequence[int] = (0, 2, 3, 4), *,
                   seed: int = 0, same_pool=None, other_pools=(), has_background: bool = True,
                   centre: bool = False, copier_baseline: bool = True) -> dict[str, dict[str, float]]:
    """Per task: removed share, map AP, chance AP and the number of slices with an anomaly; with
    ``copier_baseline`` also ``clean_error`` and ``copier_removed`` (module docstring), at the cost
    of one more restoration of the clean slices.

    ``restore_fn(cond (N, C, H, W) in the model's range) -> (restorations, maps (N, H, W))``; slice i
    of every call should draw the same noise (the restorers here key noise by position), so every
    task's inputs are passed whole, in the order of ``clean``, and filtered afterwards.
    ``centre``: the model works in [-1, 1] (RGB): inputs are centred and outputs un-centred.
    """
    def restore(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        restored, maps = restore_fn(images * 2 - 1 if centre else images)
        return ((restored + 1) / 2 if centre else restored), maps

    restored_clean = restore(clean)[0] if copier_baseline else None
    report = {}
    for task_id in task_ids:
        cases = make_cases(clean, task_id, seed=seed, same_pool=same_pool, other_pools=other_pools,
                           has_background=has_background)
        keep = np.array([c.mask.any() for c in cases])
        if not keep.any():
            continue
        restored, maps = restore(np.stack([c.corrupted for c in cases]))
        restored, maps = restored[keep], maps[keep]
        x0 = clean[keep]
        cond = np.stack([c.corrupted for c, k in zip(cases, keep) if k])
        mask = np.stack([c.mask for c, k in zip(cases, keep) if k])
        row = {
            "task": int(task_id),
            "removed": removed_share(x0, cond, restored, mask),
            "ap": average_precision(mask.ravel(), maps.ravel()),
            "chance": float(mask.mean()),
            "n_slices": int(keep.sum()),
        }
        if restored_clean is not None:
            row["clean_error"], row["copier_removed"] = copier_reference(x0, cond, restored_clean[keep], mask)
        report[TASK_NAMES[task_id]] = row
    return report


def draw_averages(restorer_for_seed: Callable[[int], Restorer], counts: Sequence[int]) -> dict[int, Restorer]:
    """For each K in ``counts``: a restorer that averages the restorations and maps of noise seeds 0..K-1.

    A stochastic restorer's own error on healthy input is partly sampling noise, which averaging
    draws (or members) shrinks; this measures how much. Each input's draws are computed once and
    shared, so all counts together cost max(counts) restorations per input; K = 1 is seed 0 alone.
    """
    cache: dict[bytes, tuple[list[np.ndarray], list[np.ndarray]]] = {}

    def all_draws(cond: np.ndarray):
        restored, maps = cache.setdefault(np.ascontiguousarray(cond).tobytes(), ([], []))
        while len(restored) < max(counts):
            r, m = restorer_for_seed(len(restored))(cond)
            restored.append(np.asarray(r, np.float32)), maps.append(np.asarray(m, np.float32))
        return restored, maps

    def averaged(k: int) -> Restorer:
        def restore_fn(cond: np.ndarray):
            restored, maps = all_draws(cond)
            # float32 storage (the cache holds max(counts) draws), float64 sums
            return tuple(np.mean(a[:k], axis=0, dtype=np.float64).astype(np.float32) for a in (restored, maps))
        return restore_fn

    if not counts or min(counts) < 1:
        raise ValueError(f"draw counts must be >= 1, got {list(counts)}")
    return {int(k): averaged(int(k)) for k in counts}


def model_restorer(models: Sequence[torch.nn.Module], plan, *, seed: int = 0, batch_size: int = 16,
                   device: str | torch.device = "cpu") -> Restorer:
    """Restore with networks directly (core sampler, no engine): member-mean restorations and maps.

    Used by condiff-train's validation hook; noise per (seed, slice, member) as in the engine.
    """
    from condiff.anomaly import zero_background
    from condiff.noise import NoiseKey, draw_noise
    from condiff.sampler import restore
    from condiff.ssim import ssim_map

    def restore_fn(cond: np.ndarray):
        cond_t = torch.from_numpy(np.ascontiguousarray(cond, dtype=np.float32))
        restored = torch.zeros_like(cond_t)
        maps = torch.zeros(cond_t.shape[0], *cond_t.shape[2:])
        for member, model in enumerate(models):
            def denoise(x, c, t, model=model):
                with torch.no_grad():
                    return model(x, c, t).float()
            for start in range(0, len(cond_t), batch_size):
                c = cond_t[start:start + batch_size]
                keys = [NoiseKey(seed, "healing", start + i, member) for i in range(len(c))]
                noise = draw_noise(keys, plan.n_noise_draws, tuple(c.shape[1:]))
                x0 = restore(denoise, c.to(device), plan, noise).cpu()
                amap = zero_background(ssim_map(x0, c), c)
                restored[start:start + len(c)] += x0 / len(models)
                maps[start:start + len(c)] += amap[:, 0] / len(models)
        return restored.numpy(), maps.numpy()

    return restore_fn


def val_hook(context: dict, n_slices: int = 12, n_steps: int = 50, sampler: str = "ddpm"):
    """``condiff-train --val-hook condiff.train.healing:val_hook``: the healing metric at every validation.

    Uses a fixed subset of the held-out slices (the ``n_slices`` with the most foreground, evenly
    spread), every task that has its sources, the EMA weights and the inference sampler; logs
    ``heal_removed/<task id>``, ``heal_ap/<task id>``, ``heal_chance/<task id>`` and the copier
    reference ``heal_copier/<task id>`` (``copier_removed``).
    """
    from condiff.sampler import make_plan

    images = context.get("val_images")
    if images is None or len(images) == 0:
        return lambda step, model: {}
    fg = (images > 0).reshape(len(images), -1).mean(axis=1)
    candidates = np.argsort(fg)[::-1][: max(n_slices * 3, n_slices)]
    chosen = np.sort(candidates)[np.linspace(0, len(candidates) - 1, min(n_slices, len(candidates))).astype(int)]
    clean = images[chosen]
    from condiff.train.tasks import ArrayPool

    pool = ArrayPool(images)
    other = tuple(context.get("other_pools") or ())
    task_ids = (0, 1, 2, 3, 4) if other else (0, 2, 3, 4)
    rgb = context.get("modality") == "rgb"
    plan = make_plan(sampler, n_steps)
    device = context.get("device", "cpu")

    def hook(step: int, model: torch.nn.Module) -> dict:
        model.eval()
        restore_fn = model_restorer([model], plan, seed=int(context.get("seed", 0)), batch_size=64, device=device)
        rep = healing_report(restore_fn, clean, task_ids, seed=1234, same_pool=pool, other_pools=other,
                             has_background=not rgb, centre=rgb)
        out = {}
        for row in rep.values():
            k = row["task"]
            out[f"heal_removed/{k}"] = row["removed"]
            out[f"heal_ap/{k}"] = row["ap"]
            out[f"heal_chance/{k}"] = row["chance"]
            out[f"heal_copier/{k}"] = row["copier_removed"]
        return out

    return hook
