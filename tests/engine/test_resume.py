"""Resume, interruption, overwrite, shards and merge: all end in byte-identical outputs (DESIGN §3, §6)."""
import hashlib
import json
import shutil

import pytest

from _infer_helpers import FAST, one_torch_thread, digests, invoke_infer, reference_run
from condiff.engine import pipeline


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


_invoke = invoke_infer


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of 3 cases with 2 members: the bytes every other run must reproduce."""
    models, scans, ref = reference_run(tmp_path_factory.mktemp("resume"), n_members=2, n_scans=3)
    return models, scans, ref, digests(ref)


def _copy(ref, dst):
    shutil.copytree(ref, dst)
    return dst


def _forbid_inference(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("inference ran")

    monkeypatch.setattr(pipeline, "run_slices", refuse)


def test_rerun_skips_done_cases_without_inference(tmp_path, reference, monkeypatch):
    models, scans, ref, want = reference
    out = _copy(ref, tmp_path / "out")
    _forbid_inference(monkeypatch)
    res = _invoke([scans, "-o", out, "--models", models, *FAST])
    assert res.exit_code == 0, res.output + res.stderr
    assert "0 done, 3 already done, 0 failed" in res.stdout
    assert digests(out) == want
    assert json.loads((out / "run.json").read_text())["counts"] == {"cases": 3, "skipped": 3}


def test_deleted_or_changed_outputs_are_recomputed_identically(tmp_path, reference):
    models, scans, ref, want = reference
    out = _copy(ref, tmp_path / "out")
    (out / "maps" / "case1.nii.gz").unlink()
    (out / "overlays" / "case2.png").write_bytes(b"not the overlay")
    res = _invoke([scans, "-o", out, "--models", models, *FAST])
    assert res.exit_code == 0, res.output + res.stderr
    assert "2 done, 1 already done" in res.stdout
    assert digests(out) == want


def test_interrupted_run_resumes_to_identical_outputs(tmp_path, reference, monkeypatch):
    models, scans, ref, want = reference
    out = tmp_path / "out"
    real = pipeline.run_slices
    calls = []

    def interrupt_in_second_group(*args, progress=None, **kw):
        calls.append(1)
        if len(calls) < 2:
            return real(*args, progress=progress, **kw)

        def progress_then_ctrl_c(n):
            progress(n)
            raise KeyboardInterrupt

        return real(*args, progress=progress_then_ctrl_c, **kw)

    monkeypatch.setattr(pipeline, "run_slices", interrupt_in_second_group)
    # one case per group, so the first case is finished when the second is interrupted
    res = _invoke([scans, "-o", out, "--models", models, *FAST, "--group-slices", "1"])
    assert res.exit_code == 130, res.output + res.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["interrupted"] is True and run["signal"] == "SIGINT"
    # what the run did before the signal is counted: one case done, two never finished
    assert run["counts"] == {"cases": 3, "ok": 1, "not_finished": 2}, run["counts"]
    assert run["not_finished"] == ["case1", "case2"] and run["failed"] == []
    assert (out / "records" / "case0.json").is_file() and not (out / "records" / "case1.json").exists()
    assert not (out / "maps" / "case1.nii.gz").exists()
    assert [line.split(",")[0] for line in (out / "cases.csv").read_text().splitlines()[1:]] == ["case0"]
    assert not (out / ".condiff.lock").exists() and not list(out.rglob("*.tmp"))

    monkeypatch.setattr(pipeline, "run_slices", real)
    res = _invoke([scans, "-o", out, "--models", models, *FAST])
    assert res.exit_code == 0, res.output + res.stderr
    assert "2 done, 1 already done" in res.stdout
    assert json.loads((out / "run.json").read_text())["interrupted"] is False
    assert digests(out) == want


def test_sigterm_exits_143_and_records_it(tmp_path, reference, monkeypatch):
    from condiff.cli_common import Terminated

    models, scans, _, _ = reference

    def terminated(*a, **k):
        raise Terminated()

    monkeypatch.setattr(pipeline, "run_slices", terminated)
    out = tmp_path / "out"
    res = _invoke([scans, "-o", out, "--models", models, *FAST])
    assert res.exit_code == 143
    run = json.loads((out / "run.json").read_text())
    assert run["interrupted"] is True and run["signal"] == "SIGTERM"
    assert run["counts"] == {"cases": 3, "not_finished": 3}, run["counts"]
    assert not (out / ".condiff.lock").exists()


def test_overwrite_is_identical_and_changed_options_are_not_skipped(tmp_path, reference):
    models, scans, ref, want = reference
    out = _copy(ref, tmp_path / "out")
    res = _invoke([scans, "-o", out, "--models", models, *FAST, "--overwrite"])
    assert res.exit_code == 0 and "3 done, 0 already done" in res.stdout
    assert digests(out) == want
    # another method (seed, members) into a folder of finished cases: refused before any work (C.27) ...
    res = _invoke([scans, "-o", out, "--models", models, *FAST, "--seed", "1", "--members", "1"])
    assert res.exit_code == 2, res.output + res.stderr
    assert "3 case(s) made with another method" in res.stderr and "seed 0 (this run: 1)" in res.stderr
    assert "members [0, 1] (this run: [0])" in res.stderr and "--overwrite" in res.stderr
    assert digests(out) == want and not (out / ".condiff.lock").exists()
    # ... and replaced with --overwrite
    res = _invoke([scans, "-o", out, "--models", models, *FAST, "--seed", "1", "--members", "1", "--overwrite"])
    assert res.exit_code == 0 and "3 done, 0 already done" in res.stdout
    now = digests(out)
    assert now["maps/case0.nii.gz"] != want["maps/case0.nii.gz"]
    assert now["cases.csv"] != want["cases.csv"]



def test_another_file_under_a_finished_case_name_is_refused_not_replaced(tmp_path, reference, monkeypatch):
    """Two sites' sub-01 given as separate runs into one folder: the second would silently replace the first."""
    models, scans, ref, want = reference
    out = _copy(ref, tmp_path / "out")
    other = tmp_path / "site-b" / "case1.nii.gz"
    other.parent.mkdir()
    shutil.copyfile(scans / "case0.nii.gz", other)  # other bytes under the name case1
    res = _invoke([other.parent, "-o", out, "--models", models, *FAST])
    assert res.exit_code == 2, res.output + res.stderr
    assert "1 case(s) made from other input files" in res.stderr
    assert str(scans / "case1.nii.gz") in res.stderr and str(other) in res.stderr and "--overwrite" in res.stderr
    assert digests(out) == want and not (out / ".condiff.lock").exists()
    # the same bytes from another folder (a moved or copied cohort) are the same cases: resumed, not refused
    moved = shutil.copytree(scans, tmp_path / "moved")
    with monkeypatch.context() as m:
        _forbid_inference(m)
        res = _invoke([moved, "-o", out, "--models", models, *FAST])
    assert res.exit_code == 0 and "0 done, 3 already done" in res.stdout, res.output + res.stderr
    # ... whose records now name where the scans are (condiff-eval reads the inputs and masks there)
    assert json.loads((out / "records" / "case0.json").read_text())["input"] == (moved / "case0.nii.gz").as_posix()
    from condiff.engine.consistency import replaced_inputs
    from condiff.engine.writer import load_records
    from condiff.io.cases import Case

    failed = [{**r, "status": "failed"} for r in load_records(out)]  # a failed record holds no result to lose
    assert replaced_inputs(failed, [Case("case1", other, "volume")]) == []
    assert replaced_inputs(load_records(out), [Case("case1", other, "volume")]) != []
    res = _invoke([other.parent, "-o", out, "--models", models, *FAST, "--overwrite"])
    assert res.exit_code == 0, res.output + res.stderr
    rec = json.loads((out / "records" / "case1.json").read_text())
    assert rec["input"] == other.as_posix()



def test_the_same_files_from_another_root_are_refused_not_added_twice(tmp_path, reference):
    """condiff-infer cohort/ then condiff-infer cohort/site-a: the scans would come back as site-a/case0 ..."""
    models, scans, ref, want = reference
    cohort = tmp_path / "cohort"
    shutil.copytree(scans, cohort / "site-a")
    out = tmp_path / "out"
    assert _invoke([cohort, "-o", out, "--models", models, *FAST]).exit_code == 0
    before = digests(out)
    res = _invoke([cohort / "site-a", "-o", out, "--models", models, *FAST])
    assert res.exit_code == 2, res.output + res.stderr
    assert "already holds 3 of this run's input files under other case names" in res.stderr
    assert "is case site-a/case0, this run would add it as case0" in res.stderr
    assert digests(out) == before and not (out / "records" / "case0.json").exists()
    res = _invoke([cohort / "site-a", "-o", out, "--models", models, *FAST, "--overwrite"])  # not even then
    assert res.exit_code == 2 and "under other case names" in res.stderr and digests(out) == before
    res = _invoke([cohort, "-o", out, "--models", models, *FAST])  # the same root: resumed
    assert res.exit_code == 0 and "0 done, 3 already done" in res.stdout


def test_overwrite_of_part_of_a_folder_removes_the_other_methods_cases(tmp_path, reference):
    """--overwrite on one input leaves one method in the folder: the other method's cases go, files and records."""
    models, scans, ref, want = reference
    out = _copy(ref, tmp_path / "out")
    res = _invoke([scans / "case1.nii.gz", "-o", out, "--models", models, *FAST, "--seed", "5", "--overwrite"])
    assert res.exit_code == 0, res.output + res.stderr
    assert sorted(p.name for p in (out / "records").iterdir()) == ["case1.json"]
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and "case1" not in p.name)
    assert all(not name.startswith(("maps/", "restorations/", "overlays/", "records/")) for name in left), left
    rows = (out / "cases.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("case1,")


def test_overwrite_reaches_through_a_symlinked_records_folder(tmp_path, reference):
    models, scans, ref, want = reference
    out = _copy(ref, tmp_path / "out")
    shutil.move(out / "records", tmp_path / "records-elsewhere")  # a user's layout: records on another disk
    (out / "records").symlink_to(tmp_path / "records-elsewhere", target_is_directory=True)
    res = _invoke([scans / "case1.nii.gz", "-o", out, "--models", models, *FAST, "--seed", "5", "--overwrite"])
    assert res.exit_code == 0, res.output + res.stderr
    assert sorted(p.name for p in (tmp_path / "records-elsewhere").iterdir()) == ["case1.json"]
    assert not (out / "maps" / "case0.nii.gz").exists()
    res = _invoke([scans / "case1.nii.gz", "-o", out, "--models", models, *FAST, "--seed", "5"])
    assert res.exit_code == 0 and "0 done, 1 already done" in res.stdout  # one method left: resumes


def test_overwrite_by_every_shard_leaves_one_method(tmp_path, reference):
    models, scans, ref, want = reference
    out = _copy(ref, tmp_path / "out")  # case0..case2 at seed 0
    two = tmp_path / "two"
    two.mkdir()
    for k in (0, 1):
        shutil.copy(scans / f"case{k}.nii.gz", two)
    args = [two, "-o", out, "--models", models, *FAST, "--seed", "3", "--overwrite"]
    res = _invoke([*args, "--shard", "0/2"])  # case0; case2 is outside the split: deleted
    assert res.exit_code == 0, res.output + res.stderr
    assert sorted(p.name for p in (out / "records").iterdir()) == ["case0.json", "case1.json"]
    assert json.loads((out / "records" / "case1.json").read_text())["seed"] == 0  # shard 1's, left to it
    res = _invoke([*args, "--shard", "1/2"])
    assert res.exit_code == 0, res.output + res.stderr
    seeds = {p.name: json.loads(p.read_text())["seed"] for p in (out / "records").iterdir()}
    assert seeds == {"case0.json": 3, "case1.json": 3}


def test_overwrite_that_stops_early_leaves_no_case_of_the_other_method(tmp_path, reference):
    """--overwrite deletes the other method's cases up front: after --fail-fast stops it, a plain
    rerun resumes instead of being refused for a folder of two methods."""
    models, scans, ref, want = reference
    out = _copy(ref, tmp_path / "out")
    mixed = shutil.copytree(scans, tmp_path / "scans")
    (mixed / "aaa.nii.gz").write_bytes(b"not a scan")  # sorts first, fails, stops the run
    res = _invoke([mixed, "-o", out, "--models", models, *FAST, "--seed", "4", "--overwrite", "--fail-fast"])
    assert res.exit_code == 1 and "STOPPED" in res.stderr, res.output + res.stderr
    assert sorted(p.name for p in (out / "records").iterdir()) == ["aaa.json"]
    (mixed / "aaa.nii.gz").unlink()
    res = _invoke([mixed, "-o", out, "--models", models, *FAST, "--seed", "4"])
    assert res.exit_code == 0 and "3 done" in res.stdout, res.output + res.stderr


def test_another_engine_or_what_is_written_is_the_same_method(tmp_path, reference):
    """Options that change only rounding or which files exist recompute the run's cases without --overwrite."""
    models, scans, ref, want = reference
    out = _copy(ref, tmp_path / "out")
    res = _invoke([scans / "case0.nii.gz", "-o", out, "--models", models, *FAST, "--no-restoration"])
    assert res.exit_code == 0 and "1 done, 0 already done" in res.stdout, res.output + res.stderr
    assert not (out / "restorations" / "case0.nii.gz").exists()
    assert (out / "restorations" / "case1.nii.gz").is_file()  # the other cases are untouched
    assert digests(out)["maps/case1.nii.gz"] == want["maps/case1.nii.gz"]


def test_eval_refuses_a_folder_of_two_methods(tmp_path, reference):
    from condiff.engine.cli import eval_main
    from click.testing import CliRunner

    models, scans, ref, want = reference
    out = _copy(ref, tmp_path / "out")
    rec_path = out / "records" / "case2.json"
    rec = json.loads(rec_path.read_text())
    rec["options"]["steps"] = 50  # as an older condiff, which did not refuse, could have left it
    rec_path.write_text(json.dumps(rec))
    res = CliRunner().invoke(eval_main, [str(out), "--masks", "{dir}/{stem}_lesionmask.nii.gz", "--missing-label", "normal"])
    assert res.exit_code == 2, res.output
    assert "2 different methods" in res.output and "steps 50 (case0: 2)" in res.output


def test_shards_then_merge_equal_single_run(tmp_path, reference):
    models, scans, ref, want = reference
    out = tmp_path / "out"
    for shard in ("1/2", "0/2"):  # any order; a different batch size too: results never depend on it
        args = [scans, "-o", out, "--models", models, *FAST, "--shard", shard, "--batch-size", "3"]
        res = _invoke(args)
        assert res.exit_code == 0, res.output + res.stderr
    assert (out / "run.0-of-2.json").is_file() and (out / "run.1-of-2.json").is_file()
    assert not (out / "run.json").exists()
    assert json.loads((out / "run.1-of-2.json").read_text())["counts"]["cases"] == 1  # case1 of sorted case0..2
    assert digests(out) == want
    (out / "cases.csv").unlink()
    (out / "scores.csv").write_text("stale\n")
    res = _invoke(["--merge", out])
    assert res.exit_code == 0 and "3 ok" in res.stdout
    assert digests(out) == want


def test_records_of_older_versions_resume_under_nan_policy_and_volume_index(tmp_path, reference, monkeypatch):
    """Records written before nonfinite_voxels / series_volumes / mask_auto existed: an ok case read with
    --nan-policy error had no NaN and one read without --volume-index was 3-D, so neither option reruns it."""
    models, scans, ref, want = reference
    out = _copy(ref, tmp_path / "out")
    for path in (out / "records").glob("*.json"):
        rec = json.loads(path.read_text())
        for key in ("nonfinite_voxels", "series_volumes", "mask_auto"):
            rec.pop(key)
        # ... whose digest covered every option, as written then
        text = json.dumps(rec["options"], sort_keys=True, separators=(",", ":"))
        rec["options_digest"] = hashlib.sha256(text.encode()).hexdigest()
        path.write_text(json.dumps(rec))
    _forbid_inference(monkeypatch)
    for extra in (["--nan-policy", "zero"], ["--volume-index", "0"]):
        res = _invoke([scans, "-o", out, "--models", models, *FAST, *extra])
        assert res.exit_code == 0 and "0 done, 3 already done" in res.stdout, (extra, res.output + res.stderr)


def test_a_copy_is_told_from_another_scan_of_the_same_protocol(tmp_path):
    """Two uncompressed scans of one protocol share their size, header and leading background: only the
    sampled middle tells them apart (the folder check must not take one for a copy of the other)."""
    import numpy as np
    import nibabel as nib

    from condiff.engine.consistency import _same_sample

    for k in range(2):
        a = np.zeros((128, 128, 60), np.int16)
        a[30:100, 30:100, 10:50] = np.random.default_rng(k).integers(1, 1000, (70, 70, 40))
        nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / f"s{k}.nii")
    first, second = (tmp_path / f"s{k}.nii" for k in range(2))
    assert first.stat().st_size == second.stat().st_size
    assert first.read_bytes()[: 1 << 16] == second.read_bytes()[: 1 << 16]
    assert not _same_sample(str(first), str(second))
    shutil.copyfile(first, tmp_path / "copy.nii")
    assert _same_sample(str(first), str(tmp_path / "copy.nii"))


def _recorded_case(out, options, *, mask_sha="m" * 64, input_sha="i" * 64, digest="d" * 64):
    """A finished case written by hand: its outputs and a record that proves them (engine.plan's contract)."""
    from pathlib import Path

    from condiff.engine.plan import RECORD_SCHEMA, plan_case, sha256_path
    from condiff.io.cases import Case

    plan = plan_case(Case("sub/case0", Path("/in/sub/case0.nii.gz"), "volume"), options)
    outputs = {}
    for kind, rel in plan.outputs.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(kind.encode())
        outputs[kind] = {"path": rel, "sha256": sha256_path(out / rel)}
    rec = {"schema": RECORD_SCHEMA, "status": "ok", "case": "sub/case0", "input_sha256": input_sha,
           "mask_sha256": mask_sha, "model_set_digest": digest, "options": options.to_dict(),
           "options_digest": options.case_digest(0, 1), "nonfinite_voxels": 0, "series_volumes": 1,
           "outputs": outputs}
    (out / plan.record).parent.mkdir(parents=True, exist_ok=True)
    (out / plan.record).write_text(json.dumps(rec))
    return plan


def test_a_record_proves_its_case_only_while_every_recorded_digest_still_holds(tmp_path):
    """resume_check: the same input, brain mask, model set and options with untouched outputs skip the case;
    any one of them changed recomputes it, named."""
    import dataclasses

    from condiff.engine.plan import RunOptions, resume_check

    options = RunOptions(mask="auto", steps=4)
    plan = _recorded_case(tmp_path, options)
    same = dict(input_sha256="i" * 64, mask_sha256="m" * 64, model_set_digest="d" * 64, options=options)
    assert resume_check(tmp_path, plan, **same) is None
    for key, value, reason in (("input_sha256", "j" * 64, "input sha256 changed"),
                               ("mask_sha256", "n" * 64, "mask sha256 changed"),
                               ("mask_sha256", None, "mask sha256 changed"),
                               ("model_set_digest", "e" * 64, "model set digest changed"),
                               ("options", dataclasses.replace(options, seed=1), "options digest changed")):
        assert resume_check(tmp_path, plan, **{**same, key: value}) == reason, key
    # a run that plans other outputs (here: no restorations) recomputes rather than trusting the old list
    fewer = dataclasses.replace(options, restoration=False)
    from condiff.engine.plan import plan_case

    assert resume_check(tmp_path, plan_case(plan.case, fewer), **{**same, "options": fewer}) in (
        "options digest changed", "different outputs planned")
    # a failed record never proves anything
    rec = json.loads((tmp_path / plan.record).read_text())
    (tmp_path / plan.record).write_text(json.dumps({**rec, "status": "failed"}))
    assert resume_check(tmp_path, plan, **same) == "failed before"


def test_records_written_before_the_newer_options_existed_stay_current(tmp_path):
    """--fast-kernels, --layout and --volume-index are left out of the options (and their digest) at their
    defaults, so a record made by a condiff without them still proves its case. Oracle: the digest an
    older condiff wrote, rebuilt with hashlib from its option dict."""
    import hashlib

    from condiff.engine.plan import RunOptions, resume_check

    options = RunOptions(mask="auto", steps=4)
    plan = _recorded_case(tmp_path, options)
    rec = json.loads((tmp_path / plan.record).read_text())
    old = {k: v for k, v in rec["options"].items() if k not in ("fast_kernels", "layout", "volume_index")}
    assert set(rec["options"]) == set(old)  # nothing of the newer options in the record at their defaults
    del old["nan_policy"]  # no NaN in the input: the policy does not decide its bytes
    want = hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert rec["options_digest"] == want
    assert resume_check(tmp_path, plan, input_sha256="i" * 64, mask_sha256="m" * 64, model_set_digest="d" * 64,
                        options=options) is None


def test_a_record_listing_fewer_outputs_than_this_version_plans_is_recomputed(tmp_path):
    """A record from a version that wrote no overlay (same options digest) must not hide the new output."""
    from condiff.engine.plan import RunOptions, resume_check

    options = RunOptions(mask="auto", steps=4)
    plan = _recorded_case(tmp_path, options)
    rec = json.loads((tmp_path / plan.record).read_text())
    del rec["outputs"]["overlay"]
    (tmp_path / plan.record).write_text(json.dumps(rec))
    assert resume_check(tmp_path, plan, input_sha256="i" * 64, mask_sha256="m" * 64, model_set_digest="d" * 64,
                        options=options) == "different outputs planned"


def test_another_preprocessing_contract_with_the_same_weights_is_another_method():
    """The model-set digest covers the weights, not the members' config.json: a contract edited in place
    (another field of view, other landmarks) gives maps of another method, named as such."""
    from condiff.engine.consistency import check_single_method, differences
    from condiff.engine.plan import RunOptions
    from condiff.errors import CondiffError

    ours = RunOptions(preprocessing={"modality": "mri", "fov_mm": 192.0}).to_dict()
    theirs = {**ours, "preprocessing": {"modality": "mri", "fov_mm": 240.0}}
    rec = {"case": "a", "status": "ok", "model_set_digest": "d" * 64, "options": theirs}
    assert differences(rec, "d" * 64, ours) == ["another preprocessing than this run's"]
    older = {k: v for k, v in ours.items() if k != "preprocessing"}  # a record without the field
    assert differences({**rec, "options": older}, "d" * 64, ours) == ["another preprocessing than this run's"]
    with pytest.raises(CondiffError, match="another preprocessing"):
        check_single_method([rec, {**rec, "case": "b", "options": ours}, {**rec, "case": "c", "options": ours}],
                            "out")
