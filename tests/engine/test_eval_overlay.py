"""condiff-eval's figures: the label's outline on the input and on the map, for the slices with the most label."""
import logging
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from _infer_helpers import one_torch_thread, reference_run
from condiff.engine import overlay, eval_overlay, evaluate as evaluation
from condiff.engine.cli import eval_main

ndimage = pytest.importorskip("scipy.ndimage")
SEG = "{dir}/{stem}_seg.nii.gz"


def _outline_oracle(mask):
    """Boundary by scipy's binary erosion with the 4-neighbour cross, outside counted as background."""
    cross = ndimage.generate_binary_structure(2, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=cross, border_value=0)


@pytest.mark.parametrize("seed", range(4))
def test_outline_equals_scipy_erosion_boundary(seed):
    rng = np.random.default_rng(seed)
    mask = ndimage.binary_opening(rng.random((23, 31)) > 0.45)
    mask[0, :5] = True  # touching the edge: the edge counts as outside
    np.testing.assert_array_equal(eval_overlay.outline(mask), _outline_oracle(mask))


def test_pick_slices_prefers_label_then_score_and_falls_back_to_scores():
    label = np.zeros((4, 4, 6), dtype=bool)
    label[:2, :2, 1] = True      # 4 voxels
    label[:1, :3, 3] = True      # 3 voxels
    label[:1, :3, 4] = True      # 3 voxels, higher score than slice 3
    scores = {0: 0.9, 1: 0.1, 2: 0.5, 3: 0.2, 4: 0.3, 5: 0.8}
    assert eval_overlay.pick_slices(label, scores) == [1, 3, 4]
    assert eval_overlay.pick_slices(label, scores, k=2) == [1, 4]
    assert eval_overlay.pick_slices(np.zeros_like(label), scores) == [0, 2, 5]
    assert eval_overlay.pick_slices(label, {1: 0.1, 5: 0.8}) == [1, 5]  # only analysed slices


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    with one_torch_thread():  # case0 with a lesion, case1 without
        _, scans, out = reference_run(tmp_path_factory.mktemp("evalfig"), n_members=1, n_scans=2, with_masks=True)
    return scans, out


def _eval(*args):
    return CliRunner().invoke(eval_main, [str(a) for a in args], catch_exceptions=False)


def test_figures_outline_the_label_exactly_where_it_is(run, tmp_path):
    import json

    from PIL import Image

    from condiff.io.volumes import read_mask, read_volume

    scans, ref = run
    out = shutil.copytree(ref, tmp_path / "out")
    res = _eval(out, "--masks", SEG)
    assert res.exit_code == 0, res.output + res.stderr
    for case in ("case0", "case1"):
        rec = json.loads((out / "records" / f"{case}.json").read_text())
        vol = read_volume(scans / f"{case}.nii.gz")
        label = read_mask(scans / f"{case}_seg.nii.gz", vol)  # the synthetic volumes are stored in RAS order
        scores = {int(k): float(s) for k, s in rec["slice_scores"]}
        picked = eval_overlay.pick_slices(label, scores)
        x, y, _ = label.shape
        factor = -(-128 // min(x, y))
        with Image.open(out / "eval-overlays" / f"{case}.png") as im:
            labelled = np.asarray(im.convert("RGB"))
        band, h = overlay.LABEL_BAND, y * factor  # a title band, then a name band above every row
        assert labelled.shape == (len(picked) * (h + band) + band, 2 * x * factor, 3)
        tops = [band + r * (band + h) + band for r in range(len(picked))]
        fig = np.concatenate([labelled[t:t + h] for t in tops], axis=0)
        assert labelled[:band].max() > 0 and all(labelled[t - band:t].max() > 0 for t in tops)  # text drawn
        small = fig[::factor, ::factor]
        cyan = (small == eval_overlay.OUTLINE).all(axis=-1)
        for row, s in enumerate(picked):
            want = _outline_oracle(np.swapaxes(label[:, :, s], 0, 1)[::-1])  # anterior up
            band = cyan[row * y:(row + 1) * y]
            np.testing.assert_array_equal(band[:, :x], want)
            np.testing.assert_array_equal(band[:, x:], want)
        assert cyan.any() == bool(label.any())  # case1 has no lesion: no outline anywhere


def test_no_overlays_writes_none_and_metrics_are_the_same(run, tmp_path):
    _, ref = run
    a = shutil.copytree(ref, tmp_path / "a")
    b = shutil.copytree(ref, tmp_path / "b")
    assert _eval(a, "--masks", SEG).exit_code == 0
    assert _eval(b, "--masks", SEG, "--no-overlays").exit_code == 0
    assert (a / "eval-overlays").is_dir() and not (b / "eval-overlays").exists()
    assert (a / "metrics-native.json").read_text() == (b / "metrics-native.json").read_text()


def test_a_figure_that_cannot_be_drawn_is_a_warning_not_a_lost_case(tmp_path, caplog):
    def moved():
        raise FileNotFoundError("scans/case0.nii.gz")

    with caplog.at_level(logging.WARNING):
        evaluation._write_figure(tmp_path, {"case": "case0"}, moved)
    assert not (tmp_path / "eval-overlays").exists()
    assert "case0: no eval overlay (FileNotFoundError" in caplog.text


def test_missing_label_normal_counts_a_case_without_label_file_as_lesion_free(run, tmp_path):
    """(Here because this module's run has a lesion-free case.) Against scikit-learn on the written maps."""
    import json

    import nibabel as nib

    sk = pytest.importorskip("sklearn.metrics")
    scans, ref = run
    labels = tmp_path / "labels"
    labels.mkdir()
    shutil.copy(scans / "case0_seg.nii.gz", labels / "case0_seg.nii.gz")  # case1 has no label file
    pattern = str(labels / "{stem}_seg.nii.gz")
    out = shutil.copytree(ref, tmp_path / "out")
    res = _eval(out, "--masks", pattern, "--no-overlays")
    assert res.exit_code == 1 and "NOT EVALUATED case1" in res.stderr
    res = _eval(out, "--masks", pattern, "--missing-label", "normal", "--no-overlays")
    assert res.exit_code == 0, res.output + res.stderr
    assert "1 case(s) without a label file counted as normal" in res.stdout
    doc = json.loads((out / "metrics-native.json").read_text())
    assert doc["counts"]["cases"] == 2 and doc["counts"]["cases_without_label"] == 1
    y = np.concatenate([np.asarray(nib.load(str(scans / "case0_seg.nii.gz")).dataobj).ravel() > 0,
                        np.zeros(nib.load(str(out / "maps" / "case1.nii.gz")).shape, bool).ravel()])
    s = np.concatenate([np.asarray(nib.load(str(out / "maps" / f"case{k}.nii.gz")).get_fdata()).ravel() for k in (0, 1)])
    assert doc["rows"][0]["ap_pixel"] == pytest.approx(sk.average_precision_score(y, s), abs=1e-10)
