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


def _grow8(mask):
    return ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool))


def _head_height(case=True):
    """The bands above an eval figure's rows: case name, legend, colour bar, panel titles."""
    return (overlay.LABEL_BAND if case else 0) + 2 * overlay.LABEL_BAND + overlay.BAR_BAND


def test_figures_outline_the_label_and_the_called_pixels_exactly_where_they_are(run, tmp_path):
    import json

    from PIL import Image

    from condiff.io.volumes import read_mask, read_volume

    scans, ref = run
    out = shutil.copytree(ref, tmp_path / "out")
    res = _eval(out, "--masks", SEG)
    assert res.exit_code == 0, res.output + res.stderr
    doc = json.loads((out / "metrics-native.json").read_text())
    thr = next(r for r in doc["rows"] if r["row"] == "ensemble")["threshold"]  # the table's best-Dice threshold
    assert np.isfinite(thr) and thr > 0
    band = overlay.LABEL_BAND
    for case in ("case0", "case1"):
        rec = json.loads((out / "records" / f"{case}.json").read_text())
        vol = read_volume(scans / f"{case}.nii.gz")
        label = read_mask(scans / f"{case}_seg.nii.gz", vol)  # the synthetic volumes are stored in RAS order
        amap = read_volume(out / "maps" / f"{case}.nii.gz").data
        called = amap >= thr  # the map is 0 outside the brain: these are the pixels the table calls
        scores = {int(k): float(s) for k, s in rec["slice_scores"]}
        picked = eval_overlay.pick_slices(label, scores)
        x, y, _ = label.shape
        factor = -(-eval_overlay.MIN_PANEL // min(x, y))
        with Image.open(out / "eval-overlays" / f"{case}.png") as im:
            labelled = np.asarray(im.convert("RGB"))
        head, h = _head_height(), y * factor  # the head's bands, then a name band above every row
        assert min(h, x * factor) >= 360  # panels at least 360 px, outlines at least 2 px
        assert labelled.shape == (head + len(picked) * (h + band), 2 * x * factor, 3)
        width = labelled.shape[1]
        np.testing.assert_array_equal(labelled[:band], overlay.text_band([f"case {case}"], width, 1))
        legend = eval_overlay.legend(thr)
        assert f"{thr:.4g}" in legend and "magenta" in legend and "cyan" in legend
        np.testing.assert_array_equal(labelled[band:2 * band], overlay.text_band([legend], width, 1))
        bar = labelled[2 * band:2 * band + overlay.BAR_BAND]
        np.testing.assert_array_equal(bar, overlay.colour_bar(width, float(amap.max()), thr))
        tops = [head + r * (band + h) + band for r in range(len(picked))]
        fig = np.concatenate([labelled[t:t + h] for t in tops], axis=0)
        assert all(labelled[t - band:t].max() > 0 for t in tops)  # text drawn
        small = fig[::factor, ::factor]
        cyan = (small == eval_overlay.OUTLINE).all(axis=-1)
        magenta = (small == eval_overlay.CALLED).all(axis=-1)
        for row, s in enumerate(picked):
            def show(a):  # anterior up
                return np.swapaxes(a[:, :, s], 0, 1)[::-1]
            want = _outline_oracle(show(label))
            # the called pixels: dashes of their outer boundary (pixels outside them with a 4-neighbour in them)
            cross = ndimage.generate_binary_structure(2, 1)
            ring = ndimage.binary_dilation(show(called), structure=cross) & ~show(called)
            i, j = np.indices(ring.shape)
            dashed = ring & ((i + 2 * j) % 4 < 2)
            rows = slice(row * y, (row + 1) * y)
            np.testing.assert_array_equal(cyan[rows, :x], want)  # the input panel: the label's outline whole
            np.testing.assert_array_equal(cyan[rows, x:], want & ~dashed)  # the map panel: the dashes on top
            np.testing.assert_array_equal(magenta[rows, x:], dashed)
            assert not magenta[rows, :x].any()  # the input panel: the label alone
            # a dark edge around every outline, so cyan and magenta stand apart from the ramp's yellow
            full = fig[row * h:(row + 1) * h]
            for cols in (slice(0, x * factor), slice(x * factor, 2 * x * factor)):
                panel = full[:, cols]
                lines = (panel == eval_overlay.OUTLINE).all(-1) | (panel == eval_overlay.CALLED).all(-1)
                assert (panel[_grow8(lines) & ~lines] == eval_overlay.EDGE).all()
        assert cyan.any() == bool(label.any())  # case1 has no lesion: no outline anywhere
        assert magenta.any()  # the threshold calls pixels in both cases' shown slices


def _volume_case(seed=0, shape=(30, 26, 5)):
    rng = np.random.default_rng(seed)
    image = rng.uniform(50, 150, shape).astype(np.float32)
    amap = ndimage.gaussian_filter(rng.uniform(0, 1, shape), 2).astype(np.float32)
    label = np.zeros(shape, dtype=bool)
    label[8:15, 6:12, 1:4] = True
    return image, amap, label, {k: float(amap[:, :, k].mean()) for k in range(shape[2])}


def test_volume_panels_are_enlarged_to_360_px_and_carry_side_markers():
    image, amap, label, scores = _volume_case()
    thr = float(np.quantile(amap, 0.8))
    fig = eval_overlay.volume_figure(image, amap, label, scores, called=amap >= thr, threshold=thr, case="c1")
    x, y = image.shape[:2]
    factor = -(-360 // min(x, y))  # 14: 26 px -> 364
    band, h, head = overlay.LABEL_BAND, y * factor, _head_height()
    assert fig.shape == (head + 3 * (band + h), 2 * x * factor, 3) and min(h, x * factor) >= 360
    left, right = overlay.side_letter("L"), overlay.side_letter("R")
    lh, lw = left.shape[:2]
    rw = right.shape[1]
    panel = x * factor
    for r in range(3):
        top = head + r * (band + h) + band + (h - lh) // 2
        for j in range(2):
            np.testing.assert_array_equal(fig[top:top + lh, j * panel + 1:j * panel + 1 + lw], left)
            np.testing.assert_array_equal(fig[top:top + lh, (j + 1) * panel - rw - 1:(j + 1) * panel - 1], right)
    # no threshold: no magenta, and the legend says only what the cyan is
    plain = eval_overlay.volume_figure(image, amap, label, scores)
    assert plain.shape[0] == fig.shape[0] - band and not (plain == eval_overlay.CALLED).all(-1).any()
    np.testing.assert_array_equal(plain[:band], overlay.text_band(["label: cyan outline"], fig.shape[1], 1))


def _photo():
    """A 40x52 photo in [0, 1], a smooth map and a rectangular label."""
    rng = np.random.default_rng(1)
    rgb = rng.uniform(0, 1, (40, 52, 3))
    amap = ndimage.gaussian_filter(rng.uniform(0, 1, (40, 52)), 2)
    label = np.zeros((40, 52), dtype=bool)
    label[10:20, 15:30] = True
    return rgb, amap, label


def test_photograph_figure_has_no_side_markers_and_outlines_the_called_pixels():
    rgb, amap, label = _photo()
    thr = float(np.quantile(amap, 0.85))
    fig = eval_overlay.image_figure(rgb, amap, label, called=amap >= thr, threshold=thr, given=True, case="eye")
    factor = 9  # 40 px -> 360
    head = _head_height()
    assert fig.shape == (head + 40 * factor, 2 * 52 * factor, 3)
    assert "given" in eval_overlay.legend(thr, given=True)
    row = fig[head:]
    small = row[::factor, ::factor]
    ring = ndimage.binary_dilation(amap >= thr, structure=ndimage.generate_binary_structure(2, 1)) & ~(amap >= thr)
    i, j = np.indices(ring.shape)
    dashed = ring & ((i + 2 * j) % 4 < 2)
    np.testing.assert_array_equal((small[:, 52:] == eval_overlay.CALLED).all(-1), dashed)
    np.testing.assert_array_equal((small == eval_overlay.OUTLINE).all(-1),
                                  np.concatenate([_outline_oracle(label), _outline_oracle(label) & ~dashed], 1))
    assert (_outline_oracle(label) & dashed).any()  # the case where the two meet is exercised
    # no "L"/"R": the panels' mid-edge pixels are the photograph's own (grey: none is a black marker box)
    lh, lw = overlay.side_letter("L").shape[:2]
    mid = (40 * factor - lh) // 2
    assert not (row[mid:mid + lh, 1:1 + lw] == overlay.side_letter("L")).all()
    grey = np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    big = np.repeat(np.repeat(grey, factor, 0), factor, 1)
    np.testing.assert_array_equal(row[mid:mid + lh, 1:1 + lw], big[mid:mid + lh, 1:1 + lw])


def test_eval_overlay_threshold_follows_a_given_threshold(run, tmp_path):
    """``--threshold``: the figure outlines the pixels the given threshold calls, and says it was given."""
    from PIL import Image

    from condiff.io.volumes import read_volume

    _, ref = run
    out = shutil.copytree(ref, tmp_path / "out")
    amap = read_volume(out / "maps" / "case0.nii.gz").data
    thr = float(np.quantile(amap[amap > 0], 0.5))
    assert _eval(out, "--masks", SEG, "--threshold", thr).exit_code == 0
    with Image.open(out / "eval-overlays" / "case0.png") as im:
        fig = np.asarray(im.convert("RGB"))
    band = overlay.LABEL_BAND
    np.testing.assert_array_equal(fig[band:2 * band], overlay.text_band([eval_overlay.legend(thr, given=True)],
                                                                          fig.shape[1], 1))


def test_eval_overlay_max_puts_every_case_on_one_colour_scale(run, tmp_path):
    """``--overlay-max``: each figure's bar is the fixed scale with its case's own maximum, the map panel's
    colours follow it (a fixed top at the case's maximum draws the default figure), metrics unchanged."""
    import json

    from PIL import Image

    from condiff.io.volumes import read_volume

    _, ref = run
    a, b = shutil.copytree(ref, tmp_path / "a"), shutil.copytree(ref, tmp_path / "b")
    maxima = {c: float(read_volume(ref / "maps" / f"{c}.nii.gz").data.max()) for c in ("case0", "case1")}
    fixed = min(maxima.values())
    assert _eval(a, "--masks", SEG).exit_code == 0
    res = _eval(b, "--masks", SEG, "--overlay-max", fixed)
    assert res.exit_code == 0, res.output
    thr = json.loads((b / "metrics-native.json").read_text())["rows"][0]["threshold"]
    band = overlay.LABEL_BAND
    for case, vmax in maxima.items():
        with Image.open(a / "eval-overlays" / f"{case}.png") as im:
            per_case = np.asarray(im.convert("RGB"))
        with Image.open(b / "eval-overlays" / f"{case}.png") as im:
            fig = np.asarray(im.convert("RGB"))
        np.testing.assert_array_equal(fig[2 * band:2 * band + overlay.BAR_BAND],
                                      overlay.colour_bar(fig.shape[1], fixed, thr, case_max=vmax))
        rows_a, rows_b = per_case[_head_height():], fig[_head_height():]
        if vmax == fixed:  # on its own maximum: the same panels as the per-case default
            np.testing.assert_array_equal(rows_b, rows_a)
        else:  # above the fixed top: brighter colours somewhere
            assert not np.array_equal(rows_b, rows_a)
    assert (a / "metrics-native.json").read_text() == (b / "metrics-native.json").read_text()
    for bad in ("0", "-1", "nan", "inf", "big"):
        res = _eval(b, "--masks", SEG, "--overlay-max", bad)
        assert res.exit_code == 2 and "--overlay-max" in res.output + res.stderr, bad
    # shared: the largest map value of the evaluated cases (maps are 0 outside the brain, which is evaluated)
    res = _eval(b, "--masks", SEG, "--overlay-max", "shared")
    assert res.exit_code == 0, res.output
    top = max(maxima.values())
    for case, vmax in maxima.items():
        with Image.open(b / "eval-overlays" / f"{case}.png") as im:
            fig = np.asarray(im.convert("RGB"))
        np.testing.assert_array_equal(fig[2 * band:2 * band + overlay.BAR_BAND],
                                      overlay.colour_bar(fig.shape[1], top, thr, case_max=vmax))


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
