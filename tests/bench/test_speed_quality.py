"""bench/speed_quality.py --smoke: the table is produced and agrees with itself (never timing thresholds)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "speed_quality.py"


def run_smoke(out: Path, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=600, cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "speed_quality.json").read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed-quality")
    return run_smoke(out), out


def ok_rows(report):
    return [r for r in report["rows"] if r["status"] == "ok"]


def test_three_files_with_header(smoke):
    report, out = smoke
    meta = report["meta"]
    md = (out / "speed_quality.md").read_text()
    assert report["schema"] == "condiff.bench.speed_quality/1"
    assert "--smoke" in meta["command"] and meta["command"] in md
    assert meta["versions"]["torch"] and meta["versions"]["condiff"] and meta["machine"]["cpu"] in md
    assert meta["date"] in md and "How to read this" in md
    try:
        import matplotlib  # noqa: F401
        assert (out / "speed_quality.png").stat().st_size > 0
    except ImportError:
        assert any("matplotlib" in n for n in meta["notes"])


def test_ap_values_are_probabilities(smoke):
    report, _ = smoke
    assert len(ok_rows(report)) >= 2
    assert 0.0 < report["meta"]["lesion_inputs"]["chance"] < 1.0
    for r in ok_rows(report):
        assert 0.0 <= r["healing_ap"] <= 1.0 and 0.0 <= r["lesion_ap"] <= 1.0
        assert r["healing"], r["name"]
        for task in r["healing"].values():
            assert 0.0 <= task["ap"] <= 1.0 and 0.0 <= task["chance"] <= 1.0
        assert r["healing_ap"] == pytest.approx(sum(t["ap"] for t in r["healing"].values()) / len(r["healing"]), abs=1e-12)


def test_reference_row_is_one(smoke):
    report, _ = smoke
    ref = report["rows"][0]
    assert ref["reference"] and ref["name"] == report["meta"]["reference"] and ref["status"] == "ok"
    assert sum(r["reference"] for r in report["rows"]) == 1
    assert ref["speed_ratio"] == 1.0 and ref["healing_rel"] == 1.0 and ref["lesion_rel"] == 1.0 and ref["quality_rel"] == 1.0


def test_ratios_are_quotients_of_rows(smoke):
    report, _ = smoke
    ref = report["rows"][0]
    for r in ok_rows(report):
        assert math.isclose(r["slices_per_s"], r["n_slices"] / r["time_s"], rel_tol=1e-12)
        assert r["n_slices"] == ref["n_slices"]  # every configuration restores the same slices
        assert math.isclose(r["speed_ratio"], r["slices_per_s"] / ref["slices_per_s"], rel_tol=1e-12)
        assert math.isclose(r["healing_rel"], r["healing_ap"] / ref["healing_ap"], rel_tol=1e-12)
        assert math.isclose(r["lesion_rel"], r["lesion_ap"] / ref["lesion_ap"], rel_tol=1e-12)
        assert r["quality_rel"] == min(r["healing_rel"], r["lesion_rel"])
        assert r["unet_evals_per_slice"] == r["members"] * r["steps"]


def test_pareto_flags_match_a_sweep(smoke):
    """Independent recomputation: sweep from fastest to slowest, a row is on the front iff it beats the best
    quality seen among strictly faster rows and no equally fast row is better."""
    report, _ = smoke
    rows = ok_rows(report)
    for r in rows:
        faster = [o["quality_rel"] for o in rows if o["slices_per_s"] > r["slices_per_s"]]
        same_speed = [o["quality_rel"] for o in rows if o is not r and o["slices_per_s"] == r["slices_per_s"]]
        expected = all(q < r["quality_rel"] for q in faster) and all(q <= r["quality_rel"] for q in same_speed)
        assert r["pareto"] is expected, r["name"]
    assert max(rows, key=lambda o: o["slices_per_s"])["pareto"]  # the fastest row is always on the front


def test_rows_that_cannot_run_are_listed_with_a_reason(smoke):
    report, out = smoke
    md = (out / "speed_quality.md").read_text()
    skipped = {r["name"]: r for r in report["rows"] if r["status"] != "ok"}
    assert "fast-fp16-ddim2-all" in skipped and "CUDA" in skipped["fast-fp16-ddim2-all"]["reason"]
    assert "2 members" in skipped["torch-fp32-ddim2-m5"]["reason"]
    for name, r in skipped.items():
        assert r["status"] == "not run" and r["reason"]
        assert "slices_per_s" not in r and "pareto" not in r
        assert f"not run: {r['reason']}" in md


def removal(row):
    return sum(t["removed"] for t in row["healing"].values()) / len(row["healing"])


def test_recommendation_follows_the_two_percent_rule(smoke):
    report, out = smoke
    tol = report["meta"]["tolerance"]
    assert tol == 0.02
    good = [r for r in ok_rows(report) if r["speed_ratio"] > 1
            and r["healing_ap"] >= (1 - tol) * report["rows"][0]["healing_ap"]
            and removal(r) >= removal(report["rows"][0]) - tol * abs(removal(report["rows"][0]))
            and r["lesion_ap"] >= (1 - tol) * report["rows"][0]["lesion_ap"]]
    expected = max(good, key=lambda r: r["slices_per_s"])["name"] if good else None
    assert report["meta"]["recommended"] == expected
    md = (out / "speed_quality.md").read_text()
    assert f"**Recommended: `{expected}`**" in md if expected else "**Recommended: none**" in md


def test_markdown_lists_every_row(smoke):
    report, out = smoke
    md = (out / "speed_quality.md").read_text().split("## Healing per task")[0]
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| config")]
    assert len(table) == len(report["rows"])
    for line, r in zip(table, report["rows"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0].split()[0] == r["name"] and cells[5] == str(r["members"])
        if r["status"] == "ok":
            assert float(cells[6]) == pytest.approx(r["slices_per_s"], rel=1e-3)
            assert (cells[12] == "yes") is r["pareto"]


def test_same_configuration_twice_gives_the_same_quality_and_members_matter(smoke, tmp_path):
    report, _ = smoke
    again = run_smoke(tmp_path, "--configs", "torch-fp32-ddim2-m1")
    assert [r["name"] for r in again["rows"]] == ["torch-fp32-ddim2-all", "torch-fp32-ddim2-m1"]  # reference always runs
    first = {r["name"]: r for r in report["rows"]}
    for r in again["rows"]:
        assert r["healing"] == first[r["name"]]["healing"], r["name"]  # same noise, same slices: identical numbers
        assert r["lesion_ap"] == first[r["name"]]["lesion_ap"], r["name"]
    one, every = first["torch-fp32-ddim2-m1"], first["torch-fp32-ddim2-all"]
    assert one["members"] == 1 and every["members"] == 2
    assert one["lesion_ap"] != every["lesion_ap"] or one["healing"] != every["healing"]


def test_unknown_configuration_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), "--configs", "torch-fp64-x"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0 and "torch-fp64-x" in proc.stderr and "torch-fp32-ddim2-m1" in proc.stderr


def _summarise():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from speed_quality import summarise
    finally:
        sys.path.pop(0)
    return summarise


def _row(name, speed, ap, removed, lesion):
    return {"name": name, "status": "ok", "slices_per_s": speed, "healing_ap": ap, "healing_removed": removed,
            "lesion_ap": lesion}


@pytest.mark.parametrize("ref_removed", [0.5, -0.2])
def test_the_rule_keeps_removal_as_well_as_map_ap(ref_removed):
    """A row whose maps rank as well but whose restorations remove less is not recommended; removal is compared
    as "at most 2 % of |reference| below", so a copier set's negative reference removal works too."""
    summarise = _summarise()
    slack = 0.01 * abs(ref_removed)
    rows = [_row("ref", 1.0, 0.6, ref_removed, 0.1),
            _row("fastest, removes less", 9.0, 0.6, ref_removed - 0.1 * abs(ref_removed), 0.1),
            _row("fast, removes a little less", 4.0, 0.6, ref_removed - slack, 0.1),
            _row("faster, maps worse", 6.0, 0.5, ref_removed, 0.1)]
    assert summarise(rows, "ref") == "fast, removes a little less"
    assert abs(rows[2]["removed_rel"] - (ref_removed - slack) / ref_removed) < 1e-12
