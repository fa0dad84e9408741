"""The fast GPU engine: half-precision weights, the whole reverse loop replayed as a CUDA graph.

Per member and batch shape, one CUDA graph holds all n_steps UNet evaluations and sampler
updates: the timestep table and the sampler coefficients live on the device, noise is copied
into a static buffer (made ahead on the CPU by ``condiff.noise``, so every backend consumes the
same numbers), and nothing synchronises with the host inside the loop. Sampler state (x_t,
x0) stays float32 (reference-method.md §10 D3); only the network runs in fp16/bf16.

``kernels="triton"`` runs the network's attention and GroupNorm(+SiLU) through condiff's Triton
kernels (``condiff.engine.kernels``) instead of PyTorch's (cuDNN attention, eager GroupNorm); they
are compiled during the warm-up run, before capture. Unmeasured until bench/gpu_check.sh records it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from condiff.errors import BackendUnavailableError
from condiff.sampler import SamplerPlan, step

logger = logging.getLogger(__name__)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class _Captured:
    """Everything one captured loop reads. A CUDA graph replays raw device addresses, so every
    tensor it reads must stay alive as long as the graph: the sampler's coefficient table
    (``plan``) once lived only in a local variable, was freed after capture, and later replays read
    whatever reused that memory (replays after the first disagreed with the eager loop)."""

    static_cond: torch.Tensor
    static_noise: torch.Tensor
    t_table: torch.Tensor
    plan: SamplerPlan
    run: Callable[[], torch.Tensor]
    graph: "torch.cuda.CUDAGraph | None" = None
    static_out: torch.Tensor | None = None
    checked: int = 0


class GraphDenoiser:
    """Owns the loop: ``restore_batch(cond, noise, plan) -> x0``; also a plain ``denoise``."""

    name = "fast"
    fixed_batch = True

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str = "fp16",
                 max_batch: int = 32, channels_last: bool = False, use_graphs: bool = True, kernels: str = "torch",
                 kernel_options: dict | None = None):
        from condiff.engine.kernels import KERNELS

        if device.type != "cuda":
            raise BackendUnavailableError(None, "the fast engine needs a CUDA device", "use --engine torch on the CPU")
        if precision not in DTYPES:
            raise BackendUnavailableError(None, f"unknown precision {precision!r}", "choose fp16, bf16 or fp32")
        if kernels not in KERNELS:
            raise BackendUnavailableError(None, f"unknown kernels {kernels!r}", f"choose one of {', '.join(KERNELS)}")
        self.device, self.precision, self.max_batch, self.kernels = device, precision, max_batch, kernels
        self.dtype = DTYPES[precision]
        self.model = model.to(device=device, dtype=self.dtype).eval()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if kernels == "triton":
            from condiff.engine.kernels import use_triton_kernels

            # in place, like the casts above; weights unchanged. kernel_options: use_triton_kernels' switches
            use_triton_kernels(self.model, **(kernel_options or {}))
        elif kernels == "compile":
            from condiff.engine.kernels import compile_model

            self.model = compile_model(self.model)  # compiled by _build's warm-up run, before capture
        self.use_graphs = use_graphs
        self.verify_replays = 2
        self.graph_fallbacks = 0
        self._graphs: dict[tuple, _Captured] = {}

    @torch.inference_mode()
    def denoise(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x_t.to(self.dtype), cond.to(self.dtype), t).float()

    def _loop(self, x, cond_h, noise, t_table, plan: SamplerPlan):
        """The reverse loop on static tensors (captured once, replayed many times)."""
        slot = 1
        x0 = x
        for i, t in enumerate(plan.timesteps):
            eps = self.model(x.to(self.dtype).contiguous(memory_format=self.memory_format), cond_h, t_table[i])
            z = None
            if plan.kind == "ddpm" and t > 0:
                z = noise[:, slot]
                slot += 1
            x, x0 = step(plan, i, x, eps.float(), z)
        return x

    def _build(self, shape: tuple, plan: SamplerPlan) -> _Captured:
        b = shape[0]
        plan_d = plan.to(self.device)
        static_cond = torch.zeros(shape, device=self.device)
        static_noise = torch.zeros((b, plan.n_noise_draws, *shape[1:]), device=self.device)
        t_table = torch.tensor(plan.timesteps, device=self.device, dtype=torch.int64)[:, None].expand(-1, b).contiguous()

        def run():
            cond_h = static_cond.to(self.dtype).contiguous(memory_format=self.memory_format)
            return self._loop(static_noise[:, 0], cond_h, static_noise, t_table, plan_d)

        entry = _Captured(static_cond, static_noise, t_table, plan_d, run)
        if not self.use_graphs:
            return entry
        # warm up on a side stream (cuDNN/cuBLAS pick their kernels), then capture
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        entry.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(entry.graph):
            entry.static_out = run()
        return entry

    def release_cached(self) -> None:
        """Forget every captured loop (each holds a private memory pool for its batch shape); the
        pipeline calls this before retrying at a smaller batch after running out of memory."""
        self._graphs.clear()

    @torch.inference_mode()
    def restore_batch(self, cond: torch.Tensor, noise: torch.Tensor, plan: SamplerPlan) -> torch.Tensor:
        """cond (B, C, H, W) on the device, noise (B, n_draws, C, H, W) on the CPU -> x0 float32."""
        key = (tuple(cond.shape), plan.kind, tuple(plan.timesteps))
        if key not in self._graphs:
            self._graphs[key] = self._build(tuple(cond.shape), plan)
            logger.debug("built %s graph for %s", "CUDA" if self.use_graphs else "eager", key)
        entry = self._graphs[key]
        entry.static_cond.copy_(cond, non_blocking=True)
        entry.static_noise.copy_(noise.pin_memory() if noise.device.type == "cpu" else noise, non_blocking=True)
        if entry.graph is None:
            return entry.run().clone()
        entry.graph.replay()
        result = entry.static_out.clone()
        if entry.checked < self.verify_replays:
            # Safety net: a replay must reproduce the eager loop on the same inputs bit for bit (same
            # kernels). It caught the freed-coefficient bug (see _Captured); a graph that disagrees is
            # dropped for the eager loop rather than trusted.
            eager = entry.run()
            diff = float((eager - result).abs().max())
            if diff > 1e-5 * (1.0 + float(eager.abs().max())):
                logger.warning("CUDA graph for %s disagrees with the eager loop (max |diff| %.3g): "
                               "using the eager loop for this shape", key[0], diff)
                entry.graph = entry.static_out = None
                self.graph_fallbacks += 1
                return eager.clone()
            entry.checked += 1
        return result


def open_fast(model_dir: str | Path | torch.nn.Module, *, device=None, precision: str = "fp16",
              max_batch: int = 32, channels_last: bool = False, use_graphs: bool = True,
              kernels: str = "torch", kernel_options: dict | None = None) -> GraphDenoiser:
    from condiff.engine.backends.torch_backend import resolve_device
    from condiff.modelset import load_model

    dev = resolve_device(device or "cuda")
    model = model_dir if isinstance(model_dir, torch.nn.Module) else load_model(model_dir)[0]
    return GraphDenoiser(model, dev, precision, max_batch, channels_last, use_graphs, kernels=kernels,
                         kernel_options=kernel_options)
