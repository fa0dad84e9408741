"""Eager PyTorch backend (CPU and CUDA; fp32, fp16 or bf16 weights; SDPA attention)."""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
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


@contextlib.contextmanager
def _intra_op_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TorchDenoiser:
    """Eager network. On the CPU every row (slice) is its own batch-1 call on one intra-op thread,
    and the rows of a batch run side by side on as many threads as torch may use: oneDNN's
    convolutions round differently at other batch sizes and other thread counts, so this makes CPU
    results bit-identical for any --batch-size, packing, core count or OMP_NUM_THREADS, and keeps
    every core busy (small nets gain most: a 32-px batch-1 call is too small to split across
    threads). On CUDA it evaluates whole fixed-shape batches (``fixed_batch``: the runner pads)."""

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
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def denoise(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_t, cond = x_t.to(self.dtype), cond.to(self.dtype)
        if self.fixed_batch:
            return self.model(x_t, cond, t).float()
        return self._rows(x_t, cond, t).float()

    def _row(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        with torch.inference_mode():  # thread-local: each pool thread sets it itself
            return self.model(x_t[i:i + 1], cond[i:i + 1], t[i:i + 1])

    def _rows(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x_t.shape[0]
        workers = torch.get_num_threads()  # as many rows at once as torch may use threads
        with _intra_op_threads(1):
            if n == 1 or workers == 1:
                return torch.cat([self._row(x_t, cond, t, i) for i in range(n)])
            if self._pool_size != workers:
                if self._pool is not None:
                    self._pool.shutdown(wait=True)
                self._pool = ThreadPoolExecutor(workers, thread_name_prefix="condiff-row")
                self._pool_size = workers
            return torch.cat(list(self._pool.map(lambda i: self._row(x_t, cond, t, i), range(n))))


def open_torch(model_dir: str | Path, *, device=None, precision: str = "fp32", max_batch: int = 16) -> TorchDenoiser:
    dev = resolve_device(device)
    model, _ = load_model(model_dir)
    return TorchDenoiser(model, dev, precision, max_batch)
