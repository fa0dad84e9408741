"""The fused CUDA SSIM anomaly map (``kernels/ssim.cu``), launched through CuPy on torch's current stream.

Specification: :func:`condiff.ssim.ssim_map` (reference-method.md §6), matched within 1e-5 in fp32.

Bytes per call, (B, C, H, W) float32 inputs: the grouped-conv reference writes and re-reads a 5C-channel
stack and its filtered copy (about 22 image-sized passes for C = 1); the kernel reads x and y once and
writes the (B, 1, H, W) map once: ``B*C*H*W*(itemsize_x + itemsize_y) + 4*B*H*W`` bytes.

- :func:`ssim_map_cuda` runs the kernel; CUDA tensors only, no autograd.
- :func:`best_ssim_map` is what the engine calls: the kernel for CUDA tensors when CuPy is installed, and
  the torch reference otherwise (CPU tensors, CuPy missing, or inputs that need gradients). The fallback
  is intended, not an error: both paths compute the same map.

CuPy is imported lazily through :func:`condiff.optional.require`; the module is compiled once per device
with NVRTC at first use (CuPy caches the binary on disk).
"""
from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import numpy as np
import torch

from condiff import ssim as _reference
from condiff.errors import BackendUnavailableError
from condiff.optional import require

logger = logging.getLogger(__name__)

KERNEL_PATH = Path(__file__).resolve().parent / "kernels" / "ssim.cu"
TILE_W = 32  # must match TILE_W / TILE_H / THREADS_* in ssim.cu
TILE_H = 32
BLOCK = (32, 8, 1)
MAX_GRID_Z = 65535  # CUDA's limit on grid.z; the kernel loops over the remaining images
_NATIVE = {torch.float32: "f32", torch.float16: "f16"}  # other float dtypes are converted to float32


def window_1d() -> np.ndarray:
    """The 1-D Gaussian (11,) float32 that ``condiff.ssim`` uses; its outer product is the 2-D window."""
    i = torch.arange(_reference.WINDOW, dtype=torch.float32) - _reference.WINDOW // 2
    g = torch.exp(-(i ** 2) / (2 * _reference.SIGMA ** 2))
    g = g / g.sum()
    # guard against the reference changing its window without this file following
    assert torch.equal(torch.outer(g, g), _reference._window("cpu", torch.float32)), "window drifted from ssim.py"
    return g.numpy()


def kernel_window(source: str | None = None) -> np.ndarray:
    """The (11,) float32 weights written as literals in ssim.cu's ``__constant__ c_window``."""
    source = KERNEL_PATH.read_text() if source is None else source
    body = re.search(r"c_window\[WIN\]\s*=\s*\{([^}]*)\}", source).group(1)
    return np.array([float(v.strip().rstrip("f")) for v in body.split(",") if v.strip()], dtype=np.float32)


@functools.lru_cache(maxsize=None)
def _kernels(device_index: int) -> dict:
    """Compile ssim.cu for one device with NVRTC; returns {"f32_f32": kernel, ...}."""
    source = KERNEL_PATH.read_text()
    # the weights live in __constant__ memory as literals; refuse to build if they are not bit-for-bit the
    # float32 values ssim.py computes (checked on the host, so no device round trip is needed)
    if not np.array_equal(kernel_window(source).view(np.uint32), window_1d().view(np.uint32)):
        raise AssertionError(f"{KERNEL_PATH}: c_window differs from condiff.ssim's window; regenerate the literals")
    cp = require("cupy", "gpu")
    with cp.cuda.Device(device_index):
        module = cp.RawModule(code=source, options=("-std=c++17",))
        kernels = {f"{a}_{b}": module.get_function(f"ssim_map_{a}_{b}") for a in ("f32", "f16") for b in ("f32", "f16")}
    kernels["_module"] = module  # keeps the loaded module alive
    logger.debug("compiled %s for cuda:%d", KERNEL_PATH.name, device_index)
    return kernels


@functools.lru_cache(maxsize=None)
def cuda_ssim_available() -> bool:
    """True when torch sees a CUDA device and CuPy imports; compilation happens at the first call."""
    if not torch.cuda.is_available():
        return False
    try:
        require("cupy", "gpu")
    except BackendUnavailableError as exc:
        logger.debug("CUDA SSIM kernel unavailable, using the torch reference: %s", exc)
        return False
    return True


def _check_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape != y.shape:
        raise ValueError(f"ssim map needs two (B, C, H, W) tensors of equal shape, got x {tuple(x.shape)} "
                         f"and y {tuple(y.shape)}")
    if not (x.is_floating_point() and y.is_floating_point()):
        raise ValueError(f"ssim map needs floating-point tensors, got x {x.dtype} {tuple(x.shape)} "
                         f"and y {y.dtype} {tuple(y.shape)}")


def _as_kernel_input(t: torch.Tensor) -> torch.Tensor:
    # float64 / bfloat16 go through float32 exactly as ssim_map's .float() does
    t = t.detach()
    if t.dtype not in _NATIVE:
        t = t.float()
    return t.contiguous()


def ssim_map_cuda(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM anomaly map of restoration ``x`` against input ``y`` with the fused kernel.

    x, y: (B, C, H, W) on the same CUDA device, float32 or float16 (each independently; other float
    dtypes are converted to float32). Returns (B, 1, H, W) float32 on that device, computed on torch's
    current stream. No autograd: the result never requires grad.
    """
    _check_inputs(x, y)
    if not (x.is_cuda and y.is_cuda) or x.device != y.device:
        raise ValueError(f"ssim_map_cuda needs both tensors on one CUDA device, got x {tuple(x.shape)} on "
                         f"{x.device} and y {tuple(y.shape)} on {y.device}")
    b, c, h, w = x.shape
    out = torch.empty((b, 1, h, w), device=x.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    if c == 0:
        raise ValueError(f"ssim map needs at least one channel, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    x, y = _as_kernel_input(x), _as_kernel_input(y)
    device = x.device.index
    kernel = _kernels(device)[f"{_NATIVE[x.dtype]}_{_NATIVE[y.dtype]}"]
    cp = require("cupy", "gpu")
    grid = ((w + TILE_W - 1) // TILE_W, (h + TILE_H - 1) // TILE_H, min(b, MAX_GRID_Z))
    args = (np.uint64(x.data_ptr()), np.uint64(y.data_ptr()), np.uint64(out.data_ptr()),
            np.int32(b), np.int32(c), np.int32(h), np.int32(w))
    stream = cp.cuda.ExternalStream(torch.cuda.current_stream(x.device).cuda_stream, device)
    with cp.cuda.Device(device), stream:  # ordered after torch's pending work on x and y
        kernel(grid, BLOCK, args)
    return out


def best_ssim_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) x2 -> (B, 1, H, W): the CUDA kernel where it applies, else :func:`condiff.ssim.ssim_map`.

    The kernel is used for inputs on one CUDA device that need no gradient, when CuPy is installed. CPU
    tensors, a missing CuPy and differentiable inputs take the torch reference (same map within 1e-5).
    """
    _check_inputs(x, y)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    if x.is_cuda and y.is_cuda and x.device == y.device and not needs_grad and cuda_ssim_available():
        return ssim_map_cuda(x, y)
    return _reference.ssim_map(x, y)
