"""``--deterministic`` (ecosystem C.41): the same bits on every run on one machine.

condiff's noise is already a pure function of (seed, input, slice, member, step), and eager fp32 on
the CPU is bit-stable; what can still vary between runs on a GPU is the kernels: cuDNN may pick
its algorithm by timing (``benchmark``) or use non-deterministic ones, and cuBLAS splits work by
workspace. This switches PyTorch to deterministic algorithms (an op without one raises instead of
varying) and asks ONNX Runtime for deterministic compute. Process-wide: it stays on after the run.
TensorRT has no such mode (a built engine runs the kernels it chose at build time every time, but
two builds may choose differently), so it is only recorded there. ``--version`` and ``run.json``
show the settings in force (``condiff.cli_common.environment_report``).
"""
from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)
CUBLAS_WORKSPACE = ":4096:8"  # PyTorch's documented setting for deterministic cuBLAS


def enable_deterministic(engine: str | None = None) -> None:
    """Deterministic kernels for this process (before any network touches the GPU)."""
    import torch

    # cuBLAS reads this when it creates its handle, i.e. at the first GPU matmul: set it before
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if engine == "trt":
        logger.warning("--deterministic: TensorRT has no deterministic mode; one built engine reruns the same "
                       "kernels, but a rebuild may choose others")


__all__ = ["enable_deterministic", "CUBLAS_WORKSPACE"]
