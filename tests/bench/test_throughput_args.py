"""bench/throughput.py: what it refuses (bad counts, --smoke conflicts, an existing report), when it fails,
and that maps are compared with the fp32 baseline only at equal steps."""
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "throughput.py"
sys.path.insert(0, str(REPO / "bench"))
import throughput as bench  # noqa: E402

# the smallest real runs: tiny net, eager torch only, no reference baseline
FAST = ["--smoke", "--device", "cpu", "--engines", "torch", "--cpu-reference", "skip"]


def run(args, cwd, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--members", "0"], ["--batch-sizes", "2", "0"],
                                 ["--fp32-steps", "0"], ["--fp32-batch-sizes", "0"], ["--steps", "-1"],
                                 ["--time-budget", "0"]])
def test_counts_below_one_are_rejected_at_parsing(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(bad)
    assert exc.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_smoke_refuses_conflicting_options_and_says_what_it_uses(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--smoke", "--steps", "5", "--batch-sizes", "8"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--steps 5" in err and "--batch-sizes 8" in err and "--smoke fixes" in err
    # the values --smoke uses, given explicitly, agree with it; other options stay the user's
    args = bench.parse_args(["--smoke", "--steps", "2", "--members", "3", "--fp32-steps", "1"])
    assert (args.preset, args.size, args.steps, args.batch_sizes, args.repeats) == ("tiny", 32, 2, [1, 2], 2)
    assert (args.members, args.fp32_steps) == (3, 1)
    assert "--smoke: --preset tiny, --size 32, --steps 2, --batch-sizes 1 2" in capsys.readouterr().err
    # without --smoke the defaults are the parser's
    args = bench.parse_args([])
    assert (args.preset, args.size, args.steps, args.batch_sizes, args.repeats, args.warmup) == \
        ("small", 128, 50, [1, 4], 5, 1)


def test_nothing_measured_is_a_failure(tmp_path):
    proc = run([*FAST, "--time-budget", "1e-9", "--out", str(tmp_path)], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "no baseline row was measured" in proc.stderr
    report = json.loads(next(tmp_path.glob("throughput-tiny-cpu-*.json")).read_text())
    assert report["rows"] and all(r["status"] == "skipped" for r in report["rows"])


def test_map_difference_only_at_equal_steps(tmp_path):
    """--fp32-steps 1: the reference rows (2 steps) get no Δmap against the 1-step baseline, and the Markdown
    says why; the baseline's own rows (equal steps) still compare."""
    proc = run(["--smoke", "--device", "cpu", "--engines", "torch", "--fp32-steps", "1", "--out", str(tmp_path)],
               tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (json_path,) = tmp_path.glob("throughput-tiny-cpu-*.json")
    report = json.loads(json_path.read_text())
    md = json_path.with_suffix(".md").read_text()
    rows = [r for r in report["rows"] if r["status"] == "ok"]
    fp32 = [r for r in rows if r["role"] == "baseline-fp32"]
    ref = [r for r in rows if r["role"] == "baseline-reference"]
    assert fp32 and ref and {r["steps"] for r in fp32} == {1} and {r["steps"] for r in ref} == {2}
    for r in fp32:
        assert r["max_abs_map_diff_vs_fp32"] == 0.0 and r["map_diff_note"] is None
    for r in ref:
        assert r["max_abs_map_diff_vs_fp32"] is None and r["max_abs_score_diff_vs_fp32"] is None
        assert "steps differ from the fp32 baseline" in r["map_diff_note"]
    assert "steps differ from the fp32 baseline" in md and "bench/gpu_consistency.py" in md


def test_existing_report_is_not_replaced_without_force(tmp_path):
    """A report of the same name (preset, device, day) in --out: the run refuses before measuring anything,
    leaving the files as they were; --force replaces them."""
    stem = f"throughput-tiny-cpu-{datetime.now(timezone.utc).date().isoformat()}"
    recorded = {f"{stem}.json": b'{"recorded": true}\n', f"{stem}.md": b"# recorded\n"}
    for name, data in recorded.items():
        (tmp_path / name).write_bytes(data)
    proc = run([*FAST, "--out", str(tmp_path)], tmp_path)
    if proc.returncode == 0 and stem not in proc.stderr:  # the UTC day turned during the run
        pytest.skip("the date changed during the test")
    assert proc.returncode == 2 and "--force" in proc.stderr and f"{stem}.json" in proc.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == recorded  # nothing touched
    proc = run([*FAST, "--out", str(tmp_path), "--force"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / f"{stem}.json").read_text())
    assert "recorded" not in report and {r["role"] for r in report["rows"]} == {"baseline-fp32"}
    assert all(r["max_abs_map_diff_vs_fp32"] == 0.0 for r in report["rows"])
