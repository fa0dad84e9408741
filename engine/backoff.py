"""Out of memory during inference: recognise it, and with ``--batch-size auto`` back off.

A group of slices that runs out of device (or host) memory is rerun at half the batch size, and
the smaller size is kept for the rest of the run; captured state the backends hold for the old
batch shape (the fast engine's CUDA graphs and their memory pools) is released first. A batch
size the user fixed is honoured instead: running out of memory is then an error naming the next
size to try.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from condiff.errors import BackendUnavailableError

logger = logging.getLogger(__name__)


_OUT_OF_MEMORY_TEXT = ("out of memory", "not enough memory", "failed to allocate memory")


def is_out_of_memory(exc: BaseException | None) -> bool:
    """A device or host allocation failure: torch's ``OutOfMemoryError`` (CUDA), or a runtime
    error that says so (the CPU allocator, ONNX Runtime's CUDA provider, TensorRT). The chain is
    followed: running out of memory inside a CUDA graph capture surfaces as the capture's own
    error ("capture invalidated") raised while handling the ``OutOfMemoryError``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        if isinstance(exc, Exception) and any(t in str(exc).lower() for t in _OUT_OF_MEMORY_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def release_cached(denoisers) -> None:
    """Drop what ``denoisers`` cached per batch shape (the fast engine's CUDA graphs and their pools)."""
    for den in denoisers:
        release = getattr(den, "release_cached", None)
        if release is not None:
            release()


def release_device_memory(ctx) -> None:
    """Drop what the denoisers cached for the old batch shape (the fast engine's CUDA graphs), also
    those of the engine a fallback stands in for, and return freed blocks to the driver, so the
    smaller batch starts from a clean pool."""
    release_cached(ctx.denoisers)
    release_cached(getattr(ctx, "standing_in_for", None) or ())
    if ctx.device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_within_memory(run: Callable, jobs: Sequence, ctx):
    """``run`` (the runner's ``run_slices``) for one group of ``jobs`` with the settings of ``ctx``
    (a ``pipeline.RunContext``). With ``--batch-size auto``, running out of memory halves the
    batch size and reruns the group, keeping the smaller size for the rest of the run. Noise is
    drawn per slice, so the rerun gives the same results: bit for bit on the CPU (rows are evaluated
    one at a time), to rounding on a GPU (other kernels for another batch shape). Progress is
    reported once per restoration however many attempts a group takes. Out of memory with a batch
    size the user fixed, or at batch 1, is a configuration error (exit 2) that says what to try."""
    reported = attempted = 0

    def progress_once(n: int) -> None:
        nonlocal reported, attempted
        attempted += n
        if attempted > reported and ctx.progress is not None:
            ctx.progress(attempted - reported)
        reported = max(reported, attempted)

    while True:
        attempted = 0
        try:
            return run(ctx.denoisers, jobs, ctx.plan, seed=ctx.options.seed, batch_size=ctx.batch_size,
                       progress=progress_once, member_ids=ctx.members, keep_member_maps=ctx.options.member_maps)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        # outside the handler, so the exception's frames (and the device tensors they hold) are gone
        if not ctx.batch_auto and ctx.batch_size > 1:
            raise BackendUnavailableError(
                None, f"out of memory on {ctx.device} at --batch-size {ctx.batch_size} ({reason})",
                f"use --batch-size {ctx.batch_size // 2}, or --batch-size auto to halve it whenever memory runs out")
        if ctx.batch_size <= 1:
            raise BackendUnavailableError(
                None, f"out of memory on {ctx.device} even at batch size 1 ({reason})",
                "free device memory (other processes), select fewer --members for --engine fast, "
                "or use a smaller model set")
        smaller = ctx.batch_size // 2
        logger.warning("out of memory on %s at batch size %d (%s); halving to %d and rerunning the group "
                       "(the same noise per slice: results equal to rounding)", ctx.device, ctx.batch_size, reason, smaller)
        release_device_memory(ctx)
        ctx.batch_size = smaller
        ctx.stats.batch_halvings += 1


__all__ = ["is_out_of_memory", "release_cached", "release_device_memory", "run_within_memory"]
