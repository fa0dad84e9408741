"""bench/quality.py's report without running a network: what is skipped is said, empty classes read "–",
and the versions line names the CPU."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _quality_module():
    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_without_ixi_data_is_reported_as_not_run(tmp_path):
    data, out = tmp_path / "emptydata", tmp_path / "out"
    data.mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "quality.py"), "--models", str(REPO / "examples" / "models"),
                           "--data", str(data), "--out", str(out), "--synthetic"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "quality.json").read_text())
    reason = report["synthetic"]["skipped"]
    assert str(data / "ixi-t1") in reason and "not found" in reason
    md = (out / "quality.md").read_text()
    assert f"not run: {reason}" in md and f"not run: {reason}" in proc.stdout


def _empty_class_report() -> dict:
    quality = _quality_module()
    nan = float("nan")
    rows = [{"row": "ensemble", "ap_image": 0.5, "auroc": 0.5, "ap_pixel": 0.4, "dice": 0.3}]
    region = {"label_values": [4], "counts": {"positive_pixels": 0},
              "rows": {"ensemble": {"ap_pixel": nan}, "members avg": {"ap_pixel": nan},
                       "members max": {"ap_pixel": nan}},
              "baselines": {name: {"ap_pixel": nan} for name in (*quality.BASELINES, "chance")}}
    return {"date": "d", "command": "c", "versions": {}, "lesions": {"brats-t1c": {
        "evaluation": {"protocol": "benchmark", "description": "x", "counts": {}, "rows": rows},
        "baselines": {"chance": {"ap_pixel": 0.1}}, "regions": {"enhancing tumour": region}}}}


def test_empty_label_class_prints_dashes_not_nan(tmp_path):
    quality = _quality_module()
    quality.write_markdown(_empty_class_report(), tmp_path / "quality.md")
    md = (tmp_path / "quality.md").read_text()
    (line,) = [x for x in md.splitlines() if x.startswith("| enhancing tumour (4) |")]
    assert "nan" not in line
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "–" and cells[3] == "– / –"


def test_versions_name_the_cpu():
    versions = _quality_module()._versions()
    assert versions["cpu"]  # platform.processor() alone is '' on Linux
