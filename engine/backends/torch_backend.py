"""Eager PyTorch backend (CPU and CUDA; fp32, fp16 or bf16 weights; SDPA attention)."""
from __future__ import annotations

from pathlib import Path

import torch

from condiff.errors import BackendUnavailableError
from condiff.modelset import load_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' -> cuda if available else cpu; refuses an unavailable CUDA device with a clear error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(None, f"device {device!r} requested but CUDA is not available",
                                      "use --device cpu")
    return dev


class TorchDenoiser:
    """Eager network. On the CPU it evaluates rows one at a time: oneDNN's convolutions round
    differently at different batch sizes, and per-row evaluation costs nothing there (batch 1
    is as fast per image as batch 8), so CPU results are bit-identical for any --batch-size.
    On CUDA it evaluates whole fixed-shape batches (``fixed_batch``: the runner pads)."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str = "fp32", max_batch: int = 16,
                 channels_last: bool = False):
        if precision not in DTYPES:
            raise BackendUnavailableError(None, f"unknown precision {precision!r}", "choose fp32, fp16 or bf16")
        if precision == "fp16" and device.type == "cpu":
            raise BackendUnavailableError(None, "fp16 is not supported on the CPU", "use --precision fp32 or bf16")
        self.device = device
        self.precision = precision
        self.max_batch = max_batch
        self.dtype = DTYPES[precision]
        self.model = model.to(device=device, dtype=self.dtype).eval()
        self.fixed_batch = device.type != "cpu"
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def denoise(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_t, cond = x_t.to(self.dtype), cond.to(self.dtype)
        if self.fixed_batch:
            return self.model(x_t, cond, t).float()
        return torch.cat([self.model(x_t[i:i + 1], cond[i:i + 1], t[i:i + 1]) for i in range(x_t.shape[0])]).float()


def open_torch(model_dir: str | Path, *, device=None, precision: str = "fp32", max_batch: int = 16) -> TorchDenoiser:
    dev = resolve_device(device)
    model, _ = load_model(model_dir)
    return TorchDenoiser(model, dev, precision, max_batch)
