"""bench/intensity_check.py: healthy-tissue percentiles per scan, with and without the landmark map."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from condiff.config import ModelConfig, preset
from condiff.modelset import save_model, save_model_set
from condiff.unet import ConditionalUNet

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("intensity_check", REPO / "bench" / "intensity_check.py")
intensity_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(intensity_check)


def _save(path, data):
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


def test_report_shows_the_landmarks_pulling_a_compressed_scan_back(tmp_path):
    rng = np.random.default_rng(0)
    brain = np.zeros((24, 24, 6), bool)
    brain[3:21, 3:21, 1:5] = True
    ixi, brats = tmp_path / "kit" / "ixi-t1", tmp_path / "kit" / "brats-tumour"
    ixi.mkdir(parents=True)
    brats.mkdir()
    for name in ("IXI001-T1", "IXI002-T1"):
        _save(ixi / f"{name}.nii.gz", np.where(brain, rng.gamma(4.0, 100.0, brain.shape), 0).astype(np.float32))
        _save(ixi / f"{name}_brainmask.nii.gz", brain.astype(np.uint8))
    # A 'contrast' case: healthy tissue like IXI plus 3 % voxels 5x brighter, labelled as tumour.
    tumour = brain & (rng.uniform(size=brain.shape) < 0.03)
    case = np.where(brain, rng.gamma(4.0, 100.0, brain.shape), 0) * np.where(tumour, 5.0, 1.0)
    _save(brats / "b1_t1c.nii.gz", case.astype(np.float32))
    _save(brats / "b1_brainmask.nii.gz", brain.astype(np.uint8))
    _save(brats / "b1_seg.nii.gz", tumour.astype(np.uint8))
    torch.manual_seed(0)
    cfg = preset("tiny", 1, sample_size=32)
    pre = {"modality": "mri", "normalisation": "percentile", "use_mask": True, "image_size": 32}
    member = save_model(tmp_path / "set" / "fold0", ConditionalUNet(cfg), ModelConfig(
        unet=cfg, preprocessing=pre, fold=0, trained={"data": {"train": {"subjects": ["IXI001-T1", "IXI002-T1"]}}}))
    save_model_set(tmp_path / "set", [member])
    out = tmp_path / "intensity.md"
    assert intensity_check.main(["--models", str(tmp_path / "set"), "--data", str(tmp_path / "kit"), "--out", str(out)]) == 0
    rows = {r.split("|")[1].strip(): r.split("|")[2:4] for r in out.read_text().splitlines() if r.startswith("| IXI")
            or r.startswith("| BraTS")}
    marks = json.loads(out.read_text().split("landmarks: ")[1])
    cols = lambda cell: [float(v) for v in cell.split("/")]  # noqa: E731
    # A training scan after the map sits on the landmarks themselves (10th, 50th, 90th = landmarks 1, 5, 9) ...
    for name in ("IXI IXI001-T1 (train)", "IXI IXI002-T1 (train)"):
        assert cols(rows[name][1]) == pytest.approx([marks[1], marks[5], marks[9]], abs=2e-3)
    # ... and the contrast case's healthy tissue, squeezed down by the bright voxels, comes back near them.
    plain, mapped = cols(rows["BraTS b1 (healthy tissue)"][0]), cols(rows["BraTS b1 (healthy tissue)"][1])
    assert plain[1] < marks[5] - 0.15 and abs(mapped[1] - marks[5]) < 0.05
