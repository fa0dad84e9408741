"""condiff-infer end to end: layout, geometry, records, failures and the exit codes of DESIGN §6."""
import csv
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from condiff.engine import overlay
from _infer_helpers import (FAST, PREPROCESSING, one_torch_thread, brain_like, make_model_set, make_scans, write_nifti,
                            invoke_infer)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_set(tmp_path_factory):
    return make_model_set(tmp_path_factory.mktemp("models") / "set", n_members=2)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


_invoke = invoke_infer


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_infer_writes_layout_geometry_and_records(tmp_path, model_set):
    scans = tmp_path / "scans"
    make_scans(scans / "site-a", n=1, with_masks=True)  # + case0_seg.nii.gz: left out, and said so
    # an oblique, non-RAS grid with different qform/sform codes, stored as int16 with scaling
    img, _ = brain_like(shape=(18, 20, 3), seed=5)
    aff = np.array([[0.0, -2.0, 0.1, 30.0], [2.1, 0.0, 0.0, -25.0], [0.0, 0.2, 2.5, 4.0], [0, 0, 0, 1]])
    write_nifti(scans / "site-b" / "oblique.nii", np.round(img * 10), affine=aff, qcode=2, scode=4, dtype=np.int16)
    out = tmp_path / "out"
    res = _invoke([scans, "-o", out, "--models", model_set, *FAST, "--members", "1"])
    assert res.exit_code == 0, res.output + res.stderr
    assert "2 done" in res.stdout
    assert "1 file(s) beside the scans skipped as masks or label maps" in res.stdout
    run = json.loads((out / "run.json").read_text())
    excluded = run["excluded_inputs"]
    assert "DEFAULT_EXCLUDE" not in run["arguments"] and run["arguments"]["steps"] == int(FAST[FAST.index("--steps") + 1])
    assert excluded == [(scans / "site-a" / "case0_seg.nii.gz").as_posix()]

    import nibabel as nib

    for case, ext in [("site-a/case0", ".nii.gz"), ("site-b/oblique", ".nii")]:
        src_path = next(scans.rglob(f"{Path(case).name}{ext}"))
        src = nib.load(str(src_path))
        for folder in ("maps", "restorations"):
            path = out / folder / f"{case}{ext}"
            assert path.is_file(), path
            if ext == ".nii.gz":
                assert path.read_bytes()[:2] == b"\x1f\x8b"
                assert gzip.decompress(path.read_bytes())  # mtime 0 is checked by byte identity in test_resume
            else:
                assert path.read_bytes()[:2] != b"\x1f\x8b"
            got = nib.load(str(path))
            assert got.shape == src.shape
            np.testing.assert_array_equal(got.affine, src.affine)
            for form in ("qform", "sform"):
                m_src, code_src = getattr(src.header, f"get_{form}")(coded=True)
                m_got, code_got = getattr(got.header, f"get_{form}")(coded=True)
                assert int(code_got) == int(code_src)
                np.testing.assert_allclose(m_got, m_src, rtol=0, atol=1e-6)
            assert got.get_data_dtype() == np.float32
            assert (got.dataobj.slope, got.dataobj.inter) == (1.0, 0.0)  # stored unscaled float32
            np.testing.assert_array_equal(got.header.get_zooms(), src.header.get_zooms())
        amap = nib.load(str(out / "maps" / f"{case}{ext}")).get_fdata()
        assert np.isfinite(amap).all() and amap.min() >= 0 and amap.max() > 0
        if ext == ".nii.gz":  # an exact grid (1 voxel = 1 pixel): background zeroed voxel for voxel
            assert (amap[np.asarray(src.dataobj) == 0] == 0).all()
        from PIL import Image

        with Image.open(out / "overlays" / f"{case}.png") as im:
            band = overlay.LABEL_BAND  # case and colour-bar bands, a title band, a name band above each row
            assert im.mode == "RGB" and im.size == (4 * 128, 3 * 128 + 4 * band + band + overlay.BAR_BAND)  # input | restoration | map
            # | map on input, each 32-px panel enlarged 4x
        rec = json.loads((out / "records" / f"{case}.json").read_text())
        assert rec["status"] == "ok" and rec["members"] == [0]
        assert rec["input_sha256"] == hashlib.sha256(src_path.read_bytes()).hexdigest()
        for entry in rec["outputs"].values():
            assert hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
        assert rec["n_slices"] == len(rec["slice_scores"]) and rec["max_slice_score"] >= rec["score"] > 0

    rows = _rows(out / "cases.csv")
    assert [(r["case"], r["status"]) for r in rows] == [("site-a/case0", "ok"), ("site-b/oblique", "ok")]
    assert rows[1]["orientation"] == "".join(nib.aff2axcodes(aff))
    scores = _rows(out / "scores.csv")
    assert scores[0]["slice"] == "" and float(scores[0]["score"]) == pytest.approx(float(rows[0]["score"]))
    run = json.loads((out / "run.json").read_text())
    assert run["interrupted"] is False and run["counts"]["ok"] == 2
    assert run["throughput"]["slices_per_s"] > 0 and run["throughput"]["unet_evaluations_per_s"] > 0
    assert run["model_set"]["digest"] == rec["model_set_digest"] and run["versions"]["torch"]
    assert not (out / ".condiff.lock").exists()
    assert "case site-a/case0 done" in (out / "condiff.log").read_text()


def test_scores_csv_numbers_slices_as_the_input_file_does(tmp_path, model_set):
    """A slab stored inferior-first along axis 1 with its first four stored slices empty: the table must
    list the stored slices 4..11 that hold tissue (the model's own, canonical order would say 0..7)."""
    img, _ = brain_like(shape=(20, 22, 12), seed=3)
    data = np.ascontiguousarray(np.transpose(img, (0, 2, 1))[:, ::-1, :])  # stored axis 1 runs superior -> inferior
    data[:, :4, :] = 0
    aff = np.array([[2.0, 0, 0, -20.0], [0, 0, 2.0, -22.0], [0, -3.0, 0, 18.0], [0, 0, 0, 1]])
    write_nifti(tmp_path / "scans" / "flipped.nii.gz", data, affine=aff)
    out = tmp_path / "out"
    res = _invoke([tmp_path / "scans", "-o", out, "--models", model_set, *FAST, "--members", "1"])
    assert res.exit_code == 0, res.output + res.stderr
    import nibabel as nib

    assert nib.aff2axcodes(aff)[1] == "I"
    with_tissue = [k for k in range(data.shape[1]) if data[:, k, :].any()]
    rows = [r for r in _rows(out / "scores.csv") if r["slice"] != ""]
    assert {r["axis"] for r in rows} == {"1"}
    assert sorted(int(r["slice"]) for r in rows) == with_tissue == list(range(4, 12))
    rec = json.loads((out / "records" / "flipped.json").read_text())
    by_slice = {int(r["slice"]): float(r["score"]) for r in rows}
    # the record keeps the canonical (inferior-to-superior) index: canonical k is stored slice 11 - k
    assert {11 - k: s for k, s in rec["slice_scores"]} == pytest.approx(by_slice, rel=1e-6)
    names = overlay.input_slice_names(rec["geometry"])
    assert names == [f"slice {11 - k} of axis 1" for k, _ in rec["slice_scores"]]

def test_real_ixi_slab_with_brain_mask(tmp_path, model_set):
    scan = REPO / "examples" / "scans" / "ixi132_t1.nii.gz"  # tracked in git: missing is a failure, not a skip
    out = tmp_path / "out"
    res = _invoke([scan, "-o", out, "--models", model_set, *FAST, "--members", "1",
                   "--mask", "{dir}/{stem}_brainmask.nii.gz"])
    assert res.exit_code == 0, res.output + res.stderr
    import nibabel as nib

    src, amap = nib.load(str(scan)), nib.load(str(out / "maps" / "ixi132_t1.nii.gz"))
    assert amap.shape == src.shape
    np.testing.assert_array_equal(amap.affine, src.affine)
    brain = np.asarray(nib.load(str(scan.with_name("ixi132_t1_brainmask.nii.gz"))).dataobj) > 0
    data = amap.get_fdata()
    assert (data[~brain] == 0).all() and data[brain].max() > 0  # zeroed outside the brain mask
    rec = json.loads((out / "records" / "ixi132_t1.json").read_text())
    assert rec["mask"].endswith("ixi132_t1_brainmask.nii.gz") and rec["mask_sha256"]


def test_a_set_with_landmarks_standardises_the_input_and_restores_in_input_units(tmp_path):
    import nibabel as nib

    from condiff.io.volumes import read_mask, read_volume
    from condiff.preprocess import LANDMARK_PERCENTILES, PreprocessConfig, prepare_volume

    scan = REPO / "examples" / "scans" / "ixi132_t1.nii.gz"  # tracked in git: missing is a failure, not a skip
    # Landmarks far from this scan's own, so the standardised input must differ visibly from the plain one.
    marks = list(np.linspace(0.02, 0.7, len(LANDMARK_PERCENTILES)))
    pre = {"modality": "mri", "image_size": 32, "fov_mm": 192.0, "normalisation": "percentile", "use_mask": True}
    outs = {}
    for name, extra in (("plain", {}), ("landmarks", {"landmarks": marks})):
        models = make_model_set(tmp_path / f"set-{name}", n_members=1, preprocessing={**pre, **extra})
        outs[name] = tmp_path / name
        res = _invoke([scan, "-o", outs[name], "--models", models, *FAST, "--save-model-space",
                       "--mask", "{dir}/{stem}_brainmask.nii.gz"])
        assert res.exit_code == 0, res.output + res.stderr
    vol = read_volume(scan)
    mask = read_mask(scan.with_name("ixi132_t1_brainmask.nii.gz"), vol)
    expect = prepare_volume(vol, PreprocessConfig.from_dict({**pre, "landmarks": marks}), mask).slices
    seen = {k: np.load(o / "model_space" / "ixi132_t1.npz")["slices"] for k, o in outs.items()}
    np.testing.assert_allclose(seen["landmarks"], expect, atol=1e-6)  # the engine applied the set's contract
    assert np.abs(seen["landmarks"] - seen["plain"]).max() > 0.1
    # The record's geometry (JSON) carries the landmark map, and undoing it brings the model-space input back to
    # the scan's own units (what the writer does to a restoration): within resampling blur of the scan.
    from condiff.preprocess import invert_to_input, to_input_units

    rec = json.loads((outs["landmarks"] / "records" / "ixi132_t1.json").read_text())
    assert rec["geometry"]["intensity"]["landmarks_to"] == pytest.approx(marks)
    back = invert_to_input(rec["geometry"], to_input_units(rec["geometry"], seen["landmarks"][:, 0]))
    src = np.asarray(vol.data, np.float64)
    inner = mask & (src > 0)
    assert np.median(np.abs(back[inner] - src[inner]) / src[inner]) < 0.15
    assert nib.load(str(outs["landmarks"] / "restorations" / "ixi132_t1.nii.gz")).shape == src.shape


def test_photographs_get_float_tiff_maps_and_png_previews(tmp_path):
    from PIL import Image

    models = make_model_set(tmp_path / "rgb-set", n_members=1, image_channels=3,
                            preprocessing={"modality": "rgb", "image_size": 32})
    rng = np.random.default_rng(0)
    photo = (rng.random((40, 52, 3)) * 255).astype(np.uint8)
    (tmp_path / "in").mkdir()
    Image.fromarray(photo).save(tmp_path / "in" / "eye.png")
    out = tmp_path / "out"
    res = _invoke([tmp_path / "in", "-o", out, "--models", models, *FAST])
    assert res.exit_code == 0, res.output + res.stderr
    import tifffile

    amap = tifffile.imread(out / "maps" / "eye.tiff")
    assert amap.dtype == np.float32 and amap.shape == (40, 52) and np.isfinite(amap).all() and amap.max() > 0
    rest = tifffile.imread(out / "restorations" / "eye.tiff")
    assert rest.shape == (40, 52, 3) and 0 <= rest.min() and rest.max() <= 1
    with Image.open(out / "maps" / "eye.png") as im:
        assert im.size == (52, 40) and im.mode == "L"
    # not square: the contract's centre crop (Resize(32) + CenterCrop(32): 32/41 of the 52 columns) is all the
    # model saw, and the record says so
    rec = json.loads((out / "records" / "eye.json").read_text())
    import re

    note = next(w for w in rec["warnings"] if w.startswith("not square"))
    height, width, c0, c1 = (int(v) for v in re.search(r"central (\d+)x(\d+) px \(rows x columns.*columns (\d+)-(\d+)",
                                                       note).groups())
    assert height == 40 and width == c1 - c0 + 1 and abs(width - 32 / 41 * 52) < 1
    assert not amap[:, :c0 - 1].any() and not amap[:, c1 + 2:].any() and amap[:, c0 + 1:c1].any()
    with Image.open(out / "overlays" / "eye.png") as im:
        # one image: one row of 4 panels (32 px enlarged 4x) under case, colour-bar, title and name bands
        assert im.size == (4 * 128, 128 + 3 * overlay.LABEL_BAND + overlay.BAR_BAND)
    # an MRI volume given to a photo model fails alone, with a reason
    make_scans(tmp_path / "in", n=1)
    res = _invoke([tmp_path / "in", "-o", out, "--models", models, *FAST])
    assert res.exit_code == 1 and "RGB photographs" in res.stderr


def test_a_photos_field_of_view_mask_zeroes_its_map_outside_and_bounds_what_eval_scores(tmp_path):
    """A retina mask given with --mask was silently ignored for photos (the black border's map values,
    often the highest, counted as false positives). Now: the map is 0 outside it on the photo's grid, the
    same inside (away from its edge) as without it, and condiff-eval scores only the masked pixels."""
    import tifffile
    from click.testing import CliRunner
    from PIL import Image
    from scipy import ndimage
    from sklearn.metrics import average_precision_score

    from condiff.engine.cli import eval_main
    from condiff.preprocess import analysed_box

    models = make_model_set(tmp_path / "rgb-set", n_members=1, image_channels=3,
                            preprocessing={"modality": "rgb", "image_size": 32})
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :52]
    retina = (yy - 20) ** 2 + (xx - 26) ** 2 <= 18 ** 2
    photo = (rng.random((40, 52, 3)) * 255 * retina[..., None]).astype(np.uint8)
    lesion = np.zeros((40, 52), bool)
    lesion[15:20, 20:25] = True
    (tmp_path / "in").mkdir()
    Image.fromarray(photo).save(tmp_path / "in" / "eye.png")
    Image.fromarray((retina * 255).astype(np.uint8)).save(tmp_path / "in" / "eye_mask.png")
    Image.fromarray((lesion * 255).astype(np.uint8)).save(tmp_path / "in" / "eye_EX.png")
    masked, whole = tmp_path / "masked", tmp_path / "whole"
    res = _invoke([tmp_path / "in", "-o", masked, "--models", models, *FAST, "--mask", "{dir}/{stem}_mask.png"])
    assert res.exit_code == 0, res.output + res.stderr
    assert _invoke([tmp_path / "in", "-o", whole, "--models", models, *FAST]).exit_code == 0
    a, b = tifffile.imread(masked / "maps" / "eye.tiff"), tifffile.imread(whole / "maps" / "eye.tiff")
    assert not a[~retina].any() and b[~retina].max() > 0
    inner = ndimage.binary_erosion(retina, iterations=3)
    np.testing.assert_array_equal(a[inner], b[inner])
    rec = json.loads((masked / "records" / "eye.json").read_text())
    assert rec["mask"] == str(tmp_path / "in" / "eye_mask.png") and rec["mask_sha256"]
    assert 0 < rec["score"] < json.loads((whole / "records" / "eye.json").read_text())["score"]

    res = CliRunner().invoke(eval_main, [str(masked), "--masks", "{dir}/{stem}_EX.png", "--no-overlays"])
    assert res.exit_code == 0, res.output
    doc = json.loads((masked / "metrics-native.json").read_text())
    r0, r1, c0, c1 = analysed_box(rec["geometry"])
    sel = np.zeros_like(retina)
    sel[r0:r1, c0:c1] = True
    sel &= retina
    row = next(r for r in doc["rows"] if r["row"] == "ensemble")
    assert doc["per_case"][0]["pixels"] == int(sel.sum())
    assert row["ap_pixel"] == pytest.approx(average_precision_score(lesion[sel], a[sel]), abs=1e-12)

    # a mask edited after inference would change the scored pixels: not evaluated, named
    Image.fromarray((ndimage.binary_dilation(retina, iterations=2) * 255).astype(np.uint8)).save(
        tmp_path / "in" / "eye_mask.png")
    res = CliRunner().invoke(eval_main, [str(masked), "--masks", "{dir}/{stem}_EX.png", "--no-overlays"])
    assert res.exit_code == 1 and "eye_mask.png: changed since case eye's map was made with it" in res.output
    # a dry run names a missing mask; a mask on another grid, or one with no pixel where the model looks,
    # fails its case naming the mask
    res = _invoke([tmp_path / "in", "-o", tmp_path / "o1", "--models", models, *FAST, "--mask", "{dir}/{stem}_fov.png",
                   "--dry-run"])
    assert res.exit_code == 1 and "eye_fov.png" in res.output + res.stderr, res.output + res.stderr
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "in" / "eye_mask.png")
    res = _invoke([tmp_path / "in", "-o", tmp_path / "o2", "--models", models, *FAST, "--mask", "{dir}/{stem}_mask.png"])
    assert res.exit_code == 1 and "eye_mask.png: mask shape (8, 8) differs from the photo's (40, 52)" in res.stderr
    Image.fromarray(np.zeros((40, 52), np.uint8)).save(tmp_path / "in" / "eye_mask.png")
    res = _invoke([tmp_path / "in", "-o", tmp_path / "o3", "--models", models, *FAST, "--mask", "{dir}/{stem}_mask.png"])
    assert res.exit_code == 1 and "eye_mask.png: has no pixel inside the part of the photo the model sees" in res.stderr


def test_broken_inputs_fail_alone_with_exit_1(tmp_path, model_set):
    scans = tmp_path / "scans"
    make_scans(scans, n=1)
    good = (scans / "case0.nii.gz").read_bytes()
    (scans / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    img, _ = brain_like(seed=3)
    img[2, 3, 1] = np.nan
    write_nifti(scans / "nans.nii.gz", img)
    out = tmp_path / "out"
    res = _invoke([scans, "-o", out, "--models", model_set, *FAST, "--members", "1"])
    assert res.exit_code == 1, res.output + res.stderr
    rows = {r["case"]: r for r in _rows(out / "cases.csv")}
    assert rows["case0"]["status"] == "ok"
    assert rows["truncated"]["status"] == "failed" and "truncated.nii.gz" in rows["truncated"]["error"]
    assert rows["truncated"]["error_type"] == "InputImageError"
    assert rows["nans"]["status"] == "failed" and "NaN" in rows["nans"]["error"]
    assert "FAILED truncated" in res.stderr and "FAILED nans" in res.stderr
    assert "Traceback" not in res.stderr
    assert (out / "maps" / "case0.nii.gz").is_file()
    assert not (out / "maps" / "truncated.nii.gz").exists() and not (out / "overlays" / "nans.png").exists()
    assert not list(out.rglob("*.tmp"))
    # --nan-policy zero accepts the NaN volume; the truncated one still fails; case0 has no NaN, so the
    # policy does not touch its bytes and it is not recomputed
    res = _invoke([scans, "-o", out, "--models", model_set, *FAST, "--members", "1", "--nan-policy", "zero"])
    rows = {r["case"]: r for r in _rows(out / "cases.csv")}
    assert res.exit_code == 1 and rows["nans"]["status"] == "ok" and rows["truncated"]["status"] == "failed"
    assert "1 done, 1 already done, 1 failed" in res.stdout, res.stdout
    assert json.loads((out / "records" / "nans.json").read_text())["nonfinite_voxels"] == 1
    assert json.loads((out / "records" / "case0.json").read_text())["nonfinite_voxels"] == 0
    # back to the default policy: the NaN volume's result no longer holds (recomputed, and refused)
    res = _invoke([scans, "-o", out, "--models", model_set, *FAST, "--members", "1"])
    assert "0 done, 1 already done, 2 failed" in res.stdout, res.stdout


def _no_model_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    # the backend first: importing it binds condiff.modelset.load_model, which must still be the real one
    # for monkeypatch.undo() to restore it
    monkeypatch.setattr("condiff.engine.backends.torch_backend.load_model", refuse)
    monkeypatch.setattr("condiff.modelset.load_model", refuse)


def test_colliding_names_exit_2_before_work(tmp_path, model_set, monkeypatch):
    _no_model_loading(monkeypatch)
    img, _ = brain_like()
    write_nifti(tmp_path / "in" / "a.nii", img)
    write_nifti(tmp_path / "in" / "a.nii.gz", img)
    res = _invoke([tmp_path / "in", "-o", tmp_path / "out", "--models", model_set, *FAST])
    assert res.exit_code == 2
    assert "a.nii" in res.stderr and "same outputs" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_output_inside_input_exit_2(tmp_path, model_set, monkeypatch):
    _no_model_loading(monkeypatch)
    make_scans(tmp_path / "in", n=1)
    res = _invoke([tmp_path / "in", "-o", tmp_path / "in" / "out", "--models", model_set, *FAST])
    assert res.exit_code == 2 and "inside the input folder" in res.stderr
    assert not (tmp_path / "in" / "out").exists()


def test_lock_file_present_exit_2(tmp_path, model_set, monkeypatch):
    _no_model_loading(monkeypatch)
    make_scans(tmp_path / "in", n=1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".condiff.lock").write_text("host elsewhere pid 1\n")
    res = _invoke([tmp_path / "in", "-o", tmp_path / "out", "--models", model_set, *FAST])
    assert res.exit_code == 2 and "locked" in res.stderr and "pid 1" in res.stderr
    assert (tmp_path / "out" / ".condiff.lock").read_text() == "host elsewhere pid 1\n"  # not ours to remove
    assert not (tmp_path / "out" / "records").exists()


@pytest.mark.parametrize("held,ours,clash", [
    ("", "1/2", True),          # a whole-folder run holds it: no shard may start
    (".0-of-2", None, True),    # a shard runs: no whole-folder run (its orphan cleanup would hit the shard's files)
    (".0-of-2", "0/3", True),   # shards of another split overlap this one's cases
    (".0-of-2", "1/2", False),  # the other shard of the same split: disjoint cases, side by side
])
def test_whole_folder_and_shard_locks_exclude_overlapping_runs(tmp_path, held, ours, clash):
    import os
    import socket

    from condiff.engine.plan import parse_shard
    from condiff.engine.writer import OutputLock
    from condiff.errors import OutputConflictError

    live = f"host {socket.gethostname()} pid {os.getppid()}\n"  # a live process of this host
    (tmp_path / f".condiff.lock{held}").write_text(live)
    lock = OutputLock(tmp_path, None if ours is None else parse_shard(ours))
    if clash:
        with pytest.raises(OutputConflictError, match=f"lock{held}"):
            lock.check()
        with pytest.raises(OutputConflictError, match="overlap"):
            lock.acquire()
        assert not lock.path.exists() or lock.path.name == f".condiff.lock{held}"  # ours released again
    else:
        lock.check()
        with lock:
            assert lock.path.is_file()
        assert not lock.path.exists()
    assert (tmp_path / f".condiff.lock{held}").read_text() == live  # the other run's lock is never touched


def test_stale_shard_lock_does_not_block_a_whole_folder_run(tmp_path):
    import socket
    import subprocess
    import sys

    from condiff.engine.writer import OutputLock

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".condiff.lock.1-of-2").write_text(f"host {socket.gethostname()} pid {int(gone.stdout)}\n")
    with OutputLock(tmp_path) as lock:
        assert lock.held


def test_shard_refused_while_a_whole_folder_run_holds_the_folder(tmp_path, model_set, monkeypatch):
    import os
    import socket

    _no_model_loading(monkeypatch)
    make_scans(tmp_path / "in", n=1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".condiff.lock").write_text(f"host {socket.gethostname()} pid {os.getppid()}\n")
    res = _invoke([tmp_path / "in", "-o", tmp_path / "out", "--models", model_set, *FAST, "--shard", "0/2"])
    assert res.exit_code == 2 and "whole-folder run" in res.stderr, res.output + res.stderr
    assert not (tmp_path / "out" / "records").exists()


def test_configuration_errors_exit_2(tmp_path, model_set, monkeypatch):
    make_scans(tmp_path / "in", n=1)
    base = [tmp_path / "in", "-o", tmp_path / "out", "--models", model_set, *FAST]
    res = _invoke([*base, "--members", "0,5"])
    assert res.exit_code == 2 and "--members" in res.stderr
    res = _invoke([tmp_path / "in", "-o", tmp_path / "out", "--models", tmp_path / "nowhere", *FAST])
    assert res.exit_code == 2 and "nowhere" in res.stderr
    res = _invoke([tmp_path / "missing", "-o", tmp_path / "out", "--models", model_set, *FAST])
    assert res.exit_code == 2 and "missing" in res.stderr
    res = _invoke([*base, "--shard", "3/2"])
    assert res.exit_code == 2
    import torch

    if not torch.cuda.is_available():
        res = _invoke([*base, "--device", "cuda"])
        assert res.exit_code == 2 and "CUDA is not available" in res.stderr
    # the bundled demo model set does not exist yet: the default --models must say so
    monkeypatch.setattr("condiff.engine.cli.bundled", lambda name: None if name == "models" else tmp_path / "in")
    res = _invoke([tmp_path / "in", "-o", tmp_path / "out", *FAST])
    assert res.exit_code == 2 and "bundled demo model set" in res.stderr
    assert not (tmp_path / "out").exists()
    # -v shows the traceback
    res = _invoke([*base, "--members", "0,5", "-v"])
    assert res.exit_code == 2 and "Traceback" in res.stderr


def test_dry_run_loads_no_model_and_lists_outputs(tmp_path, model_set, monkeypatch):
    _no_model_loading(monkeypatch)
    make_scans(tmp_path / "in", n=2)
    (tmp_path / "in" / "empty.nii.gz").write_bytes(b"")
    shutil.copy(tmp_path / "in" / "case1.nii.gz", tmp_path / "in" / "case9_seg.nii.gz")
    shutil.copy(tmp_path / "in" / "case1.nii.gz", tmp_path / "in" / "case1_segmented.nii.gz")
    out = tmp_path / "out"
    res = _invoke([tmp_path / "in", "-o", out, "--models", model_set, *FAST, "--save-model-space", "--dry-run"])
    assert res.exit_code == 1, res.output + res.stderr  # one invalid input
    for rel in ("maps/case0.nii.gz", "restorations/case1.nii.gz", "overlays/case0.png", "model_space/case1.npz",
                "records/case0.json"):
        assert rel in res.stdout
    assert "invalid  empty" in res.stdout and "no model was loaded" in res.stdout
    # the label map beside the scans is named as left out, and a scan whose name only starts like one is kept
    assert f"excluded {tmp_path / 'in' / 'case9_seg.nii.gz'}" in res.stdout and "1 file(s) excluded" in res.stdout
    assert "maps/case1_segmented.nii.gz" in res.stdout
    assert "INVALID empty" in res.stderr  # stdout may be a file: errors also go to stderr
    assert not out.exists()
    from condiff.engine import cli
    monkeypatch.setattr(cli, "_one_screen", lambda: True)  # both on one terminal: said once, on stdout
    res = _invoke([tmp_path / "in", "-o", out, "--models", model_set, *FAST, "--dry-run"])
    assert res.exit_code == 1 and "invalid  empty" in res.stdout and "INVALID" not in res.stderr
    monkeypatch.undo()
    _no_model_loading(monkeypatch)
    (tmp_path / "in" / "empty.nii.gz").unlink()
    res = _invoke([tmp_path / "in", "-o", out, "--models", model_set, *FAST, "--no-restoration", "--dry-run"])
    assert res.exit_code == 0 and "maps/case0.nii.gz" in res.stdout and "restorations/" not in res.stdout
    assert "model_space/" not in res.stdout


def test_dry_run_refuses_an_output_the_run_would_refuse(tmp_path, model_set, monkeypatch):
    """--dry-run said 'valid' (exit 0) for an -o the run then refused (exit 2): under a file, and where
    only mkdir finds out (as root every folder looks writable; here a failing mkdir stands in)."""
    import tempfile

    _no_model_loading(monkeypatch)
    make_scans(tmp_path / "in", n=1)
    (tmp_path / "afile").write_text("x")
    args = [tmp_path / "in", "--models", model_set, *FAST, "--dry-run"]
    res = _invoke([*args, "-o", tmp_path / "afile" / "out"])
    assert res.exit_code == 2 and "afile" in res.stderr and "is not a folder" in res.stderr, res.output + res.stderr

    def refused(*a, **k):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    res = _invoke([*args, "-o", tmp_path / "new" / "out"])
    assert res.exit_code == 2 and "Operation not permitted" in res.stderr and str(tmp_path / "new" / "out") in res.stderr
    monkeypatch.undo()
    _no_model_loading(monkeypatch)
    res = _invoke([*args, "-o", tmp_path / "new" / "out"])  # a creatable folder: valid, and nothing is left
    assert res.exit_code == 0, res.output + res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "in"]


def test_dry_run_reads_like_the_run_and_names_what_it_would_fail(tmp_path, model_set, monkeypatch):
    """Broken data behind a valid header (cut-off gzip data, NaN voxels, a brain mask on another grid) are
    named by --dry-run, with the run's own messages, and a later run fails exactly those cases."""
    import gzip

    import nibabel as nib

    _no_model_loading(monkeypatch)
    scans = tmp_path / "in"
    make_scans(scans, n=4)
    raw = gzip.decompress((scans / "case0.nii.gz").read_bytes())
    (scans / "case0.nii.gz").write_bytes(gzip.compress(raw[:len(raw) - 200]))  # a valid gzip of a cut NIfTI
    img = nib.load(str(scans / "case1.nii.gz"))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[3, 3, 1] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(scans / "case1.nii.gz"))
    write_nifti(scans / "case2_brainmask.nii.gz", np.ones((7, 7, 3), dtype=np.uint8))
    out = tmp_path / "out"
    args = [scans, "-o", out, "--models", model_set, *FAST]
    assert nib.load(str(scans / "case0.nii.gz")).shape  # a header-only check would call it valid
    res = _invoke([*args, "--dry-run"])
    assert res.exit_code == 1, res.output + res.stderr
    invalid = {line.split()[1].rstrip(":"): line for line in res.stdout.splitlines() if line.startswith("  invalid")}
    assert set(invalid) == {"case0", "case1", "case2"}, res.stdout
    assert "truncated" in invalid["case0"] and "NaN" in invalid["case1"] and "case2_brainmask" in invalid["case2"]
    assert "3 case(s) valid" not in res.stdout and "1 case(s) valid, 3 invalid" in res.stdout
    monkeypatch.undo()
    with one_torch_thread():
        run = _invoke(args)
    assert run.exit_code == 1
    rows = {r["case"]: r for r in csv.DictReader((out / "cases.csv").open())}
    assert [c for c, r in sorted(rows.items()) if r["status"] == "failed"] == ["case0", "case1", "case2"]


def test_subprocess_run_exit_code(tmp_path, model_set):
    make_scans(tmp_path / "in", n=1)
    exe = shutil.which("condiff-infer")
    cmd = [exe] if exe else [sys.executable, "-c", "from condiff.engine.cli import infer_main; infer_main()"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--models", str(model_set),
                           "--sampler", "ddim", "--steps", "2", "--members", "1", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "1 done" in proc.stdout
    assert "slice/s" not in proc.stderr  # stderr is not a terminal: no progress bar
    assert (tmp_path / "out" / "maps" / "case0.nii.gz").is_file()


def test_version_reports_environment():
    res = _invoke(["--version"])
    assert res.exit_code == 0
    for word in ("condiff 0.1.0", "torch", "cuda_available", "gpus", "onnxruntime", "tensorrt"):
        assert word in res.stdout


def test_version_says_whether_fp32_may_run_on_tf32(monkeypatch):
    """--precision fp32 on a GPU lets cuDNN use TF32 unless told otherwise: the report (and run.json) says so."""
    import torch

    from condiff.cli_common import environment_report

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")
    assert environment_report()["tf32"] == "convolutions off, matmuls off (NVIDIA_TF32_OVERRIDE=0)"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE")
    assert environment_report()["tf32"].startswith("convolutions allowed")
    assert "tf32" in _invoke(["--version"]).stdout


def test_version_reports_the_nvidia_driver_and_readable_formats(tmp_path):
    from condiff.cli_common import _nvidia_driver, environment_report
    from condiff.config import SCHEMA as MODEL_SCHEMA
    from condiff.modelset import SET_SCHEMA

    proprietary = tmp_path / "a"
    proprietary.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\n"
                           "GCC version:  gcc version 12.2.0\n")
    open_module = tmp_path / "b"
    open_module.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder@U16)\n")
    assert _nvidia_driver(proprietary) == "550.54.14"
    assert _nvidia_driver(open_module) == "580.65.06"
    assert _nvidia_driver(tmp_path / "missing") is None
    report = environment_report()
    assert SET_SCHEMA in report["formats"] and MODEL_SCHEMA in report["formats"]
    import torch

    from _infer_helpers import one_torch_thread
    with one_torch_thread():  # how many CPU slices run side by side: run.json says it
        assert environment_report()["torch_threads"] == 1 == torch.get_num_threads()
    out = _invoke(["--version"]).stdout
    assert "nvidia_driver" in out and "formats" in out and SET_SCHEMA in out


def test_version_says_which_ort_providers_load(monkeypatch):
    """B.8: onnxruntime-gpu offers CUDA and TensorRT where their libraries are missing; --version opens a
    session on each and reports the ones that fall back or fail, not just what is on offer."""
    import types

    import onnxruntime

    from condiff.cli_common import environment_report, probe_ort_providers

    usable, unusable = probe_ort_providers(onnxruntime)  # the real CPU build: its CPU provider loads
    assert "CPUExecutionProvider" in usable and not any(u.startswith("CPUExecutionProvider") for u in unusable)

    class Session:
        def __init__(self, graph, options, providers):
            assert isinstance(graph, bytes) and graph  # a serialised ONNX model, really parsed below
            onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
            (self.name,) = providers
            if self.name == "TensorrtExecutionProvider":
                raise RuntimeError("libnvinfer.so.10: cannot open shared object file\nmore detail")

        def get_providers(self):  # CUDA falls back to the CPU as ORT does when libcudnn is missing
            return ["CPUExecutionProvider"] if self.name == "CUDAExecutionProvider" else [self.name]

    fake = types.SimpleNamespace(
        __version__="1.99.0", SessionOptions=onnxruntime.SessionOptions, InferenceSession=Session,
        get_available_providers=lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    report = environment_report(probe_providers=True)
    assert report["onnxruntime_usable"] == ["CPUExecutionProvider"]
    assert report["onnxruntime_unusable"] == [
        "TensorrtExecutionProvider: libnvinfer.so.10: cannot open shared object file",
        "CUDAExecutionProvider: did not load (the session ran on CPUExecutionProvider)"]
    assert "onnxruntime_usable" not in environment_report()  # run.json does not pay for the probe
    out = _invoke(["--version"]).stdout
    assert "onnxruntime_unusable   TensorrtExecutionProvider: libnvinfer" in out


def test_what_was_done_to_an_input_is_in_its_record_and_cases_csv(tmp_path):
    """EXIF rotation and a dropped alpha channel are recorded per case (B.3/B.7), a clean photo has
    nothing; the EXIF-rotated photo's map comes out in the displayed orientation."""
    import csv

    from PIL import Image

    models = make_model_set(tmp_path / "rgb-set", n_members=1, image_channels=3,
                            preprocessing={"modality": "rgb", "image_size": 32})
    rng = np.random.default_rng(1)
    (tmp_path / "in").mkdir()
    Image.fromarray((rng.random((44, 44, 3)) * 255).astype(np.uint8)).save(tmp_path / "in" / "plain.png")
    Image.fromarray((rng.random((44, 44, 4)) * 255).astype(np.uint8), "RGBA").save(tmp_path / "in" / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated by 90 degrees
    Image.fromarray((rng.random((40, 52, 3)) * 255).astype(np.uint8)).save(tmp_path / "in" / "rotated.jpg", exif=exif)
    out = tmp_path / "out"
    res = _invoke([tmp_path / "in", "-o", out, "--models", models, *FAST])
    assert res.exit_code == 0, res.output + res.stderr
    rows = {r["case"]: r for r in csv.DictReader((out / "cases.csv").open())}
    assert rows["plain"]["warnings"] == ""
    assert rows["alpha"]["warnings"] == "alpha channel dropped (not composited)"
    assert rows["rotated"]["warnings"].startswith("EXIF orientation 6 applied")
    rec = json.loads((out / "records" / "rotated.json").read_text())
    assert rec["warnings"][0].startswith("EXIF orientation 6 applied")  # then: not square, its centre analysed
    assert "; ".join(rec["warnings"]) == rows["rotated"]["warnings"] and rec["warnings"][1].startswith("not square")
    assert "warnings" not in json.loads((out / "records" / "plain.json").read_text())
    import tifffile

    assert tifffile.imread(out / "maps" / "rotated.tiff").shape == (52, 40)  # as displayed


def test_nan_voxels_zeroed_and_a_missing_brain_mask_are_noted_per_case(tmp_path):
    import csv

    # a set trained with brain masks: a scan without a mask file falls back to its own foreground
    models = make_model_set(tmp_path / "masked-set", n_members=1, preprocessing={**PREPROCESSING, "use_mask": True})
    img, brain = brain_like(seed=3)
    img[2, 3, 1] = np.nan
    (tmp_path / "in").mkdir()
    write_nifti(tmp_path / "in" / "nans.nii.gz", img)
    write_nifti(tmp_path / "in" / "masked.nii.gz", img)
    write_nifti(tmp_path / "in" / "masked_brainmask.nii.gz", brain.astype(np.float32))
    out = tmp_path / "out"
    res = _invoke([tmp_path / "in", "-o", out, "--models", models, *FAST, "--nan-policy", "zero"])
    assert res.exit_code == 0, res.output + res.stderr
    rows = {r["case"]: r for r in csv.DictReader((out / "cases.csv").open())}
    assert set(rows) == {"nans", "masked"}
    notes = rows["nans"]["warnings"].split("; ")
    assert notes[0] == "1 NaN/Inf voxels replaced by 0 (--nan-policy zero)"
    assert notes[1].startswith("no brain mask file") and len(notes) == 2
    assert rows["masked"]["warnings"] == "1 NaN/Inf voxels replaced by 0 (--nan-policy zero)"


def test_output_that_is_a_dangling_symlink_is_exit_2_before_any_model_loads(tmp_path, model_set, monkeypatch):
    _no_model_loading(monkeypatch)
    make_scans(tmp_path / "in", n=1)
    (tmp_path / "out").symlink_to(tmp_path / "gone", target_is_directory=True)
    res = _invoke([tmp_path / "in", "-o", tmp_path / "out", "--models", model_set, *FAST])
    assert res.exit_code == 2 and "symbolic link to a missing folder" in res.stderr, res.output + res.stderr


def test_output_folder_that_cannot_be_made_is_exit_2_before_any_model_loads(tmp_path, model_set, monkeypatch):
    _no_model_loading(monkeypatch)
    make_scans(tmp_path / "in", n=1)
    (tmp_path / "afile").write_text("not a folder")
    res = _invoke([tmp_path / "in", "-o", tmp_path / "afile" / "out", "--models", model_set, *FAST])
    assert res.exit_code == 2 and "afile/out" in res.stderr and "cannot create the output folder" in res.stderr
    assert "is not a folder" in res.stderr
    res = _invoke([tmp_path / "in", "-o", tmp_path / "afile", "--models", model_set, *FAST])
    assert res.exit_code == 2 and "is not a folder" in res.stderr
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_too_little_free_space_for_the_outputs_is_warned_before_the_run(tmp_path, model_set, monkeypatch):
    import collections
    import shutil as shutil_mod

    from condiff.engine import writer

    make_scans(tmp_path / "in", n=2)
    need = sum(writer.estimated_output_bytes(p) for p in (tmp_path / "in").glob("*.nii.gz"))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_mod, "disk_usage", lambda p: usage(10**12, 0, int(need) - 1))
    assert "may take about" in writer.free_space_warning(tmp_path / "out" / "deeper", sorted((tmp_path / "in").iterdir()))
    res = _invoke([tmp_path / "in", "-o", tmp_path / "out", "--models", model_set, *FAST, "--members", "1"])
    assert res.exit_code == 0 and "MiB free" in res.stderr and "2 case(s)" in res.stderr  # a warning, not a refusal
    assert "MiB free" in (tmp_path / "out" / "condiff.log").read_text()
    res = _invoke([tmp_path / "in", "-o", tmp_path / "out", "--models", model_set, *FAST, "--members", "1"])
    assert res.exit_code == 0 and "MiB free" not in res.stderr  # resuming: the done cases need no new space
    monkeypatch.setattr(shutil_mod, "disk_usage", lambda p: usage(10**12, 0, int(need) + 1))
    assert writer.free_space_warning(tmp_path / "out", sorted((tmp_path / "in").iterdir())) is None


@pytest.mark.parametrize("suffix,dtype", [(".nii", np.uint8), (".nii.gz", np.uint8), (".nii", np.float32)])
def test_free_space_estimate_covers_what_the_run_writes(tmp_path, model_set, suffix, dtype):
    """The estimate was 4 bytes per input byte: an 8-bit uncompressed scan makes float32 map and
    restoration, 8x its size (a 15-scan run on a 100 MiB disk stopped with no warning). It now comes
    from the header's voxel count, and covers what the run actually writes."""
    import nibabel as nib

    from condiff.engine import writer

    rng = np.random.default_rng(0)
    data = np.zeros((24, 24, 10), dtype=np.float32)
    data[4:20, 4:20, 2:8] = rng.uniform(0.2, 1.0, (16, 16, 6))
    data = (data * 255).astype(dtype) if dtype == np.uint8 else data
    (tmp_path / "in").mkdir()
    scan = tmp_path / "in" / f"scan{suffix}"
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), str(scan))
    with one_torch_thread():
        res = _invoke([tmp_path / "in", "-o", tmp_path / "out", "--models", model_set, *FAST])
    assert res.exit_code == 0, res.output + res.stderr
    written = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != "condiff.log")
    assert writer.estimated_output_bytes(scan) >= written
    volumes = sum(p.stat().st_size for p in (tmp_path / "out").glob("*/scan.nii*"))  # map and restoration
    assert writer.estimated_output_bytes(scan) - writer.OUTPUT_PER_CASE_BYTES >= volumes


def test_volume_index_analyses_one_volume_of_a_series_and_writes_a_3d_map(tmp_path, model_set):
    import nibabel as nib

    img, _ = brain_like(seed=5)
    series = np.stack([img, img * 1.5, img * 0.5], axis=-1).astype(np.float32)
    (tmp_path / "in").mkdir()
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    nib.save(nib.Nifti1Image(series, affine), tmp_path / "in" / "series.nii.gz")
    write_nifti(tmp_path / "in" / "plain.nii.gz", img)
    out = tmp_path / "out"
    res = _invoke([tmp_path / "in", "-o", out, "--models", model_set, *FAST, "--members", "1"])
    assert res.exit_code == 1 and "--volume-index" in res.stderr  # a series fails alone, saying what to do
    # its failed record holds no result, so fixing the command needs no --overwrite; the 3-D case is the
    # same method whatever --volume-index says, so it is neither refused nor recomputed
    res = _invoke([tmp_path / "in", "-o", out, "--models", model_set, *FAST, "--members", "1", "--volume-index", "1"])
    assert res.exit_code == 0, res.output + res.stderr
    assert "1 done, 1 already done" in res.stdout, res.stdout
    from condiff.engine.consistency import check_single_method
    from condiff.engine.writer import load_records

    records = load_records(out)
    assert sorted(r["series_volumes"] for r in records) == [1, 3]
    check_single_method(records, out)  # condiff-eval pools them as one method
    from condiff.engine.evaluate import provenance

    assert records[0]["case"] == "plain" and records[0]["options"].get("volume_index") is None
    assert provenance(records, "{dir}/{stem}_seg.nii.gz", "error")["method"]["volume_index"] == 1  # the series'
    amap = nib.load(str(out / "maps" / "series.nii.gz"))
    assert amap.shape == img.shape and np.allclose(amap.affine, affine)
    rec = json.loads((out / "records" / "series.json").read_text())
    assert rec["options"]["volume_index"] == 1 and rec["shape"] == list(img.shape)
    res = _invoke([tmp_path / "in", "-o", out, "--models", model_set, *FAST, "--members", "1", "--volume-index", "2"])
    assert res.exit_code == 2 and "volume_index 1 (this run: 2)" in res.stderr  # another volume: another method


# ----------------------------------------------------------------------------------------- --members and --shard


@pytest.mark.parametrize("text, n, expected", [
    (None, 3, [0, 1, 2]), ("", 3, [0, 1, 2]), ("1", 3, [0]), ("3", 3, [0, 1, 2]), ("2,", 3, [2]),
    ("2,0", 3, [2, 0]), (" 0, 2 ", 3, [0, 2]),
    ("0", 3, None), ("4", 3, None), ("-1", 3, None), ("0,0", 3, None), ("2,1,2", 3, None), ("3,", 3, None),
    ("-1,", 3, None), (",", 3, None), ("x", 3, None),
])
def test_members_text_is_a_count_or_distinct_indices(text, n, expected):
    from condiff.engine.plan import parse_members

    if expected is None:
        with pytest.raises(ValueError, match="--members"):
            parse_members(text, n)
    else:
        assert parse_members(text, n) == expected


@pytest.mark.parametrize("text, expected", [("0/1", (0, 1)), ("3/4", (3, 4)), ("4/4", None), ("5/4", None),
                                            ("-1/4", None), ("0/0", None), ("1/2/3", None), ("a/b", None), ("1", None)])
def test_shard_text_is_an_index_below_the_count(text, expected):
    from condiff.engine.plan import parse_shard

    if expected is None:
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(text)
    else:
        assert parse_shard(text) == expected


def test_shards_split_the_cases_by_sorted_name_whatever_order_they_were_given_in():
    """Shards started with the inputs in another order (``a/ b/`` and ``b/ a/``) must still split one
    list: case k of the name-sorted list goes to shard k % N, so every case runs exactly once."""
    from condiff.engine.plan import select_shard
    from condiff.io.cases import Case

    names = ["b/x", "a/z", "c", "a/y", "b/w", "a/x", "d"]
    made = [Case(name, Path(f"/in/{name}.nii.gz"), "volume") for name in names]
    ordered = sorted(names)
    rng = np.random.default_rng(0)
    for count in (1, 2, 3):
        for _ in range(3):
            given = [made[i] for i in rng.permutation(len(made))]
            for index in range(count):
                assert [c.name for c in select_shard(given, index, count)] == ordered[index::count]


def test_a_shard_leaves_other_writers_temporary_files_and_merge_exits_1_for_failed_cases(tmp_path, model_set):
    """Shards write into one folder side by side: a shard must not delete another's half-written file
    (only a whole-folder run removes a killed run's leftovers). --merge reports failed cases with exit 1."""
    scans = tmp_path / "scans"
    make_scans(scans, n=1)
    good = (scans / "case0.nii.gz").read_bytes()
    (scans / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    in_flight = out / "maps" / ".case7.nii.gz.4242.tmp"  # another shard's map being written
    in_flight.parent.mkdir(parents=True)
    in_flight.write_bytes(b"partial")
    base = [scans, "-o", out, "--models", model_set, *FAST, "--members", "1"]
    res = _invoke([*base, "--shard", "0/2"])  # case0
    assert res.exit_code == 0, res.output + res.stderr
    res = _invoke([*base, "--shard", "1/2"])  # truncated
    assert res.exit_code == 1, res.output + res.stderr
    assert in_flight.is_file()
    res = _invoke(["--merge", out])
    assert res.exit_code == 1 and "1 ok, 1 failed" in res.stdout, res.output + res.stderr
    res = _invoke(base)  # a whole-folder run owns the folder: leftovers go
    assert res.exit_code == 1 and not in_flight.exists()


def test_overlay_max_fixes_the_colour_scale_of_every_preview_and_map_max_tells_what_to_pick(tmp_path, model_set):
    """--overlay-max: every case's overlay bar is the fixed scale with that case's own maximum (map_max in
    cases.csv and the record: the largest model-space map value, as the npz holds it); changing it reruns
    the cases, since it decides the overlay bytes; photos' map PNG previews use the same top."""
    from PIL import Image

    scans = tmp_path / "scans"
    make_scans(scans, n=2)
    out = tmp_path / "out"
    res = _invoke([scans, "-o", out, "--models", model_set, *FAST, "--save-model-space"])
    assert res.exit_code == 0, res.output + res.stderr
    rows = {r["case"]: r for r in _rows(out / "cases.csv")}
    maxima = {}
    for case, row in rows.items():
        npz = np.load(out / "model_space" / f"{case}.npz")
        maxima[case] = float(npz["maps"].max())
        assert float(row["map_max"]) == pytest.approx(maxima[case], rel=1e-6)
        assert json.loads((out / "records" / f"{case}.json").read_text())["map_max"] == pytest.approx(maxima[case])
    fixed = 0.5 * min(maxima.values())  # below every case's maximum: both saturate
    before = {c: (out / "overlays" / f"{c}.png").read_bytes() for c in rows}
    res = _invoke([scans, "-o", out, "--models", model_set, *FAST, "--save-model-space", "--overlay-max", str(fixed)])
    assert res.exit_code == 0, res.output + res.stderr
    assert "2 done" in res.stdout  # not skipped as current: the overlays change
    band = overlay.LABEL_BAND
    for case in rows:
        rec = json.loads((out / "records" / f"{case}.json").read_text())
        assert rec["options"]["overlay_max"] == fixed
        with Image.open(out / "overlays" / f"{case}.png") as im:
            img = np.asarray(im.convert("RGB"))
        assert (out / "overlays" / f"{case}.png").read_bytes() != before[case]
        np.testing.assert_array_equal(img[band:band + overlay.BAR_BAND],
                                      overlay.colour_bar(img.shape[1], fixed, case_max=maxima[case]))
    res = _invoke([scans, "-o", out, "--models", model_set, *FAST, "--save-model-space", "--overlay-max", str(fixed)])
    assert res.exit_code == 0 and "2 already done" in res.stdout  # the same scale again: current
    for bad in ("0", "-0.1", "nan", "inf"):
        res = _invoke([scans, "-o", tmp_path / "bad", "--models", model_set, *FAST, "--overlay-max", bad])
        assert res.exit_code == 2 and "--overlay-max" in res.output + res.stderr, bad

    import tifffile

    rgb_models = make_model_set(tmp_path / "rgb-set", n_members=1, image_channels=3,
                                preprocessing={"modality": "rgb", "image_size": 32})
    (tmp_path / "photos").mkdir()
    Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)).save(
        tmp_path / "photos" / "eye.png")
    res = _invoke([tmp_path / "photos", "-o", tmp_path / "pout", "--models", rgb_models, *FAST, "--overlay-max", "0.01"])
    assert res.exit_code == 0, res.output + res.stderr
    amap = tifffile.imread(tmp_path / "pout" / "maps" / "eye.tiff").astype(np.float64)
    with Image.open(tmp_path / "pout" / "maps" / "eye.png") as im:
        preview = np.asarray(im)
    np.testing.assert_array_equal(preview, np.round(np.clip(amap / 0.01, 0, 1) * 255).astype(np.uint8))


def test_a_mask_pattern_with_an_unknown_placeholder_is_a_usage_error(tmp_path, model_set):
    """It was a ValueError traceback at the first case (after the models loaded); condiff-eval's --masks too."""
    from click.testing import CliRunner

    from condiff.engine.cli import eval_main

    make_scans(tmp_path / "scans", n=1)
    for pattern, what in (("{dir}/{name}_brainmask.nii.gz", "unknown placeholder 'name'"), ("{stem", "malformed")):
        res = _invoke([tmp_path / "scans", "-o", tmp_path / "out", "--models", model_set, *FAST, "--mask", pattern])
        assert res.exit_code == 2 and what in res.output + res.stderr and "Traceback" not in res.output + res.stderr
        assert not (tmp_path / "out").exists()
        res = CliRunner().invoke(eval_main, [str(tmp_path), "--masks", pattern])
        assert res.exit_code == 2 and what in res.output + res.stderr


def test_a_member_config_edited_after_a_run_makes_its_cases_stale(tmp_path):
    """set.json's digest covers the weights only: a config.json edited in place (another network from the same
    weights) was resumed as current ('1 already done', the old scores kept)."""
    models = make_model_set(tmp_path / "set", n_members=1)
    make_scans(tmp_path / "scans", n=1)
    args = [tmp_path / "scans", "-o", tmp_path / "out", "--models", models, *FAST]
    assert "1 done" in _invoke(args).stdout
    assert "1 already done" in _invoke(args).stdout
    cfg = models / "fold_0" / "config.json"
    doc = json.loads(cfg.read_text())
    doc["unet"]["norm_eps"] = doc["unet"]["norm_eps"] * 10
    cfg.write_text(json.dumps(doc))
    res = _invoke(args)
    assert res.exit_code == 0 and "1 done" in res.stdout, res.stdout
