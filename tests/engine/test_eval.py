"""condiff-eval on a real condiff-infer output folder, checked against scikit-learn on the same data."""
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from _infer_helpers import (FAST, PREPROCESSING, brain_like, make_model_set, make_scans, one_torch_thread, restamp_output,
                            write_nifti)
from condiff.engine.cli import eval_main, infer_main

sk = pytest.importorskip("sklearn.metrics")
SEG = "{dir}/{stem}_seg.nii.gz"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """3 synthetic cases with lesion and brain masks, inferred with --mask and --save-member-maps."""
    root = tmp_path_factory.mktemp("eval")
    with one_torch_thread():
        models = make_model_set(root / "set", n_members=2)
        scans = root / "scans"
        make_scans(scans, n=3, with_masks=True)
        for k in range(3):
            img, _ = brain_like(seed=k)
            write_nifti(scans / f"case{k}_brainmask.nii.gz", (img > 0).astype(np.uint8))
        out = root / "out"
        res = CliRunner().invoke(infer_main, [str(scans), "-o", str(out), "--models", str(models), *FAST,
                                              "--mask", "{dir}/{stem}_brainmask.nii.gz", "--save-member-maps"],
                                 catch_exceptions=False)
    assert res.exit_code == 0, res.output + res.stderr
    return scans, out


def _eval(*args):
    return CliRunner().invoke(eval_main, [str(a) for a in args], catch_exceptions=False)


def _rows(out, protocol):
    return {r["row"]: r for r in json.loads((out / f"metrics-{protocol}.json").read_text())["rows"]}


def test_benchmark_protocol_matches_sklearn_on_model_space(run):
    from condiff.io.volumes import read_mask, read_volume
    from condiff.preprocess import mask_to_slices

    scans, out = run
    res = _eval(out, "--masks", SEG, "--protocol", "benchmark")
    assert res.exit_code == 0, res.output + res.stderr
    assert "protocol: benchmark" in res.stdout and "AP_p" in res.stdout and "members std" in res.stdout
    maps, masks, scores, member = [], [], [], []
    for k in range(3):
        rec = json.loads((out / "records" / f"case{k}.json").read_text())
        z = np.load(out / "model_space" / f"case{k}.npz")
        vol = read_volume(scans / f"case{k}.nii.gz")
        m = mask_to_slices(read_mask(scans / f"case{k}_seg.nii.gz", vol), rec["geometry"])
        keep = z["slices"].reshape(len(z["slices"]), -1).sum(1) != 0
        maps.append(z["maps"][keep]), masks.append(m[keep]), scores.append(z["scores"][keep])
        member.append(z["member_maps"][:, keep])
    maps, masks, scores, member = (np.concatenate(maps), np.concatenate(masks), np.concatenate(scores),
                                   np.concatenate(member, axis=1))
    labels = masks.reshape(len(masks), -1).any(1)
    assert labels.any() and not labels.all()
    rows = _rows(out, "benchmark")
    ens = rows["ensemble"]
    assert abs(ens["ap_image"] - sk.average_precision_score(labels, scores)) <= 1e-10
    assert abs(ens["auroc"] - sk.roc_auc_score(labels, scores)) <= 1e-10
    assert abs(ens["ap_pixel"] - sk.average_precision_score(masks.ravel(), maps.ravel())) <= 1e-10
    p, r, _ = sk.precision_recall_curve(masks.ravel(), maps.ravel())
    with np.errstate(invalid="ignore", divide="ignore"):
        assert abs(ens["dice"] - np.nanmax(2 * p * r / (p + r))) <= 1e-10
    per_member = [sk.average_precision_score(masks.ravel(), member[k].ravel()) for k in range(2)]
    for k in range(2):
        assert abs(rows[f"member {k}"]["ap_pixel"] - per_member[k]) <= 1e-10
    assert abs(rows["members avg"]["ap_pixel"] - np.mean(per_member)) <= 1e-10
    assert abs(rows["members max"]["ap_pixel"] - np.max(per_member)) <= 1e-10
    assert abs(rows["members std"]["ap_pixel"] - np.std(per_member)) <= 1e-10
    assert (out / "metrics-benchmark.csv").read_text().startswith(
        "protocol,row,AP_i,AUROC,AP_p,best Dice,thr,Dice@5%FPR,AUPRO@30%,lesion F1\n")
    # each member's lesion F1 at its own best-Dice threshold, counted by the Shifts-style oracle
    from lesion_oracle import shifts_counts, shifts_f1

    f1s = []
    for k in range(2):
        thr = rows[f"member {k}"]["threshold"]
        les, found, called, false = np.sum([shifts_counts(y, m >= thr, 2) for y, m in zip(masks, member[k])], axis=0)
        f1s.append(shifts_f1(les, found, called, false))
        assert abs(rows[f"member {k}"]["lesion_f1"] - f1s[-1]) <= 1e-12
    assert abs(rows["members avg"]["lesion_f1"] - np.mean(f1s)) <= 1e-12


def test_native_protocol_uses_written_maps_inside_the_brain_mask(run):
    import nibabel as nib

    scans, out = run
    res = _eval(out, "--masks", SEG)
    assert res.exit_code == 0, res.output + res.stderr
    assert "protocol: native" in res.stdout
    ys, ss = [], []
    for k in range(3):
        amap = nib.load(str(out / "maps" / f"case{k}.nii.gz")).get_fdata(dtype=np.float32)
        seg = np.asarray(nib.load(str(scans / f"case{k}_seg.nii.gz")).dataobj) > 0
        brain = np.asarray(nib.load(str(scans / f"case{k}_brainmask.nii.gz")).dataobj) > 0
        ys.append((seg & brain)[brain]), ss.append(amap[brain])
    y, s = np.concatenate(ys), np.concatenate(ss)
    doc = json.loads((out / "metrics-native.json").read_text())
    ens = doc["rows"][0]
    assert doc["protocol"] == "native" and doc["counts"]["pixels"] == y.size
    rec0 = json.loads((out / "records" / "case0.json").read_text())
    prov = doc["provenance"]  # what was evaluated against what, for whoever reads the JSON later
    assert prov["masks"] == SEG and prov["model_set_digest"] == rec0["model_set_digest"]
    assert prov["method"]["seed"] == rec0["seed"] and prov["method"]["steps"] == rec0["steps"]
    assert prov["engines"] == [f"{rec0['engine']} {rec0['precision']}"]
    assert abs(ens["ap_pixel"] - sk.average_precision_score(y, s)) <= 1e-10
    # samples: the analysed axial slices (RAS volumes: the 3rd axis), scored as in the record
    labels, scores = [], []
    for k in range(3):
        rec = json.loads((out / "records" / f"case{k}.json").read_text())
        seg = np.asarray(nib.load(str(scans / f"case{k}_seg.nii.gz")).dataobj) > 0
        for z_index, score in rec["slice_scores"]:
            labels.append(seg[:, :, z_index].any()), scores.append(score)
    assert abs(ens["auroc"] - sk.roc_auc_score(labels, scores)) <= 1e-10


def _case_arrays(scans, out, k, protocol, labels=None):
    """Case k's label and map where a protocol scores them, read independently of condiff-eval:
    native (label inside the brain, map, brain mask) on the input grid; benchmark (masks, maps, None)
    of the non-empty model-space slices. ``labels``: the folder of the label maps (default: the scans')."""
    import nibabel as nib

    from condiff.io.volumes import read_mask, read_volume
    from condiff.preprocess import mask_to_slices

    seg_path = (labels or scans) / f"case{k}_seg.nii.gz"
    if protocol == "native":
        brain = np.asarray(nib.load(str(scans / f"case{k}_brainmask.nii.gz")).dataobj) > 0
        seg = (np.asarray(nib.load(str(seg_path)).dataobj) > 0) & brain
        return seg, nib.load(str(out / "maps" / f"case{k}.nii.gz")).get_fdata(dtype=np.float32), brain
    rec = json.loads((out / "records" / f"case{k}.json").read_text())
    z = np.load(out / "model_space" / f"case{k}.npz")
    keep = z["slices"].reshape(len(z["slices"]), -1).sum(1) != 0
    m = mask_to_slices(read_mask(seg_path, read_volume(scans / f"case{k}.nii.gz")), rec["geometry"])
    return m[keep], z["maps"][keep], None


def _case_pixels_native(scans, out, k):
    seg, amap, brain = _case_arrays(scans, out, k, "native")
    return seg[brain], amap[brain]


def _case_pixels_benchmark(scans, out, k):
    m, maps, _ = _case_arrays(scans, out, k, "benchmark")
    return m.ravel(), maps.ravel()


@pytest.mark.parametrize("protocol", ["native", "benchmark"])
def test_per_case_rows_match_sklearn_on_each_case_alone(run, protocol):
    scans, out = run
    res = _eval(out, "--masks", SEG, "--protocol", protocol)
    assert res.exit_code == 0, res.output + res.stderr
    assert "per case" in res.stdout and f"metrics-{protocol}-cases.csv" in res.stdout
    doc = json.loads((out / f"metrics-{protocol}.json").read_text())
    thr = doc["rows"][0]["threshold"]
    pixels_of = _case_pixels_native if protocol == "native" else _case_pixels_benchmark
    assert [r["case"] for r in doc["per_case"]] == ["case0", "case1", "case2"]
    for k, row in enumerate(doc["per_case"]):
        y, s = pixels_of(scans, out, k)
        rec = json.loads((out / "records" / f"case{k}.json").read_text())
        assert row["score"] == rec["score"]
        assert (row["pixels"], row["positive_pixels"]) == (y.size, int(y.sum()))
        assert y.any() and not y.all(), "the fixture's cases each hold lesion and normal pixels"
        assert abs(row["ap_pixel"] - sk.average_precision_score(y, s)) <= 1e-10
        p, r, _ = sk.precision_recall_curve(y, s)
        with np.errstate(invalid="ignore", divide="ignore"):
            assert abs(row["dice"] - np.nanmax(2 * p * r / (p + r))) <= 1e-10
        assert abs(row["dice_at_threshold"] - sk.f1_score(y, s >= thr)) <= 1e-10
        assert row["pixels_at_threshold"] == int(np.sum(s >= thr))
    # the pooled pixels are exactly the cases' pixels
    assert doc["counts"]["pixels"] == sum(r["pixels"] for r in doc["per_case"])
    lines = (out / f"metrics-{protocol}-cases.csv").read_text().splitlines()
    assert lines[0] == ("protocol,case,score,pixels,positive_pixels,ap_pixel,dice,dice_at_threshold,pixels_at_threshold,"
                        "lesions,lesions_found,false_regions")
    for line, row in zip(lines[1:], doc["per_case"]):
        cells = line.split(",")
        assert cells[1] == row["case"] and float(cells[5]) == row["ap_pixel"] and int(cells[8]) == row["pixels_at_threshold"]


def test_lesion_free_case_has_empty_cells_and_counts_its_false_positives(run, tmp_path):
    scans, out = run
    labels = tmp_path / "labels"
    labels.mkdir()
    for k in (0, 2):  # case1 has no label file: counted as normal
        (labels / f"case{k}_seg.nii.gz").write_bytes((scans / f"case{k}_seg.nii.gz").read_bytes())
    res = _eval(out, "--masks", str(labels) + "/{stem}_seg.nii.gz", "--missing-label", "normal")
    assert res.exit_code == 0, res.output + res.stderr
    doc = json.loads((out / "metrics-native.json").read_text())
    row = {r["case"]: r for r in doc["per_case"]}["case1"]
    y, s = _case_pixels_native(scans, out, 1)
    thr = doc["rows"][0]["threshold"]
    assert row["positive_pixels"] == 0 and row["ap_pixel"] is None and row["dice"] is None
    assert row["pixels_at_threshold"] == int(np.sum(s >= thr)) > 0 and row["dice_at_threshold"] == 0.0
    line = [x for x in (out / "metrics-native-cases.csv").read_text().splitlines() if ",case1," in x][0]
    assert line.split(",")[5:7] == ["", ""]


@pytest.mark.parametrize("protocol", ["native", "benchmark"])
def test_label_values_select_classes_of_a_label_map(run, tmp_path, protocol):
    """BraTS-style label maps (each lesion split into values 2 and 4): --label-values 4 scores value 4 only."""
    import nibabel as nib

    from condiff.preprocess import mask_to_slices

    scans, out = run
    labels = tmp_path / "labels"
    labels.mkdir()
    for k in range(3):
        img = nib.load(str(scans / f"case{k}_seg.nii.gz"))
        seg = np.asarray(img.dataobj) > 0
        classes = np.where(seg, 2, 0).astype(np.uint8)
        checker = (np.indices(seg.shape).sum(axis=0) % 2).astype(bool)
        classes[seg & checker] = 4  # a checkerboard of each lesion is "4"
        nib.save(nib.Nifti1Image(classes, img.affine, img.header), str(labels / f"case{k}_seg.nii.gz"))
    res = _eval(out, "--masks", str(labels) + "/{stem}_seg.nii.gz", "--protocol", protocol, "--label-values", "4",
                "--no-overlays")
    assert res.exit_code == 0, res.output + res.stderr
    assert "lesion = label values 4" in res.stdout
    doc = json.loads((out / f"metrics-{protocol}.json").read_text())
    assert doc["label_values"] == [4]
    ys, ss = [], []
    for k in range(3):
        classes = np.asarray(nib.load(str(labels / f"case{k}_seg.nii.gz")).dataobj)
        assert (classes == 4).any() and (classes == 2).any()
        if protocol == "native":
            brain = np.asarray(nib.load(str(scans / f"case{k}_brainmask.nii.gz")).dataobj) > 0
            amap = nib.load(str(out / "maps" / f"case{k}.nii.gz")).get_fdata(dtype=np.float32)
            ys.append(((classes == 4) & brain)[brain]), ss.append(amap[brain])
        else:
            rec = json.loads((out / "records" / f"case{k}.json").read_text())
            z = np.load(out / "model_space" / f"case{k}.npz")
            keep = z["slices"].reshape(len(z["slices"]), -1).sum(1) != 0
            # the chosen class as a binary label (its extent must not depend on its code 4), resampled, > 0.4
            m = mask_to_slices((classes == 4).astype(np.float32), rec["geometry"])
            ys.append(m[keep].ravel()), ss.append(z["maps"][keep].ravel())
    y, s = np.concatenate(ys), np.concatenate(ss)
    assert doc["counts"]["positive_pixels"] == int(y.sum())
    assert abs(doc["rows"][0]["ap_pixel"] - sk.average_precision_score(y, s)) <= 1e-10
    # without the option every value > 0 is lesion, as before
    res = _eval(out, "--masks", str(labels) + "/{stem}_seg.nii.gz", "--protocol", protocol, "--no-overlays")
    whole = json.loads((out / f"metrics-{protocol}.json").read_text())
    assert whole["label_values"] is None and whole["counts"]["positive_pixels"] > int(y.sum())


def test_baselines_score_intensity_inside_the_brain_like_sklearn(run):
    scans, out = run
    res = _eval(out, "--masks", SEG, "--protocol", "benchmark", "--baselines")
    assert res.exit_code == 0, res.output + res.stderr
    assert "baseline: bright" in res.stdout and "chance" in res.stdout
    rows = _rows(out, "benchmark")
    from condiff.engine.evaluate import local_median_window

    masks, bright, dark, grey_of, brain_of = [], [], [], [], []
    for k in range(3):
        pixels_y, _ = _case_pixels_benchmark(scans, out, k)
        z = np.load(out / "model_space" / f"case{k}.npz")
        keep = z["slices"].reshape(len(z["slices"]), -1).sum(1) != 0
        x, brain = z["slices"][keep][:, 0].astype(np.float64), z["foreground"][keep].astype(bool)
        masks.append(pixels_y), bright.append((x * brain).ravel()), dark.append(((1 - x) * brain).ravel())
        grey_of.append(x), brain_of.append(brain)
    y = np.concatenate(masks)
    assert abs(rows["baseline: bright"]["ap_pixel"] - sk.average_precision_score(y, np.concatenate(bright))) <= 1e-10
    assert abs(rows["baseline: dark"]["ap_pixel"] - sk.average_precision_score(y, np.concatenate(dark))) <= 1e-10
    assert rows["chance"]["ap_pixel"] == pytest.approx(y.mean(), abs=1e-12)
    median = [_local_median_deviation(x.reshape(-1, *z["slices"].shape[-2:]), (d > 0).reshape(-1, *z["slices"].shape[-2:]),
                                      window=local_median_window(z["slices"].shape[-1])).ravel()
              for x, d in zip(grey_of, brain_of)]
    assert abs(rows["baseline: median"]["ap_pixel"] - sk.average_precision_score(y, np.concatenate(median))) <= 1e-10
    # "area": the brain mask as the map, so its slice score is the brain's share of the slice
    area = np.concatenate([b.reshape(len(b), -1).mean(1) for b in brain_of])
    positive = y.reshape(len(area), -1).any(1)
    assert abs(rows["baseline: area"]["ap_image"] - sk.average_precision_score(positive, area)) <= 1e-10
    assert abs(rows["baseline: area"]["auroc"] - sk.roc_auc_score(positive, area)) <= 1e-10
    # the bright map's lesion F1 at its own threshold, slice by slice (8-connected) by the oracle
    from lesion_oracle import shifts_counts, shifts_f1

    thr = rows["baseline: bright"]["threshold"]
    shape = (-1, *z["slices"].shape[-2:])
    slices = zip(y.reshape(shape), np.concatenate(bright).reshape(shape))
    les, found, called, false = np.sum([shifts_counts(m, b >= thr, 2) for m, b in slices], axis=0)
    assert called > 0 and abs(rows["baseline: bright"]["lesion_f1"]
                              - shifts_f1(les, found, called, false)) <= 1e-12
    # the ensemble row is untouched by the extra rows
    plain = _eval(out, "--masks", SEG, "--protocol", "benchmark")
    assert plain.exit_code == 0 and "baseline" not in plain.stdout
    assert _rows(out, "benchmark")["ensemble"] == rows["ensemble"]
    native = _eval(out, "--masks", SEG, "--baselines")
    assert native.exit_code == 2 and "--protocol benchmark" in native.stderr


def test_label_values_are_checked(run):
    scans, out = run
    for bad, text in (("a,4", "integer label values"), ("0", "above 0"), (",", "above 0")):
        res = _eval(out, "--masks", SEG, "--label-values", bad)
        assert res.exit_code == 2 and text in res.stderr, (bad, res.stderr)


def test_missing_labels_fail_alone_with_exit_1(run, tmp_path):
    scans, out = run
    assert _eval(out, "--masks", SEG).exit_code == 0
    earlier = {p.name: p.read_bytes() for p in out.glob("metrics-native*")}
    res = _eval(out, "--masks", "{dir}/{stem}_missing.nii.gz")
    assert res.exit_code == 1
    assert "NOT EVALUATED case0" in res.stderr and "mask not found" in res.stderr
    # nothing evaluated (a mistyped pattern): each case named once, the earlier metrics kept, not emptied
    assert res.stderr.count("case0_missing.nii.gz") == 1 and "no case could be evaluated" in res.stderr
    assert len(earlier) == 3 and {p.name: p.read_bytes() for p in out.glob("metrics-native*")} == earlier
    # one case without a label: the others are still evaluated
    only = tmp_path / "labels"
    only.mkdir()
    for k in (0, 2):
        (only / f"case{k}_seg.nii.gz").write_bytes((scans / f"case{k}_seg.nii.gz").read_bytes())
    res = _eval(out, "--masks", str(only) + "/{stem}_seg.nii.gz", "--protocol", "benchmark")
    assert res.exit_code == 1 and "NOT EVALUATED case1" in res.stderr
    doc = json.loads((out / "metrics-benchmark.json").read_text())
    assert doc["cases"] == ["case0", "case2"] and doc["rows"][0]["row"] == "ensemble"



def test_native_protocol_keeps_to_the_automatic_brain_of_a_scan_without_a_mask_file(tmp_path):
    """No brain-mask file: inference used the scan's non-background voxels as the brain, so must the
    evaluation (the map is 0 outside; counting those voxels inflates Dice@5%FPR and AUPRO)."""
    import nibabel as nib

    with one_torch_thread():
        models = make_model_set(tmp_path / "set", n_members=1, preprocessing={**PREPROCESSING, "use_mask": True})
        make_scans(tmp_path / "scans", n=1, with_masks=True)
        out = tmp_path / "out"
        res = CliRunner().invoke(infer_main, [str(tmp_path / "scans"), "-o", str(out), "--models", str(models), *FAST],
                                 catch_exceptions=False)
    assert res.exit_code == 0, res.output + res.stderr
    assert json.loads((out / "records" / "case0.json").read_text())["mask_auto"] is True
    res = _eval(out, "--masks", SEG)
    assert res.exit_code == 0, res.output + res.stderr
    doc = json.loads((out / "metrics-native.json").read_text())
    image = np.asarray(nib.load(str(tmp_path / "scans" / "case0.nii.gz")).dataobj)
    lesion = np.asarray(nib.load(str(tmp_path / "scans" / "case0_seg.nii.gz")).dataobj) > 0
    brain = image != 0  # brain_like: exactly 0 outside the head
    assert 0 < brain.sum() < brain.size
    case = doc["per_case"][0] if "per_case" in doc else next(iter(doc.get("case_rows", [])), None)
    assert case is not None and case["pixels"] == int(brain.sum())
    assert case["positive_pixels"] == int((lesion & brain).sum())
    # a record written before mask_auto existed: the same brain, inferred from its options
    path = out / "records" / "case0.json"
    rec = json.loads(path.read_text())
    del rec["mask_auto"]
    path.write_text(json.dumps(rec))
    assert _eval(out, "--masks", SEG).exit_code == 0
    assert json.loads((out / "metrics-native.json").read_text())["per_case"][0]["pixels"] == int(brain.sum())
    # the input must still be the one the map was made from
    (tmp_path / "scans" / "case0.nii.gz").write_bytes(b"changed")
    res = _eval(out, "--masks", SEG)
    assert res.exit_code == 1 and "case0.nii.gz: changed since its map was made" in res.stderr


def test_empty_output_folder_is_a_usage_error(tmp_path):
    res = _eval(tmp_path, "--masks", SEG)
    assert res.exit_code == 2 and "no finished cases" in res.stderr


def test_baseline_maps_put_background_below_all_tissue_for_rgb_ranges():
    from condiff.engine.evaluate import baseline_maps

    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, size=(2, 3, 8, 8))
    fg = rng.random((2, 8, 8)) > 0.3
    maps = baseline_maps(x, fg, (-1.0, 1.0))
    grey = x.mean(axis=1)
    np.testing.assert_allclose(maps["bright"], (grey + 1) * fg, rtol=0, atol=1e-12)
    np.testing.assert_allclose(maps["dark"], (1 - grey) * fg, rtol=0, atol=1e-12)
    assert maps["bright"][fg].min() >= 0 and np.all(maps["bright"][~fg] == 0)


def test_case_baselines_are_cached_per_model_space_file(run, tmp_path):
    import shutil

    from condiff.engine.evaluate import baseline_maps, case_baselines, kept_slices

    scans, out = run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    rec = json.loads((copy / "records" / "case0.json").read_text())
    first = case_baselines(copy, rec)
    assert case_baselines(copy, rec) is first and not first["median"].flags.writeable
    path = copy / rec["outputs"]["model_space"]["path"]
    with np.load(path) as z:
        arrays = dict(z)
    keep = kept_slices(rec, arrays["slices"])
    expected = baseline_maps(arrays["slices"][keep], arrays["foreground"][keep], (0.0, 1.0))
    for name in first:
        np.testing.assert_array_equal(first[name], expected[name])
    arrays["slices"] = arrays["slices"] * 0.5  # the file changes: the cache must not serve the old maps
    np.savez(path, **arrays)
    again = case_baselines(copy, rec)
    assert again is not first
    np.testing.assert_allclose(again["bright"], 0.5 * first["bright"], rtol=0, atol=1e-12)


def _local_median_deviation(grey, fg, window):
    """The "median" baseline by explicit windows: background replaced by the slice's brain median,
    edges repeated, |x - median of the window| inside the brain."""
    from numpy.lib.stride_tricks import sliding_window_view

    out = np.zeros_like(grey)
    half = window // 2
    for k, (g, m) in enumerate(zip(grey, fg)):
        filled = np.where(m, g, np.median(g[m]))
        windows = sliding_window_view(np.pad(filled, half, mode="edge"), (window, window))
        out[k] = np.abs(g - np.median(windows, axis=(-2, -1))) * m
    return out


@pytest.mark.parametrize("size, window", [(16, 3), (32, 5), (40, 5)])
def test_local_median_baseline_against_explicit_windows(size, window):
    from condiff.engine.evaluate import baseline_maps, local_median_window

    assert local_median_window(size) == window
    rng = np.random.default_rng(size)
    x = rng.uniform(0, 1, size=(3, 1, size, size))
    yy, xx = np.mgrid[:size, :size]
    fg = np.broadcast_to((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2, (3, size, size))
    c = size // 2
    x[0, 0, c, c] = 1.5  # a bright spot in the brain stands out from its surroundings
    got = baseline_maps(x, fg, (0.0, 1.0))["median"]
    np.testing.assert_allclose(got, _local_median_deviation(x[:, 0], fg, window), rtol=0, atol=1e-12)
    assert np.all(got[~fg] == 0) and got[0, c, c] > got[0][fg[0]].max() * 0.5


def _several_lesions(scans, folder):
    """Label maps with lesions of several sizes per case: the blob, a 2x2x2 cube, and a voxel touching the cube
    by a corner only (one lesion in 3-D, 26-connected)."""
    import nibabel as nib

    folder.mkdir()
    for k in range(3):
        img = nib.load(str(scans / f"case{k}_seg.nii.gz"))
        seg = np.asarray(img.dataobj) > 0
        seg[4:6, 8:10, 1:3] = True
        seg[6, 10, 3] = True
        nib.save(nib.Nifti1Image(seg.astype(np.uint8), img.affine, img.header), str(folder / f"case{k}_seg.nii.gz"))
    return str(folder) + "/{stem}_seg.nii.gz"


@pytest.mark.parametrize("protocol", ["native", "benchmark"])
def test_aupro_and_dice_at_5_percent_fpr_count_connected_lesions(run, tmp_path, protocol):
    from skimage.measure import label as connected

    from condiff.metrics import aupro, dice_at_fpr

    scans, out = run
    pattern = _several_lesions(scans, tmp_path / "labels")
    res = _eval(out, "--masks", pattern, "--protocol", protocol, "--no-overlays")
    assert res.exit_code == 0, res.output + res.stderr
    assert "AUPRO@30%" in res.stdout and "Dice@5%FPR" in res.stdout and "connected lesions" in res.stdout
    ys, ss, ids, offset = [], [], [], 0
    for k in range(3):
        seg, amap, brain = _case_arrays(scans, out, k, protocol, tmp_path / "labels")
        if protocol == "native":
            lesions = connected(seg, connectivity=3)[brain]
            ys.append(seg[brain]), ss.append(amap[brain])
        else:
            lesions = np.stack([connected(s, connectivity=2) for s in seg])
            per_slice_offsets = np.r_[0, np.cumsum([s.max() for s in lesions])[:-1]][:, None, None]
            lesions = np.where(lesions > 0, lesions + per_slice_offsets, 0).ravel()
            ys.append(seg.ravel()), ss.append(amap.ravel())
        ids.append(np.where(lesions > 0, lesions + offset, 0))
        offset += int(lesions.max())
    y, s, regions = np.concatenate(ys), np.concatenate(ss), np.concatenate(ids)
    doc = json.loads((out / f"metrics-{protocol}.json").read_text())
    ens = doc["rows"][0]
    assert doc["counts"]["lesions"] == len(np.unique(regions[regions > 0]))
    if protocol == "native":
        assert doc["counts"]["lesions"] == 6  # (blob, cube with its corner voxel) x 3 cases: 26-connected
    assert abs(ens["aupro"] - aupro(regions, s, 0.3)) <= 1e-12
    assert abs(ens["dice_fpr5"] - dice_at_fpr(y, s, 0.05)[0]) <= 1e-12
    assert 0 <= ens["aupro"] <= 1 and doc["aupro_max_fpr"] == 0.3


def test_given_threshold_from_a_number_or_another_evaluation(run, tmp_path):
    scans, out = run
    res = _eval(out, "--masks", SEG, "--protocol", "benchmark")
    assert res.exit_code == 0, res.output + res.stderr
    own = json.loads((out / "metrics-benchmark.json").read_text())
    assert own["threshold_chosen_on_evaluated_data"] is True and own["given_threshold"] is None
    saved = tmp_path / "validation-metrics.json"
    saved.write_text((out / "metrics-benchmark.json").read_text())
    # the folder's own best threshold, given back: Dice@given is the best Dice
    res = _eval(out, "--masks", SEG, "--protocol", "benchmark", "--threshold", saved)
    assert res.exit_code == 0, res.output + res.stderr
    doc = json.loads((out / "metrics-benchmark.json").read_text())
    assert doc["threshold_chosen_on_evaluated_data"] is False
    assert doc["given_threshold"] == {"value": own["rows"][0]["threshold"], "source": str(saved)}
    assert abs(doc["rows"][0]["dice_given"] - own["rows"][0]["dice"]) <= 1e-12
    assert "Dice@given" in res.stdout and str(saved) in res.stdout
    # a number: Dice and per-case rows at it, as scikit-learn's F1
    thr = 0.5 * own["rows"][0]["threshold"]
    res = _eval(out, "--masks", SEG, "--protocol", "benchmark", "--threshold", repr(thr))
    assert res.exit_code == 0, res.output + res.stderr
    doc = json.loads((out / "metrics-benchmark.json").read_text())
    ys, ss = zip(*[_case_pixels_benchmark(scans, out, k) for k in range(3)])
    y, s = np.concatenate(ys), np.concatenate(ss)
    assert abs(doc["rows"][0]["dice_given"] - sk.f1_score(y, s >= thr)) <= 1e-12
    for k, row in enumerate(doc["per_case"]):
        assert row["pixels_at_threshold"] == int(np.sum(ss[k] >= thr))
    assert "Dice@given" in (out / "metrics-benchmark.csv").read_text().splitlines()[0]
    assert all("dice_given" not in r for r in doc["rows"][1:])  # members are not scored at the ensemble's threshold


def test_given_threshold_is_checked(run, tmp_path):
    scans, out = run
    res = _eval(out, "--masks", SEG, "--protocol", "benchmark")
    assert res.exit_code == 0
    other = out / "metrics-benchmark.json"
    res = _eval(out, "--masks", SEG, "--threshold", other, "--no-overlays")  # native against benchmark
    assert res.exit_code == 2 and str(other) in res.stderr and "same --protocol" in res.stderr
    for bad, text in ((tmp_path / "nope.json", "cannot be read"), ("inf", "not a finite threshold")):
        res = _eval(out, "--masks", SEG, "--threshold", bad)
        assert res.exit_code == 2 and text in res.stderr and str(bad) in res.stderr, res.stderr
    # a threshold chosen for other lesion classes is used, with a warning
    res = _eval(out, "--masks", SEG, "--protocol", "benchmark", "--threshold", other, "--label-values", "1")
    assert res.exit_code == 0 and "chosen for label values all > 0" in res.stderr, res.stderr
    junk = tmp_path / "junk.json"
    junk.write_text('{"rows": []}')
    res = _eval(out, "--masks", SEG, "--threshold", junk)
    assert res.exit_code == 2 and "no ensemble best-Dice threshold" in res.stderr


def test_native_bootstrap_resamples_the_written_maps_by_case(run, tmp_path):
    import nibabel as nib
    from skimage.measure import label as connected

    from condiff.engine.bootstrap import INTERVAL_KEYS, PooledCases, bootstrap

    scans, out = run
    pattern = _several_lesions(scans, tmp_path / "labels")  # lesions of different sizes: AUPRO is not recall
    res = _eval(out, "--masks", pattern, "--bootstrap", "30", "--bootstrap-seed", "7", "--no-overlays")
    assert res.exit_code == 0, res.output + res.stderr
    boot = json.loads((out / "metrics-native.json").read_text())["bootstrap"]
    assert list(boot["rows"]) == ["ensemble"] and boot["seed"] == 7
    ys, ss, ids, sy, ssc = [], [], [], [], []
    for k in range(3):
        brain = np.asarray(nib.load(str(scans / f"case{k}_brainmask.nii.gz")).dataobj) > 0
        seg = (np.asarray(nib.load(str(tmp_path / "labels" / f"case{k}_seg.nii.gz")).dataobj) > 0) & brain
        amap = nib.load(str(out / "maps" / f"case{k}.nii.gz")).get_fdata(dtype=np.float32)
        rec = json.loads((out / "records" / f"case{k}.json").read_text())
        ys.append(seg[brain]), ss.append(amap[brain]), ids.append(connected(seg, connectivity=3)[brain])
        sy.append([seg[:, :, z].any() for z, _ in rec["slice_scores"]])
        ssc.append([score for _, score in rec["slice_scores"]])
    from condiff.engine.lesions import LesionDetection
    from lesion_oracle import shifts_counts

    thr = json.loads((out / "metrics-native.json").read_text())["rows"][0]["threshold"]
    counts = []
    for k in range(3):  # the ensemble's per-case lesion counts at its threshold, by the oracle on the grid
        seg, amap, brain = _case_arrays(scans, out, k, "native", tmp_path / "labels")
        counts.append(LesionDetection(*shifts_counts(seg, (amap >= thr) & brain, 3)))
    ours = bootstrap({"ensemble": PooledCases(ys, ss, ids, sy, ssc, lesion_counts=counts)}, 30, seed=7).to_dict()
    for key in INTERVAL_KEYS:
        np.testing.assert_allclose(boot["rows"]["ensemble"][key], ours["rows"]["ensemble"][key], rtol=0, atol=1e-12)


@pytest.mark.parametrize("protocol", ["native", "benchmark"])
def test_lesion_wise_counts_at_the_table_threshold(run, tmp_path, protocol):
    """Per case: lesions found and called regions touching none, counted by skimage on the written
    maps at the JSON's threshold (26-connected on the input grid, 8-connected per model-space slice)."""
    from lesion_oracle import shifts_counts

    scans, out = run
    pattern = _several_lesions(scans, tmp_path / "labels")
    res = _eval(out, "--masks", pattern, "--protocol", protocol, "--no-overlays")
    assert res.exit_code == 0, res.output + res.stderr
    doc = json.loads((out / f"metrics-{protocol}.json").read_text())
    thr = doc["rows"][0]["threshold"]
    assert doc["lesion_detection"]["threshold"] == thr

    total = np.zeros(4, dtype=int)
    for k, row in enumerate(doc["per_case"]):
        seg, amap, brain = _case_arrays(scans, out, k, protocol, tmp_path / "labels")
        if protocol == "native":
            expected = np.array(shifts_counts(seg, (amap >= thr) & brain, 3))
        else:
            expected = np.sum([shifts_counts(s, a >= thr, 2) for s, a in zip(seg, amap)], axis=0)
        found_false = (row["lesions"], row["lesions_found"], row["false_regions"])
        assert found_false == (expected[0], expected[1], expected[3]), (k, found_false, expected)
        total += expected
    det = doc["lesion_detection"]
    assert (det["lesions"], det["found"], det["called_regions"], det["false_regions"]) == tuple(total)
    assert det["lesions"] == doc["counts"]["lesions"] and 0 < det["found"] <= det["lesions"]
    assert abs(det["recall"] - total[1] / total[0]) <= 1e-12
    assert f"{total[1]} of {total[0]} lesions found" in res.stdout
    if protocol == "native":
        assert det["lesions"] == 6  # (blob, cube with its corner voxel) x 3 cases
    assert det["min_iou"] == 0.25


def test_lesion_iou_option(run, tmp_path):
    """--lesion-iou changes the matching (here to any overlap), recorded in the JSON; 0 is refused."""
    from lesion_oracle import shifts_counts

    scans, out = run
    res = _eval(out, "--masks", SEG, "--protocol", "benchmark", "--lesion-iou", "1e-9")
    assert res.exit_code == 0, res.output + res.stderr
    doc = json.loads((out / "metrics-benchmark.json").read_text())
    thr = doc["rows"][0]["threshold"]
    assert doc["lesion_detection"]["min_iou"] == 1e-9 and "IoU >= 1e-09," in res.stdout
    for k, row in enumerate(doc["per_case"]):
        seg, amap, _ = _case_arrays(scans, out, k, "benchmark")
        les, found, _, false = np.sum([shifts_counts(s, a >= thr, 2, min_iou=1e-9) for s, a in zip(seg, amap)], axis=0)
        assert (row["lesions"], row["lesions_found"], row["false_regions"]) == (les, found, false)
    res = _eval(out, "--masks", SEG, "--lesion-iou", "0")
    assert res.exit_code == 2 and "--lesion-iou" in res.stderr


def test_photographs_are_evaluated_against_png_masks(tmp_path):
    """RGB photos with PNG masks: both protocols run, and the native per-case lesion counts are the
    oracle's on the written float TIFF maps (8-connected in 2-D)."""
    import tifffile
    from PIL import Image

    from lesion_oracle import shifts_counts

    with one_torch_thread():
        models = make_model_set(tmp_path / "set", n_members=2, image_channels=3,
                                preprocessing={"modality": "rgb", "image_size": 32})
        rng = np.random.default_rng(0)
        photos = tmp_path / "in"
        photos.mkdir()
        for k in range(3):
            Image.fromarray((rng.random((40, 52, 3)) * 255).astype(np.uint8)).save(photos / f"eye{k}.png")
            mask = np.zeros((40, 52), np.uint8)
            mask[10 + k:20 + k, 15:25] = mask[30:33, 40:44] = 255
            Image.fromarray(mask).save(photos / f"eye{k}_mask.png")
        out = tmp_path / "out"
        res = CliRunner().invoke(infer_main, [str(photos), "-o", str(out), "--models", str(models), *FAST,
                                              "--save-member-maps"], catch_exceptions=False)
    assert res.exit_code == 0, res.output + res.stderr
    for protocol in ("native", "benchmark"):
        extra = ["--baselines"] if protocol == "benchmark" else []
        res = _eval(out, "--masks", "{dir}/{stem}_mask.png", "--protocol", protocol, *extra)
        assert res.exit_code == 0, res.output + res.stderr
        doc = json.loads((out / f"metrics-{protocol}.json").read_text())
        assert doc["counts"]["cases"] == 3 and all(r["lesions"] == 2 for r in doc["per_case"])
    doc = json.loads((out / "metrics-native.json").read_text())
    thr = doc["rows"][0]["threshold"]
    # the photos are 40 x 52: only the analysed centre square (40 x 40 or 41 columns) is evaluated
    assert all(row["pixels"] in (40 * 40, 40 * 41) for row in doc["per_case"])
    for k, row in enumerate(doc["per_case"]):
        with Image.open(photos / f"eye{k}_mask.png") as im:
            label = np.asarray(im) > 0
        amap = tifffile.imread(out / "maps" / f"eye{k}.tiff")
        les, found, _, false = shifts_counts(label, amap >= thr, 2)
        assert (row["lesions"], row["lesions_found"], row["false_regions"]) == (les, found, false)


@pytest.mark.parametrize("protocol", ["native", "benchmark"])
def test_lesions_called_only_by_pixels_at_the_threshold_are_found(run, tmp_path, protocol):
    """Lesion-wise counts call pixels with map >= threshold, as Dice does. The maps are rewritten so that
    case 0's lesion reads 0.9, the other cases' lesions exactly 0.5 and everything else 0: the best-Dice
    threshold is 0.5 (Dice 1), and every lesion is found, the 0.5 ones only by pixels equal to it."""
    import shutil

    import nibabel as nib

    scans, src = run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    value = {0: 0.9, 1: 0.5, 2: 0.5}
    for k in range(3):
        seg, _, brain = _case_arrays(scans, out, k, protocol)
        if protocol == "native":
            img = nib.load(str(out / "maps" / f"case{k}.nii.gz"))
            amap = np.where(seg & brain, value[k], 0.0).astype(np.float32)
            nib.save(nib.Nifti1Image(amap, img.affine, img.header), str(out / "maps" / f"case{k}.nii.gz"))
            restamp_output(out, f"case{k}", "map")
        else:
            path = out / "model_space" / f"case{k}.npz"
            with np.load(path) as z:
                arrays = {name: z[name] for name in z.files}
            keep = arrays["slices"].reshape(len(arrays["slices"]), -1).sum(1) != 0
            maps = np.zeros_like(arrays["maps"])
            maps[keep] = np.where(seg, value[k], 0.0)
            np.savez(path, **{**arrays, "maps": maps})
            restamp_output(out, f"case{k}", "model_space")
        assert seg.any()
    res = _eval(out, "--masks", SEG, "--protocol", protocol, "--no-overlays")
    assert res.exit_code == 0, res.output + res.stderr
    doc = json.loads((out / f"metrics-{protocol}.json").read_text())
    ens = doc["rows"][0]
    assert ens["threshold"] == 0.5 and ens["dice"] == 1.0
    det = doc["lesion_detection"]
    assert det["threshold"] == 0.5 and det["lesions"] >= 3
    assert (det["found"], det["false_regions"]) == (det["lesions"], 0)
    for row in doc["per_case"]:
        assert row["lesions"] > 0 and (row["lesions_found"], row["false_regions"]) == (row["lesions"], 0), row
    assert f"{det['lesions']} of {det['lesions']} lesions found" in res.stdout


def _copy(run, tmp_path, name="out"):
    import shutil

    return shutil.copytree(run[1], tmp_path / name)


def test_cases_not_here_to_evaluate_are_named_and_exit_1(run, tmp_path):
    """A case condiff-infer failed on, an interrupted run and shards that never ran into the folder: each is
    listed as not evaluated (exit 1), the finished cases are still scored; a later whole-folder run that
    finished clears the shard notes."""
    import os
    import time

    out = _copy(run, tmp_path)
    res = _eval(out, "--masks", SEG, "--no-overlays")
    assert res.exit_code == 0 and "NOT EVALUATED" not in res.stderr, res.stderr
    failed = {**json.loads((out / "records" / "case0.json").read_text()), "case": "case9", "status": "failed",
              "error_type": "InputImageError", "error": "case9.nii.gz: truncated", "outputs": {}}
    (out / "records" / "case9.json").write_text(json.dumps(failed))
    res = _eval(out, "--masks", SEG, "--no-overlays")
    assert res.exit_code == 1 and "NOT EVALUATED case9: condiff-infer failed on it (InputImageError" in res.stderr
    doc = json.loads((out / "metrics-native.json").read_text())
    assert doc["cases"] == ["case0", "case1", "case2"] and doc["failures"][0]["case"] == "case9"
    (out / "records" / "case9.json").unlink()

    run_json = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run_json, "interrupted": True, "signal": "SIGTERM"}))
    res = _eval(out, "--masks", SEG, "--no-overlays")
    assert res.exit_code == 1 and "NOT EVALUATED run.json: condiff-infer was interrupted (SIGTERM)" in res.stderr
    (out / "run.json").write_text(json.dumps({**run_json, "stopped": "--fail-fast", "not_finished": ["case7"]}))
    res = _eval(out, "--masks", SEG, "--no-overlays")  # a run that stopped early (--fail-fast, a full disk)
    assert res.exit_code == 1, res.stderr
    assert "NOT EVALUATED run.json: condiff-infer stopped early (--fail-fast) before every case finished: 1 case(s) " \
           "it did not finish (case7)" in res.stderr
    (out / "run.json").write_text(json.dumps(run_json))
    past = time.time() - 100
    os.utime(out / "run.json", (past, past))
    (out / "run.0-of-3.json").write_text(json.dumps(run_json))
    res = _eval(out, "--masks", SEG, "--no-overlays")
    assert res.exit_code == 1, res.stderr
    for i in (1, 2):
        assert f"NOT EVALUATED shard {i}/3: has not run into this folder (no run.{i}-of-3.json)" in res.stderr
    assert "shard 0/3" not in res.stderr
    (out / "run.json").write_text(json.dumps(run_json))  # a whole-folder run that finished after the split
    res = _eval(out, "--masks", SEG, "--no-overlays")
    assert res.exit_code == 0 and "NOT EVALUATED" not in res.stderr, res.stderr


def test_outputs_or_brain_masks_changed_since_inference_fail_alone(run, tmp_path):
    import shutil

    import nibabel as nib

    scans = shutil.copytree(run[0], tmp_path / "scans")
    out = _copy(run, tmp_path)
    for k in range(3):  # the records point at the copied scans' brain masks
        path = out / "records" / f"case{k}.json"
        rec = json.loads(path.read_text())
        rec["mask"] = str(scans / Path(rec["mask"]).name)
        path.write_text(json.dumps(rec))
    # another case's map copied over case0's; case2's brain mask halved after inference
    shutil.copy(out / "maps" / "case1.nii.gz", out / "maps" / "case0.nii.gz")
    img = nib.load(str(scans / "case2_brainmask.nii.gz"))
    brain = np.asarray(img.dataobj).copy()
    brain[:10] = 0
    nib.save(nib.Nifti1Image(brain, img.affine, img.header), str(scans / "case2_brainmask.nii.gz"))
    res = _eval(out, "--masks", SEG, "--no-overlays")
    assert res.exit_code == 1
    assert f"NOT EVALUATED case0: {out / 'maps' / 'case0.nii.gz'}: changed since condiff-infer wrote it" in res.stderr
    assert f"NOT EVALUATED case2: {scans / 'case2_brainmask.nii.gz'}: changed since case case2's map" in res.stderr
    assert json.loads((out / "metrics-native.json").read_text())["cases"] == ["case1"]
    # a map with NaN (its record's digest matching: written so) is refused by name too
    img = nib.load(str(out / "maps" / "case1.nii.gz"))
    amap = np.asarray(img.get_fdata(dtype=np.float32))
    amap[amap > 0] = np.nan
    nib.save(nib.Nifti1Image(amap, img.affine, img.header), str(out / "maps" / "case1.nii.gz"))
    restamp_output(out, "case1", "map")
    res = _eval(out, "--masks", SEG, "--no-overlays")
    assert res.exit_code == 1 and f"{out / 'maps' / 'case1.nii.gz'}: holds" in res.stderr and "NaN/Inf" in res.stderr
    # model-space files are checked in the benchmark protocol
    out2 = _copy(run, tmp_path, "out2")
    shutil.copy(out2 / "model_space" / "case1.npz", out2 / "model_space" / "case2.npz")
    res = _eval(out2, "--masks", SEG, "--protocol", "benchmark")
    assert res.exit_code == 1 and "case2.npz: changed since condiff-infer wrote it" in res.stderr


def test_missing_labels_are_named_and_a_pattern_that_matches_nothing_keeps_the_earlier_metrics(run, tmp_path):
    out = _copy(run, tmp_path)
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "case0_seg.nii.gz").write_bytes((run[0] / "case0_seg.nii.gz").read_bytes())
    res = _eval(out, "--masks", str(labels) + "/{stem}_seg.nii.gz", "--missing-label", "normal", "--no-overlays")
    assert res.exit_code == 0, res.stderr
    doc = json.loads((out / "metrics-native.json").read_text())
    assert doc["cases_without_label"] == ["case1", "case2"] and doc["counts"]["cases_without_label"] == 2
    assert "counted as normal (case1, case2)" in res.stdout
    assert [r["label"] for r in doc["per_case"]] == [str(labels / "case0_seg.nii.gz"), None, None]
    before = (out / "metrics-native.json").read_bytes()
    res = _eval(out, "--masks", "{dir}/{stem}_sge.nii.gz", "--missing-label", "normal", "--no-overlays")
    assert res.exit_code == 1 and "no label file matches --masks '{dir}/{stem}_sge.nii.gz'" in res.stderr
    assert "earlier ones are kept" in res.stderr and (out / "metrics-native.json").read_bytes() == before


def test_one_label_file_for_several_cases_is_warned_about(run, tmp_path):
    out = _copy(run, tmp_path)
    one = str(run[0] / "case0_seg.nii.gz")
    res = _eval(out, "--masks", one, "--no-overlays")
    assert res.exit_code == 0 and f"{one} is the label of 3 cases (case0, case1, case2)" in res.stderr, res.stderr
    res = _eval(out, "--masks", SEG, "--no-overlays")
    assert "is the label of" not in res.stderr


def test_a_threshold_chosen_on_maps_made_another_way_is_warned_about(run, tmp_path):
    out = _copy(run, tmp_path)
    assert _eval(out, "--masks", SEG, "--no-overlays").exit_code == 0
    same = tmp_path / "same.json"
    same.write_text((out / "metrics-native.json").read_text())
    res = _eval(out, "--masks", SEG, "--no-overlays", "--threshold", same)
    assert res.exit_code == 0 and "made another way" not in res.stderr
    doc = json.loads(same.read_text())
    doc["provenance"]["method"]["steps"] = 50
    doc["provenance"]["model_set_digest"] = "0" * 64
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    res = _eval(out, "--masks", SEG, "--no-overlays", "--threshold", other)
    assert res.exit_code == 0 and "chosen on maps made another way (another model set; steps 50 (here 2))" in res.stderr


def test_figures_of_cases_no_longer_evaluated_are_removed(run, tmp_path):
    out = _copy(run, tmp_path)
    assert _eval(out, "--masks", SEG).exit_code == 0
    assert sorted(p.name for p in (out / "eval-overlays").glob("*.png")) == ["case0.png", "case1.png", "case2.png"]
    labels = tmp_path / "labels"
    labels.mkdir()
    for k in (0, 1):
        (labels / f"case{k}_seg.nii.gz").write_bytes((run[0] / f"case{k}_seg.nii.gz").read_bytes())
    res = _eval(out, "--masks", str(labels) + "/{stem}_seg.nii.gz")
    assert res.exit_code == 1 and "NOT EVALUATED case2" in res.stderr
    assert sorted(p.name for p in (out / "eval-overlays").glob("*.png")) == ["case0.png", "case1.png"]


def test_label_values_that_no_label_holds_are_warned_about(run, tmp_path):
    out = _copy(run, tmp_path)
    res = _eval(out, "--masks", SEG, "--no-overlays", "--label-values", "5")
    assert res.exit_code == 0 and "no label holds any of the values 5" in res.stderr, res.stderr
    res = _eval(out, "--masks", SEG, "--no-overlays", "--label-values", "1")
    assert "no label holds" not in res.stderr


def test_an_all_healthy_evaluation_says_why_its_metrics_are_undefined_and_what_to_give(run, tmp_path):
    out = _copy(run, tmp_path)
    res = _eval(out, "--masks", "{dir}/{stem}_nolabel.nii.gz", "--missing-label", "normal", "--no-overlays")
    assert res.exit_code == 1  # no case has a label file: a mistyped pattern, said once
    assert res.stderr.count("NOT EVALUATED") == 1 and "NOT EVALUATED all 3 cases: no label file matches" in res.stderr
    empty = tmp_path / "labels"
    empty.mkdir()
    for k in range(3):  # lesion-free labels for every case
        write_nifti(empty / f"case{k}_seg.nii.gz", np.zeros((20, 22, 4), np.uint8))
    res = _eval(out, "--masks", str(empty) + "/{stem}_seg.nii.gz", "--no-overlays")
    assert res.exit_code == 0, res.stderr
    assert "no label holds a lesion pixel" in res.stdout and "give --threshold" in res.stdout
    res = _eval(out, "--masks", str(empty) + "/{stem}_seg.nii.gz", "--no-overlays", "--threshold", "0.001")
    assert "count the pixels the given threshold calls (false positives)" in res.stdout
    doc = json.loads((out / "metrics-native.json").read_text())
    assert all(r["positive_pixels"] == 0 and r["pixels_at_threshold"] >= 0 for r in doc["per_case"])
    assert sum(r["pixels_at_threshold"] for r in doc["per_case"]) > 0


def test_labels_that_matched_but_could_not_be_used_are_not_called_a_mistyped_pattern(run, tmp_path):
    """Two cases' label files on another grid fail, the third case has none: it was reported as 'no label
    file matches --masks (nor for any other case: a mistyped pattern?)', though the pattern matched."""
    out = _copy(run, tmp_path)
    labels = tmp_path / "labels"
    labels.mkdir()
    for k in (0, 1):
        write_nifti(labels / f"case{k}_seg.nii.gz", np.ones((7, 5, 3), np.uint8))  # not the scans' grid
    res = _eval(out, "--masks", str(labels) + "/{stem}_seg.nii.gz", "--missing-label", "normal", "--no-overlays")
    assert res.exit_code == 1, res.stderr
    line = next(x for x in res.stderr.splitlines() if "NOT EVALUATED case2" in x)
    assert "mistyped" not in line and "the 2 that matched other cases could not be used" in line, res.stderr
    res = _eval(out, "--masks", str(tmp_path) + "/nowhere/{stem}_seg.nii.gz", "--missing-label", "normal",
                "--no-overlays")
    assert res.exit_code == 1 and "a mistyped pattern?" in res.stderr
