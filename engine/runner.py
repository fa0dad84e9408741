"""The batched ensemble runner: slices x members -> restorations, maps and scores.

Backends with ``fixed_batch`` (CUDA) always get the same batch shape (a short batch is padded
and cropped), so each row's result depends only on its own inputs and the batch size; CPU
backends evaluate rows independently. Either way slices from many scans can share a batch
and results never depend on packing, order or what else was in the batch. A backend that owns
the whole reverse loop (the CUDA-graph engine) exposes ``restore_batch(cond, noise) -> x0``.
Noise comes from ``condiff.noise`` per (seed, digest, slice, member).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from condiff.anomaly import zero_background
from condiff.noise import NoiseKey, draw_noise
from condiff.sampler import SamplerPlan, restore
from condiff.engine.ssim_cuda import best_ssim_map


@dataclass
class SliceJob:
    """One 2-D slice to restore: conditioning image (C, H, W) float32, its foreground (H, W) and noise identity."""

    cond: torch.Tensor
    digest: str
    slice_index: int
    foreground: torch.Tensor | None = None


@dataclass
class SliceResult:
    restoration: torch.Tensor  # (C, H, W) member mean of the restorations
    amap: torch.Tensor         # (H, W) ensemble map, background zeroed
    score: float               # mean of the ensemble map
    member_scores: list[float]
    member_maps: torch.Tensor | None = None  # (M, H, W), only with keep_member_maps


MapFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def run_slices(denoisers: Sequence, jobs: Sequence[SliceJob], plan: SamplerPlan, *, seed: int = 0,
               batch_size: int | None = None, map_fn: MapFn = best_ssim_map,
               progress: Callable[[int], None] | None = None, member_ids: Sequence[int] | None = None,
               keep_member_maps: bool = False, prefetch: bool | None = None) -> list[SliceResult]:
    """Restore every job with every member (one denoiser per member) and average maps and scores.

    ``member_ids``: each denoiser's index in the model set (keys its noise; default 0..M-1), so a
    run of members ``2,`` draws member 2's noise. ``progress(n)`` is called with the number of
    slice-member restorations just finished. ``prefetch`` (default: on a CUDA device) draws the next
    batch's noise on a CPU thread while the device runs this one (0.6 s of CPU per member and batch
    of 64 at 128 px, which the GPU would otherwise wait for); the results are the same.
    """
    if not jobs:
        return []
    n_members = len(denoisers)
    device = denoisers[0].device
    batch_size = batch_size or min(d.max_batch for d in denoisers)
    shape = tuple(jobs[0].cond.shape)
    maps = torch.zeros(len(jobs), *shape[1:], dtype=torch.float32)
    restorations = torch.zeros(len(jobs), *shape, dtype=torch.float32)
    member_scores = torch.zeros(n_members, len(jobs), dtype=torch.float64)
    member_maps = torch.zeros(n_members, len(jobs), *shape[1:]) if keep_member_maps else None
    member_ids = list(range(n_members)) if member_ids is None else list(member_ids)
    if len(member_ids) != n_members:
        raise ValueError(f"{len(member_ids)} member ids for {n_members} denoisers")

    def inputs(m: int, start: int):  # CPU work for one batch: its conditioning images and noise
        chunk = jobs[start:start + batch_size]
        n = len(chunk)
        cond = torch.stack([j.cond for j in chunk])
        keys = [NoiseKey(seed, j.digest, j.slice_index, member_ids[m]) for j in chunk]
        noise = draw_noise(keys, plan.n_noise_draws, shape)
        if n < batch_size and getattr(denoisers[m], "fixed_batch", True):
            # pad to the fixed batch shape; padded rows are discarded
            pad = batch_size - n
            cond = torch.cat([cond, cond[:1].expand(pad, *shape)])
            noise = torch.cat([noise, noise[:1].expand(pad, *noise.shape[1:])])
        return chunk, n, cond, noise

    work = [(m, start) for m in range(n_members) for start in range(0, len(jobs), batch_size)]
    if prefetch is None:
        prefetch = torch.device(device).type == "cuda"
    pool = ThreadPoolExecutor(1, thread_name_prefix="condiff-noise") if prefetch and len(work) > 1 else None
    try:
        pending = pool.submit(inputs, *work[0]) if pool is not None else None
        for k, (m, start) in enumerate(work):
            if pool is not None:
                chunk, n, cond, noise = pending.result()
                if k + 1 < len(work):
                    pending = pool.submit(inputs, *work[k + 1])
            else:
                chunk, n, cond, noise = inputs(m, start)
            _run_batch(denoisers[m], m, start, chunk, n, cond, noise, plan, device, map_fn, maps, restorations,
                       member_scores, member_maps, n_members)
            if progress is not None:
                progress(n)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    scores = maps.flatten(1).double().mean(1)
    return [SliceResult(restorations[i], maps[i], float(scores[i]), member_scores[:, i].tolist(),
                        None if member_maps is None else member_maps[:, i])
            for i in range(len(jobs))]


def _run_batch(den, m, start, chunk, n, cond, noise, plan, device, map_fn, maps, restorations, member_scores,
               member_maps, n_members) -> None:
    """One member on one (padded) batch: restore, map, and add the member's share into the outputs."""
    cond_d = cond.to(device)
    if hasattr(den, "restore_batch"):
        x0 = den.restore_batch(cond_d, noise, plan)
    else:
        x0 = restore(den.denoise, cond_d, plan, noise)
    amap = map_fn(x0, cond_d.float())
    amap = amap[:n].cpu()
    for i, j in enumerate(chunk):
        amap_i = zero_background(amap[i:i + 1], cond[i:i + 1],
                                 None if j.foreground is None else j.foreground[None, None])
        maps[start + i] += amap_i[0, 0] / n_members
        member_scores[m, start + i] = amap_i.double().mean()
        if member_maps is not None:
            member_maps[m, start + i] = amap_i[0, 0]
    restorations[start:start + n] += x0[:n].cpu() / n_members
