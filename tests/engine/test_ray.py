"""condiff-infer --ray: a local Ray cluster on 127.0.0.1 with 2 CPU workers, over real slices.

Every run must end with the bytes of the single-process run (DESIGN §3): plain, with a worker
killed mid-run (its case retried), after the driver was SIGKILLed (rerun resumes), and as two
shards (one on Ray, one not) merged. The cluster starts once for the module.
"""
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from _infer_helpers import FAST, digests, make_model_set, one_torch_thread
from condiff.engine.cli import infer_main

REPO = Path(__file__).resolve().parents[2]
# the same place tests/conftest.py's shared_data fixture looks (a module-scoped fixture cannot use that one)
SHARED_DATA = Path(os.environ.get("CONDIFF_SHARED_DATA", REPO.parent / "shared" / "data"))
N_SLICES = 4
RAY = ["--ray-workers", "2"]  # --ray itself: the module's cluster is already connected, so the value is not used


def _invoke(args):
    return CliRunner().invoke(infer_main, [str(a) for a in args], catch_exceptions=False)


def _cut(src: Path, axis: int, first: int, dst: Path) -> None:
    """An axial slab of a real scan (nibabel slicer: voxels unchanged, affine exact)."""
    import nibabel as nib

    index = [slice(None)] * 3
    index[axis] = slice(first, first + N_SLICES)
    dst.write_bytes(gzip.compress(nib.load(src).slicer[tuple(index)].to_bytes(), mtime=0))


def _real_slabs(folder: Path) -> str:
    """Four 4-slice slabs of real T1 scans: IXI from the data kit, else the bundled sample slabs."""
    folder.mkdir(parents=True)
    ixi = sorted((SHARED_DATA / "ixi-t1").glob("IXI*-T1.nii.gz"))
    if len(ixi) >= 4:
        for src in ixi[:4]:  # axis 1 is inferior-superior in the IXI files (examples/make_examples.py)
            _cut(src, 1, 50, folder / f"{src.name[:6].lower()}_t1.nii.gz")
        return "IXI (data kit)"
    scans = REPO / "examples" / "scans"
    for stem, axis in (("ixi132_t1", 1), ("ms_patient26_t1", 2)):
        for half in (0, 1):
            _cut(scans / f"{stem}.nii.gz", axis, half * N_SLICES, folder / f"{stem}_{half}.nii.gz")
    return "bundled sample slabs"


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster bound to 127.0.0.1 with 2 CPUs, started the way --ray local starts it."""
    ray = pytest.importorskip("ray")
    from condiff.engine import distributed

    if ray.is_initialized():
        pytest.skip("this process is already connected to another Ray cluster")
    distributed.connect("local", num_cpus=2)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Model set, scans and the single-process reference run (one torch thread, like each worker)."""
    root = tmp_path_factory.mktemp("ray")
    models = make_model_set(root / "set", n_members=2)
    scans = root / "scans"
    source = _real_slabs(scans)
    ref = root / "ref"
    with one_torch_thread():
        res = _invoke([scans, "-o", ref, "--models", models, *FAST])
    assert res.exit_code == 0, res.output + res.stderr
    cases = sorted(p.name[: -len(".nii.gz")] for p in scans.glob("*.nii.gz"))
    return {"models": models, "scans": scans, "ref": ref, "want": digests(ref), "cases": cases, "source": source}


def _n_records(out: Path) -> int:
    return len(list((out / "records").glob("*.json"))) if (out / "records").is_dir() else 0


def _no_temp_files(out: Path) -> bool:
    return not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------------- cluster


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def _listening(pids: set[int]) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the TCP sockets ``pids`` listen on."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    found.append(cols[1].split(":")[0])
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_local_cluster_listens_on_loopback_only(cluster):
    assert cluster.startswith("127.0.0.1:")
    addrs = _listening(_descendants(os.getpid()))
    assert addrs, "found no listening socket of the Ray processes"
    loopback = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}  # v4, v4-in-v6, ::1
    assert set(addrs) <= loopback, addrs


# ----------------------------------------------------------------------------------------- runs


def test_ray_run_is_byte_identical_to_single_process(tmp_path, cluster, data):
    out = tmp_path / "out"
    res = _invoke([data["scans"], "-o", out, "--models", data["models"], *FAST, "--ray", *RAY])
    assert res.exit_code == 0, res.output + res.stderr
    assert f"{len(data['cases'])} done" in res.stdout
    assert digests(out) == data["want"], data["source"]
    run = json.loads((out / "run.json").read_text())
    assert run["ray"]["n_workers"] == 2 and len(run["ray"]["workers"]) == 2
    assert run["ray"]["lost_workers"] == 0 and run["counts"]["ok"] == len(data["cases"])
    assert not (out / ".condiff.lock").exists() and _no_temp_files(out)
    log = (out / "condiff.log").read_text()  # the workers' own log lines stay in the workers: the driver logs each case
    for case in data["cases"]:
        assert len(re.findall(rf"condiff\.engine\.pipeline: case {case} done: score ", log)) == 1, log


def test_lost_worker_case_is_retried_on_another(tmp_path, cluster, data, monkeypatch):
    victim = data["cases"][1]
    marker = tmp_path / "killed-once"
    monkeypatch.setenv("CONDIFF_TEST_KILL_ON_CASE", victim)
    monkeypatch.setenv("CONDIFF_TEST_KILL_MARKER", str(marker))
    out = tmp_path / "out"
    res = _invoke([data["scans"], "-o", out, "--models", data["models"], *FAST, "--ray", *RAY, "--max-retries", "1"])
    assert res.exit_code == 0, res.output + res.stderr
    assert marker.exists(), "the worker was never killed"
    run = json.loads((out / "run.json").read_text())
    assert run["ray"]["lost_workers"] == 1 and run["ray"]["retried"] == [victim]
    assert "retrying on another worker" in res.stderr and victim in res.stderr
    assert digests(out) == data["want"]
    assert _no_temp_files(out)


def test_case_lost_more_than_max_retries_is_failed_not_retried_forever(tmp_path, cluster, data, monkeypatch):
    scans = tmp_path / "scans"
    scans.mkdir()
    victim = data["cases"][0]
    shutil.copy(data["scans"] / f"{victim}.nii.gz", scans)
    monkeypatch.setenv("CONDIFF_TEST_KILL_ON_CASE", victim)
    monkeypatch.setenv("CONDIFF_TEST_KILL_MARKER", str(tmp_path / "killed-once"))
    out = tmp_path / "out"
    res = _invoke([scans, "-o", out, "--models", data["models"], *FAST, "--ray", *RAY, "--max-retries", "0"])
    assert res.exit_code == 1, res.output + res.stderr
    assert f"FAILED {victim}" in res.stderr and "lost 1 times" in res.stderr
    rec = json.loads((out / "records" / f"{victim}.json").read_text())
    assert rec["status"] == "failed" and not (out / "maps" / f"{victim}.nii.gz").exists()
    # the rerun (no fault this time: the marker exists) recomputes it
    res = _invoke([scans, "-o", out, "--models", data["models"], *FAST, "--ray", *RAY])
    assert res.exit_code == 0, res.output + res.stderr
    assert digests(out)[f"maps/{victim}.nii.gz"] == data["want"][f"maps/{victim}.nii.gz"]


def test_input_error_is_reported_once_and_not_retried(tmp_path, cluster, data):
    scans = tmp_path / "scans"
    scans.mkdir()
    good = data["cases"][0]
    shutil.copy(data["scans"] / f"{good}.nii.gz", scans)
    raw = (scans / f"{good}.nii.gz").read_bytes()
    (scans / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "out"
    res = _invoke([scans, "-o", out, "--models", data["models"], *FAST, "--ray", *RAY])
    assert res.exit_code == 1, res.output + res.stderr
    assert res.stderr.count("FAILED truncated") == 1 and "truncated.nii.gz" in res.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["ray"]["retried"] == [] and run["ray"]["lost_workers"] == 0
    assert run["counts"] == {"cases": 2, "ok": 1, "failed": 1}
    assert digests(out, files=())[f"maps/{good}.nii.gz"] == data["want"][f"maps/{good}.nii.gz"]


def test_failed_case_records_and_log_are_those_of_a_single_process_run(tmp_path, cluster, data, monkeypatch):
    """A broken input given by a relative path: the same failed record, cases.csv and JSON log line with
    and without --ray (the error text names the absolute path in both)."""
    scans = tmp_path / "scans"
    scans.mkdir()
    raw = (data["scans"] / f"{data['cases'][0]}.nii.gz").read_bytes()
    (scans / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    monkeypatch.chdir(tmp_path)
    lines = {}
    for out, extra in (("single", []), ("ray", ["--ray", *RAY])):
        res = _invoke(["scans", "-o", out, "--models", data["models"], *FAST, "--log-format", "json", *extra])
        assert res.exit_code == 1, res.output + res.stderr
        assert f"FAILED truncated: {scans / 'truncated.nii.gz'}:" in res.stderr
        log = [json.loads(line) for line in (tmp_path / out / "condiff.log").read_text().splitlines()]
        lines[out] = [{k: v for k, v in d.items() if k != "time"} for d in log if "case" in d]
    assert lines["ray"] == lines["single"] and [d["status"] for d in lines["single"]] == ["failed"]
    assert (tmp_path / "ray" / "cases.csv").read_bytes() == (tmp_path / "single" / "cases.csv").read_bytes()
    recs = [json.loads((tmp_path / out / "records" / "truncated.json").read_text()) for out in ("single", "ray")]
    assert recs[0] == recs[1] and recs[0]["error"].startswith(f"{scans / 'truncated.nii.gz'}:")


def _ray_run_past_its_first_record(out, cluster, data) -> subprocess.Popen:
    """condiff-infer --ray in a child process, returned once its first case is recorded; the last case
    waits long enough that the driver is surely signalled before it is done."""
    exe = shutil.which("condiff-infer")
    cmd = [exe] if exe else [sys.executable, "-c", "from condiff.engine.cli import infer_main; infer_main()"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONDIFF_TEST_DELAY_CASE": f"{data['cases'][-1]}:120"}
    args = [str(data["scans"]), "-o", str(out), "--models", str(data["models"]), *FAST, "--ray", cluster, *RAY]
    proc = subprocess.Popen([*cmd, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 150
        while not _n_records(out):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no record appeared"
            time.sleep(0.05)
    except BaseException:
        proc.kill()
        raise
    return proc


def test_sigterm_on_the_driver_exits_143_and_run_json_says_interrupted(tmp_path, cluster, data):
    """ray.init installs its own SIGTERM handler (sys.exit); condiff's must stay in force on the driver."""
    out = tmp_path / "out"
    proc = _ray_run_past_its_first_record(out, cluster, data)
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    run = json.loads((out / "run.json").read_text())
    assert run["interrupted"] is True and run["signal"] == "SIGTERM"
    counts = run["counts"]
    assert counts["cases"] == len(data["cases"]) and counts.get("not_finished", 0) >= 1
    assert counts.get("ok", 0) + counts["not_finished"] == len(data["cases"])
    assert not (out / ".condiff.lock").exists() and _no_temp_files(out)


def test_killed_driver_rerun_resumes_to_identical_outputs(tmp_path, cluster, data):
    out = tmp_path / "out"
    proc = _ray_run_past_its_first_record(out, cluster, data)
    try:
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()  # reaped: its pid is gone, so the lock it left is stale
    assert (out / ".condiff.lock").exists()
    assert _n_records(out) < len(data["cases"])
    res = _invoke([data["scans"], "-o", out, "--models", data["models"], *FAST, "--ray", *RAY])
    assert res.exit_code == 0, res.output + res.stderr
    assert "stale lock" in res.stderr
    assert "already done" in res.stdout and not res.stdout.startswith("condiff-infer: 0 already done")
    assert digests(out) == data["want"]
    assert not (out / ".condiff.lock").exists() and _no_temp_files(out)


def test_shards_on_ray_and_single_process_merge_to_the_whole(tmp_path, cluster, data):
    out = tmp_path / "out"
    res = _invoke([data["scans"], "-o", out, "--models", data["models"], *FAST, "--shard", "0/2", "--ray", *RAY])
    assert res.exit_code == 0, res.output + res.stderr
    with one_torch_thread():
        res = _invoke([data["scans"], "-o", out, "--models", data["models"], *FAST, "--shard", "1/2"])
    assert res.exit_code == 0, res.output + res.stderr
    assert (out / "run.0-of-2.json").is_file() and (out / "run.1-of-2.json").is_file()
    (out / "cases.csv").unlink()
    res = _invoke(["--merge", out])
    assert res.exit_code == 0 and f"{len(data['cases'])} ok" in res.stdout
    assert digests(out) == data["want"]


# ----------------------------------------------------------------------------------------- without a cluster


def test_without_ray_installed_exit_2_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails as if it were not installed
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(REPO / "examples" / "scans" / "ixi132_t1.nii.gz", scans)
    models = make_model_set(tmp_path / "set", n_members=1)
    res = _invoke([scans, "-o", tmp_path / "out", "--models", models, *FAST, "--ray"])
    assert res.exit_code == 2, res.output + res.stderr
    assert "pip install 'condiff[ray]'" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "records").exists()


def test_ray_address_that_looks_like_an_input_is_a_usage_error(tmp_path):
    res = _invoke(["--ray", str(tmp_path), "-o", tmp_path / "out"])
    assert res.exit_code == 2 and "--ray" in res.stderr and "ADDRESS" in res.stderr


def test_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path):
    import socket

    from condiff.engine.writer import OutputLock
    from condiff.errors import OutputConflictError

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    lock = OutputLock(tmp_path)
    for holder in (f"host {host} pid {os.getppid()}", f"host another-{host} pid {dead.stdout.strip()}"):
        lock.path.write_text(holder + "\n")  # alive here, or on a host we cannot check: locked
        with pytest.raises(OutputConflictError, match="locked by another condiff run"):
            lock.check()
        with pytest.raises(OutputConflictError, match=re.escape(holder)):
            lock.acquire()
    lock.path.write_text(f"host {host} pid {dead.stdout.strip()}\n")
    lock.check()
    with lock:
        assert lock.path.read_text().splitlines()[0] == f"host {host} pid {os.getpid()}"
    assert not lock.path.exists()


def test_worker_layout_follows_the_cluster():
    from condiff.engine.distributed import plan_workers
    from condiff.errors import BackendUnavailableError

    assert plan_workers("auto", None, {"CPU": 16.0, "GPU": 4.0}) == plan_workers("cuda:1", None, {"CPU": 16, "GPU": 4})
    lay = plan_workers("auto", None, {"CPU": 16.0, "GPU": 4.0})
    assert (lay.device, lay.n_workers, lay.num_gpus, lay.num_cpus) == ("cuda", 4, 1, 1)
    assert plan_workers("auto", 8, {"CPU": 16, "GPU": 4}).n_workers == 4  # never more than one per GPU
    lay = plan_workers("auto", None, {"CPU": 16.0})
    assert (lay.device, lay.n_workers, lay.num_cpus) == ("cpu", 4, 4)
    lay = plan_workers("cpu", 2, {"CPU": 2.0, "GPU": 1.0})
    assert (lay.device, lay.n_workers, lay.num_cpus, lay.num_gpus) == ("cpu", 2, 1, 0)
    with pytest.raises(BackendUnavailableError, match="no GPU"):
        plan_workers("cuda", None, {"CPU": 8.0})
