"""condiff-infer --log-format json: condiff.log as JSON lines a log collector can parse, one per event,
with the finished cases' fields equal to their records."""
import json

import pytest

from _infer_helpers import FAST, invoke_infer, one_torch_thread, reference_run


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def test_json_log_lines_carry_each_case_with_its_record_score(tmp_path):
    models, scans, ref = reference_run(tmp_path / "r", n_members=1, n_scans=2)
    out = tmp_path / "out"
    (scans / "case9.nii.gz").write_bytes(b"not a nifti")  # one failed case
    res = invoke_infer([scans, "-o", out, "--models", models, *FAST, "--log-format", "json"])
    assert res.exit_code == 1
    lines = [json.loads(line) for line in (out / "condiff.log").read_text().splitlines()]  # every line parses
    assert all({"time", "level", "logger", "message"} <= set(d) for d in lines)
    by_case = {d["case"]: d for d in lines if "status" in d}
    for case in ("case0", "case1"):
        rec = json.loads((out / "records" / f"{case}.json").read_text())
        assert by_case[case]["status"] == "ok"
        assert by_case[case]["score"] == rec["score"] and by_case[case]["n_slices"] == rec["n_slices"]
    assert by_case["case9"]["status"] == "failed" and "NIfTI" in by_case["case9"]["error"]
    res = invoke_infer([scans, "-o", out, "--models", models, *FAST, "--log-format", "json"])  # rerun: skips
    skipped = [json.loads(line) for line in (out / "condiff.log").read_text().splitlines()]
    assert {d["case"] for d in skipped if d.get("status") == "skipped"} == {"case0", "case1"}


def test_text_log_stays_the_default(tmp_path):
    models, scans, ref = reference_run(tmp_path / "r", n_members=1, n_scans=1)
    text = (ref / "condiff.log").read_text().splitlines()
    assert text and not text[0].startswith("{") and any("case case0 done: score" in line for line in text)
