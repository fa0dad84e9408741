"""bench/throughput.py --smoke: the report is produced and agrees with itself (never timing thresholds)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "throughput.py"
REL = 1e-9


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (json_path,) = out.glob("throughput-tiny-cpu-*.json")
    return json.loads(json_path.read_text()), json_path.with_suffix(".md").read_text(), json_path


def close(a, b):
    return math.isclose(a, b, rel_tol=REL, abs_tol=0.0)


def ok_rows(report):
    return [r for r in report["rows"] if r["status"] == "ok"]


def test_files_and_header(smoke):
    report, md, json_path = smoke
    meta = report["meta"]
    assert report["schema"] == "condiff.bench.throughput/1"
    assert (meta["preset"], meta["size"], meta["steps"], meta["batch_sizes"], meta["repeats"]) == ("tiny", 32, 2, [1, 2], 2)
    assert "--smoke" in meta["command"] and meta["date"][:10] in json_path.name
    assert meta["gflop_per_eval"] > 0 and "FlopCounterMode" in meta["flops_source"]
    assert meta["floor_ms_per_eval"] is None and "no CPU floor" in meta["floor_note"]
    try:
        import matplotlib  # noqa: F401
        assert json_path.with_suffix(".png").stat().st_size > 0
    except ImportError:
        assert any("matplotlib" in n for n in meta["notes"])
    assert meta["command"] in md and report["machine"]["cpu"] in md


def test_every_row_has_machine_and_versions(smoke):
    report, _, _ = smoke
    assert report["rows"]
    for r in report["rows"]:
        assert r["machine"] == report["machine"] and r["machine"]["device"] == "cpu" and r["machine"]["cpu"]
        assert r["versions"] == report["versions"]
        assert r["versions"]["torch"] and r["versions"]["condiff"]
        assert r["status"] in ("ok", "skipped")
        if r["status"] == "skipped":
            assert r["note"]


def test_both_baselines_ran_at_every_batch(smoke):
    report, _, _ = smoke
    for role in ("baseline-fp32", "baseline-reference"):
        rows = [r for r in ok_rows(report) if r["role"] == role]
        assert sorted(r["batch_size"] for r in rows) == [1, 2], role
    for r in ok_rows(report):
        if r["role"] == "baseline-fp32":
            assert r["vs_fp32"] == 1.0 and r["max_abs_map_diff_vs_fp32"] == 0.0
        if r["role"] == "baseline-reference":
            assert r["vs_reference"] == 1.0
            # equal steps and seed: the reference's maps are compared with the fp32 baseline's
            assert isinstance(r["max_abs_map_diff_vs_fp32"], float) and r["map_diff_note"] is None


def test_rates_are_consistent(smoke):
    report, _, _ = smoke
    meta = report["meta"]
    for r in ok_rows(report):
        p, b, m, s = r["pipeline_s"], r["batch_size"], r["members"], r["steps"]
        assert len(p["samples"]) == meta["repeats"] and p["min"] <= p["median"] <= p["max"]
        assert r["slice_evals"] == m * s
        assert close(r["slices_per_s"], b / p["median"])
        assert close(r["slices_per_s"] * r["slice_evals"], r["evals_per_s"])
        assert close(r["paper_slice_s"] * r["evals_per_s"], 500)
        assert close(r["paper_slices_per_s"] * 500, r["evals_per_s"])
        assert close(r["slice_s_10_members"], 10 / m / r["slices_per_s"])
        assert close(r["denoise_ms_per_image"] * b, r["denoise_ms"]["median"])
        assert close(r["denoise_evals_per_s"], 1e3 / r["denoise_ms_per_image"])
        assert close(r["pipeline_tflops"], r["gflop_per_eval"] * r["evals_per_s"] / 1e3)
        assert r["floor_fraction"] is None and r["x_floor"] is None
        assert r["peak_mem_mib"] > 0 and r["build_s"] >= 0 and r["first_call_s"] > 0


def test_ratios_are_quotients_of_rows(smoke):
    report, _, _ = smoke
    rows = ok_rows(report)
    for role, key in (("baseline-fp32", "vs_fp32"), ("baseline-reference", "vs_reference")):
        base = {r["batch_size"]: r["evals_per_s"] for r in rows if r["role"] == role}
        best = max(base.values())
        for r in rows:
            assert close(r[key], r["evals_per_s"] / base[r["batch_size"]])
            assert close(r[key + "_best"], r["evals_per_s"] / best)


def test_markdown_lists_every_row(smoke):
    report, md, _ = smoke
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| engine")]
    assert len(table) == len(report["rows"])
    for line, r in zip(table, report["rows"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == r["label"] and cells[1] == str(r["batch_size"])
        if r["status"] == "ok":
            assert float(cells[3].replace(",", "")) == pytest.approx(r["slices_per_s"], rel=1e-2)
        else:
            assert cells[3].startswith("skipped")
