"""condiff-infer on a Ray cluster: one actor per GPU (or CPU worker group), cases handed out as actors free up.

Each actor builds the same ``RunContext`` a single-process run builds (``make_context`` and
``load_denoisers``, once) and runs ``process_cases([case], ctx)`` per task, so the actor writes
the case's outputs and then its record itself, through ``engine.writer``: atomic files, the same
records, the same bytes as a single-process, sharded or resumed run. The driver (the
condiff-infer process) holds the output lock, schedules cases dynamically (``ray.wait``), keeps
one progress bar for the cluster, and at the end rebuilds the CSVs and writes ``run.json``
(``cli._run``). Every node must see the output folder, the model set and the inputs at the same
paths (a shared file system).

What is retried and what is not:
- a lost actor (its process killed, its node gone, the OOM killer): the case it held goes back to
  the front of the queue and runs on another actor (a replacement is started), at most
  ``max_retries`` more times; after that the case is recorded as failed;
- a case that fails in the pipeline (bad input, non-finite output: the worker returns a failed
  ``CaseOutcome`` and has written a failed record) is reported once and never retried, and so is
  a case whose worker code raised (a bug is deterministic too);
- a worker that cannot start for a configuration reason (``CondiffError`` while loading, e.g. no
  GPU or the model set missing on that node) stops the run with that error (exit 2).

Address: ``local`` starts a cluster on this machine for the run, bound to 127.0.0.1 only, and
stops it afterwards; ``auto`` joins the cluster ``ray start`` made on this machine; ``HOST:PORT``
(or ``ray://HOST:PORT``) joins that one. A process already connected to Ray (a notebook, a test)
uses its connection.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from condiff import errors
from condiff.errors import BackendUnavailableError, CondiffError
from condiff.io.cases import Case
from condiff.optional import require

from .pipeline import CaseOutcome, RunContext

logger = logging.getLogger(__name__)

ADDRESS_RE = re.compile(r"^(auto|local|(ray://)?[A-Za-z0-9_.\-]+:\d+)$")
CPUS_PER_WORKER = 4        # default CPU worker group when --ray-workers is not given
POLL_S = 0.25              # how often the driver looks at progress while waiting
TEST_HOOK_PREFIX = "CONDIFF_TEST_"   # fault-injection hooks, forwarded from the driver to the actors
_LOST = ("RayActorError", "WorkerCrashedError", "NodeDiedError", "OutOfMemoryError", "ObjectLostError",
         "LocalRayletDiedError")


def check_address(text: str) -> str:
    """``auto``, ``local``, ``HOST:PORT`` or ``ray://HOST:PORT``; anything else is a ValueError
    (usually an input path that ``--ray`` took as its value)."""
    if not ADDRESS_RE.match(text):
        raise ValueError(f"--ray {text!r}: expected auto, local, HOST:PORT or ray://HOST:PORT "
                         "(give inputs before --ray, or write --ray=ADDRESS)")
    return text


# ----------------------------------------------------------------------------------------- connecting


@contextlib.contextmanager
def _loopback_only(ray, starting: bool) -> Iterator[None]:
    """Make a local cluster bind 127.0.0.1 only (``starting``), or let a driver join one.

    On Linux Ray replaces a loopback ``_node_ip_address`` (and a loopback cluster address) by
    the machine's routable address unless its "Windows/macOS single-machine" switch is off;
    with the node address on loopback, GCS, raylet, workers and agents all listen on 127.0.0.1,
    and a driver joining such a cluster must use loopback too. The variable is inherited by the
    processes ``ray.init`` starts (the raylet passes it on to its workers); both it and the
    already-imported constant are restored afterwards.
    """
    consts = ray._private.ray_constants
    saved_env = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    saved_const = getattr(consts, "ENABLE_RAY_CLUSTER", None)
    if starting:
        os.environ.pop("RAY_ADDRESS", None)  # otherwise ray.init(address=None) joins that cluster instead
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    consts.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        consts.ENABLE_RAY_CLUSTER = saved_const
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _is_loopback(ray, address: str) -> bool:
    """Whether the cluster ``address`` (``auto``: the one Ray would find) is on 127.0.0.1 / ::1."""
    if address.startswith("ray://"):
        return False  # Ray Client: a plain gRPC connection, nothing binds on this side
    if address == "auto":
        try:
            address = ray._private.services.get_ray_address_from_environment("auto", None) or ""
        except Exception:  # private API: if it moved, connect as Ray does by default
            return False
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def connect(address: str = "local", num_cpus: int | None = None) -> bool:
    """Connect this process to Ray; returns True when it started the connection (and should close it).

    ``local``: a new single-machine cluster on 127.0.0.1 with ``num_cpus`` CPUs (default: the
    CPUs this process may use) and the GPUs Ray detects. A connection that already exists is used
    as it is. An unreachable cluster is a ``BackendUnavailableError`` (exit 2).
    """
    ray = require("ray", "ray")
    if ray.is_initialized():
        return False
    try:
        if address == "local":
            if num_cpus is None:
                num_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            with _loopback_only(ray, starting=True):
                ray.init(address=None, num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                         log_to_driver=False, logging_level=logging.WARNING)
        else:
            with _loopback_only(ray, starting=False) if _is_loopback(ray, address) else contextlib.nullcontext():
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as exc:
        if ray.is_initialized():  # half-started: do not leave processes behind
            ray.shutdown()
        raise BackendUnavailableError(None, f"cannot connect to the Ray cluster at {address!r} ({exc})",
                                      "start one with 'ray start --head', or use --ray local for a cluster on "
                                      "this machine only") from exc
    return True


def disconnect() -> None:
    """Close this process's Ray connection (and stop the cluster if ``connect`` started it here)."""
    ray = require("ray", "ray")
    if ray.is_initialized():
        ray.shutdown()


@dataclasses.dataclass
class WorkerLayout:
    """How the actors are sized: ``device`` "cpu" or "cuda"; one actor holds ``num_gpus`` GPUs and ``num_cpus`` CPUs."""

    device: str
    n_workers: int
    num_cpus: int
    num_gpus: int


def plan_workers(requested_device: str, n_workers: int | None, resources: dict[str, float]) -> WorkerLayout:
    """Actors for a cluster with ``resources`` (``ray.cluster_resources()``).

    ``auto`` means GPUs when the cluster has any; ``cuda`` without GPUs is a
    ``BackendUnavailableError``. GPU actors take one GPU and one CPU each (at most one per GPU);
    CPU actors take ``CPUs // n_workers`` CPUs each (default groups of ``CPUS_PER_WORKER``).
    """
    n_gpus, n_cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    dev = (requested_device or "auto").split(":")[0]
    if dev == "auto":
        dev = "cuda" if n_gpus else "cpu"
    if dev == "cuda":
        if n_gpus == 0:
            raise BackendUnavailableError(None, "--device cuda requested but the Ray cluster has no GPU",
                                          "add GPU nodes, or use --device cpu")
        n = min(n_workers or n_gpus, n_gpus)
        if n_workers and n_workers > n_gpus:
            logger.warning("--ray-workers %d: the cluster has %d GPU(s); using %d workers", n_workers, n_gpus, n)
        return WorkerLayout("cuda", n, 1, 1)
    if dev != "cpu":
        raise BackendUnavailableError(None, f"device {requested_device!r} is not supported with --ray", "use auto, cpu or cuda")
    if n_cpus == 0:
        raise BackendUnavailableError(None, "the Ray cluster has no CPU to run workers on", "check 'ray status'")
    n = min(n_workers or max(1, n_cpus // CPUS_PER_WORKER), n_cpus)
    if n_workers and n_workers > n_cpus:
        logger.warning("--ray-workers %d: the cluster has %d CPU(s); using %d workers", n_workers, n_cpus, n)
    return WorkerLayout("cpu", n, max(1, n_cpus // n), 0)


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


# ----------------------------------------------------------------------------------------- the actor


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


# ----------------------------------------------------------------------------------------- the driver


@dataclasses.dataclass
class _Slot:
    actor: Any
    label: str
    ready: bool = False
    case: int | None = None          # index of the case in flight


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


class _Scheduler:
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
        for _ in range(min(self.layout.n_workers, len(self.cases))):
            self._start_actor()
        try:
            while self.queue or any(s.case is not None for s in self.slots):
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
        except BaseException:
            self._abandon()
            raise
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


def run_on_ray(cases: Sequence[Case], ctx_kwargs: dict[str, Any], address: str = "local", n_workers: int | None = None,
               max_retries: int = 2, progress: Callable[[int], None] | None = None, *,
               on_work: Callable[[int], None] | None = None, on_outcome: Callable[[CaseOutcome], None] | None = None,
               ctx: RunContext | None = None, info: dict[str, Any] | None = None) -> list[CaseOutcome]:
    """Run ``cases`` on Ray actors; returns one outcome per case, in order, like ``process_cases``.

    ``ctx_kwargs``: the keyword arguments of ``make_context`` (``models``, ``out_dir``, ...);
    ``--device`` there names the workers' device. ``progress(n)`` / ``on_work(n)`` receive
    slice-member restorations finished / about to start across the cluster; ``on_outcome`` each
    case's outcome as it arrives. ``ctx``: the driver's context (``driver_context``): its stats
    are summed from the workers and its device and batch size set to theirs. ``info`` receives
    what run.json records about the cluster. The caller holds the output lock and rebuilds the
    tables afterwards. ``max_retries``: how many more times a case whose worker was lost runs.
    """
    if not cases:
        return []
    ray = require("ray", "ray")
    kwargs = absolute_kwargs(ctx_kwargs)
    cases = [dataclasses.replace(c, path=Path(os.path.abspath(c.path))) for c in cases]
    started = connect(address)
    t0 = time.perf_counter()
    try:
        layout = plan_workers(kwargs.get("device", "auto"), n_workers, ray.cluster_resources())
        kwargs["device"] = layout.device
        if ctx is None:
            ctx = driver_context(kwargs)
        ctx.options = dataclasses.replace(ctx.options, device_type=layout.device)
        ctx.device = layout.device
        logger.info("Ray: %d %s worker(s) (%d CPU, %d GPU each) for %d case(s)", layout.n_workers, layout.device,
                    layout.num_cpus, layout.num_gpus, len(cases))
        sched = _Scheduler(ray, cases, kwargs, layout, ctx, max_retries, progress, on_work, on_outcome)
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


__all__ = ["run_on_ray", "connect", "disconnect", "plan_workers", "driver_context", "absolute_kwargs", "check_address",
           "WorkerLayout", "CaseWorker", "ProgressBox"]
