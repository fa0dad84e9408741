"""Several processes on one folder (concurrency audit; each defect reproduced with real processes first):
the method check after the lock, inputs replaced while read, stale-lock takeovers, --merge beside shards
and runs, two condiff-evals, and a failed training beside a rival."""
import os
import shutil
import socket
import time

import pytest
from click.testing import CliRunner

from _infer_helpers import FAST, invoke_infer, make_model_set, make_scans, one_torch_thread
from condiff.engine.cli import eval_main, infer_main
from condiff.io import lock as locks


def _holder(pid: int) -> str:
    return f"host {socket.gethostname()} pid {pid}\n"


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("conc")
    models = make_model_set(root / "set", n_members=1)
    make_scans(root / "scans", n=2, with_masks=True)
    res = invoke_infer([root / "scans", "-o", root / "done", "--models", models, *FAST])
    assert res.exit_code == 0, res.output
    return root, models


def test_a_method_written_while_this_run_loaded_its_models_is_refused_under_the_lock(folder, tmp_path, monkeypatch):
    """Run B checked an empty folder, then loaded its models; run A took the lock, wrote its (other) method's
    cases and left: B must refuse once it holds the lock (both exited 0, the folder pooled two methods)."""
    from condiff.engine import pipeline

    root, models = folder
    out = tmp_path / "out"
    real = pipeline.load_denoisers

    def meanwhile(ctx):  # run A, done while B loaded
        shutil.copytree(root / "done", out, dirs_exist_ok=True)
        return real(ctx)

    monkeypatch.setattr(pipeline, "load_denoisers", meanwhile)
    res = invoke_infer([root / "scans", "-o", out, "--models", models, *FAST[:3], "3", *FAST[4:]])  # 3 steps, not 2
    assert res.exit_code == 2, res.output + res.stderr
    assert "steps" in res.stderr and "another -o folder" in res.stderr


def test_an_input_replaced_while_it_is_read_fails_instead_of_recording_another_files_digest(folder, tmp_path,
                                                                                              monkeypatch):
    """The digest was taken from one file and the voxels from its replacement (mv): the record certified
    a map of other bytes, and a later resume kept it."""
    from condiff.engine import pipeline

    root, models = folder
    scans = tmp_path / "scans"
    shutil.copytree(root / "scans", scans)
    real = pipeline.read_case

    def replaced_first(case, ctx, mask_path):
        if case.name == "case0":
            other = scans / ".swap.nii.gz"
            shutil.copy(scans / "case1.nii.gz", other)
            os.replace(other, case.path)  # what mv does: a new file under the old name
        return real(case, ctx, mask_path)

    monkeypatch.setattr(pipeline, "read_case", replaced_first)
    res = invoke_infer([scans, "-o", tmp_path / "out", "--models", models, *FAST])
    assert res.exit_code == 1, res.output + res.stderr
    assert f"FAILED case0: {scans / 'case0.nii.gz'}: changed while it was being read" in res.stderr
    assert "1 done" in res.output


def test_a_stale_lock_is_removed_only_by_the_takeover_guards_holder_and_only_while_unchanged(tmp_path):
    lock_file = tmp_path / ".condiff.lock"
    guard = tmp_path / ".condiff.lock.takeover"
    stale = _holder(999999)
    lock_file.write_text(stale)
    seen = locks._identity(lock_file)
    guard.write_text("")  # another run is taking it over right now
    assert not locks.remove_if_unchanged(lock_file, stale, seen) and lock_file.exists() and guard.exists()
    old = time.time() - 60
    os.utime(guard, (old, old))  # a guard left by a killed takeover: cleared, and the takeover goes on
    assert locks.remove_if_unchanged(lock_file, stale, seen) and not guard.exists() and not lock_file.exists()
    lock_file.write_text(_holder(os.getppid()))  # a rival took it over meanwhile: never removed
    assert not locks.remove_if_unchanged(lock_file, stale, seen) and lock_file.exists()
    lock_file.write_text(stale)
    assert locks.remove_if_unchanged(lock_file, stale, locks._identity(lock_file))
    assert not lock_file.exists() and not guard.exists()


def test_a_run_takes_over_a_stale_lock_beside_a_guard_a_killed_takeover_left(folder, tmp_path):
    """A SIGKILL inside a takeover left the guard: the next run was refused, naming the dead holder."""
    root, models = folder
    out = shutil.copytree(root / "done", tmp_path / "out")
    (out / ".condiff.lock").write_text(_holder(999999))
    guard = out / ".condiff.lock.takeover"
    guard.write_text("")
    old = time.time() - 60
    os.utime(guard, (old, old))
    res = invoke_infer([root / "scans", "-o", out, "--models", models, *FAST])
    assert res.exit_code == 0 and "removing a stale lock" in res.stderr, res.output + res.stderr
    assert not guard.exists() and not (out / ".condiff.lock").exists()


def test_a_fresh_guard_means_another_run_is_taking_the_stale_lock_over(tmp_path):
    from condiff.errors import OutputConflictError

    (tmp_path / ".condiff.lock").write_text(_holder(999999))
    (tmp_path / ".condiff.lock.takeover").write_text("")
    with pytest.raises(OutputConflictError, match="another process is taking over right now"):
        locks.OutputLock(tmp_path).acquire()


def test_merge_names_a_shard_that_never_ran_and_exits_1(folder, tmp_path):
    root, models = folder
    out = tmp_path / "out"
    assert invoke_infer([root / "scans", "-o", out, "--models", models, *FAST, "--shard", "0/2"]).exit_code == 0
    res = CliRunner().invoke(infer_main, ["--merge", str(out)])
    assert res.exit_code == 1 and "shard 1/2: has not run into this folder" in res.stderr, res.output
    assert invoke_infer([root / "scans", "-o", out, "--models", models, *FAST, "--shard", "1/2"]).exit_code == 0
    assert CliRunner().invoke(infer_main, ["--merge", str(out)]).exit_code == 0


def test_merge_leaves_the_tables_of_a_live_whole_folder_run_alone(folder, tmp_path):
    root, _ = folder
    out = shutil.copytree(root / "done", tmp_path / "out")
    (out / ".condiff.lock").write_text(_holder(os.getppid()))  # a live process of this host
    before = (out / "cases.csv").read_bytes()
    (out / "cases.csv").write_bytes(before + b"")  # untouched below: same bytes, same mtime
    stamp = (out / "cases.csv").stat().st_mtime_ns
    res = CliRunner().invoke(infer_main, ["--merge", str(out)])
    assert res.exit_code == 1 and "a whole-folder run" in res.stderr and "nothing was merged" in res.stderr
    assert (out / "cases.csv").stat().st_mtime_ns == stamp


def test_a_whole_folder_run_keeps_a_live_writers_table_temporary(folder, tmp_path):
    """A --merge begun before the run took the lock may still be writing its table: its temporary stays
    (the run removed it at once and the merge crashed renaming it)."""
    root, models = folder
    out = shutil.copytree(root / "done", tmp_path / "out")
    live = out / f".cases.csv.{os.getppid()}.0123abcd.tmp"
    live.write_bytes(b"partial")
    assert invoke_infer([root / "scans", "-o", out, "--models", models, *FAST]).exit_code == 0
    assert live.exists()


def test_one_condiff_eval_at_a_time_per_folder(folder, tmp_path):
    root, _ = folder
    out = shutil.copytree(root / "done", tmp_path / "out")
    busy = out / ".condiff-eval.lock"
    busy.write_text(_holder(os.getppid()))
    args = [str(out), "--masks", "{dir}/{stem}_seg.nii.gz", "--no-overlays"]
    res = CliRunner().invoke(eval_main, args)
    assert res.exit_code == 2 and "is being evaluated by another condiff-eval" in res.stderr, res.output
    assert not (out / "metrics-native.json").exists()
    busy.write_text(_holder(999999))  # its process is gone: taken over
    res = CliRunner().invoke(eval_main, args)
    assert res.exit_code == 0, res.output + res.stderr
    assert not busy.exists() and (out / "metrics-native.json").exists()
