"""The worker side of a Ray run: the case-processing actor and the progress counter actor.

Each ``CaseWorker`` builds the same ``RunContext`` a single-process run builds (``make_context``
and ``load_denoisers``, once) and runs ``process_cases([case], ctx)`` per task, so the actor writes
the case's outputs and then its record itself, through ``engine.writer``: atomic files, the same
records, the same bytes as a single-process, sharded or resumed run. Both classes are plain
classes, wrapped with ``ray.remote`` by the driver (``ray_scheduler``), so nothing here imports Ray.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any

from condiff.errors import CondiffError
from condiff.io.cases import Case

from .pipeline import CaseOutcome, RunContext

TEST_HOOK_PREFIX = "CONDIFF_TEST_"   # fault-injection hooks, forwarded from the driver to the actors


def _run_test_hooks(hooks: dict[str, str], case_name: str) -> None:
    """Fault injection for the tests (``CONDIFF_TEST_*`` in the driver's environment).

    ``KILL_ON_CASE=name`` + ``KILL_MARKER=path``: the worker dies (``os._exit(1)``) when it starts
    ``name``, once: the marker file, created exclusively, records that it happened.
    ``DELAY_CASE=name:seconds``: the worker sleeps before ``name`` (to kill the driver mid-run).
    """
    if hooks.get("CONDIFF_TEST_KILL_ON_CASE") == case_name and hooks.get("CONDIFF_TEST_KILL_MARKER"):
        try:
            os.close(os.open(hooks["CONDIFF_TEST_KILL_MARKER"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            pass
        else:
            os._exit(1)
    name, _, seconds = hooks.get("CONDIFF_TEST_DELAY_CASE", "").rpartition(":")
    if name == case_name:
        time.sleep(float(seconds))


class CaseWorker:
    """One loaded engine (the body of a Ray actor; wrapped with ``ray.remote`` at run time).

    A configuration error while loading is kept and returned by ``ready()``, so the driver can
    stop the run with the user's message instead of retrying a worker that can never start.
    """

    def __init__(self, ctx_kwargs: dict[str, Any], num_threads: int, cwd: str, progress_box=None,
                 hooks: dict[str, str] | None = None):
        import torch

        from .pipeline import load_denoisers, make_context

        if os.path.isdir(cwd):  # relative mask patterns resolve as in the driver
            os.chdir(cwd)
        torch.set_num_threads(max(1, num_threads))
        self.hooks = dict(hooks or {})
        self.error: tuple[str, str] | None = None
        self.ctx: RunContext | None = None
        try:
            ctx = make_context(**ctx_kwargs)
            load_denoisers(ctx)
        except CondiffError as exc:
            self.error = (type(exc).__name__, exc.message)
            return
        if progress_box is not None:
            # fire-and-forget: the driver reads the totals when it polls
            ctx.on_work = lambda n: progress_box.add.remote(n, 0)
            ctx.progress = lambda n: progress_box.add.remote(0, n)
        self.ctx = ctx

    def ready(self) -> dict[str, Any]:
        """Who this worker is, or the configuration error that stopped it loading."""
        if self.error is not None:
            return {"error": self.error}
        ctx = self.ctx
        name = ctx.device
        if ctx.device.startswith("cuda"):
            import torch

            name = torch.cuda.get_device_name(torch.device(ctx.device))
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": ctx.device, "device_name": name,
                "batch_size": ctx.batch_size, "options_digest": ctx.options_digest,
                "model_set_digest": ctx.model_set.digest}

    def process(self, case: Case) -> tuple[CaseOutcome, dict[str, Any]]:
        """Run one case (outputs and record written here); returns its outcome and the stats it added."""
        from .pipeline import process_cases

        _run_test_hooks(self.hooks, case.name)
        before = self.ctx.stats.to_dict()
        outcome = process_cases([case], self.ctx)[0]
        after = self.ctx.stats.to_dict()
        return outcome, {k: after[k] - before[k] for k in after}


class ProgressBox:
    """Slice counts pushed by the workers, taken by the driver (the body of a tiny Ray actor)."""

    def __init__(self):
        self.work = self.done = 0

    def add(self, work: int, done: int) -> None:
        self.work += work
        self.done += done

    def take(self) -> tuple[int, int]:
        out = (self.work, self.done)
        self.work = self.done = 0
        return out
