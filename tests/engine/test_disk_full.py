"""Stopping early: a full output disk (the case being written fails, no further case is started: their
compute would be lost too) and --fail-fast; the run says how to resume, and a rerun finishes the same outputs."""
import errno
import json

import pytest

from _infer_helpers import FAST, digests, invoke_infer, one_torch_thread, reference_run
from condiff.engine import pipeline


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    models, scans, ref = reference_run(tmp_path_factory.mktemp("full"), n_members=1, n_scans=4)
    return models, scans, digests(ref)


@pytest.mark.parametrize("code", [errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)])
def test_full_disk_stops_the_run_and_a_rerun_resumes(tmp_path, reference, monkeypatch, code):
    models, scans, want = reference
    real_write, real_run = pipeline.write_case_files, pipeline.run_slices
    computed = []

    def write_until_full(out_dir, plan, **kw):
        if plan.case.name == "case1":
            raise OSError(code, "No space left on device", str(out_dir / "maps" / "case1.nii.gz"))
        return real_write(out_dir, plan, **kw)

    def counting_run(denoisers, jobs, *a, **kw):
        computed.extend({j.digest for j in jobs})
        return real_run(denoisers, jobs, *a, **kw)

    monkeypatch.setattr(pipeline, "write_case_files", write_until_full)
    monkeypatch.setattr(pipeline, "run_slices", counting_run)
    out = tmp_path / "out"
    res = invoke_infer([scans, "-o", out, "--models", models, *FAST, "--group-slices", "1"])  # one case per group
    assert res.exit_code == 1, res.output + res.stderr
    assert "1 done, 0 already done, 1 failed, 2 not finished" in res.stdout
    assert "FAILED case1: OSError" in res.stderr and "FAILED case2" not in res.stderr
    assert "STOPPED: no space left on the output disk" in res.stderr and "2 case(s) not finished" in res.stderr
    assert len(computed) == 2  # case0 and case1 only: nothing computed after the disk filled
    run = json.loads((out / "run.json").read_text())
    assert run["stopped"].startswith("no space left") and run["failed"] == ["case1"]
    assert run["not_finished"] == ["case2", "case3"] and run["counts"] == {"cases": 4, "ok": 1, "failed": 1, "not_finished": 2}
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr  # a full disk is not a bug
    assert not (out / "records" / "case2.json").exists() and not list(out.rglob("*.tmp"))
    assert not (out / "maps" / "case1.nii.gz").exists()

    monkeypatch.setattr(pipeline, "write_case_files", real_write)
    res = invoke_infer([scans, "-o", out, "--models", models, *FAST])
    assert res.exit_code == 0, res.output + res.stderr
    assert "3 done, 1 already done, 0 failed" in res.stdout
    assert digests(out) == want


def test_full_disk_in_a_shared_group_leaves_the_rest_of_the_group_unwritten(tmp_path, reference, monkeypatch):
    models, scans, want = reference
    real_write = pipeline.write_case_files
    monkeypatch.setattr(pipeline, "write_case_files", lambda out_dir, plan, **kw: (
        real_write(out_dir, plan, **kw) if plan.case.name == "case0" else
        (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))))
    out = tmp_path / "out"
    res = invoke_infer([scans, "-o", out, "--models", models, *FAST])  # all four cases share one group
    assert res.exit_code == 1 and "1 done, 0 already done, 1 failed, 2 not finished" in res.stdout
    assert "FAILED case1" in res.stderr and "2 case(s) not finished" in res.stderr
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["case0.nii.gz"]
    monkeypatch.setattr(pipeline, "write_case_files", real_write)
    assert invoke_infer([scans, "-o", out, "--models", models, *FAST]).exit_code == 0
    assert digests(out) == want


def test_other_write_errors_fail_only_their_case(tmp_path, reference, monkeypatch):
    models, scans, _ = reference
    real_write = pipeline.write_case_files

    def permission_denied_once(out_dir, plan, **kw):
        if plan.case.name == "case1":
            raise PermissionError(errno.EACCES, "Permission denied", str(out_dir / "maps"))
        return real_write(out_dir, plan, **kw)

    monkeypatch.setattr(pipeline, "write_case_files", permission_denied_once)
    out = tmp_path / "out"
    res = invoke_infer([scans, "-o", out, "--models", models, *FAST, "--group-slices", "1"])
    assert res.exit_code == 1
    assert "3 done, 0 already done, 1 failed" in res.stdout and "STOPPED" not in res.stderr
    assert json.loads((out / "run.json").read_text())["stopped"] is None


def test_stop_reason_is_read_back_from_the_outcomes_of_ray_workers():
    from types import SimpleNamespace

    from condiff.io.cases import Case

    worker_ctx = SimpleNamespace(stopped="no space left on the output disk (/o) while writing a")
    outcome = pipeline._unfinished(Case(name="b", path=None, kind="volume"), worker_ctx)
    driver_ctx = SimpleNamespace(stopped=None)
    assert pipeline.stop_reason(driver_ctx, [outcome]) == worker_ctx.stopped
    assert pipeline.stop_reason(driver_ctx, []) is None


def test_fail_fast_stops_at_the_first_failed_case_and_a_rerun_resumes(tmp_path, reference):
    import shutil

    models, scans, want = reference
    broken = tmp_path / "scans"
    shutil.copytree(scans, broken)
    good = (broken / "case1.nii.gz").read_bytes()
    (broken / "case1.nii.gz").write_bytes(good[: len(good) // 2])  # truncated: fails when read
    out = tmp_path / "out"
    res = invoke_infer([broken, "-o", out, "--models", models, *FAST, "--fail-fast"])
    assert res.exit_code == 1
    assert "1 done, 0 already done, 1 failed, 2 not finished" in res.stdout  # case0, read before case1, still finishes
    assert "FAILED case1" in res.stderr and "STOPPED: --fail-fast: case1 failed; 2 case(s) not finished" in res.stderr
    assert not (out / "maps" / "case2.nii.gz").exists() and not (out / "records" / "case2.json").exists()
    res = invoke_infer([broken, "-o", out, "--models", models, *FAST])  # without: the rest is done
    assert res.exit_code == 1 and "2 done, 1 already done, 1 failed" in res.stdout
    (broken / "case1.nii.gz").write_bytes(good)
    res = invoke_infer([broken, "-o", out, "--models", models, *FAST])
    assert res.exit_code == 0 and "1 done, 3 already done" in res.stdout
    assert {k: v for k, v in digests(out).items() if k.startswith("maps/")} == \
        {k: v for k, v in want.items() if k.startswith("maps/")}


def test_fail_fast_is_refused_with_ray(tmp_path, reference):
    models, scans, _ = reference
    res = invoke_infer([scans, "-o", tmp_path / "out", "--models", models, *FAST, "--fail-fast", "--ray"])
    assert res.exit_code == 2 and "--fail-fast is not supported with --ray" in res.output + res.stderr


def test_fail_fast_also_stops_on_a_failure_after_inference(tmp_path, reference, monkeypatch):
    models, scans, _ = reference
    real_write = pipeline.write_case_files

    def fails_for_case1(out_dir, plan, **kw):
        if plan.case.name == "case1":
            raise ValueError("cannot write this map")
        return real_write(out_dir, plan, **kw)

    monkeypatch.setattr(pipeline, "write_case_files", fails_for_case1)
    out = tmp_path / "out"
    res = invoke_infer([scans, "-o", out, "--models", models, *FAST, "--fail-fast", "--group-slices", "1"])
    assert res.exit_code == 1 and "1 done, 0 already done, 1 failed, 2 not finished" in res.stdout
    assert "STOPPED: --fail-fast: case1 failed; 2 case(s) not finished" in res.stderr
    assert json.loads((out / "run.json").read_text())["stopped"] == "--fail-fast: case1 failed"
