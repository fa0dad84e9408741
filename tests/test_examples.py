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


def test_model_card_front_matter_matches_its_evidence():
    """The card's machine-readable figures are the recorded reports' numbers (rounded), and describe the
    bundled members as they are."""
    import json

    yaml = pytest.importorskip("yaml")
    repo = REPO
    card = (repo / "examples" / "models" / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    healing = json.loads((repo / meta["evidence"]["healing"]).read_text())["synthetic"]["member_summary"]
    for task, value in meta["metrics"]["healing_removed"].items():
        assert abs(healing[task]["ensemble_removed"] - value) <= 5e-4, task
    for task, value in meta["metrics"]["healing_map_ap"].items():
        assert abs(healing[task]["ensemble_ap"] - value) <= 5e-4, task
    assert set(meta["metrics"]["healing_removed"]) == set(healing)
    lesions = json.loads((repo / meta["evidence"]["lesions"]).read_text())["lesions"]
    for data, claimed in meta["metrics"]["lesions_ap_pixel"].items():
        rows = {r["row"]: r for r in lesions[data]["evaluation"]["rows"]}
        assert abs(rows["ensemble"]["ap_pixel"] - claimed["ensemble"]) <= 5e-4, data
        for name in ("bright", "chance"):
            assert abs(lesions[data]["baselines"][name]["ap_pixel"] - claimed[name]) <= 5e-4, (data, name)
    lesionwise = json.loads((repo / meta["evidence"]["lesions_lesionwise"]).read_text())["lesions"]
    for data, claimed in meta["metrics"]["lesions_f1"].items():
        rows = {r["row"]: r for r in lesionwise[data]["evaluation"]["rows"]}
        assert abs(rows["ensemble"]["lesion_f1"] - claimed["ensemble"]) <= 5e-4, data
        assert abs(lesionwise[data]["baselines"]["bright"]["lesion_f1"] - claimed["bright"]) <= 5e-4, data
        assert abs(rows["ensemble"]["ap_pixel"] - meta["metrics"]["lesions_ap_pixel"][data]["ensemble"]) <= 5e-4
    members = json.loads((repo / "examples" / "models" / "set.json").read_text())["members"]
    assert [m["path"] for m in members] == meta["model"]["members"]
    for member, steps in zip(meta["model"]["members"], meta["model"]["steps_per_member"]):
        config = json.loads((repo / "examples" / "models" / member / "config.json").read_text())
        assert config["trained"]["steps"] == steps and config["preprocessing"]["image_size"] == meta["model"]["image_size"]
