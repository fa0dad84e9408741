"""condiff-train end to end on a few IXI volumes at 32 px (synthetic phantom volumes without the data kit)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from condiff.modelset import load_model, open_model_set
from condiff.train.cli import main

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CONDIFF_SHARED_DATA", REPO.parent / "shared" / "data"))
SUBJECTS = ("IXI132-HH-1415", "IXI162-HH-1548")
MASK = "{dir}/{stem}_brainmask.nii.gz"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/train/test_loop.py
    yield
    torch.set_num_threads(before)


def _phantom_volumes(folder: Path) -> None:
    import nibabel as nib

    rng = np.random.default_rng(0)
    x, y, z = np.mgrid[:40, :40, :12]
    for i, name in enumerate(SUBJECTS):
        inside = ((x - 20) / 15) ** 2 + ((y - 20) / 12) ** 2 + ((z - 6) / 7) ** 2 <= 1
        data = np.where(inside, 300 + 100 * np.sin(x / 3 + i) * np.cos(y / 4) + rng.normal(0, 5, x.shape), 0)
        affine = np.diag([4.0, 4.0, 4.0, 1.0])
        nib.save(nib.Nifti1Image(data.astype(np.float32), affine), folder / f"{name}-T1.nii.gz")
        nib.save(nib.Nifti1Image(inside.astype(np.uint8), affine), folder / f"{name}-T1_brainmask.nii.gz")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ixi")
    if (SHARED / "ixi-t1").is_dir():
        for s in SUBJECTS:  # image, mask and the label map that must not be taken for an image
            for suffix in ("", "_brainmask", "_dlmuse"):
                (folder / f"{s}-T1{suffix}.nii.gz").symlink_to(SHARED / "ixi-t1" / f"{s}-T1{suffix}.nii.gz")
    else:
        _phantom_volumes(folder)
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def _common(data_dir, cache_dir, out):
    return ["--data", data_dir, "--mask-pattern", MASK, "--preset", "tiny", "--image-size", 32, "-o", out,
            "--batch-size", 2, "--holdout", 1, "--workers", 0, "--cache-dir", cache_dir, "--no-progress",
            "--log-every", 1]


def test_cli_trains_a_fold_into_a_loadable_model_set_and_resumes(data_dir, cache_dir, tmp_path):
    out = tmp_path / "set"
    args = _common(data_dir, cache_dir, out) + ["--fold", 3, "--max-steps", 4, "--val-start", 2, "--val-every", 2,
                                                "--val-max-slices", 6, "--checkpoint-every", 2]
    code, output = _run(*args)
    assert code == 0, output
    summary = json.loads(output[output.index("{"):])
    assert summary["members"] == ["fold3"] and summary["folds"][0]["steps"] == 4

    ms = open_model_set(out)
    assert len(ms) == 1
    cfg = ms.configs[0]
    assert cfg.fold == 3 and cfg.train_tasks == [0, 2, 3] and cfg.val_tasks == [1, 4]  # fold table §5.1
    assert cfg.preprocessing["modality"] == "mri" and cfg.preprocessing["image_size"] == 32
    assert cfg.preprocessing["use_mask"] is True and cfg.preprocessing["normalisation"] == "percentile"
    tr = cfg.trained
    assert tr["steps"] == 4 and tr["complete"] and tr["weights"] == "ema-best" and tr["best_step"] in (2, 4)
    assert tr["effective_train_tasks"] == [0, 2, 3] and tr["effective_val_tasks"] == [4]
    assert [(s["task"], s["role"]) for s in tr["substitutions"]] == [(1, "validation")]  # D7: recorded, not silent
    assert tr["data"]["train"]["subjects"] == [f"{SUBJECTS[0]}-T1"]
    assert tr["data"]["validation"]["subjects"] == [f"{SUBJECTS[1]}-T1"]  # _dlmuse and _brainmask excluded
    assert tr["recipe"]["name"] == "reference" and tr["recipe"]["lr"] == 1e-4 and tr["code_version"]
    model, _ = load_model(ms.member_dirs[0])
    x = torch.zeros(2, 1, 32, 32)
    assert model(x, x, torch.tensor([0, 999])).shape == (2, 1, 32, 32)
    from safetensors.torch import load_file

    best = load_file(str(out / "train" / "fold3" / "best" / f"ema-{tr['best_step']:09d}.safetensors"))
    assert all(torch.equal(best[k], v) for k, v in model.state_dict().items())  # D6: the best EMA weights

    code, output = _run(*args)  # an existing run is never overwritten silently
    assert code == 2 and "--resume" in output
    args[args.index("--max-steps") + 1] = 6
    code, output = _run(*args, "--resume")
    assert code == 0, output
    assert open_model_set(out).configs[0].trained["steps"] == 6
    steps = [json.loads(x)["step"] for x in (out / "train" / "fold3" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_cli_several_folds_with_another_data_set_and_no_validation(data_dir, cache_dir, tmp_path):
    fundus = SHARED / "fundus"
    if not fundus.is_dir():
        pytest.skip("fundus photographs of the data kit not found")
    out = tmp_path / "set"
    code, output = _run(*_common(data_dir, cache_dir, out), "--folds", "0,6", "--max-steps", 1, "--holdout", 0,
                        "--other-data", fundus)
    assert code == 0, output
    ms = open_model_set(out)
    assert [c.fold for c in ms.configs] == [0, 6]
    for c in ms.configs:
        assert c.trained["substitutions"] == [] and c.trained["weights"] == "ema-final"
        assert 1 in c.trained["effective_train_tasks"]
        assert c.trained["data"]["other_data"][0]["modality"] == "rgb"


def test_cli_refuses_an_empty_dataset_naming_the_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, output = _run("--data", empty, "--preset", "tiny", "-o", tmp_path / "out", "--no-progress")
    assert code == 2
    assert str(empty) in output and "no training images" in output
    assert not (tmp_path / "out" / "set.json").exists()


def test_sigterm_stops_cleanly_with_a_checkpoint_and_a_model_folder(data_dir, cache_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "set"
    cmd = [sys.executable, "-m", "condiff.train.cli"] + [str(a) for a in _common(data_dir, cache_dir, out)] + [
        "--fold", "0", "--max-steps", "100000", "--holdout", "0", "--checkpoint-every", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = out / "train" / "fold0" / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while not (log.is_file() and log.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-2000:]
    trained = open_model_set(out).configs[0].trained
    assert trained["stop_reason"] == "signal" and not trained["complete"] and trained["steps"] >= 2
    from condiff.train.checkpoint import latest_checkpoint, load_checkpoint

    assert load_checkpoint(latest_checkpoint(out / "train" / "fold0" / "checkpoints")).step == trained["steps"]


def test_cli_records_a_size_curriculum_and_rejects_a_malformed_one(data_dir, cache_dir, tmp_path):
    out = tmp_path / "set"
    code, output = _run(*_common(data_dir, cache_dir, out), "--fold", 9, "--max-steps", 1, "--holdout", 0,
                        "--recipe", "healing", "--size-curriculum", "2.5:300")
    assert code == 0, output
    recipe = open_model_set(out).configs[0].trained["recipe"]
    assert recipe["size_scale_start"] == 2.5 and recipe["size_curriculum_steps"] == 300
    assert recipe["name"] == "healing" and recipe["mask_weight"] == 10.0
    # the healing recipe brings its own curriculum; 'none' turns it off, the reference recipe has none
    for extra, expected in ((("--recipe", "healing"), (2.0, 2500)),
                            (("--recipe", "healing", "--size-curriculum", "none"), (1.0, 0)),
                            ((), (1.0, 0))):
        other = tmp_path / f"set{len(extra)}"
        code, output = _run(*_common(data_dir, cache_dir, other), "--fold", 9, "--max-steps", 1, "--holdout", 0, *extra)
        assert code == 0, output
        recipe = open_model_set(other).configs[0].trained["recipe"]
        assert (recipe["size_scale_start"], recipe["size_curriculum_steps"]) == expected, extra
    code, output = _run(*_common(data_dir, cache_dir, tmp_path / "bad"), "--size-curriculum", "2.5")
    assert code == 2 and "--size-curriculum" in output and "START:STEPS" in output
    assert not (tmp_path / "bad").exists()


def test_cli_records_a_learning_rate_anneal_and_rejects_a_malformed_one(data_dir, cache_dir, tmp_path):
    out = tmp_path / "set"
    code, output = _run(*_common(data_dir, cache_dir, out), "--fold", 9, "--max-steps", 3, "--holdout", 0,
                        "--lr", "1e-3", "--lr-anneal", "1:2:0.25")
    assert code == 0, output
    recipe = open_model_set(out).configs[0].trained["recipe"]
    assert (recipe["lr_anneal_start"], recipe["lr_anneal_end"], recipe["lr_final_factor"]) == (1, 2, 0.25)
    logged = [json.loads(x) for x in (out / "train" / "fold9" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in logged if r["kind"] == "train"] == pytest.approx([1e-3, 1e-3, 2.5e-4])
    for bad in ("2000", "5:3"):
        code, output = _run(*_common(data_dir, cache_dir, tmp_path / "bad"), "--lr-anneal", bad)
        assert code == 2 and "--lr-anneal" in output and "anneal" in output, output
        assert not (tmp_path / "bad").exists()


def test_cli_landmarks_are_fitted_on_the_training_scans_and_stored(data_dir, cache_dir, tmp_path):
    from condiff import preprocess
    from condiff.io import volumes

    out = tmp_path / "set"
    code, output = _run(*_common(data_dir, cache_dir, out), "--fold", 0, "--max-steps", 1, "--landmarks")
    assert code == 0, output
    pre = open_model_set(out).preprocessing
    # Oracle: numpy percentiles of the percentile-scaled brain of the one training scan (--holdout 1 keeps the
    # last of the two subjects for validation), computed here without condiff's landmark helpers.
    image = data_dir / f"{SUBJECTS[0]}-T1.nii.gz"
    vol = volumes.read_volume(image)
    brain = np.asarray(volumes.read_mask(data_dir / f"{SUBJECTS[0]}-T1_brainmask.nii.gz", vol), bool)
    v = np.asarray(vol.data, np.float64)[brain]
    lo, hi = np.percentile(v, (0.5, 99.5))
    expect = np.percentile(np.clip((v - lo) / (hi - lo), 0, 1), preprocess.LANDMARK_PERCENTILES)
    assert pre["landmarks"] == pytest.approx(expect.tolist(), abs=1e-6)
    # Without the flag the contract has no landmarks (and its config no key for them).
    plain = tmp_path / "plain"
    code, output = _run(*_common(data_dir, cache_dir, plain), "--fold", 0, "--max-steps", 1)
    assert code == 0, output
    assert "landmarks" not in open_model_set(plain).preprocessing


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_training_never_overwrites_a_trained_model_or_mixes_contracts(data_dir, cache_dir, tmp_path):
    import shutil

    out = tmp_path / "set"
    base = _common(data_dir, cache_dir, out) + ["--max-steps", 2, "--val-start", 100]
    code, output = _run(*base, "--fold", 0)
    assert code == 0, output
    shutil.rmtree(out / "train")  # a model set as a user has it: model folders, no checkpoints of this run
    weights = _sha(out / "fold0" / "model.safetensors")
    code, output = _run(*base, "--fold", 0)
    assert code == 2 and "fold0: already holds a trained model" in output, output
    assert _sha(out / "fold0" / "model.safetensors") == weights
    args = [a if a != 32 else 48 for a in base]  # --image-size 48 for another fold into the same set
    code, output = _run(*args, "--fold", 1)
    assert code == 2 and "fold0: was trained with another image size" in output, output
    assert not (out / "fold1").exists()


def test_resume_with_another_network_or_preprocessing_is_refused(data_dir, cache_dir, tmp_path):
    out = tmp_path / "run"
    base = _common(data_dir, cache_dir, out) + ["--fold", 2, "--val-start", 100, "--checkpoint-every", 2]
    code, output = _run(*base, "--max-steps", 2)
    assert code == 0, output
    code, output = _run(*base, "--max-steps", 4, "--resume", "--normalisation", "max")
    assert code == 2 and "another preprocessing (normalisation)" in output, output
    code, output = _run(*[a if a != "tiny" else "small" for a in base], "--max-steps", 4, "--resume")
    assert code == 2 and "another network" in output, output
    code, output = _run(*base, "--max-steps", 4, "--resume")  # the original options continue it
    assert code == 0, output


@pytest.mark.parametrize("option, fragment", [
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--mask-weight", "0"], "--mask-weight must be a positive number"),
    (["--image-size", "33"], "--image-size 33 does not suit the tiny preset"),
    (["--mask-pattern", "{dir}/{name}_brainmask.nii.gz"], "unknown placeholder 'name'"),
    (["--other-mask-pattern", "{stem"], "malformed"),
    (["--cache-dir", "AFILE/c"], "--cache-dir cannot create the output folder"),
    (["--image-size", "4096"], "4096 is not in the range 16<=x<=1024"),
    (["--fov-mm", "5000"], "5000 mm is outside 1..1000 mm"),
])
def test_bad_option_values_are_refused_before_any_data_is_read(tmp_path, option, fragment):
    args = ["--data", tmp_path / "no-such-data", "--preset", "tiny", "--image-size", 32, "-o", tmp_path / "o",
            "--no-progress"]
    (tmp_path / "AFILE").write_text("x")
    option = [str(tmp_path / v) if v.startswith("AFILE") else v for v in option]
    i = args.index(option[0]) if option[0] in args else None
    if i is not None:
        args[i + 1] = option[1]
    else:
        args += option
    code, output = _run(*args)
    assert code == 2 and fragment in output and "no-such-data" not in output, output
    assert not (tmp_path / "o").exists()


def test_an_output_that_is_a_file_is_refused_before_any_data_is_read(tmp_path):
    (tmp_path / "afile").write_text("x")
    code, output = _run("--data", tmp_path / "no-such-data", "--preset", "tiny", "-o", tmp_path / "afile" / "sub",
                        "--no-progress")
    assert code == 2 and "cannot create the output folder" in output and "is not a folder" in output, output


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux's /proc, where no folder can be made")
def test_an_output_that_cannot_be_made_is_exit_2_not_a_traceback(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda *a, **k: True)  # as for root: every folder looks writable
    code, output = _run("--data", data_dir, "--holdout", 1, "--preset", "tiny", "--image-size", 32,
                        "-o", "/proc/condiff-test/set", "--no-progress")
    assert code == 2 and "/proc/condiff-test/set" in output and "cannot create the output folder" in output, output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_cuda_device_without_cuda_is_refused_before_anything_is_made(tmp_path):
    code, output = _run("--data", tmp_path / "no-such-data", "--preset", "tiny", "--image-size", 32,
                        "-o", tmp_path / "set", "--device", "cuda", "--no-progress")
    assert code == 2 and "CUDA is not available" in output, output
    assert not (tmp_path / "set").exists()


def test_a_full_disk_while_training_is_a_message_and_exit_1(data_dir, cache_dir, tmp_path, monkeypatch):
    import errno

    from condiff.train import checkpoint as ckpt

    def full(root, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(root) / "checkpoint-000000002.tmp"))

    monkeypatch.setattr(ckpt, "save_checkpoint", full)
    out = tmp_path / "run"
    code, output = _run(*_common(data_dir, cache_dir, out), "--fold", 2, "--max-steps", 2, "--val-start", 100,
                        "--checkpoint-every", 2)
    assert code == 1 and "checkpoint-000000002.tmp: the disk is full" in output and "--resume" in output, output
    assert "Traceback" not in output


def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(data_dir, cache_dir, tmp_path):
    """Exactly: resuming from step 2 after step 4's checkpoint was damaged ends with the weights of a
    run that was never interrupted."""
    from safetensors.torch import load_file

    base = _common(data_dir, cache_dir, tmp_path / "a") + ["--fold", 2, "--val-start", 100, "--checkpoint-every", 2]
    code, output = _run(*base, "--max-steps", 6)
    assert code == 0, output
    straight = load_file(str(tmp_path / "a" / "fold2" / "model.safetensors"))
    other = [a if a != tmp_path / "a" else tmp_path / "b" for a in base]
    code, output = _run(*other, "--max-steps", 4)
    assert code == 0, output
    newest = tmp_path / "b" / "train" / "fold2" / "checkpoints" / "checkpoint-000000004"
    tensors = next(p for p in newest.iterdir() if p.name.startswith("tensors"))
    tensors.write_bytes(tensors.read_bytes()[:100])  # cut short
    code, output = _run(*other, "--max-steps", 6, "--resume")
    assert code == 0 and "checkpoint-000000004 is damaged" in output, output
    resumed = load_file(str(tmp_path / "b" / "fold2" / "model.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_step_and_time_limits_that_train_nothing_are_refused(tmp_path):
    for option in (["--max-steps", "0"], ["--time-budget-min", "0"]):
        code, output = _run("--data", tmp_path, "--preset", "tiny", "-o", tmp_path / "o", *option)
        assert code == 2 and option[0] in output, output


def test_a_second_training_of_one_output_folder_is_refused_while_the_first_runs(data_dir, cache_dir, tmp_path):
    import socket

    out = tmp_path / "run"
    (out / "train").mkdir(parents=True)
    live = f"host {socket.gethostname()} pid {os.getppid()}\n"  # a live process of this host holds it
    (out / "train" / ".condiff.lock").write_text(live)
    code, output = _run(*_common(data_dir, cache_dir, out), "--fold", 2, "--max-steps", 2, "--val-start", 100)
    assert code == 2 and "locked by another condiff run" in output, output
    assert (out / "train" / ".condiff.lock").read_text() == live and not (out / "fold2").exists()
    (out / "train" / ".condiff.lock").unlink()
    code, output = _run(*_common(data_dir, cache_dir, out), "--fold", 2, "--max-steps", 2, "--val-start", 100)
    assert code == 0 and not (out / "train" / ".condiff.lock").exists(), output  # released afterwards


def test_a_diverged_training_is_exit_1_and_exports_nothing_non_finite(data_dir, cache_dir, tmp_path):
    from condiff.train.checkpoint import list_checkpoints, load_checkpoint

    def finite_checkpoints(work):
        found = list_checkpoints(work / "checkpoints")
        for _, path in found:
            assert all(torch.isfinite(t).all() for t in load_checkpoint(path).tensors.values() if t.is_floating_point())
        return found

    def end_reason(work):
        return json.loads((work / "metrics.jsonl").read_text().splitlines()[-1])["reason"]

    # from the start: nothing to keep
    out = tmp_path / "scratch"
    code, output = _run(*_common(data_dir, cache_dir, out), "--fold", 2, "--val-start", 100, "--max-steps", 8,
                        "--lr", "1e6")
    assert code == 1, output
    assert "error: " in output and "training diverged" in output and "lower --lr" in output
    assert "Traceback" not in output
    assert not (out / "fold2").exists() and end_reason(out / "train" / "fold2") == "diverged"
    finite_checkpoints(out / "train" / "fold2")

    # a healthy chunk, then a resume at an absurd learning rate: the first chunk's model and checkpoint stay
    out = tmp_path / "run"
    base = _common(data_dir, cache_dir, out) + ["--fold", 2, "--val-start", 100, "--checkpoint-every", 2]
    code, output = _run(*base, "--max-steps", 2)
    assert code == 0, output
    model = (out / "fold2" / "model.safetensors").read_bytes()
    code, output = _run(*base, "--max-steps", 30, "--lr", "1e6", "--resume")
    assert code == 1 and "training diverged" in output and "checkpoint-000000002 (step 2" in output, output
    work = out / "train" / "fold2"
    assert end_reason(work) == "diverged" and [s for s, _ in finite_checkpoints(work)] == [2]
    assert (out / "fold2" / "model.safetensors").read_bytes() == model  # not replaced by non-finite weights
    assert json.loads((out / "set.json").read_text())["members"][0]["path"] == "fold2"
    # what the message advises: resume from the last finite checkpoint with a lower learning rate
    code, output = _run(*base, "--max-steps", 4, "--lr", "1e-4", "--resume")
    assert code == 0, output
    model, cfg = load_model(out / "fold2")
    assert cfg.trained["complete"] and cfg.trained["steps"] == 4


# ------------------------------------------------------------------ audit fixes: best weights, splits, folds, options


def _tiny(data, out, cache=None, *extra):
    args = ["--data", data, "--preset", "tiny", "--image-size", 32, "-o", out, "--batch-size", 2, "--workers", 0,
            "--no-progress", "--log-every", 1, "--val-max-slices", 4]
    if cache is not None:
        args += ["--cache-dir", cache]
    return args + list(extra)


@pytest.fixture(scope="module")
def three_dir(tmp_path_factory) -> Path:
    """Three phantom subjects with brain masks."""
    from _train_helpers import phantom_volume

    folder = tmp_path_factory.mktemp("three")
    for i in range(3):
        phantom_volume(folder / f"subj{i}.nii.gz", seed=i, mask_path=folder / f"subj{i}_brainmask.nii.gz")
    return folder


def test_a_best_written_after_the_newest_checkpoint_is_never_exported(data_dir, cache_dir, tmp_path):
    """A run killed after validation wrote best weights but before it checkpointed that step: the resume
    exports the EMA of the best step its checkpoint records, never the dead run's newer weights."""
    from safetensors.torch import load_file, save_file

    from condiff.train.checkpoint import load_checkpoint

    out = tmp_path / "set"
    base = _common(data_dir, cache_dir, out) + ["--fold", 2, "--val-start", 2, "--val-every", 2,
                                                "--val-max-slices", 4, "--checkpoint-every", 2]
    code, output = _run(*base, "--max-steps", 4)
    assert code == 0, output
    work = out / "train" / "fold2"
    ckpt2 = work / "checkpoints" / "checkpoint-000000002"
    import shutil

    shutil.rmtree(work / "checkpoints" / "checkpoint-000000004")  # as if killed before checkpoint 4
    # the dead run's best of step 4 (zeros make any mix-up visible), under the old and the keyed name
    fake = {k[4:]: torch.zeros_like(v) for k, v in load_checkpoint(ckpt2).tensors.items() if k.startswith("ema/")}
    save_file(fake, str(work / "best" / "ema.safetensors"), metadata={"step": "4"})
    save_file(fake, str(work / "best" / "ema-000000004.safetensors"), metadata={"step": "4"})
    (work / "best" / "best.json").write_text(json.dumps({"step": 4, "val_ma": 0.0, "val_loss": 0.0}))

    code, output = _run(*base, "--max-steps", 2, "--resume")
    assert code == 0, output
    model, cfg = load_model(out / "fold2")
    assert cfg.trained["best_step"] == 2 and cfg.trained["weights"] == "ema-best"
    ema2 = {k[4:]: v for k, v in load_checkpoint(ckpt2).tensors.items() if k.startswith("ema/")}
    assert all(torch.equal(ema2[k], v) for k, v in model.state_dict().items())  # the EMA at the card's best_step
    assert "nothing trained" in output and "discarded" in output, output
    assert json.loads((work / "best" / "best.json").read_text())["step"] == 2
    assert sorted(p.name for p in (work / "best").glob("ema*")) == ["ema-000000002.safetensors"]
    best = load_file(str(work / "best" / "ema-000000002.safetensors"))
    assert all(torch.equal(ema2[k], best[k]) for k in ema2)

    # every checkpoint damaged: the advice is to start afresh elsewhere
    tensors = next(p for p in ckpt2.iterdir() if p.name.startswith("tensors"))
    tensors.write_bytes(tensors.read_bytes()[:100])
    code, output = _run(*base, "--max-steps", 4, "--resume")
    assert code == 2 and "is damaged" in output and "start afresh" in output and "another -o" in output, output


def test_a_bids_subject_is_held_out_whole_and_listed_on_the_card(tmp_path):
    from _train_helpers import phantom_volume

    data = tmp_path / "bids"
    for i, (sub, ses) in enumerate([("sub-01", "ses-1"), ("sub-02", "ses-1"), ("sub-02", "ses-2")]):
        (data / sub / ses / "anat").mkdir(parents=True)
        phantom_volume(data / sub / ses / "anat" / f"{sub}_{ses}_T1w.nii.gz", seed=i)
    out = tmp_path / "set"
    code, output = _run(*_tiny(data, out), "--fold", 0, "--max-steps", 1, "--holdout", 1, "--val-start", 1)
    assert code == 0, output
    d = open_model_set(out).configs[0].trained["data"]
    assert d["train"]["subjects"] == ["sub-01"] and d["validation"]["subjects"] == ["sub-02"]
    assert len(d["validation"]["cases"]) == 2 and d["train"]["cases"] == ["sub-01/ses-1/anat/sub-01_ses-1_T1w"]
    code, output = _run(*_tiny(data, tmp_path / "o2"), "--holdout", 2, "--max-steps", 1)
    assert code == 2 and "holding out 2 of 2 subjects" in output, output


def test_a_resume_that_would_move_subjects_between_training_and_validation_is_refused(three_dir, tmp_path, caplog):
    out = tmp_path / "set"
    base = _tiny(three_dir, out, None, "--mask-pattern", MASK, "--fold", 1, "--val-start", 100, "--checkpoint-every", 2)
    code, output = _run(*base, "--max-steps", 2, "--holdout", 1)
    assert code == 0, output
    code, output = _run(*base, "--max-steps", 4, "--holdout", 2, "--resume")
    assert code == 2 and "trained on, now held out for validation: subj1" in output, output
    assert "--holdout" in output and "Traceback" not in output
    code, output = _run(*base, "--max-steps", 4, "--holdout", 1, "--resume")
    assert code == 0, output
    d = open_model_set(out).configs[0].trained["data"]
    assert d["train"]["subjects"] == ["subj0", "subj1"] and d["validation"]["subjects"] == ["subj2"]

    # a checkpoint of an older condiff records no subjects: warned about, not refused
    from condiff.train.loop import check_resume_state

    split = {"train": ["subj0"], "validation": ["subj1"]}
    with caplog.at_level("WARNING", logger="condiff.train.loop"):
        check_resume_state("ckpt", {"contract": None}, None, split)
    assert "records no training and validation subjects" in caplog.text
    with pytest.raises(Exception, match="held out for validation, now trained on: subj1; new in the data: subj2"):
        check_resume_state("ckpt", {"data_split": split}, None, {"train": ["subj0", "subj1", "subj2"], "validation": []})


def test_a_fold_conflict_is_found_before_any_fold_trains(data_dir, cache_dir, tmp_path):
    out = tmp_path / "set"
    base = _common(data_dir, cache_dir, out) + ["--val-start", 100, "--max-steps", 1]
    code, output = _run(*base, "--fold", 0)
    assert code == 0, output
    set_json = (out / "set.json").read_text()
    code, output = _run(*base, "--folds", "5,0")
    assert code == 2 and "fold0: holds checkpoints of an earlier run" in output, output
    assert not (out / "fold5").exists() and not (out / "train" / "fold5").exists()
    assert (out / "set.json").read_text() == set_json
    code, output = _run(*base, "--folds", "5,0", "--resume", "--normalisation", "max")  # a contract checked up front
    assert code == 2 and "another preprocessing (normalisation)" in output, output
    assert not (out / "fold5").exists() and not (out / "train" / "fold5").exists()


def test_set_json_lists_the_folds_that_finished_when_a_later_fold_fails(data_dir, cache_dir, tmp_path, monkeypatch):
    import errno

    from condiff.train.loop import Trainer

    fit = Trainer.fit

    def fit_then_fail(self):
        if self.work_dir.name == "fold6":
            raise OSError(errno.ENOSPC, "No space left on device", str(self.work_dir / "checkpoints"))
        return fit(self)

    monkeypatch.setattr(Trainer, "fit", fit_then_fail)
    out = tmp_path / "set"
    code, output = _run(*_common(data_dir, cache_dir, out), "--folds", "5,6", "--val-start", 100, "--max-steps", 1)
    assert code == 1 and "the disk is full" in output, output
    members = [m["path"] for m in json.loads((out / "set.json").read_text())["members"]]
    assert members == ["fold5"]


@pytest.mark.parametrize("hook, fragment", [
    ("no_such_module_xyz:factory", "cannot import module 'no_such_module_xyz'"),
    ("condiff.train.healing:no_such_function", "has no 'no_such_function'"),
    ("math:pi", "math.pi is not callable"),
    ("justamodule", "expected MODULE:FUNCTION"),
])
def test_a_bad_val_hook_is_refused_before_any_data_is_read(tmp_path, hook, fragment):
    code, output = _run("--data", tmp_path / "no-such-data", "--preset", "tiny", "--image-size", 32,
                        "-o", tmp_path / "o", "--no-progress", "--val-hook", hook)
    assert code == 2 and fragment in output and f"--val-hook {hook!r}" in output, output
    assert "Traceback" not in output and "no-such-data" not in output and not (tmp_path / "o").exists()


def test_a_val_hook_without_validation_is_warned_about(data_dir, cache_dir, tmp_path):
    out = tmp_path / "set"
    code, output = _run(*_common(data_dir, cache_dir, out), "--fold", 0, "--max-steps", 1, "--holdout", 0,
                        "--val-hook", "_train_helpers:null_val_hook")
    assert code == 0 and "never runs" in output and "--holdout 0" in output, output


@pytest.mark.parametrize("kind, expect, infer_only", [
    ("series", "fslroi IN OUT N 1", "--volume-index"),
    ("nan", "training needs finite voxels", "--nan-policy"),
])
def test_bad_volumes_say_what_condiff_train_can_do_and_leave_nothing_behind(three_dir, tmp_path, kind, expect,
                                                                             infer_only):
    from _train_helpers import phantom_volume

    data = tmp_path / "data"
    data.mkdir()
    for f in three_dir.iterdir():
        (data / f.name).symlink_to(f)
    phantom_volume(data / "zbad.nii.gz", series=3 if kind == "series" else 0, nan=kind == "nan")
    out = tmp_path / "set"
    code, output = _run(*_tiny(data, out), "--holdout", 1, "--max-steps", 1)
    assert code == 2 and "zbad.nii.gz" in output and expect in output and infer_only not in output, output
    assert not out.exists()  # OUT/train and the slices cached in it were this run's: removed
    # an OUT that existed before keeps what it held; only what the run made goes
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, output = _run(*_tiny(data, out), "--holdout", 1, "--max-steps", 1)
    assert code == 2, output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_data_errors_are_found_before_the_output_is_made(data_dir, tmp_path):
    code, output = _run(*_tiny(tmp_path / "nonexist", tmp_path / "o_ne"))
    assert code == 2 and "nonexist: is not a folder" in output, output
    assert not (tmp_path / "o_ne").exists()
    code, output = _run(*_tiny(data_dir, tmp_path / "o_hold"), "--holdout", 2)
    assert code == 2 and "holding out 2 of 2 subjects leaves none to train on" in output, output
    assert not (tmp_path / "o_hold").exists()


def test_a_run_refused_by_another_runs_lock_removes_nothing_of_it(tmp_path, monkeypatch, data_dir):
    """Two trainings started on one new OUT: the one that finds the other's lock must not clean up the
    folder as its own (it would delete the running training's lock and files)."""
    import socket

    from condiff.train import cli as train_cli

    out = tmp_path / "set"
    (out / "train").mkdir(parents=True)
    lock = out / "train" / ".condiff.lock"
    lock.write_text(f"host {socket.gethostname()} pid {os.getppid()}\n")  # a live process holds it
    monkeypatch.setattr(train_cli, "_created_top", lambda path: out)  # as if this run had made OUT just now
    code, output = _run("--data", data_dir, "--preset", "tiny", "--image-size", 32, "-o", out, "--holdout", 1,
                        "--no-progress")
    assert code == 2 and "lock" in output.lower(), output
    assert lock.is_file()


def test_a_copy_of_a_scan_under_another_name_is_trained_on_once_never_held_out(tmp_path):
    """A byte copy sorted last was held out as its own subject while its original trained, so validation
    (and the healing metric) ran on training data; a symlinked duplicate's warning was printed three times."""
    import shutil

    from _train_helpers import phantom_volume

    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        phantom_volume(data / f"subj{i}.nii.gz", seed=i, mask_path=data / f"subj{i}_brainmask.nii.gz")
    shutil.copy(data / "subj0.nii.gz", data / "zcopy.nii.gz")
    shutil.copy(data / "subj0_brainmask.nii.gz", data / "zcopy_brainmask.nii.gz")
    (data / "ylink.nii.gz").symlink_to(data / "subj1.nii.gz")
    (data / "ylink_brainmask.nii.gz").symlink_to(data / "subj1_brainmask.nii.gz")
    out = tmp_path / "set"
    code, output = _run(*_tiny(data, out, None, "--mask-pattern", MASK, "--fold", 0, "--max-steps", 1,
                               "--holdout", 1, "--val-start", 1))
    assert code == 0, output
    d = open_model_set(out).configs[0].trained["data"]
    assert d["train"]["cases"] == ["subj0", "subj1"] and d["validation"]["cases"] == ["subj2"]
    copy_warnings = [line for line in output.splitlines() if "zcopy.nii.gz: the same bytes as" in line]
    assert len(copy_warnings) == 1 and "subj0.nii.gz" in copy_warnings[0], output
    assert output.count("ylink.nii.gz: same file as an earlier input") == 1, output


def test_distinct_content_hashes_only_equal_sizes_and_keeps_the_first(tmp_path, monkeypatch):
    from condiff.io.cases import Case
    from condiff.train import data as tdata

    files = {"a": b"x" * 10, "b": b"y" * 10, "c": b"x" * 10, "d": b"x" * 11}
    cases = []
    for name, content in files.items():
        (tmp_path / f"{name}.nii.gz").write_bytes(content)
        cases.append(Case(name=name, path=tmp_path / f"{name}.nii.gz", kind="volume"))
    hashed = []
    real = tdata.file_sha256
    monkeypatch.setattr(tdata, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    assert [c.name for c in tdata.distinct_content(cases)] == ["a", "b", "d"]
    assert sorted(hashed) == ["a.nii.gz", "c.nii.gz"]  # b: same size, other bytes at its ends: never read whole


def test_a_bids_datasets_derivatives_sourcedata_and_code_are_not_trained_on(tmp_path):
    """condiff-train read a BIDS root's derivatives/ (preprocessed copies, _dseg label maps as 'healthy
    scans'), sourcedata/ and code/ (a template became a subject of its own)."""
    import shutil

    from _train_helpers import phantom_volume

    data = tmp_path / "ds"
    for i, sub in enumerate(("sub-01", "sub-02", "sub-03")):
        (data / sub / "anat").mkdir(parents=True)
        phantom_volume(data / sub / "anat" / f"{sub}_T1w.nii.gz", seed=i)
    (data / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    prep = data / "derivatives" / "fmriprep" / "sub-01" / "anat"
    prep.mkdir(parents=True)
    shutil.copy(data / "sub-01" / "anat" / "sub-01_T1w.nii.gz", prep / "sub-01_desc-preproc_T1w.nii.gz")
    phantom_volume(prep / "sub-01_dseg.nii.gz", seed=7)
    (data / "code").mkdir()
    phantom_volume(data / "code" / "template.nii.gz", seed=8)
    out = tmp_path / "set"
    code, output = _run(*_tiny(data, out), "--fold", 0, "--max-steps", 1, "--holdout", 1, "--val-start", 1)
    assert code == 0, output
    d = open_model_set(out).configs[0].trained["data"]
    assert d["train"]["cases"] == ["sub-01/anat/sub-01_T1w", "sub-02/anat/sub-02_T1w"]
    assert d["validation"]["cases"] == ["sub-03/anat/sub-03_T1w"] and "the same bytes" not in output


def test_a_run_that_trained_on_copies_resumes_with_keep_copies_and_says_so(tmp_path):
    """A run started before copies were dropped (as --keep-copies trains) could not resume: its split held
    the copy, and the message called the copy 'no longer in the data'."""
    import shutil

    from _train_helpers import phantom_volume

    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        phantom_volume(data / f"subj{i}.nii.gz", seed=i)
    shutil.copy(data / "subj1.nii.gz", data / "subj1b.nii.gz")
    out = tmp_path / "set"
    base = _tiny(data, out, None, "--fold", 0, "--val-start", 100, "--checkpoint-every", 1, "--holdout", 1)
    code, output = _run(*base, "--max-steps", 1, "--keep-copies")
    assert code == 0 and "the same bytes" not in output, output
    assert open_model_set(out).configs[0].trained["data"]["train"]["cases"] == ["subj0", "subj1", "subj1b"]
    code, output = _run(*base, "--max-steps", 2, "--resume")
    assert code == 2 and "drops byte-identical copies of other scans (subj1b)" in output, output
    assert "resumes with --keep-copies" in output
    code, output = _run(*base, "--max-steps", 2, "--resume", "--keep-copies")
    assert code == 0, output
    # another network is not what dropping copies changes: its own advice, no --keep-copies hint
    code, output = _run(*_tiny(data, out, None, "--fold", 0, "--val-start", 100, "--holdout", 1, "--preset", "compact"),
                        "--max-steps", 3, "--resume")
    assert code == 2 and "another" in output and "--keep-copies" not in output, output


def test_a_cache_dir_the_system_cannot_make_is_exit_2_before_any_output(tmp_path):
    """Permissions say /proc/x can be made (as root); only mkdir finds out: the run crashed with exit 1 and
    left an empty OUT/train."""
    from _train_helpers import phantom_volume

    if not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc")
    (tmp_path / "data").mkdir()
    for i in range(3):
        phantom_volume(tmp_path / "data" / f"subj{i}.nii.gz", seed=i)
    code, output = _run(*_tiny(tmp_path / "data", tmp_path / "fresh", "/proc/condiff-nope"), "--fold", 0,
                        "--holdout", 1)
    assert code == 2 and "--cache-dir" in output and "Traceback" not in output, output
    assert not (tmp_path / "fresh").exists()


def test_listing_training_data_never_opens_a_fifo(tmp_path, fails_instead_of_hanging):
    """Files are grouped by size before hashing: a FIFO (size 0) beside an empty file was opened and waited
    for a writer forever; the reader names it later."""
    import os

    from condiff.train import data as tdata

    (tmp_path / "empty.nii.gz").write_bytes(b"")
    os.mkfifo(tmp_path / "zz_fifo.nii.gz")
    (tmp_path / "dangling.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    with fails_instead_of_hanging(20):
        names = [c.name for c in tdata.list_cases(tmp_path)]
    assert names == ["dangling", "empty", "zz_fifo"]


def test_a_failed_training_removes_its_folder_but_not_a_rival_that_took_the_lock_meanwhile(three_dir, tmp_path,
                                                                                            monkeypatch):
    """A failed run removed the folder it made after releasing its lock (so the lock file went too): a
    training that took the lock in that gap lost its files (concurrency audit). Files go under the lock;
    afterwards only folders left empty."""
    from _train_helpers import phantom_volume
    from condiff.io import lock as locks

    data = tmp_path / "data"
    data.mkdir()
    for f in three_dir.iterdir():
        (data / f.name).symlink_to(f)
    phantom_volume(data / "zbad.nii.gz", nan=True)
    out = tmp_path / "set"
    real_release = locks.OutputLock.release

    def rival_takes_it(self):  # another training takes the lock as soon as this one lets it go
        real_release(self)
        if self.path.parent == out / "train":
            (out / "train" / "rival-checkpoint.pt").write_text("theirs")

    monkeypatch.setattr(locks.OutputLock, "release", rival_takes_it)
    code, output = _run(*_tiny(data, out), "--holdout", 1, "--max-steps", 1)
    assert code == 2 and "zbad.nii.gz" in output, output
    assert (out / "train" / "rival-checkpoint.pt").read_text() == "theirs"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["train", "train/rival-checkpoint.pt"]
