"""The driver side of a Ray run: the ``ray.wait`` loop that hands out cases, replaces lost actors and retries.

What is retried and what is not:
- a lost actor (its process killed, its node gone, the OOM killer): the case it held goes back to
  the front of the queue and runs on another actor (a replacement is started), at most
  ``max_retries`` more times; after that the case is recorded as failed;
- a case that fails in the pipeline (bad input, non-finite output: the worker returns a failed
  ``CaseOutcome`` and has written a failed record) is reported once and never retried, and so is
  a case whose worker code raised (a bug is deterministic too);
- a worker that cannot start for a configuration reason (``CondiffError`` while loading, e.g. no
  GPU or the model set missing on that node) stops the run with that error (exit 2).

The scheduler receives the imported ``ray`` module from its caller; nothing here imports Ray.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Sequence

from condiff import errors
from condiff.errors import CondiffError
from condiff.io.cases import Case

from .pipeline import CaseOutcome, RunContext
from .ray_cluster import WorkerLayout
from .ray_worker import TEST_HOOK_PREFIX, CaseWorker, ProgressBox

logger = logging.getLogger(__name__)
case_logger = logging.getLogger(__name__.rsplit(".", 1)[0] + ".pipeline")  # the logger the single-process run uses

POLL_S = 0.25              # how often the driver looks at progress while waiting
_LOST = ("RayActorError", "WorkerCrashedError", "NodeDiedError", "OutOfMemoryError", "ObjectLostError",
         "LocalRayletDiedError")


@dataclasses.dataclass
class _Slot:
    actor: Any
    label: str
    ready: bool = False
    case: int | None = None          # index of the case in flight


def log_outcome(outcome: CaseOutcome) -> None:
    """Log a worker's case outcome on the driver, as ``pipeline`` logs it in a single-process run (the same
    message, level and ``extra`` fields, so condiff.log and --log-format json read the same): the workers'
    own log lines stay in the workers. Cases a stop left unfinished are not logged per case there either."""
    case = outcome.case
    if outcome.status == "ok":
        case_logger.info("case %s done: score %.6g, max slice %.6g, %d slices", case.name, outcome.score,
                         outcome.max_slice_score, outcome.n_slices,
                         extra={"case": case.name, "status": "ok", "score": outcome.score,
                                "max_slice_score": outcome.max_slice_score, "n_slices": outcome.n_slices})
    elif outcome.status == "skipped":
        case_logger.info("case %s: outputs up to date, skipped", case.name, extra={"case": case.name, "status": "skipped"})
    elif outcome.error_type != "NotFinished":
        case_logger.info("case %s failed: %s", case.name, outcome.error,
                         extra={"case": case.name, "status": "failed", "error": outcome.error})


@contextlib.contextmanager
def _sigterm_deferred():
    """While the loop waits in Ray, a SIGTERM is only noted (the yielded list); the caller stops at a safe
    point and delivers it to the handler it had (condiff's raises ``Terminated``: exit 143, run.json
    interrupted). A handler that raises inside ``ray.wait``/``ray.get`` is called from Ray's own signal
    check, which turns anything but ``KeyboardInterrupt`` into a ``SystemError``. Main thread only."""
    pending: list[int] = []
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous in (None, signal.SIG_IGN):
        yield pending  # cannot install (or restore) a handler here, or SIGTERM is ignored anyway
        return
    signal.signal(signal.SIGTERM, lambda signum, frame: pending.append(signum))
    try:
        yield pending
    finally:
        signal.signal(signal.SIGTERM, previous)


def _lost_types(ray) -> tuple[type, ...]:
    return tuple(getattr(ray.exceptions, n) for n in _LOST if hasattr(ray.exceptions, n))


def _temp_files(out_dir: Path, ctx: RunContext, case: Case) -> list[Path]:
    """Temporary files (``io.atomic``) a killed worker may have left for ``case``."""
    from .plan import plan_case

    plan = plan_case(case, ctx.options)
    found = []
    for rel in [plan.record, *plan.outputs.values()]:
        path = out_dir / rel
        if path.parent.is_dir():
            found.extend(path.parent.glob(f".{path.name}.*.tmp"))
    return found


class CaseScheduler:
    """The ``ray.wait`` loop: hands cases to free actors, replaces lost ones, collects outcomes."""

    def __init__(self, ray, cases: Sequence[Case], ctx_kwargs: dict[str, Any], layout: WorkerLayout, ctx: RunContext,
                 max_retries: int, progress, on_work, on_outcome):
        self.ray, self.cases, self.kwargs, self.layout, self.ctx = ray, list(cases), ctx_kwargs, layout, ctx
        self.max_retries, self.progress, self.on_work, self.on_outcome = max_retries, progress, on_work, on_outcome
        self.lost_types = _lost_types(ray)
        self.queue = collections.deque(range(len(self.cases)))
        self.attempts = [0] * len(self.cases)
        self.outcomes: list[CaseOutcome | None] = [None] * len(self.cases)
        self.refs: dict[Any, _Slot] = {}
        self.slots: list[_Slot] = []
        self.n_started = 0
        # enough replacements for every allowed retry, plus a few for actors lost while idle
        self.replacements_left = layout.n_workers + len(self.cases) * max_retries
        self.info: dict[str, Any] = {"workers": [], "lost_workers": 0, "retried": [], "lost_cases": []}
        self.box = None
        self.worker_class = None
        self.hooks = {k: v for k, v in os.environ.items() if k.startswith(TEST_HOOK_PREFIX)}

    # -- actors

    def _start_actor(self) -> None:
        lay = self.layout
        if self.worker_class is None:
            self.worker_class = self.ray.remote(CaseWorker).options(num_cpus=lay.num_cpus, num_gpus=lay.num_gpus,
                                                                    max_restarts=0, max_task_retries=0)
        actor = self.worker_class.remote(self.kwargs, lay.num_cpus, os.getcwd(), self.box, self.hooks)
        self.n_started += 1
        slot = _Slot(actor, f"worker {self.n_started}")
        self.slots.append(slot)
        self.refs[actor.ready.remote()] = slot

    def _drop(self, slot: _Slot) -> None:
        with contextlib.suppress(Exception):
            self.ray.kill(slot.actor, no_restart=True)
        if slot in self.slots:
            self.slots.remove(slot)

    def _assign(self, slot: _Slot) -> None:
        if self.queue:
            k = self.queue.popleft()
            self.attempts[k] += 1
            slot.case = k
            self.refs[slot.actor.process.remote(self.cases[k])] = slot

    # -- results

    def _finish(self, k: int, outcome: CaseOutcome) -> None:
        self.outcomes[k] = outcome
        if self.on_outcome is not None:
            self.on_outcome(outcome)

    def _fail_case(self, k: int, exc: BaseException) -> None:
        from .pipeline import _fail  # the failed-record writer every case failure goes through
        from .plan import plan_case

        case = self.cases[k]
        self._finish(k, _fail(self.ctx, case, plan_case(case, self.ctx.options), exc))

    def _on_ready(self, slot: _Slot, info: dict[str, Any]) -> None:
        if "error" in info:
            kind, message = info["error"]
            raise getattr(errors, kind, CondiffError)(None, message)
        want = (self.ctx.options_digest, self.ctx.model_set.digest)
        if (info["options_digest"], info["model_set_digest"]) != want:
            raise CondiffError(None, f"the Ray worker on {info['host']} would compute other outputs than this driver "
                                     f"(options digest {info['options_digest'][:12]} != {want[0][:12]} or model set "
                                     f"digest {info['model_set_digest'][:12]} != {want[1][:12]})",
                               "install the same condiff version on every node and give the model set on a shared path")
        slot.ready = True
        self.info["workers"].append({k: info[k] for k in ("host", "device", "device_name", "batch_size")})
        logger.debug("%s ready on %s (%s)", slot.label, info["host"], info["device_name"])

    def _on_lost(self, slot: _Slot, exc: BaseException) -> None:
        self.info["lost_workers"] += 1
        k = slot.case
        self._drop(slot)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if k is not None:
            case = self.cases[k]
            for tmp in _temp_files(self.ctx.out_dir, self.ctx, case):
                tmp.unlink(missing_ok=True)
            if self.attempts[k] > self.max_retries:
                logger.error("case %s: its Ray worker was lost %d times; giving up (%s)", case.name, self.attempts[k],
                             reason)
                self.info["lost_cases"].append(case.name)
                self._fail_case(k, CondiffError(case.path, f"its Ray worker was lost {self.attempts[k]} times "
                                                           f"(last: {reason})",
                                                "check the workers' logs (ray logs) for out-of-memory kills or node failures"))
            else:
                logger.warning("case %s: its Ray worker was lost (%s); retrying on another worker (attempt %d of %d)",
                               case.name, reason, self.attempts[k] + 1, self.max_retries + 1)
                self.info["retried"].append(case.name)
                self.queue.appendleft(k)
        else:
            logger.warning("%s was lost before it took a case (%s)", slot.label, reason)
        if self.replacements_left > 0 and (self.queue or any(s.case is not None for s in self.slots)):
            self.replacements_left -= 1
            self._start_actor()

    def _collect(self, ref) -> None:
        ray = self.ray
        slot = self.refs.pop(ref)
        try:
            value = ray.get(ref)
        except self.lost_types as exc:
            if isinstance(exc, ray.exceptions.RayActorError) and exc.actor_init_failed:
                raise RuntimeError(f"a Ray worker failed to start: {exc}") from exc
            self._on_lost(slot, exc)
            return
        except ray.exceptions.RayTaskError as exc:
            # the worker's code raised: a bug or an input the pipeline did not catch; deterministic, not retried
            if slot.case is None:
                raise
            k, slot.case = slot.case, None
            self._fail_case(k, exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc)
            self._assign(slot)
            return
        if slot.case is None:
            self._on_ready(slot, value)
        else:
            k, slot.case = slot.case, None
            outcome, stats = value
            for key, v in stats.items():
                setattr(self.ctx.stats, key, getattr(self.ctx.stats, key) + v)
            log_outcome(outcome)  # the worker logged it where no log file is (_fail_case's cases log here)
            self._finish(k, outcome)
        self._assign(slot)

    def _poll_progress(self) -> None:
        if self.box is None:
            return
        try:
            work, done = self.ray.get(self.box.take.remote())
        except self.ray.exceptions.RayError as exc:  # the bar is not worth stopping the run for
            logger.warning("progress across the cluster is no longer shown (%s)", exc)
            self.box = None
            return
        if work and self.on_work is not None:
            self.on_work(work)
        if done and self.progress is not None:
            self.progress(done)

    # -- the loop

    def run(self) -> list[CaseOutcome]:
        ray = self.ray
        if self.progress is not None or self.on_work is not None:
            self.box = ray.remote(ProgressBox).options(num_cpus=0).remote()
        with _sigterm_deferred() as sigterm:
            try:
                for _ in range(min(self.layout.n_workers, len(self.cases))):
                    self._start_actor()
                while not sigterm and (self.queue or any(s.case is not None for s in self.slots)):
                    if not self.refs:  # every worker lost and no replacement left
                        reason = CondiffError(None, "no Ray worker left to run this case", "check the cluster ('ray status')")
                        while self.queue:
                            k = self.queue.popleft()
                            self._fail_case(k, CondiffError(self.cases[k].path, reason.problem, reason.hint))
                        break
                    done, _ = ray.wait(list(self.refs), num_returns=1, timeout=POLL_S)
                    for ref in done:
                        self._collect(ref)
                    self._poll_progress()
                if sigterm:
                    self._abandon()
            except BaseException:
                self._abandon()
                raise
        if sigterm:  # the handler the caller had is back: deliver the signal to it (condiff's raises Terminated)
            signal.raise_signal(signal.SIGTERM)
            raise SystemExit(128 + signal.SIGTERM)  # that handler did not stop the run; the workers are gone
        self._poll_progress()
        self._shutdown_actors()
        return [o for o in self.outcomes if o is not None]

    def _shutdown_actors(self) -> None:
        for slot in list(self.slots):
            self._drop(slot)
        if self.box is not None:
            with contextlib.suppress(Exception):
                self.ray.kill(self.box, no_restart=True)

    def _abandon(self) -> None:
        """Interrupted (or a configuration error): stop every worker, wait until the ones holding a
        case are gone, and remove the temporary files they may have left."""
        busy = [(ref, slot) for ref, slot in self.refs.items() if slot.case is not None]
        self._shutdown_actors()
        with contextlib.suppress(Exception):
            self.ray.wait([r for r, _ in busy], num_returns=len(busy), timeout=10)
        for _, slot in busy:
            for tmp in _temp_files(self.ctx.out_dir, self.ctx, self.cases[slot.case]):
                tmp.unlink(missing_ok=True)
