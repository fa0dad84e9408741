"""condiff-infer on a Ray cluster: one actor per GPU (or CPU worker group), cases handed out as actors free up.

Each actor builds the same ``RunContext`` a single-process run builds and runs
``process_cases([case], ctx)`` per task, writing the case's outputs and record itself
(``ray_worker``). The driver (the condiff-infer process) holds the output lock, schedules cases
dynamically and retries cases whose actor was lost (``ray_scheduler``), keeps one progress bar for
the cluster, and at the end rebuilds the CSVs and writes ``run.json`` (``cli._run``). Every node
must see the output folder, the model set and the inputs at the same paths (a shared file system).
Connecting and sizing the actors: ``ray_cluster``.

This module is the entry point (``run_on_ray``) and keeps the public names of all four modules.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from condiff.io.cases import Case
from condiff.optional import require

from .pipeline import CaseOutcome, RunContext
# The constants are re-exported so that ``condiff.engine.distributed`` keeps every name it had.
from .ray_cluster import ADDRESS_RE, CPUS_PER_WORKER  # noqa: F401
from .ray_cluster import WorkerLayout, check_address, cluster_layout, connect, disconnect, plan_workers
from .ray_scheduler import POLL_S, CaseScheduler  # noqa: F401
from .ray_worker import TEST_HOOK_PREFIX, CaseWorker, ProgressBox  # noqa: F401

logger = logging.getLogger(__name__)


def driver_context(ctx_kwargs: dict[str, Any]) -> RunContext:
    """The driver's ``RunContext``: the same validation as ``make_context``, without touching a GPU
    (the head node may have none); ``run_on_ray`` fills in the workers' device."""
    from .pipeline import make_context

    ctx = make_context(**{**ctx_kwargs, "device": "cpu"})
    if (ctx_kwargs.get("device") or "auto").startswith("cuda"):  # known now, so --dry-run checks the right digest
        ctx.options = dataclasses.replace(ctx.options, device_type="cuda")
        ctx.device = "cuda"
    return ctx


def absolute_kwargs(ctx_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Model set and output folder made absolute, so workers resolve them as the driver does.

    The mask pattern stays as given (it is part of the option digest); workers run in the
    driver's working folder, so a relative pattern resolves the same way there.
    """
    kw = dict(ctx_kwargs)
    for key in ("models", "out_dir"):
        if kw.get(key) is not None:
            kw[key] = Path(os.path.abspath(kw[key]))
    return kw


def absolute_cases(cases: Sequence[Case]) -> list[Case]:
    """Cases with absolute input paths: workers in other processes (or on other nodes) find the files the
    driver found, and error messages name the same path in every run (``cli._infer`` applies it to
    single-process runs too, so records and cases.csv do not depend on --ray)."""
    return [dataclasses.replace(c, path=Path(os.path.abspath(c.path))) for c in cases]


def run_on_ray(cases: Sequence[Case], ctx_kwargs: dict[str, Any], address: str = "local", n_workers: int | None = None,
               max_retries: int = 2, progress: Callable[[int], None] | None = None, *,
               on_work: Callable[[int], None] | None = None, on_outcome: Callable[[CaseOutcome], None] | None = None,
               ctx: RunContext | None = None, info: dict[str, Any] | None = None,
               layout: WorkerLayout | None = None) -> list[CaseOutcome]:
    """Run ``cases`` on Ray actors; returns one outcome per case, in order, like ``process_cases``.

    ``ctx_kwargs``: the keyword arguments of ``make_context`` (``models``, ``out_dir``, ...);
    ``--device`` there names the workers' device. ``progress(n)`` / ``on_work(n)`` receive
    slice-member restorations finished / about to start across the cluster; ``on_outcome`` each
    case's outcome as it arrives. ``ctx``: the driver's context (``driver_context``): its stats
    are summed from the workers and its device and batch size set to theirs. ``info`` receives
    what run.json records about the cluster. The caller holds the output lock and rebuilds the
    tables afterwards. ``max_retries``: how many more times a case whose worker was lost runs.
    ``layout``: the actors, if the caller planned them already (``cluster_layout``, after ``connect``).
    """
    if not cases:
        return []
    ray = require("ray", "ray")
    kwargs = absolute_kwargs(ctx_kwargs)
    cases = absolute_cases(cases)
    started = connect(address)
    t0 = time.perf_counter()
    try:
        if layout is None:
            layout = cluster_layout(kwargs.get("device", "auto"), n_workers)
        kwargs["device"] = layout.device
        if ctx is None:
            ctx = driver_context(kwargs)
        ctx.options = dataclasses.replace(ctx.options, device_type=layout.device)
        ctx.device = layout.device
        logger.info("Ray: %d %s worker(s) (%d CPU, %d GPU each) for %d case(s)", layout.n_workers, layout.device,
                    layout.num_cpus, layout.num_gpus, len(cases))
        sched = CaseScheduler(ray, cases, kwargs, layout, ctx, max_retries, progress, on_work, on_outcome)
        try:
            outcomes = sched.run()
        finally:
            if sched.info["workers"]:
                ctx.batch_size = sched.info["workers"][0]["batch_size"]
            wall = time.perf_counter() - t0
            if info is not None:
                info.update({"address": address, "n_workers": layout.n_workers, "num_cpus_per_worker": layout.num_cpus,
                             "num_gpus_per_worker": layout.num_gpus, "max_retries": max_retries, "wall_s": wall,
                             "slices_per_s": ctx.stats.n_slices / wall if wall else None, **sched.info})
        return outcomes
    finally:
        if started:
            ray.shutdown()


__all__ = ["run_on_ray", "connect", "disconnect", "plan_workers", "cluster_layout", "driver_context", "absolute_kwargs",
           "absolute_cases", "check_address",
           "WorkerLayout", "CaseWorker", "ProgressBox"]
