"""Connecting to a Ray cluster and sizing the actors that run cases on it.

Address: ``local`` starts a cluster on this machine for the run, bound to 127.0.0.1 only, and
stops it afterwards (even when ``ray start`` made another one here); ``auto`` joins the cluster
``ray start`` made on this machine; ``HOST:PORT`` (or ``ray://HOST:PORT``) joins that one. A process already connected to Ray (a notebook, a test)
uses its connection. Ray itself is imported inside the functions (``optional.require``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import signal
import socket
import threading
from typing import Iterator

from condiff.errors import BackendUnavailableError
from condiff.optional import require

logger = logging.getLogger(__name__)

ADDRESS_RE = re.compile(r"^(auto|local|(ray://)?[A-Za-z0-9_.\-]+:\d+)$")
CPUS_PER_WORKER = 4        # default CPU worker group when --ray-workers is not given
PROBE_TIMEOUT_S = 5.0      # how long a HOST:PORT may take to accept a TCP connection before connect gives up


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
        os.environ.pop("RAY_ADDRESS", None)  # another cluster's address: not for the processes this one starts
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


def _probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """A ``ConnectionError`` within ``timeout`` seconds when nothing accepts TCP connections at ``address``
    (``HOST:PORT`` or ``ray://HOST:PORT``): ``ray.init`` itself retries such an address for many minutes."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {host}:{port}: {exc.strerror or exc}") from None


def _resolved(ray, address: str) -> str | None:
    """The ``HOST:PORT`` that ``auto`` would join (RAY_ADDRESS, or the last 'ray start' on this machine), or None."""
    try:
        found = ray._private.services.get_ray_address_from_environment("auto", None)
    except Exception:  # private API, or nothing found: ray.init reports that itself, quickly
        return None
    return found if found and ADDRESS_RE.match(found) and found not in ("auto", "local") else None


@contextlib.contextmanager
def _keep_signal_handlers() -> Iterator[None]:
    """Restore the SIGTERM and SIGINT handlers that ``ray.init`` replaces (it installs ``sys.exit(signum)``
    for SIGTERM, and its core worker may install its own), so condiff's handlers (SIGTERM: ``Terminated``,
    exit 143 with run.json marked interrupted) stay in force. Main thread only; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:  # None: installed outside Python, cannot be restored from here
                signal.signal(sig, handler)


def connect(address: str = "local", num_cpus: int | None = None, quiet: bool = False) -> bool:
    """Connect this process to Ray; returns True when it started the connection (and should close it).

    ``local``: a new single-machine cluster on 127.0.0.1 with ``num_cpus`` CPUs (default: the
    CPUs this process may use) and the GPUs Ray detects, even when another cluster runs on this
    machine. A connection that already exists is used as it is. An unreachable cluster is a
    ``BackendUnavailableError`` (exit 2), within seconds: a ``HOST:PORT`` (or the address ``auto``
    finds) where nothing listens is refused before ``ray.init``. The process's SIGTERM and SIGINT
    handlers are the same afterwards. ``quiet`` (-q): Ray's own warnings (e.g. its token-authentication
    notice) are not printed either.
    """
    ray = require("ray", "ray")
    if ray.is_initialized():
        return False
    ray_level = logging.ERROR if quiet else logging.WARNING
    try:
        with _keep_signal_handlers():
            if address == "local":
                if num_cpus is None:
                    num_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
                with _loopback_only(ray, starting=True):
                    # "local", not None: None would join a cluster 'ray start' made (or a stale
                    # /tmp/ray/ray_current_cluster names) and refuse num_cpus
                    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                             log_to_driver=False, logging_level=ray_level)
            else:
                target = _resolved(ray, address) if address == "auto" else address
                if target is not None:
                    _probe(target)
                with _loopback_only(ray, starting=False) if _is_loopback(ray, address) else contextlib.nullcontext():
                    ray.init(address=address, log_to_driver=False, logging_level=ray_level)
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as exc:
        if ray.is_initialized():  # half-started: do not leave processes behind
            ray.shutdown()
        if address == "local":
            problem, hint = (f"cannot start a Ray cluster on this machine ({exc})",
                             "Check 'ray status' and the logs under /tmp/ray, or run without --ray")
        else:
            problem, hint = (f"cannot connect to the Ray cluster at {address!r} ({exc})",
                             "Check the address and that the cluster is up ('ray status'; on its head node "
                             "'ray start --head'), or use --ray local for a cluster on this machine only")
        raise BackendUnavailableError(None, problem, hint) from exc
    return True


def disconnect() -> None:
    """Close this process's Ray connection (and stop the cluster if ``connect`` started it here)."""
    ray = require("ray", "ray")
    if ray.is_initialized():
        ray.shutdown()


def cluster_layout(requested_device: str, n_workers: int | None) -> "WorkerLayout":
    """``plan_workers`` for the cluster this process is connected to (after ``connect``)."""
    ray = require("ray", "ray")
    return plan_workers(requested_device, n_workers, ray.cluster_resources())


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
