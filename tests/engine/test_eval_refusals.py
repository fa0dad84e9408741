"""condiff-eval refuses non-finite and missing outputs case by case, and names unfinished shards and shared labels (mutation audit 3)."""
import json
import os
import time

import numpy as np
import pytest
from click.testing import CliRunner

from _infer_helpers import FAST, make_model_set, one_torch_thread, restamp_output
from condiff.engine.cli import infer_main
from test_eval import _copy, _eval, run  # noqa: F401,F811 (its module fixture, shared, and helpers)

SEG = "{dir}/{stem}_seg.nii.gz"


def test_a_missing_map_is_named_as_missing_with_what_to_do(run, tmp_path):
    out = _copy(run, tmp_path)
    (out / "maps" / "case0.nii.gz").unlink()
    res = _eval(out, "--masks", SEG, "--no-overlays")
    assert res.exit_code == 1, res.stderr
    assert f"NOT EVALUATED case0: {out / 'maps' / 'case0.nii.gz'}: is missing (the map output of case case0)" \
           in res.stderr and "rerun condiff-infer" in res.stderr, res.stderr


def test_a_map_with_infinite_values_is_refused_like_nan(run, tmp_path):
    import nibabel as nib

    out = _copy(run, tmp_path)
    img = nib.load(str(out / "maps" / "case1.nii.gz"))
    amap = np.asarray(img.get_fdata(dtype=np.float32))
    amap[amap > 0] = np.inf
    nib.save(nib.Nifti1Image(amap, img.affine, img.header), str(out / "maps" / "case1.nii.gz"))
    restamp_output(out, "case1", "map")
    res = _eval(out, "--masks", SEG, "--no-overlays")
    assert res.exit_code == 1 and f"NOT EVALUATED case1: {out / 'maps' / 'case1.nii.gz'}: holds" in res.stderr
    assert "NaN/Inf values" in res.stderr
    assert json.loads((out / "metrics-native.json").read_text())["cases"] == ["case0", "case2"]


@pytest.mark.parametrize("key", ["maps", "member_maps"])
def test_model_space_maps_with_nan_are_refused_in_the_benchmark_protocol(run, tmp_path, key):
    out = _copy(run, tmp_path)
    path = out / "model_space" / "case0.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays[key] = arrays[key].copy()
    arrays[key][arrays[key] > 0] = np.nan
    np.savez(path, **arrays)
    restamp_output(out, "case0", "model_space")
    res = _eval(out, "--masks", SEG, "--protocol", "benchmark")
    assert res.exit_code == 1, res.stderr
    assert f"NOT EVALUATED case0: {path}: holds" in res.stderr and "NaN/Inf values" in res.stderr, res.stderr


def test_an_interrupted_whole_folder_run_after_the_shards_does_not_hide_the_missing_shards(run, tmp_path):
    out = _copy(run, tmp_path)
    run_json = json.loads((out / "run.json").read_text())
    (out / "run.0-of-3.json").write_text(json.dumps(run_json))
    past = time.time() - 100
    os.utime(out / "run.0-of-3.json", (past, past))
    (out / "run.json").write_text(json.dumps({**run_json, "interrupted": True, "signal": "SIGINT"}))  # newer
    res = _eval(out, "--masks", SEG, "--no-overlays")
    assert res.exit_code == 1 and "NOT EVALUATED run.json: condiff-infer was interrupted (SIGINT)" in res.stderr
    for i in (1, 2):
        assert f"NOT EVALUATED shard {i}/3: has not run into this folder" in res.stderr, res.stderr


def test_one_label_file_for_two_cases_is_warned_about(run, tmp_path):
    out = _copy(run, tmp_path)
    (out / "records" / "case2.json").unlink()
    one = str(run[0] / "case0_seg.nii.gz")
    res = _eval(out, "--masks", one, "--no-overlays")
    assert res.exit_code == 0 and f"{one} is the label of 2 cases (case0, case1)" in res.stderr, res.stderr


def test_a_photographs_map_with_nan_is_refused_naming_it(tmp_path):
    import tifffile
    from PIL import Image

    with one_torch_thread():
        models = make_model_set(tmp_path / "set", n_members=1, image_channels=3,
                                preprocessing={"modality": "rgb", "image_size": 32})
        photos = tmp_path / "in"
        photos.mkdir()
        rng = np.random.default_rng(0)
        for k in range(2):
            Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(photos / f"eye{k}.png")
            mask = np.zeros((40, 40), np.uint8)
            mask[10:20, 15:25] = 255
            Image.fromarray(mask).save(photos / f"eye{k}_mask.png")
        out = tmp_path / "out"
        res = CliRunner().invoke(infer_main, [str(photos), "-o", str(out), "--models", str(models), *FAST],
                                 catch_exceptions=False)
    assert res.exit_code == 0, res.output + res.stderr
    amap = tifffile.imread(out / "maps" / "eye0.tiff")
    amap[5:10, 5:10] = np.nan
    tifffile.imwrite(out / "maps" / "eye0.tiff", amap)
    restamp_output(out, "eye0", "map")
    res = _eval(out, "--masks", "{dir}/{stem}_mask.png", "--no-overlays")
    assert res.exit_code == 1 and f"NOT EVALUATED eye0: {out / 'maps' / 'eye0.tiff'}: holds 25 NaN/Inf values" \
        in res.stderr, res.stderr


def test_a_binary_mask_stored_as_0_255_is_warned_about_in_the_benchmark_and_label_values_makes_it_0_1(run, tmp_path):
    """The benchmark resamples label values before '> 0.4' (the reference's rule): a 0/255 mask spreads
    (metrics audit: 4x the lesion pixels) without a word. condiff-eval warns, naming --label-values 255,
    which scores it exactly as the 0/1 mask; a 0/1 mask and a multi-class map are not warned about."""
    import nibabel as nib

    scans, out = run
    for k in range(3):
        img = nib.load(str(scans / f"case{k}_seg.nii.gz"))
        coded = (np.asarray(img.dataobj) > 0).astype(np.float32) * 255
        nib.save(nib.Nifti1Image(coded, img.affine), str(tmp_path / f"case{k}_m255.nii.gz"))
    pattern = str(tmp_path / "{stem}_m255.nii.gz")

    def positives(*extra):
        res = _eval(out, "--masks", *extra, "--protocol", "benchmark", "--no-overlays")
        assert res.exit_code == 0, res.output + res.stderr
        return json.loads((out / "metrics-benchmark.json").read_text())["counts"]["positive_pixels"], res.stderr

    plain, plain_err = positives(SEG)
    spread, spread_err = positives(pattern)
    chosen, chosen_err = positives(pattern, "--label-values", "255")
    assert spread >= plain and chosen == plain  # these volumes are not resampled (the model's grid): equal here
    assert "3 label file(s) hold a single lesion value other than 1" in spread_err
    assert "--label-values 255" in spread_err
    assert "single lesion value" not in plain_err + chosen_err
