"""bench/gpu_train.sh + bench/train_chunks.py: chunks resume through the packed, split, checksummed state
and add up exactly to one uninterrupted run (GPU_TRAIN_DRY=1: a few CPU steps on phantom volumes)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import train_chunks  # noqa: E402


def _volumes(folder: Path) -> None:
    import nibabel as nib

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    x, y, z = np.mgrid[:40, :40, :10]
    for i in range(4):  # 2 train + 2 held-out subjects (--holdout 2)
        inside = ((x - 20) / 15) ** 2 + ((y - 20) / 12) ** 2 + ((z - 5) / 6) ** 2 <= 1
        data = np.where(inside, 300 + 100 * np.sin(x / 3 + i) * np.cos(y / 4) + rng.normal(0, 5, x.shape), 0)
        aff = np.diag([4.0, 4.0, 4.0, 1.0])
        nib.save(nib.Nifti1Image(data.astype(np.float32), aff), folder / f"S{i}-T1.nii.gz")
        nib.save(nib.Nifti1Image(inside.astype(np.uint8), aff), folder / f"S{i}-T1_brainmask.nii.gz")


def _chunk(tmp: Path, name: str, state: Path, steps: int) -> Path:
    out = tmp / f"ret-{name}"
    env = {**os.environ, "GPU_TRAIN_DRY": "1", "DRY_STEPS": str(steps), "RUN": "t", "DATA": str(tmp / "data"),
           "STATE": str(state), "OUT": str(out), "WORK": str(tmp / f"work-{name}"), "PIECE": "1M",
           "OMP_NUM_THREADS": "1", "CURRICULUM": "2:5",  # the size curriculum must resume exactly too
           "LR_ANNEAL": "2:5:0.1"}  # and a learning-rate anneal across the chunks' boundary (step 3)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_train.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _git_repo(path: Path) -> Path:
    path.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    return path


@pytest.mark.slow
def test_two_chunks_equal_one_run_and_are_recorded(tmp_path):
    from safetensors.numpy import load_file

    _volumes(tmp_path / "data" / "ixi-t1")
    runs, results = tmp_path / "runs", tmp_path / "results"
    ret1 = _chunk(tmp_path, "1", tmp_path / "no-state", 3)
    pieces = sorted(ret1.glob("state.tgz.part*"))
    assert len(pieces) >= 2  # 1 MB pieces: the state really is split and rejoined
    assert all(p.stat().st_size <= 2**20 for p in pieces)
    rec1 = train_chunks.collect("t", ret1, runs, results)
    assert (rec1["steps_before"], rec1["steps_after"]) == (0, 3)

    fake_repo = _git_repo(tmp_path / "repo")
    staged = train_chunks.stage("t", runs, repo=fake_repo, results=results)
    assert sorted(p.name for p in staged.glob("state.tgz.part*")) == [p.name for p in pieces]
    ret2 = _chunk(tmp_path, "2", staged, 6)
    log2 = (ret2 / "gpu_train.log").read_text()
    assert "resuming t from step 3" in log2 and "size curriculum 2:5" in log2 and "landmarks 1" in log2
    assert "lr anneal 2:5:0.1" in log2
    rec2 = train_chunks.collect("t", ret2, runs, results)
    assert (rec2["steps_before"], rec2["steps_after"]) == (3, 6)
    assert rec2["device_train_min_total"] >= rec1["device_train_min_total"]

    straight = _chunk(tmp_path, "straight", tmp_path / "no-state", 6)
    train_chunks.collect("straight", straight, runs, results)
    a = load_file(str(runs / "t" / "model" / "fold0" / "model.safetensors"))
    b = load_file(str(runs / "straight" / "model" / "fold0" / "model.safetensors"))
    assert a.keys() == b.keys()
    config = json.loads((runs / "t" / "model" / "fold0" / "config.json").read_text())
    assert len(config["preprocessing"]["landmarks"]) == 11  # LANDMARKS defaults to 1 for GPU runs
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    # the metrics log carried across chunks has every step once and the healing metric
    metrics = runs / "t" / "state" / "train" / "fold0" / "metrics.jsonl"
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if json.loads(x)["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    assert set(rec2["healing"]["removed"]) and all(0 <= v <= 1 for v in rec2["healing"]["ap"].values())
    rows = (results / "t.md").read_text().splitlines()
    assert sum(r.startswith("| 20") for r in rows) == 2
    with pytest.raises(SystemExit, match="already recorded"):
        train_chunks.collect("t", ret2, runs, results)


def _state_tgz(chunk: dict, metrics: list[dict] | None = None) -> bytes:
    """A state as gpu_train.sh packs it: chunk.json first, then the metrics log."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        files = {"chunk.json": json.dumps(chunk).encode()}
        if metrics is not None:
            files[f"train/fold{chunk['fold']}/metrics.jsonl"] = "".join(json.dumps(m) + "\n" for m in metrics).encode()
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _returned(folder: Path, before: int, after: int, run: str = "t", piece: int = 200,
              date: str = "2026-12-07T00:00:00+00:00") -> Path:
    """What bench/gpu_train.sh returns for a chunk from step ``before`` to ``after`` (no training)."""
    folder.mkdir(parents=True)
    chunk = {"run": run, "recipe": "healing", "fold": 0, "steps_before": before, "steps_after": after,
             "train_wall_s": 60, "train_rc": 0, "device": "cpu", "date": date,
             "checkpoint": f"step{after:08d}"}
    data = _state_tgz(chunk, [{"kind": "train", "step": after, "loss": 1.0}])
    lines = []
    for i in range(0, len(data), piece):  # several pieces: they are joined again
        p = folder / f"state.tgz.part{i // piece:02d}"
        p.write_bytes(data[i:i + piece])
        lines.append(f"{train_chunks.sha256(p)}  {p.name}")
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return folder


def _record(results: Path, run: str, *steps: tuple[int, int]) -> Path:
    """The run's record as collect writes it: one line per chunk."""
    results.mkdir(parents=True, exist_ok=True)
    log = results / f"{run}.jsonl"
    log.write_text("".join(json.dumps({
        "run": run, "recipe": "healing", "fold": 0, "steps_before": a, "steps_after": b, "train_wall_s": 189,
        "train_rc": 0, "device": "NVIDIA H100 80GB HBM3", "date": "2026-12-06T11:16:24+00:00",
        "checkpoint": f"step{b:08d}", "device_train_min_total": 3.15, "val_step": b, "val_loss": 0.0003,
        "healing": {"removed": {"0": 0.02}, "ap": {"0": 0.5}, "chance": {"0": 0.13}, "copier": {}, "min_removed": 0.02},
    }) + "\n" for a, b in steps))
    return log


def _previous_state(runs: Path, run: str = "t") -> None:
    (runs / run / "pieces").mkdir(parents=True)
    (runs / run / "pieces" / "state.tgz.part00").write_bytes(b"previous")
    (runs / run / "state").mkdir()
    (runs / run / "state" / "chunk.json").write_text('{"steps_after": 2000}')


def _unchanged(runs: Path, log: Path, text: str, run: str = "t") -> None:
    assert [p.name for p in (runs / run / "pieces").iterdir()] == ["state.tgz.part00"]
    assert (runs / run / "pieces" / "state.tgz.part00").read_bytes() == b"previous"
    assert (runs / run / "state" / "chunk.json").read_text() == '{"steps_after": 2000}'
    assert not (runs / run / "model").exists()
    assert log.read_text() == text
    assert not [p for p in runs.iterdir() if p.name.startswith(".collect")]  # no temporary left behind


def test_stage_refuses_a_trained_run_without_its_state(tmp_path):
    """A run recorded at step 2000 whose state is not restored must not silently restart from scratch."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    _record(results, "long", (0, 2000))
    repo = _git_repo(tmp_path / "repo")
    with pytest.raises(SystemExit, match=r"records long at step 2000.*ARCHIVED\.md"):
        train_chunks.stage("long", runs, repo=repo, results=results)
    assert not (repo / ".carry").exists()
    # from the command line too: a non-zero exit
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "train_chunks.py"), "--runs-dir", str(runs), "stage",
                           "long", "--results", str(results)], capture_output=True, text=True)
    assert proc.returncode != 0 and "ARCHIVED.md" in proc.stderr
    # a run nothing is recorded for still starts from scratch
    assert not train_chunks.stage("new", runs, repo=repo, results=results).exists()


def test_stage_refuses_a_state_other_than_the_last_recorded(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    _returned(runs / "t" / "pieces", 0, 2000)
    repo = _git_repo(tmp_path / "repo")
    _record(results, "t", (0, 2000), (2000, 4000))
    with pytest.raises(SystemExit, match="the state is at step 2000.*at step 4000"):
        train_chunks.stage("t", runs, repo=repo, results=results)
    _record(results, "t", (0, 2000))
    staged = train_chunks.stage("t", runs, repo=repo, results=results)
    assert len(list(staged.glob("state.tgz.part*"))) == len(list((runs / "t" / "pieces").glob("state.tgz.part*")))


def test_collect_refuses_a_chunk_that_restarted_from_scratch_and_keeps_the_previous_state(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    _previous_state(runs)
    log = _record(results, "t", (0, 2000))
    text = log.read_text()
    ret = _returned(tmp_path / "ret", 0, 2000)  # trained 2000 steps again from scratch
    (ret / "model.tgz").write_bytes(b"")  # never reached: the chunk is refused first
    with pytest.raises(SystemExit, match="starts at step 0, but .* at step 2000.*from scratch"):
        train_chunks.collect("t", ret, runs, results)
    _unchanged(runs, log, text)
    ret2 = _returned(tmp_path / "ret2", 0, 1500)
    with pytest.raises(SystemExit, match="starts at step 0"):
        train_chunks.collect("t", ret2, runs, results)
    _unchanged(runs, log, text)


def test_collect_refuses_a_recorded_or_empty_chunk_and_keeps_the_previous_state(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    _previous_state(runs)
    log = _record(results, "t", (0, 2000))
    text = log.read_text()
    again = _returned(tmp_path / "again", 0, 2000, date=json.loads(text)["date"])  # the very chunk recorded
    with pytest.raises(SystemExit, match="already recorded"):
        train_chunks.collect("t", again, runs, results)
    _unchanged(runs, log, text)
    with pytest.raises(SystemExit, match="trained no steps"):  # e.g. a chunk whose training was skipped
        train_chunks.collect("t", _returned(tmp_path / "none", 2000, 2000), runs, results)
    _unchanged(runs, log, text)
    with pytest.raises(SystemExit, match="starts at step 1000"):
        train_chunks.collect("t", _returned(tmp_path / "other", 1000, 3000), runs, results)
    _unchanged(runs, log, text)


def test_collect_records_a_chunk_that_continues_the_run(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    _previous_state(runs)
    _record(results, "t", (0, 2000))
    ret = _returned(tmp_path / "ret", 2000, 2600)
    rec = train_chunks.collect("t", ret, runs, results)
    assert (rec["steps_before"], rec["steps_after"]) == (2000, 2600)
    assert rec["device_train_min_total"] == pytest.approx((189 + 60) / 60, abs=0.01)
    assert sorted(p.name for p in (runs / "t" / "pieces").iterdir()) == sorted(p.name for p in ret.glob("state*"))
    assert json.loads((runs / "t" / "state" / "chunk.json").read_text())["steps_after"] == 2600
    assert [json.loads(x)["steps_after"] for x in (results / "t.jsonl").read_text().splitlines()] == [2000, 2600]
    assert not [p for p in runs.iterdir() if p.name.startswith(".collect")]


def test_collect_refuses_a_corrupted_piece_and_keeps_the_previous_state(tmp_path):
    runs = tmp_path / "runs"
    (runs / "t" / "pieces").mkdir(parents=True)
    (runs / "t" / "pieces" / "state.tgz.part00").write_bytes(b"previous")
    ret = tmp_path / "ret"
    ret.mkdir()
    (ret / "state.tgz.part00").write_bytes(b"abc")
    (ret / "SHA256SUMS").write_text(f"{train_chunks.sha256(ret / 'state.tgz.part00')}  state.tgz.part00\n")
    (ret / "state.tgz.part00").write_bytes(b"abd")  # flipped in transfer
    with pytest.raises(SystemExit, match="state.tgz.part00: SHA-256 differs"):
        train_chunks.collect("t", ret, runs, tmp_path / "results")
    assert (runs / "t" / "pieces" / "state.tgz.part00").read_bytes() == b"previous"


def test_stage_refuses_a_state_that_cannot_travel(tmp_path):
    runs = tmp_path / "runs"
    (runs / "big" / "pieces").mkdir(parents=True)
    with open(runs / "big" / "pieces" / "state.tgz.part00", "wb") as f:
        f.write(_state_tgz({"run": "big", "fold": 0, "steps_before": 0, "steps_after": 0}))
        f.truncate(65 * 2**20)  # sparse: 65 MiB of state alone is over the 64 MiB a device call sends
    repo = _git_repo(tmp_path / "repo")
    with pytest.raises(SystemExit, match="too much to send"):
        train_chunks.stage("big", runs, repo=repo)


def test_report_tables_the_healing_metric_per_run(tmp_path):
    logs = {}
    for name, removed in (("reference", [0.0, 0.1]), ("healing", [0.2, 0.6])):
        p = tmp_path / f"{name}.jsonl"
        lines = [{"kind": "train", "step": 1, "loss": 1.0}]
        for i, r in enumerate(removed):
            lines.append({"kind": "val", "step": 100 * (i + 1), "elapsed_s": 60.0 * (i + 1), "val_loss": 0.1,
                          "heal_removed/0": r, "heal_removed/2": r / 2, "heal_ap/0": 0.5, "heal_ap/2": 0.3,
                          "heal_chance/0": 0.1, "heal_chance/2": 0.1})
        p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        logs[name] = p
    rep = train_chunks.report(list(logs.items()), tmp_path / "out", "t", "cmd")
    s = rep["runs"]["healing"]["series"]
    assert [r["step"] for r in s] == [100, 200]
    assert s[1]["mean_removed"] == pytest.approx((0.6 + 0.3) / 2)
    assert s[0]["mean_ap"] == pytest.approx(0.4) and s[0]["mean_chance"] == pytest.approx(0.1)
    md = (tmp_path / "out" / "healing.md").read_text()
    assert "| healing | 200 | 2.0 | 0.1000 | 0.600 | 0.300 | 0.400 (0.100) |" in md
