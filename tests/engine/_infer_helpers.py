"""Shared builders for the condiff-infer / condiff-eval tests: a tiny model set and small NIfTI volumes."""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import numpy as np

PREPROCESSING = {"modality": "mri", "image_size": 32, "fov_mm": 64.0}
BYTE_FOLDERS = ("maps", "restorations", "overlays", "records")
# Fast sampler settings for tests: DDIM with 2 steps on the CPU (byte identity is promised on the CPU;
# the schedule and network are the real code).
FAST = ["--sampler", "ddim", "--steps", "2", "--batch-size", "4", "--no-progress", "--device", "cpu"]


@contextlib.contextmanager
def one_torch_thread():
    """Tiny 32-px networks run fastest on one thread, and a busy 2-core test machine makes
    oversubscribed intra-op threads very slow; restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_model_set(root: Path, n_members: int = 2, preprocessing: dict | None = None, image_channels: int = 1) -> Path:
    """A set of ``n_members`` tiny (32 px) UNets with different random weights."""
    import torch

    from condiff.config import ModelConfig, preset
    from condiff.modelset import save_model, save_model_set
    from condiff.unet import ConditionalUNet

    root.mkdir(parents=True, exist_ok=True)
    dirs = []
    for k in range(n_members):
        torch.manual_seed(100 + k)
        cfg = preset("tiny", image_channels, sample_size=32)
        model = ConditionalUNet(cfg).eval()
        mc = ModelConfig(unet=cfg, preprocessing=dict(preprocessing or PREPROCESSING), fold=k)
        dirs.append(save_model(root / f"fold_{k}", model, mc))
    save_model_set(root, dirs, name="tiny test set")
    return root


def brain_like(shape=(20, 22, 4), seed: int = 0, lesion: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A smooth ellipsoid 'brain' on a zero background (+ a bright blob); returns (image, lesion mask)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = (x / 0.8) ** 2 + (y / 0.85) ** 2 + (z / 1.4) ** 2 < 1
    img = np.where(inside, 100 + 20 * np.cos(3 * x) * np.sin(2 * y) + rng.normal(0, 3, shape), 0).astype(np.float32)
    blob = ((x - 0.3) ** 2 + (y + 0.2) ** 2 < 0.06) & inside & (np.abs(z) < 0.7)
    if lesion:
        img[blob] += 60
    return img, blob


def write_nifti(path: Path, data: np.ndarray, affine=None, qcode: int = 1, scode: int = 1, dtype=None) -> Path:
    import nibabel as nib

    if affine is None:
        affine = np.diag([2.0, 2.0, 3.0, 1.0])
        affine[:3, 3] = [-20.0, -22.0, -9.0]
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype or np.asarray(data).dtype), affine)
    img.header.set_qform(affine, code=qcode)
    img.header.set_sform(affine, code=scode)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def make_scans(folder: Path, n: int = 3, with_masks: bool = False) -> list[Path]:
    """``n`` small synthetic volumes named case0.nii.gz ... (+ case*_seg.nii.gz lesion masks)."""
    paths = []
    for k in range(n):
        img, blob = brain_like(seed=k, lesion=k != 1)
        paths.append(write_nifti(folder / f"case{k}.nii.gz", img))
        if with_masks:
            write_nifti(folder / f"case{k}_seg.nii.gz", blob.astype(np.uint8))
    return paths


def digests(out: Path, folders=BYTE_FOLDERS, files=("cases.csv", "scores.csv")) -> dict[str, str]:
    """sha256 of every file under the byte-identical folders and of the two CSVs."""
    found = {}
    for folder in folders:
        for p in sorted((out / folder).rglob("*")):
            if p.is_file():
                found[p.relative_to(out).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    for name in files:
        found[name] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    return found


def invoke_infer(args):
    """Run condiff-infer in-process (click's CliRunner); exceptions propagate so failures show their cause."""
    from click.testing import CliRunner

    from condiff.engine.cli import infer_main

    return CliRunner().invoke(infer_main, [str(a) for a in args], catch_exceptions=False)


def reference_run(root: Path, n_members: int = 2, n_scans: int = 3, with_masks: bool = False) -> tuple[Path, Path, Path]:
    """A tiny model set, ``n_scans`` synthetic scans (``with_masks``: and their lesion masks) and one
    uninterrupted ``condiff-infer`` run of them with ``FAST`` settings into ``root/ref``: the
    outputs other runs must reproduce. Returns (models, scans, ref)."""
    models = make_model_set(root / "set", n_members=n_members)
    scans = root / "scans"
    make_scans(scans, n=n_scans, with_masks=with_masks)
    ref = root / "ref"
    res = invoke_infer([scans, "-o", ref, "--models", models, *FAST])
    assert res.exit_code == 0, res.output + res.stderr
    return models, scans, ref


def restamp_output(out: Path, case: str, kind: str = "map") -> None:
    """After a test rewrote a case's output file (a crafted map), put its digest into the record, as if
    condiff-infer had written it: condiff-eval refuses outputs whose bytes differ from their record."""
    import json

    rec_path = out / "records" / f"{case}.json"
    rec = json.loads(rec_path.read_text())
    entry = rec["outputs"][kind]
    entry["sha256"] = hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest()
    rec_path.write_text(json.dumps(rec))
