"""bench/cohort.py: the report is produced and agrees with the run's own records (no timing asserted)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_cohort_report_counts_every_case_done_then_skipped(tmp_path):
    out = tmp_path / "cohort"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "cohort.py"), "--cases", "3", "--out", str(out),
                           "--keep-work"],
                          capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "cohort.json").read_text())
    assert report["fresh"]["counts"]["ok"] == 3 and report["resumed"]["counts"]["skipped"] == 3
    for run in ("fresh", "resumed"):
        assert abs(report[run]["s_per_case"] * 3 - report[run]["wall_s"]) < 1e-9 and report[run]["wall_s"] > 0
    records = sorted(p.name for p in (out / "work" / "out" / "records").iterdir())
    assert records == [f"sub-{i:04d}_T1w.json" for i in range(3)]
    assert "| fresh |" in (out / "cohort.md").read_text() and report["machine"]["cpu_count"] >= 1


def test_cohort_rerun_after_keep_work_is_fresh(tmp_path):
    """A second run into the same OUT after --keep-work removes the leftover work folder first: its first
    run does every case again instead of resuming (0 done / 3 skipped)."""
    out = tmp_path / "cohort"
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    for flags in (["--keep-work"], []):
        proc = subprocess.run([sys.executable, str(REPO / "bench" / "cohort.py"), "--cases", "3", "--out", str(out),
                               *flags], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "removing the leftover" in proc.stderr
    report = json.loads((out / "cohort.json").read_text())
    assert report["fresh"]["counts"]["ok"] == 3 and report["resumed"]["counts"]["skipped"] == 3
    assert not (out / "work").exists()  # removed at the end without --keep-work


def test_cohort_failed_count_check_writes_no_report(tmp_path, monkeypatch):
    """Counts are checked before the report is written: a run whose cases were not all done then all
    skipped exits 1 and leaves no cohort.json / cohort.md."""
    import importlib.util

    import pytest

    spec = importlib.util.spec_from_file_location("cohort_bench", REPO / "bench" / "cohort.py")
    cohort = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cohort)
    fake = {"command": "fake", "wall_s": 1.0, "counts": {"cases": 3, "skipped": 3}, "timings_s": {"total": 1.0}}
    monkeypatch.setattr(cohort, "run_infer", lambda scans, out, extra: fake)
    out = tmp_path / "cohort"
    with pytest.raises(SystemExit) as exc:
        cohort.main(["--cases", "3", "--out", str(out)])
    assert exc.value.code not in (0, None) and "no report written" in str(exc.value.code)
    assert not (out / "cohort.json").exists() and not (out / "cohort.md").exists()
