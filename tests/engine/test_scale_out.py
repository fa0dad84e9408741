"""Scale-out checks that need no running cluster (or start their own): connecting to Ray (signals, an
unreachable address, a stale 'ray start' address), what is refused before any output, shard locks
that carry the run's method, --merge over a folder of two methods, and the same case paths and
per-case log lines with or without --ray. test_ray.py runs the cases on a shared local cluster."""
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from _infer_helpers import FAST, make_model_set, make_scans
from condiff.engine.cli import infer_main

REPO = Path(__file__).resolve().parents[2]


def _invoke(args):
    return CliRunner().invoke(infer_main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def model_set(tmp_path_factory):
    return make_model_set(tmp_path_factory.mktemp("models") / "set", n_members=1)


@pytest.fixture
def ray_not_connected():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("this process is already connected to a Ray cluster")
    return ray


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def _live_lock(path: Path, method: dict | None = None) -> str:
    """A lock held by a live process of this host (our parent), optionally with a method line."""
    text = f"host {socket.gethostname()} pid {os.getppid()}\n"
    if method is not None:
        text += f"method {json.dumps(method, sort_keys=True)}\n"
    path.write_text(text)
    return text


# ----------------------------------------------------------------------------------------- connecting


def test_unreachable_address_is_exit_2_within_seconds_and_writes_nothing(tmp_path, model_set, ray_not_connected):
    make_scans(tmp_path / "in", n=1)
    t0 = time.monotonic()
    res = _invoke([tmp_path / "in", "-o", tmp_path / "out", "--models", model_set, *FAST,
                   f"--ray=127.0.0.1:{_closed_port()}"])
    assert res.exit_code == 2, res.output + res.stderr
    assert time.monotonic() - t0 < 30  # ray.init alone retries such an address for many minutes
    assert "cannot connect to the Ray cluster" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
    assert not ray_not_connected.is_initialized()


class _FakeInit:
    """Stands in for ray.init: records its arguments and replaces the SIGTERM handler as Ray 2.x does."""

    def __init__(self):
        self.calls = []

    def __call__(self, address=None, **kwargs):
        self.calls.append({"address": address, **kwargs})
        signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(signum))


def test_connect_starts_a_new_local_cluster_and_keeps_the_signal_handlers(monkeypatch, ray_not_connected):
    from condiff.engine import ray_cluster

    fake = _FakeInit()
    monkeypatch.setattr(ray_not_connected, "init", fake)

    def ours(signum, frame):
        raise AssertionError("not called")

    before = {sig: signal.signal(sig, ours) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert ray_cluster.connect("local", num_cpus=1) is True
        assert signal.getsignal(signal.SIGTERM) is ours and signal.getsignal(signal.SIGINT) is ours
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    # address None would join a cluster 'ray start' made here (or one a stale ray_current_cluster names)
    assert fake.calls[0]["address"] == "local" and fake.calls[0]["num_cpus"] == 1


@pytest.mark.parametrize("quiet", [False, True])
def test_quiet_silences_rays_own_warnings(monkeypatch, ray_not_connected, quiet):
    """-q reaches ray.init: Ray's own WARNING lines (its token-authentication notice on every start)
    printed on a quiet run before."""
    import logging

    from condiff.engine import ray_cluster

    fake = _FakeInit()
    monkeypatch.setattr(ray_not_connected, "init", fake)
    before = signal.getsignal(signal.SIGTERM)
    try:
        ray_cluster.connect("local", num_cpus=1, quiet=quiet)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert fake.calls[0]["logging_level"] == (logging.ERROR if quiet else logging.WARNING)


def test_quiet_ray_run_prints_nothing(tmp_path, model_set, ray_not_connected):
    """The whole command in its own process on a real local cluster: -q with --ray prints nothing (Ray's
    loggers bind to the process's stderr when Ray is imported, so only a fresh process shows them)."""
    import subprocess
    import sys

    make_scans(tmp_path / "in", n=1)
    args = [str(a) for a in (tmp_path / "in", "-o", tmp_path / "out", "--models", model_set, *FAST, "-q", "--ray")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    res = subprocess.run([sys.executable, "-c", "from condiff.engine.cli import infer_main; infer_main()", *args],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == "", res.stdout + res.stderr
    assert json.loads((tmp_path / "out" / "run.json").read_text())["counts"]["ok"] == 1


def test_local_cluster_starts_beside_a_stale_ray_start_address(monkeypatch, ray_not_connected):
    """A real local cluster (a few seconds): a 'ray start' address file naming a dead cluster must not
    be joined, and condiff's SIGTERM handler must still be in place afterwards."""
    from condiff.engine import ray_cluster

    tmp = tempfile.mkdtemp(prefix="cr", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        os.makedirs(os.path.join(tmp, "ray"))
        with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write(f"127.0.0.1:{_closed_port()}\n")
        monkeypatch.setenv("RAY_TMPDIR", tmp)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)

        def ours(signum, frame):
            raise AssertionError("not called")

        before = signal.signal(signal.SIGTERM, ours)
        try:
            assert ray_cluster.connect("local", num_cpus=1) is True
            try:
                assert ray_not_connected.cluster_resources().get("CPU") == 1
                assert signal.getsignal(signal.SIGTERM) is ours
            finally:
                ray_cluster.disconnect()
        finally:
            signal.signal(signal.SIGTERM, before)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_unreachable_local_start_does_not_suggest_itself(monkeypatch, ray_not_connected):
    from condiff.engine import ray_cluster
    from condiff.errors import BackendUnavailableError

    def fail(**kwargs):
        raise RuntimeError("raylet did not start")

    monkeypatch.setattr(ray_not_connected, "init", fail)
    with pytest.raises(BackendUnavailableError) as err:
        ray_cluster.connect("local", num_cpus=1)
    assert "--ray local" not in err.value.message and "raylet did not start" in err.value.message


def test_cuda_on_a_cluster_without_gpu_is_exit_2_before_any_output(tmp_path, model_set, monkeypatch, ray_not_connected):
    from condiff.engine import distributed

    monkeypatch.setattr(distributed, "connect", lambda address, num_cpus=None, **kw: False)  # "already connected"
    monkeypatch.setattr(ray_not_connected, "cluster_resources", lambda: {"CPU": 2.0})
    make_scans(tmp_path / "in", n=1)
    args = [a for a in FAST if a not in ("--device", "cpu")]
    res = _invoke([tmp_path / "in", "-o", tmp_path / "out", "--models", model_set, *args, "--device", "cuda", "--ray"])
    assert res.exit_code == 2, res.output + res.stderr
    assert "no GPU" in res.stderr
    assert not (tmp_path / "out").exists()  # no lock, no header-only CSVs, no run.json


# ----------------------------------------------------------------------------------------- one method per folder


def _method(**changes) -> dict:
    base = {"model_set": "ab" * 32, "sampler": "ddim", "steps": 2, "members": [0], "seed": 0, "mask": "auto",
            "preprocessing": {"image_size": 32}, "schedule": None, "volume_index": None}
    return {**base, **changes}


def test_shard_lock_refuses_a_live_shard_of_another_method(tmp_path):
    from condiff.engine.writer import OutputLock
    from condiff.errors import OutputConflictError

    other = tmp_path / ".condiff.lock.1-of-2"
    live = _live_lock(other, _method(steps=3))
    lock = OutputLock(tmp_path, (0, 2), method=_method())
    with pytest.raises(OutputConflictError, match=r"another method \(steps 3 \(this run: 2\)\).*\.condiff\.lock\.1-of-2"):
        lock.check()
    with pytest.raises(OutputConflictError, match="another method"):
        lock.acquire()
    assert not lock.path.exists() and other.read_text() == live
    # the same method, or a lock of an older version (no method line): side by side as before
    for theirs in (_method(), None):
        text = _live_lock(other, theirs)
        lock = OutputLock(tmp_path, (0, 2), method=_method())
        lock.check()
        with lock:
            holder, *middle, method = lock.path.read_text().splitlines()
            assert holder == f"host {socket.gethostname()} pid {os.getpid()}"
            assert all(line.startswith("pidns ") for line in middle)
            assert json.loads(method[len("method "):]) == _method()
        assert other.read_text() == text
    # a stale shard lock of another method blocks nothing
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    other.write_text(f"host {socket.gethostname()} pid {int(gone.stdout)}\nmethod {json.dumps(_method(steps=3))}\n")
    with OutputLock(tmp_path, (0, 2), method=_method()) as lock:
        assert lock.held


def test_shard_started_beside_a_running_shard_of_another_method_is_exit_2(tmp_path, model_set):
    from condiff.engine.cli import lock_method
    from condiff.engine.pipeline import make_context

    make_scans(tmp_path / "in", n=2)
    out = tmp_path / "out"
    out.mkdir()
    other = make_context(model_set, out, device="cpu", sampler="ddim", steps=3, batch_size=4, mask_pattern="auto")
    _live_lock(out / ".condiff.lock.1-of-2", lock_method(other))  # shard 1 runs now with --steps 3, no record yet
    res = _invoke([tmp_path / "in", "-o", out, "--models", model_set, *FAST, "--shard", "0/2"])
    assert res.exit_code == 2, res.output + res.stderr
    assert "another method" in res.stderr and "steps 3 (this run: 2)" in res.stderr and "1-of-2" in res.stderr
    assert not (out / "records").exists() and not (out / ".condiff.lock.0-of-2").exists()


def test_merge_refuses_records_of_two_methods(tmp_path):
    from condiff.engine.plan import RECORD_SCHEMA

    out = tmp_path / "out"
    (out / "records").mkdir(parents=True)
    for name, steps in (("a", 2), ("b", 2), ("c", 3)):
        rec = {"schema": RECORD_SCHEMA, "case": name, "status": "ok", "kind": "volume", "input": f"/data/{name}.nii.gz",
               "model_set_digest": "ab" * 32, "options": _method(steps=steps),
               "score": 1.0, "max_slice_score": 1.0, "slice_scores": [[0, 1.0]]}
        (out / "records" / f"{name}.json").write_text(json.dumps(rec))
    res = _invoke(["--merge", out])
    assert res.exit_code == 2, res.output + res.stderr
    assert "2 different methods" in res.stderr and "steps 3" in res.stderr and "not rebuilt" in res.stderr
    assert not (out / "cases.csv").exists()


# ----------------------------------------------------------------------------------------- same records, same log


def test_case_paths_are_absolute_in_every_run(tmp_path, model_set, monkeypatch):
    """The error text of a failed case names the input by its absolute path with or without --ray (the Ray
    driver makes them absolute for its workers, with the same function)."""
    from condiff.engine import distributed
    from condiff.io.cases import Case

    scans = tmp_path / "scans"
    make_scans(scans, n=1)
    raw = (scans / "case0.nii.gz").read_bytes()
    (scans / "case0.nii.gz").write_bytes(raw[: len(raw) // 2])
    monkeypatch.chdir(tmp_path)
    res = _invoke(["scans", "-o", "out", "--models", model_set, *FAST])
    assert res.exit_code == 1, res.output + res.stderr
    rec = json.loads((tmp_path / "out" / "records" / "case0.json").read_text())
    assert rec["error"].startswith(f"{tmp_path / 'scans' / 'case0.nii.gz'}:"), rec["error"]
    assert f"FAILED case0: {tmp_path / 'scans' / 'case0.nii.gz'}:" in res.stderr
    case = Case("x", Path("scans/case0.nii.gz"), "volume")
    assert distributed.absolute_cases([case])[0].path == tmp_path / "scans" / "case0.nii.gz"


def test_driver_logs_a_workers_outcome_as_the_pipeline_does(caplog):
    """Ray workers' own log lines never reach OUT/condiff.log: the driver logs each outcome with the
    single-process pipeline's logger, message and fields."""
    import logging

    from condiff.engine.pipeline import CaseOutcome
    from condiff.engine.ray_scheduler import log_outcome
    from condiff.io.cases import Case

    case = Case("sub-01", Path("/x/sub-01.nii.gz"), "volume")
    with caplog.at_level(logging.INFO, logger="condiff"):
        log_outcome(CaseOutcome(case, "ok", score=0.5, max_slice_score=0.75, n_slices=3))
        log_outcome(CaseOutcome(case, "skipped"))
        log_outcome(CaseOutcome(case, "failed", error="bad", error_type="InputImageError"))
        log_outcome(CaseOutcome(case, "failed", error="not finished", error_type="NotFinished"))
    recs = [r for r in caplog.records if r.name == "condiff.engine.pipeline"]
    assert [r.getMessage() for r in recs] == ["case sub-01 done: score 0.5, max slice 0.75, 3 slices",
                                              "case sub-01: outputs up to date, skipped", "case sub-01 failed: bad"]
    assert [(r.case, r.status) for r in recs] == [("sub-01", "ok"), ("sub-01", "skipped"), ("sub-01", "failed")]
    assert (recs[0].score, recs[0].max_slice_score, recs[0].n_slices, recs[2].error) == (0.5, 0.75, 3, "bad")
