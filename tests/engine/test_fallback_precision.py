"""--fallback-precision: a case whose output is not finite (half-precision overflow, ecosystem C.39)
is recomputed once on eager torch at the fallback precision, equal to a run made that way from the
start, and its record and cases.csv say so; without the flag such a case fails with a hint.

A real fp16 overflow needs a GPU and an unlucky network, so the runner is wrapped to poison the
first restoration of one chosen case with NaN; everything around it (pipeline, CLI, writer) is real.
"""
import csv
import hashlib
import json

import pytest

from _infer_helpers import FAST, digests, invoke_infer, one_torch_thread, reference_run
from condiff.engine import pipeline


@pytest.fixture(scope="module", autouse=True)
def reference(tmp_path_factory):
    """A set, two scans and their fp32 eager outputs (the fallback must reproduce case1's); the
    module's tests run on one torch thread."""
    with one_torch_thread():
        yield reference_run(tmp_path_factory.mktemp("fallback"), n_members=2, n_scans=2)


def _poisoning(digest: str, times: int, real=pipeline.run_slices, calls=None):
    """``run_slices`` whose first ``times`` runs of the case with input ``digest`` return NaN maps."""
    seen = {"n": 0}

    def run(denoisers, jobs, plan, **kw):
        results = real(denoisers, jobs, plan, **kw)
        if calls is not None:
            calls.append(len(jobs))
        if any(j.digest == digest for j in jobs) and seen["n"] < times:
            seen["n"] += 1
            for job, r in zip(jobs, results):
                if job.digest == digest:
                    r.amap.fill_(float("nan"))
        return results

    return run


def _rows(out):
    with open(out / "cases.csv", newline="") as f:
        return {r["case"]: r for r in csv.DictReader(f)}


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_non_finite_case_is_recomputed_in_fp32_and_equals_an_fp32_run(tmp_path, reference, monkeypatch):
    models, scans, ref = reference
    calls = []
    monkeypatch.setattr(pipeline, "run_slices", _poisoning(_digest(scans / "case1.nii.gz"), 1, calls=calls))
    out = tmp_path / "out"
    res = invoke_infer([scans, "-o", out, "--models", models, *FAST, "--precision", "bf16",
                        "--fallback-precision", "fp32"])
    assert res.exit_code == 0, res.output + res.stderr
    assert "2 done, 0 already done, 0 failed" in res.stdout
    want, got = digests(ref), digests(out)
    case1 = {k: v for k, v in want.items() if "case1" in k and not k.startswith("records/")}  # records name the run
    assert len(case1) >= 2 and {k: got[k] for k in case1} == case1  # byte-identical to the fp32 eager run
    rec0 = json.loads((out / "records" / "case0.json").read_text())
    rec1 = json.loads((out / "records" / "case1.json").read_text())
    assert (rec0["precision"], rec0["fallback"]) == ("bf16", None)
    assert (rec1["engine"], rec1["precision"]) == ("torch", "fp32")
    assert rec1["fallback"]["from_precision"] == "bf16" and "non-finite" in rec1["fallback"]["reason"]
    rows = _rows(out)
    assert (rows["case0"]["precision"], rows["case1"]["precision"]) == ("bf16", "fp32")
    assert "case1: non-finite output from engine torch (bf16); recomputing it on torch fp32" in (out / "condiff.log").read_text()
    n1 = len(json.loads((ref / "records" / "case1.json").read_text())["slice_scores"])
    assert calls[-1] == n1  # only case1's slices were run again


def test_without_the_flag_the_case_fails_with_a_hint(tmp_path, reference, monkeypatch):
    models, scans, ref = reference
    monkeypatch.setattr(pipeline, "run_slices", _poisoning(_digest(scans / "case1.nii.gz"), 1))
    out = tmp_path / "out"
    res = invoke_infer([scans, "-o", out, "--models", models, *FAST, "--precision", "bf16"])
    assert res.exit_code == 1
    rows = _rows(out)
    assert rows["case0"]["status"] == "ok" and rows["case1"]["status"] == "failed"
    assert "non-finite output from engine torch (bf16)" in rows["case1"]["error"]
    assert "--fallback-precision fp32" in rows["case1"]["error"]


def test_a_fallback_that_is_not_finite_either_fails_the_case_naming_it(tmp_path, reference, monkeypatch):
    models, scans, ref = reference
    monkeypatch.setattr(pipeline, "run_slices", _poisoning(_digest(scans / "case1.nii.gz"), 2))
    out = tmp_path / "out"
    res = invoke_infer([scans, "-o", out, "--models", models, *FAST, "--precision", "bf16",
                        "--fallback-precision", "fp32"])
    assert res.exit_code == 1
    assert "non-finite output from engine torch (fp32)" in _rows(out)["case1"]["error"]


def test_no_second_run_when_the_run_already_is_the_fallback(tmp_path, reference, monkeypatch):
    models, scans, ref = reference
    calls = []
    monkeypatch.setattr(pipeline, "run_slices", _poisoning(_digest(scans / "case1.nii.gz"), 1, calls=calls))
    out = tmp_path / "out"
    res = invoke_infer([scans, "-o", out, "--models", models, *FAST, "--fallback-precision", "fp32"])  # torch fp32 already
    assert res.exit_code == 1 and len(calls) == 1
    assert _rows(out)["case1"]["status"] == "failed"
