"""The bundled sample scans: exactly what examples/make_examples.py writes from the data kit, the
synthetic anomaly only where its mask says, and the bundled models find it (slow)."""
import importlib.util
import json

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO

SCANS = REPO / "examples" / "scans"
SYNTHETIC = "ixi526_synthetic_t1"


def _make_examples():
    spec = importlib.util.spec_from_file_location("make_examples", REPO / "examples" / "make_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundled_scans_are_what_the_script_writes(shared_data, tmp_path):
    _make_examples().make(shared_data, tmp_path)
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == sorted(p.name for p in SCANS.glob("*.nii.gz"))
    for name in made:
        assert (tmp_path / name).read_bytes() == (SCANS / name).read_bytes(), name


def test_synthetic_anomaly_changes_the_scan_only_inside_its_mask(shared_data):
    mod = _make_examples()
    scan, mask, axis, first, stem = mod.SYNTHETIC
    source = mod.slab(shared_data / scan, axis, first)
    original = np.asarray(source.get_fdata())
    brain = np.asarray(mod.slab(shared_data / mask, axis, first).dataobj) > 0
    made = nib.load(SCANS / f"{stem}.nii.gz")
    lesion = np.asarray(nib.load(SCANS / f"{stem}_lesionmask.nii.gz").dataobj) > 0
    assert np.allclose(made.affine, source.affine)
    change = np.abs(np.asarray(made.get_fdata()) - original) / original.max()
    assert not (lesion & ~brain).any()
    assert change[~brain].max() < 1e-6  # untouched outside the brain (float32 rounding only)
    assert change[~lesion].max() <= mod.CHANGED  # at most the faint rim of the smooth ramp outside the mask
    assert (change > 1e-6).sum() < 1.5 * lesion.sum()  # and that rim is thin
    assert change[lesion].min() > mod.CHANGED and change[lesion].mean() >= 0.15
    share = lesion.sum(axis=tuple(a for a in range(3) if a != axis)) / brain.sum(axis=tuple(a for a in range(3) if a != axis))
    assert np.all((share > 0.02) & (share < 0.12))  # lesion-sized on every slice of the slab


@pytest.mark.slow
def test_bundled_models_find_the_bundled_synthetic_anomaly(tmp_path):
    """The README's promise that the overlay lights up: pixel AP on the synthetic slab far above chance."""
    from click.testing import CliRunner

    from condiff.engine.cli import eval_main, infer_main

    out = tmp_path / "out"
    res = CliRunner().invoke(infer_main, [str(SCANS / f"{SYNTHETIC}.nii.gz"), "-o", str(out), "--no-progress",
                                          "--device", "cpu"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(eval_main, [str(out), "--masks", "{dir}/{stem}_lesionmask.nii.gz"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert (out / "eval-overlays" / f"{SYNTHETIC}.png").is_file()
    doc = json.loads((out / "metrics-native.json").read_text())
    row = next(r for r in doc["rows"] if r["row"] == "ensemble")
    chance = doc["counts"]["positive_pixels"] / doc["counts"]["pixels"]
    assert row["ap_pixel"] > 0.5 and row["ap_pixel"] > 5 * chance, (row, chance)  # measured 0.85, chance 0.05
