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
