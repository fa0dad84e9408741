"""bench/cpu_rows.py: the report is produced and self-consistent (timings are not tested)."""
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("cpu_rows", REPO / "bench" / "cpu_rows.py")
cpu_rows = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cpu_rows)


def test_report_has_every_way_for_every_batch(tmp_path, monkeypatch):
    monkeypatch.setitem(cpu_rows.CASES, "tiny", (32, (1, 3)))
    cpu_rows.main(["--presets", "tiny", "--repeats", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "cpu_rows.json").read_text())
    ways = {(r["batch"], r["way"]) for r in report["rows"]}
    assert ways == {(b, w) for b in (1, 3) for w in ("rows-in-turn", "rows-side-by-side", "whole-batch")}
    for r in report["rows"]:
        assert 0 < r["min_ms_per_image"] <= r["ms_per_image"] <= r["max_ms_per_image"]
    assert report["machine"]["cpu_count"] and report["versions"]["torch"]
    table = (tmp_path / "cpu_rows.md").read_text().splitlines()
    assert len(table) == 2 + 6 and all(line.count("|") == 8 for line in table)
    assert sum(line.endswith("| 1.00× |") for line in table) >= 2  # each batch's baseline row


def test_pipeline_rows_agree_up_to_rounding(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "tests" / "engine"))
    from _infer_helpers import make_model_set

    rows = cpu_rows.pipeline(make_model_set(tmp_path / "set", n_members=2), repeats=1, slices=3, steps=2)
    assert [r["way"] for r in rows] == ["rows-in-turn", "rows-side-by-side"]
    assert all(r["slices"] == 3 and r["members"] == 2 and r["seconds"] > 0 for r in rows)
    assert rows[0]["max_abs_map_diff_between_ways"] < 1e-5  # the same computation, other thread counts
