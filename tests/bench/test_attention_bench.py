"""bench/attention.py --interpret: arguments, the report and its arithmetic on the CPU (never timing thresholds)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "attention.py"
sys.path.insert(0, str(REPO / "bench"))
import attention as bench  # noqa: E402


def test_arguments():
    args = bench.parse_args([])
    assert [s for s, _ in args.shape_list] == ["paper-128px", "paper-64px"]
    assert dict(args.shape_list)["paper-128px"] == (8, 16, 16384, 8)  # performance.md §1/§4
    args = bench.parse_args(["--shapes", "2,4,100,8", "paper-64px", "--batch", "3", "--configs", "128,64,4,3"])
    assert args.shape_list == [("2x4x100x8", (3, 4, 100, 8)), ("paper-64px", (3, 32, 4096, 8))]
    assert args.config_list == [(128, 64, 4, 3)]
    for bad in (["--shapes", "1,2,3"], ["--configs", "128,64"], ["--poly-shares", "1.5"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_interpret_run_writes_a_consistent_report(tmp_path):
    pytest.importorskip("triton", reason="triton is not installed")
    out = tmp_path / "attention.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--interpret", "--shapes", "tiny-64", "--poly-shares", "0",
                           "0.5", "--configs", "64,32,4,2", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["schema"] == "condiff.bench.attention/1" and report["meta"]["interpret"]
    rows = report["rows"]
    assert [r["impl"] for r in rows] == ["sdpa (default dispatch)", "triton", "triton, poly share 0.5",
                                        "triton, MMA row sum", "triton, paired f16 exp",
                                        "triton, MMA row sum + paired f16 exp", "triton BM64 BN32 w4 s2"]
    for r in rows:
        assert r["status"] == "ok" and r["rel_err"] < 2e-3  # fp16 against the float64 oracle
        assert math.isclose(r["exp_per_s"], r["B"] * r["H"] * r["N"] ** 2 / (r["ms"] / 1e3), rel_tol=1e-9)
        assert math.isclose(r["speedup_vs_sdpa"], rows[0]["ms"] / r["ms"], rel_tol=1e-9)
        assert r["exp_per_sm_clock"] is None  # no SMs on the CPU
    md = out.with_suffix(".md").read_text()
    assert report["meta"]["command"] in md and md.count("| tiny-64 |") == len(rows)


def test_without_cuda_it_asks_for_a_gpu_or_interpret(tmp_path):
    """No CUDA and no --interpret: a clear error (exit 2) at once, not the paper shapes on the CPU."""
    import os

    out = tmp_path / "attention.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "needs a GPU" in proc.stderr and "--interpret" in proc.stderr
    assert not out.exists()
