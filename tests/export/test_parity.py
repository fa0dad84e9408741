"""The export map check: calibration set, parity figures against independent oracles, refusals."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from condiff.errors import ExportError  # noqa: E402
from condiff.export import onnx_export  # noqa: E402
from condiff.export.parity import FP16, FP32, calibration_set, check_size, map_parity  # noqa: E402
from condiff.modelset import load_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_onnx_export import make_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_model(tmp_path_factory.mktemp("parity") / "m")
    model, config = load_model(folder)
    return folder, model, config


def test_calibration_set_is_in_the_model_range_with_labelled_discs():
    mri, masks = calibration_set(1, 32, "mri")
    assert mri.shape == (4, 1, 32, 32) and masks.shape == (4, 1, 32, 32)
    assert mri.min() == 0 and mri.max() <= 1 and (mri[:, :, 0, 0] == 0).all()  # background exactly 0
    assert [bool(m.any()) for m in masks] == [False, True, False, True]
    assert (mri[masks] > 0).all()  # the discs lie inside the head
    rgb, _ = calibration_set(3, 32, "rgb")
    assert rgb.shape == (4, 3, 32, 32) and rgb.min() == -1 and rgb.max() <= 1 and (rgb[:, :, 0, 0] == -1).all()
    again, _ = calibration_set(1, 32, "mri")
    assert torch.equal(mri, again)  # the same images at every export


def test_identical_denoisers_agree_exactly(tiny):
    _, model, config = tiny
    parity = map_parity(model, model, 1, 32, steps=4)
    assert parity.max_abs_map_diff == 0 and parity.min_correlation == pytest.approx(1.0)
    assert parity.rank_agreement == 1.0 and parity.ap_export == parity.ap_reference and parity.finite
    assert parity.failures(FP32) == []


def test_parity_figures_match_independent_recomputation(tiny):
    """Recompute the figures from the two runs' maps with numpy and scikit-learn."""
    _, model, _ = tiny
    from condiff.export import parity as mod

    seen = []
    real = mod._maps

    def keep(denoise, images, noise, plan):
        out = real(denoise, images, noise, plan)
        seen.append(out.double().numpy())
        return out

    mod._maps = keep
    try:
        scaled = lambda x, c, t: 0.97 * model(x, c, t)  # noqa: E731
        parity = map_parity(model, scaled, 1, 32, steps=4)
    finally:
        mod._maps = real
    ref, out = seen
    _, masks = calibration_set(1, 32)
    labelled = masks.numpy().any(axis=(1, 2, 3))
    assert parity.max_abs_map_diff == pytest.approx(np.abs(out - ref).max())
    assert parity.relative_map_diff == pytest.approx(np.abs(out - ref).max() / np.abs(ref).max())
    corr = min(np.corrcoef(r.ravel(), o.ravel())[0, 1] for r, o in zip(ref, out))
    assert parity.min_correlation == pytest.approx(corr)
    y = masks.numpy()[labelled].ravel()
    assert parity.ap_reference == pytest.approx(average_precision_score(y, ref[labelled].ravel()))
    assert parity.ap_export == pytest.approx(average_precision_score(y, out[labelled].ravel()))
    assert 0 < parity.relative_map_diff


def test_drift_and_nan_are_refused_under_both_tolerances(tiny):
    _, model, _ = tiny
    halved = map_parity(model, lambda x, c, t: 0.5 * model(x, c, t), 1, 32)
    assert halved.failures(FP32) and halved.failures(FP16)
    nan = map_parity(model, lambda x, c, t: model(x, c, t) * float("nan"), 1, 32, steps=2)
    assert not nan.finite and nan.failures(FP32) == ["the exported network's maps hold NaN or infinity"]
    assert json.loads(json.dumps(nan.to_dict(FP32)))["relative_map_diff"] is None  # valid JSON, no NaN


def test_rank_agreement_ignores_ties_and_counts_swaps():
    from condiff.export.parity import _rank_agreement

    assert _rank_agreement(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0])) == 1.0
    assert _rank_agreement(np.array([1.0, 2.0, 3.0]), np.array([2.0, 1.0, 3.0])) == pytest.approx(2 / 3)
    assert _rank_agreement(np.array([1.0, 1.001, 3.0]), np.array([1.001, 1.0, 3.0])) == 1.0  # a tie, not a swap


def test_export_records_the_map_check_in_the_sidecar(tmp_path):
    folder = make_model(tmp_path / "m")
    result = onnx_export.export_onnx(folder)
    doc = json.loads((folder / "model.onnx.json").read_text())
    maps = doc["check"]["maps"]
    assert maps["steps"] == 10 and maps["images"] == 4 and maps["finite"]
    assert maps["relative_map_diff"] <= 1e-3 and maps["min_correlation"] >= 0.9999
    assert maps["tolerance"] == {"relative_map_diff": 1e-3, "min_correlation": 0.9999, "max_ap_delta": 0.005,
                                 "min_rank_agreement": 1.0}
    assert result.maps.relative_map_diff == maps["relative_map_diff"]


def test_export_whose_maps_drift_writes_nothing(tmp_path, monkeypatch):
    """A graph that passes the one-call eps check but drifts over the loop is refused."""
    folder = make_model(tmp_path / "m")
    real = onnx_export.ort_denoiser

    def drifting(session):
        inner = real(session)
        return lambda x, c, t: 0.5 * inner(x, c, t)

    monkeypatch.setattr(onnx_export, "ort_denoiser", drifting)
    with pytest.raises(ExportError, match="anomaly maps differ from torch's on the calibration set"):
        onnx_export.export_onnx(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_cli_map_check_steps(tmp_path):
    from click.testing import CliRunner

    from condiff.export.cli import main

    folder = make_model(tmp_path / "m")
    result = CliRunner().invoke(main, [str(folder), "--map-check-steps", "0"])
    assert result.exit_code == 0, result.output
    assert "maps=unchecked" in result.output
    assert json.loads((folder / "model.onnx.json").read_text())["check"]["maps"].startswith("skipped")
    result = CliRunner().invoke(main, [str(folder), "--map-check-steps", "3"])
    assert result.exit_code == 0, result.output
    assert "maps (3 steps x 4 images): rel_diff=" in result.output
    assert json.loads((folder / "model.onnx.json").read_text())["check"]["maps"]["steps"] == 3


def test_check_size_fits_the_budget():
    assert check_size(0.01) == (4, 10)       # the bundled nets: the full check
    assert check_size(2.4) == (4, 10)        # 96 s: fits the 120 s budget whole
    assert check_size(4.5) == (4, 5)         # symmetric on 2 cores (3 s torch + ~1.5 s ORT per image)
    assert check_size(24.0) == (2, 2)        # paper on 2 cores: the smallest check, never none
    for cost in (0.01, 1.0, 2.0, 4.5, 6.0, 12.0, 20.0):
        images, steps = check_size(cost)
        assert images * steps * cost <= 120 or (images, steps) == (2, 2)
        larger = [(i, s) for i, s in ((4, 10), (4, 5), (2, 5), (2, 3)) if i * s > images * steps]
        assert all(i * s * cost > 120 for i, s in larger)  # nothing larger would have fitted


def test_slow_networks_get_a_smaller_map_check(tmp_path, monkeypatch):
    """Unless told a step count, the export sizes the check from the eps check's timing."""
    folder = make_model(tmp_path / "m")
    real = onnx_export.max_abs_diff_vs_torch

    def slow(*args, seconds=None, **kwargs):
        diff = real(*args, seconds=seconds, **kwargs)
        seconds.update(ort=10.0, torch=14.0)  # as the paper preset on 2 CPU cores
        return diff

    monkeypatch.setattr(onnx_export, "max_abs_diff_vs_torch", slow)
    result = onnx_export.export_onnx(folder)
    assert (result.maps.images, result.maps.steps) == (2, 2)
    result = onnx_export.export_onnx(folder, map_steps=10)  # told: the full check whatever it costs
    assert (result.maps.images, result.maps.steps) == (4, 10)


def test_cli_refuses_more_map_check_steps_than_the_schedule_has(tmp_path):
    from click.testing import CliRunner

    from condiff.export.cli import main

    folder = make_model(tmp_path / "m")
    result = CliRunner().invoke(main, [str(folder), "--map-check-steps", "5000"])
    assert result.exit_code == 2 and "5000" in result.output
    assert not (folder / "model.onnx").exists()


def test_a_config_with_null_preprocessing_exports(tmp_path):
    folder = make_model(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["preprocessing"] = None  # a hand-edited config: no contract, so the phantoms follow the channel count
    (folder / "config.json").write_text(json.dumps(cfg))
    result = onnx_export.export_onnx(folder, map_steps=2)
    assert result.maps.finite and result.maps.failures(FP32) == []


def test_a_constant_exported_map_correlates_only_with_the_same_constant():
    """An export that flattens every map (e.g. restores the input exactly) has no correlation with torch's
    textured map; two equal constant maps agree. Non-constant maps: numpy's Pearson r."""
    from condiff.export.parity import _correlation

    ramp = np.linspace(0, 0.3, 64)
    assert _correlation(ramp, np.zeros(64)) == 0.0
    assert _correlation(np.zeros(64), ramp) == 0.0
    assert _correlation(np.full(64, 0.5), np.full(64, 0.25)) == 0.0
    # constants that are not exact in binary: numpy's std() of np.full(64, 0.2) is 2.8e-17, not 0, and
    # a std() == 0 test called these two maps perfectly correlated
    assert np.full(64, 0.2).std() > 0
    assert _correlation(np.full(64, 0.2), np.full(64, 0.1)) == 0.0
    assert _correlation(np.full(64, 0.2), np.full(64, 0.2)) == 1.0
    assert _correlation(np.zeros(64), np.zeros(64)) == 1.0
    noisy = ramp + np.random.default_rng(0).normal(0, 0.05, 64)
    assert _correlation(ramp, noisy) == pytest.approx(np.corrcoef(ramp, noisy)[0, 1], abs=1e-15)


def _parity(**changes):
    from condiff.export.parity import MapParity

    good = dict(steps=10, images=4, max_abs_map_diff=0.0, relative_map_diff=0.0, min_correlation=1.0,
                rank_agreement=1.0, ap_reference=0.5, ap_export=0.5, finite=True)
    return MapParity(**{**good, **changes})


@pytest.mark.parametrize("changes, fp32, fp16", [
    ({}, [], []),
    ({"relative_map_diff": 2e-3}, ["maps differ"], []),
    ({"relative_map_diff": 0.06}, ["maps differ"], ["maps differ"]),
    ({"min_correlation": 0.99995}, [], []),
    ({"min_correlation": 0.997}, ["map correlation"], []),
    ({"min_correlation": 0.99}, ["map correlation"], ["map correlation"]),  # drift the fp16 gate must refuse
    ({"ap_export": 0.51}, ["pixel AP"], []),
    ({"ap_export": 0.47}, ["pixel AP"], ["pixel AP"]),
    ({"rank_agreement": 0.9}, ["slice scores ranked"], []),
    ({"rank_agreement": 0.7}, ["slice scores ranked"], ["slice scores ranked"]),
])
def test_each_tolerance_refuses_on_its_own(changes, fp32, fp16):
    parity = _parity(**changes)
    for tol, expected in ((FP32, fp32), (FP16, fp16)):
        got = parity.failures(tol)
        assert len(got) == len(expected) and all(e in g for e, g in zip(expected, got)), (tol, got)


def test_rank_ties_are_relative_to_the_scores_size():
    """Slice scores are small numbers: 0.001 against 0.002 is a clear order (100 %), not a tie."""
    from condiff.export.parity import _rank_agreement

    small = np.array([0.001, 0.002, 0.003])
    assert _rank_agreement(small, np.array([0.002, 0.001, 0.003])) == pytest.approx(2 / 3)
    assert _rank_agreement(small * 1000, np.array([2.0, 1.0, 3.0])) == pytest.approx(2 / 3)
    assert _rank_agreement(np.array([0.001, 0.001005]), np.array([0.002, 0.001])) == 1.0  # 0.5 % apart: a tie
