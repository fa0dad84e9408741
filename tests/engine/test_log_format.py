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


def test_quiet_prints_only_errors_and_the_log_file_still_gets_everything(tmp_path):
    models, scans, ref = reference_run(tmp_path / "r", n_members=1, n_scans=1)
    (scans / "case9.nii.gz").write_bytes(b"not a nifti")  # a failed case: an error, still printed
    (scans / "extra.mha").write_bytes(b"x")  # a skipped format: a warning, logged during discovery
    out = tmp_path / "out"
    res = invoke_infer([scans, "-o", out, "--models", models, *FAST, "-q"])
    assert res.exit_code == 1
    assert res.stdout == ""  # no summary line
    assert "FAILED case9" in res.stderr and "extra.mha" not in res.stderr and "WARNING" not in res.stderr
    log = (out / "condiff.log").read_text()
    assert "extra.mha: skipped (unsupported file type)" in log  # logged before the log file opened
    assert "case case0 done" in log and "case9" in log
    loud = invoke_infer([scans, "-o", tmp_path / "loud", "--models", models, *FAST])
    assert "extra.mha" in loud.stderr and "1 done" in loud.stdout  # what -q hides is there without it


def test_quiet_and_verbose_together_are_refused(tmp_path):
    res = invoke_infer([tmp_path, "-o", tmp_path / "out", "-q", "-v"])
    assert res.exit_code == 2 and "--quiet" in res.stderr and not (tmp_path / "out").exists()


def test_log_file_goes_where_asked_and_is_appended_to(tmp_path):
    models, scans, ref = reference_run(tmp_path / "r", n_members=1, n_scans=1)
    out, log = tmp_path / "out", tmp_path / "logs" / "site-a" / "run.log"  # its folder is created
    for _ in range(2):
        res = invoke_infer([scans, "-o", out, "--models", models, *FAST, "--log-file", log])
        assert res.exit_code == 0, res.output
    text = log.read_text()
    assert text.count("case case0 done") == 1 and text.count("case case0: outputs up to date, skipped") == 1
    assert not (out / "condiff.log").exists()
    assert json.loads((out / "run.json").read_text())["arguments"]["log_file"] == log.as_posix()


@pytest.mark.parametrize("bad", ["folder", "under-a-file"])
def test_unusable_log_file_is_exit_2_naming_it_before_any_work(tmp_path, bad):
    models, scans, ref = reference_run(tmp_path / "r", n_members=1, n_scans=1)
    (tmp_path / "folder").mkdir()
    (tmp_path / "plain").write_text("x")
    log = tmp_path / "folder" if bad == "folder" else tmp_path / "plain" / "run.log"
    out = tmp_path / "out"
    res = invoke_infer([scans, "-o", out, "--models", models, *FAST, "--log-file", log])
    assert res.exit_code == 2 and str(log) in res.stderr
    assert not (out / "records").exists()
