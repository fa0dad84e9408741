"""Runs killed by SIGKILL (out of memory, a node lost, a container restarted), which no handler sees: the
lock and temporary files they leave are found, named and cleaned, and nothing reports such a folder as
complete (from the crash-resume audit: eval and --merge said success; shards and eval left temporary
files; an empty lock, or one naming the new run's own pid, blocked every rerun)."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from _infer_helpers import FAST, digests, invoke_infer, make_model_set, make_scans, one_torch_thread
from condiff.engine.cli import eval_main, infer_main
from condiff.errors import OutputConflictError
from condiff.io.lock import EMPTY_LOCK_GRACE_S, OutputLock

HELPERS = Path(__file__).resolve().parent


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def _dead_pid() -> int:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(gone.stdout)


def _holder(pid: int) -> str:
    return f"host {socket.gethostname()} pid {pid}\n"


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A reference run of 3 cases, and the same run killed by a real SIGKILL right after its first record."""
    root = tmp_path_factory.mktemp("killed")
    models = make_model_set(root / "set", n_members=1)
    scans = root / "scans"
    make_scans(scans, n=3, with_masks=True)
    ref = root / "ref"
    assert invoke_infer([scans, "-o", ref, "--models", models, *FAST]).exit_code == 0
    out = root / "out"
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(HELPERS)!r})
from condiff.engine import pipeline
real = pipeline.write_record
def write_then_die(*args, **kw):
    real(*args, **kw)
    os.kill(os.getpid(), signal.SIGKILL)   # a real SIGKILL: no handler, no run.json, the lock stays
pipeline.write_record = write_then_die
from condiff.engine.cli import infer_main
infer_main({[str(scans), "-o", str(out), "--models", str(models), *FAST]!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return models, scans, ref, out


def test_a_killed_run_is_reported_by_eval_and_merge_then_a_rerun_finishes_it_identically(killed, tmp_path):
    import shutil

    models, scans, ref, killed_out = killed
    out = tmp_path / "out"
    shutil.copytree(killed_out, out)
    assert (out / ".condiff.lock").is_file() and len(list((out / "records").glob("*.json"))) == 1
    res = CliRunner().invoke(eval_main, [str(out), "--masks", "{dir}/{stem}_seg.nii.gz", "--no-overlays"])
    assert res.exit_code == 1, res.output
    assert "NOT EVALUATED .condiff.lock: a whole-folder run of condiff-infer was killed before it finished" in res.output
    res = CliRunner().invoke(infer_main, ["--merge", str(out)])
    assert res.exit_code == 1 and "was killed before it finished" in res.output, res.output

    res = invoke_infer([scans, "-o", out, "--models", models, *FAST])
    assert res.exit_code == 0, res.output + res.stderr
    assert "removing a stale lock" in res.stderr and "2 done, 1 already done" in res.stdout
    assert digests(out) == digests(ref)
    assert not [p for p in out.rglob(".*") if p.name != ".condiff.lock"] and not (out / ".condiff.lock").exists()
    res = CliRunner().invoke(eval_main, [str(out), "--masks", "{dir}/{stem}_seg.nii.gz", "--no-overlays"])
    assert res.exit_code == 0, res.output


def test_eval_names_a_run_that_is_writing_now(killed, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(killed[3], out)
    (out / ".condiff.lock.1-of-2").write_text(_holder(os.getppid()))  # a live process of this host
    (out / ".condiff.lock").unlink()
    res = CliRunner().invoke(eval_main, [str(out), "--masks", "{dir}/{stem}_seg.nii.gz", "--no-overlays"])
    assert res.exit_code == 1 and "shard 1/2 of condiff-infer is writing to this folder now" in res.output


def test_shards_merge_and_eval_remove_dead_writers_temporary_files_only(killed, tmp_path):
    """A killed shard's temporary files (full-size maps) stayed for good: only a whole-folder run removed them."""
    import shutil

    models, scans, ref, _ = killed
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    dead, live = _dead_pid(), os.getppid()
    # True: removed; a dead pid's file younger than the grace may be a live writer's on another node
    leftovers = {out / "restorations" / f".case1.nii.gz.{dead}.0123abcd.tmp": True,
                 out / "maps" / f".case2.nii.gz.{live}.0123abcd.tmp": False,
                 out / f".cases.csv.{dead}.89abcdef.tmp": True,
                 out / "eval-overlays" / f".case0.png.{dead}.0123abcd.tmp": True,
                 out / "eval-overlays" / f".case1.png.{live}.0123abcd.tmp": False,
                 out / "maps" / f".case0.nii.gz.{dead}.fedcba98.tmp": False,
                 out / f".metrics-native.json.{dead}.fedcba98.tmp": False}

    def leave(paths):
        for path in paths:
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(b"partial")
            if "fedcba98" not in path.name:
                old = time.time() - 3600
                os.utime(path, (old, old))

    leave(leftovers)
    res = invoke_infer([scans, "-o", out, "--models", models, *FAST, "--shard", "1/2"])
    assert res.exit_code == 0, res.output + res.stderr
    assert {p: p.exists() for p in leftovers} == {p: not gone for p, gone in leftovers.items()}
    leave(leftovers)  # again, for --merge and for condiff-eval
    merged = CliRunner().invoke(infer_main, ["--merge", str(out)])
    # shard 0/2 never ran after the whole-folder run that made the folder: said, as condiff-eval says it
    assert merged.exit_code == 1 and "shard 0/2: has not run into this folder" in merged.stderr, merged.output
    assert {p: p.exists() for p in leftovers} == {p: not gone for p, gone in leftovers.items()}
    assert invoke_infer([scans, "-o", out, "--models", models, *FAST, "--shard", "0/2"]).exit_code == 0
    leave(leftovers)
    res = CliRunner().invoke(eval_main, [str(out), "--masks", "{dir}/{stem}_seg.nii.gz", "--no-overlays"])
    assert res.exit_code == 0, res.output
    assert {p: p.exists() for p in leftovers} == {p: not gone for p, gone in leftovers.items()}


def test_a_whole_folder_run_removes_the_locks_of_killed_shards(tmp_path):
    stale, live = tmp_path / ".condiff.lock.0-of-2", tmp_path / ".condiff.lock.1-of-2"
    stale.write_text(_holder(_dead_pid()))
    with OutputLock(tmp_path):
        assert not stale.exists()
    live.write_text(_holder(os.getppid()))
    with pytest.raises(OutputConflictError, match="overlap"):
        OutputLock(tmp_path).acquire()
    assert live.exists()


def test_an_empty_lock_is_stale_once_older_than_its_grace(tmp_path, caplog):
    """A run killed between creating its lock and writing it left an empty lock that blocked every rerun."""
    lock_file = tmp_path / ".condiff.lock"
    lock_file.write_text("")
    with pytest.raises(OutputConflictError, match="locked by another condiff run"):
        OutputLock(tmp_path).acquire()  # just made: its run may be writing it now
    old = time.time() - EMPTY_LOCK_GRACE_S - 5
    os.utime(lock_file, (old, old))
    with caplog.at_level("WARNING", logger="condiff.io.lock"):
        with OutputLock(tmp_path) as lock:
            assert lock.held and lock_file.read_text().startswith("host ")
    assert "removing a stale lock (it is empty: its run was killed while taking it)" in caplog.text


def test_a_lock_naming_this_process_is_stale_only_within_this_pid_namespace(tmp_path, caplog):
    """A lock naming the new run's own pid was taken for a live run. It is stale when it records this pid
    namespace (no other process there can have this pid); a lock of another container sharing the host
    name (host networking: both condiff as pid 1) must never be taken over, nor an older lock without
    a namespace, which may be one."""
    from condiff.io.lock import _pid_namespace

    ns = _pid_namespace()
    if ns is None:
        pytest.skip("no /proc/self/ns/pid on this system")
    lock_file = tmp_path / ".condiff.lock"
    lock_file.write_text(_holder(os.getpid()) + f"pidns {ns}\n")
    with caplog.at_level("WARNING", logger="condiff.io.lock"):
        with OutputLock(tmp_path) as lock:
            assert lock.held and f"pidns {ns}" in lock_file.read_text()
            # while this process holds it, it is not stale for anyone in this process either
            with pytest.raises(OutputConflictError, match="locked by another condiff run"):
                OutputLock(tmp_path).check()
    assert "is this process, which never took it" in caplog.text
    for other in (_holder(os.getpid()), _holder(os.getpid()) + "pidns pid:[1]\n", _holder(_dead_pid()) + "pidns pid:[1]\n"):
        lock_file.write_text(other)  # no namespace recorded, or another container's: held
        with pytest.raises(OutputConflictError, match="locked by another condiff run"):
            OutputLock(tmp_path).acquire()
        assert lock_file.read_text() == other


def test_eval_says_a_lock_of_another_host_may_be_running_or_lost(killed, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(killed[3], out)
    (out / ".condiff.lock").write_text("host another-node pid 4242\n")
    res = CliRunner().invoke(eval_main, [str(out), "--masks", "{dir}/{stem}_seg.nii.gz", "--no-overlays"])
    assert res.exit_code == 1 and "holds this folder from another host or container" in res.output
    assert f"delete {out / '.condiff.lock'}" in res.output


def test_an_empty_lock_taken_over_by_another_run_meanwhile_is_not_removed(tmp_path, monkeypatch):
    """Two empty locks read alike: between this run's staleness check and its removal another run may
    have replaced the stale lock with its own, not yet written; the file's identity tells them apart."""
    from condiff.io import lock as lockmod

    lock_file = tmp_path / ".condiff.lock"
    lock_file.write_text("")
    old = time.time() - EMPTY_LOCK_GRACE_S - 5
    os.utime(lock_file, (old, old))
    real = lockmod._stale

    def rival_takes_it_meanwhile(content, path):
        verdict = real(content, path)
        path.unlink()
        path.write_text("")  # the rival's fresh lock, still empty
        return verdict

    monkeypatch.setattr(lockmod, "_stale", rival_takes_it_meanwhile)
    with pytest.raises(OutputConflictError, match="locked by another condiff run"):
        OutputLock(tmp_path).acquire()
    assert lock_file.exists() and lock_file.read_text() == ""


def test_a_killed_dry_runs_probe_folder_is_removed_by_the_next(tmp_path):
    """--dry-run proves OUT creatable with a folder made and removed at once; a kill in between left it."""
    from condiff.io.atomic import probe_creatable

    dead = tmp_path / f".condiff-probe-{_dead_pid()}-abcd1234"
    live = tmp_path / f".condiff-probe-{os.getppid()}-abcd1234"
    foreign = tmp_path / f".condiff-probe-{_dead_pid()}-full"
    fresh = tmp_path / f".condiff-probe-{_dead_pid()}-fresh"  # maybe another node's probe, in progress
    for folder in (dead, live, foreign, fresh):
        folder.mkdir()
    (foreign / "kept.txt").write_text("not a probe's")
    for folder in (dead, live, foreign):
        os.utime(folder, (time.time() - 3600,) * 2)
    probe_creatable(tmp_path / "out")
    assert not dead.exists() and live.exists() and (foreign / "kept.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, foreign.name, fresh.name])


def test_a_whole_folder_run_removes_a_killed_runs_fresh_table_temporaries_at_once(killed, tmp_path):
    """The tables are a whole-folder run's alone: a killed run's fresh .cases.csv temporary goes at once,
    while a fresh metrics temporary (condiff-eval, maybe on another node) waits for the grace."""
    import shutil

    models, scans, ref, _ = killed
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    table, metrics = out / f".cases.csv.{_dead_pid()}.0123abcd.tmp", out / f".metrics-native.csv.{_dead_pid()}.0123abcd.tmp"
    for path in (table, metrics):
        path.write_bytes(b"partial")
    assert invoke_infer([scans, "-o", out, "--models", models, *FAST]).exit_code == 0
    assert not table.exists() and metrics.exists()
