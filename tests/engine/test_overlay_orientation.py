"""Overlays follow the model contract's orientation and the voxel sizes (geometry audit D1, D2), and volumes
without orientation or with trailing singleton dimensions are handled as said (D3, D4)."""
import itertools

import numpy as np
import pytest

from condiff.engine import eval_overlay, overlay

AXES = {"R": "L", "A": "P", "S": "I"}


def _codes(slicing: str):
    """Every contract code whose third axis is along ``slicing`` (S: axial, A: coronal, R: sagittal)."""
    plane = [a for a in AXES if a != slicing]
    for first, second in (plane, plane[::-1]):
        for a, b, c in itertools.product((first, AXES[first]), (second, AXES[second]), (slicing, AXES[slicing])):
            yield a + b + c


def _marker_in(code: str):
    """A RAS volume with a single voxel at patient left, anterior, superior, reoriented to ``code`` by nibabel
    (the oracle), and the slice through the marker along the contract's third axis."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

    ras = np.zeros((20, 22, 24))
    ras[3, 17, 19] = 1.0  # x=3 of 20: patient left; y=17 of 22: anterior; z=19 of 24: superior
    arr = apply_orientation(ras, ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(code))))
    k = np.argwhere(arr)[0][2]
    return arr[:, :, k]


@pytest.mark.parametrize("code", list(_codes("S")))
def test_axial_slices_show_anterior_up_and_patient_left_on_the_left_in_every_contract(code):
    shown = overlay.show_slice(_marker_in(code), code)
    r, c = np.argwhere(shown)[0]
    assert shown.shape == (22, 20)  # rows run anterior-posterior, columns left-right
    assert r < shown.shape[0] / 2 and c < shown.shape[1] / 2, (code, r, c)  # top: anterior; left: patient left
    assert overlay.display_transform(code)[3]  # L/R markers belong on axial panels


@pytest.mark.parametrize("code", list(_codes("A")))
def test_coronal_slices_show_superior_up_and_patient_left_on_the_left(code):
    shown = overlay.show_slice(_marker_in(code), code)
    r, c = np.argwhere(shown)[0]
    assert r < shown.shape[0] / 2 and c < shown.shape[1] / 2, (code, r, c)
    assert overlay.display_transform(code)[3]


@pytest.mark.parametrize("code", list(_codes("R")))
def test_sagittal_slices_show_superior_up_and_anterior_left_without_side_markers(code):
    shown = overlay.show_slice(_marker_in(code), code)
    r, c = np.argwhere(shown)[0]
    assert r < shown.shape[0] / 2 and c < shown.shape[1] / 2, (code, r, c)
    assert not overlay.display_transform(code)[3]


def _stack(seed=0, n=3, h=24, w=20):
    rng = np.random.default_rng(seed)
    slices = rng.random((n, 1, h, w)).astype(np.float32)
    return slices, rng.random((n, 1, h, w)).astype(np.float32), rng.random((n, h, w)).astype(np.float32), rng.random(n)


def test_one_anatomy_on_two_contracts_is_drawn_alike():
    """Model-space slices of an LPS contract are the RAS contract's flipped on both in-plane axes: the overlay
    must be the same picture (it showed LPS brains upside down with L and R swapped)."""
    slices, rest, maps, scores = _stack()
    ras = overlay.labelled_overlay(slices, rest, maps, scores, case="c", orientation="RAS")
    lps = overlay.labelled_overlay(slices[:, :, ::-1, ::-1], rest[:, :, ::-1, ::-1], maps[:, ::-1, ::-1], scores,
                                   case="c", orientation="LPS")
    np.testing.assert_array_equal(ras, lps)
    assert not np.array_equal(ras, overlay.labelled_overlay(slices[:, :, ::-1, ::-1], rest[:, :, ::-1, ::-1],
                                                            maps[:, ::-1, ::-1], scores, case="c"))


def _volume(h=24, w=20, d=3):
    """Canonical arrays with a constant brain (so grey levels do not depend on how often a voxel is drawn)."""
    yy, xx = np.mgrid[:h, :w]
    brain = ((yy - h / 2) / (h / 2.5)) ** 2 + ((xx - w / 2) / (w / 2.5)) ** 2 <= 1
    image = np.repeat((0.5 * brain)[..., None], d, axis=2)
    label = np.zeros_like(image, dtype=bool)
    label[8:12, 6:9, 1] = True
    amap = np.where(label, 0.8, 0.1 * brain[..., None]).astype(np.float32)
    return image, amap, label, {0: 0.1, 1: 0.9, 2: 0.2}


def test_eval_figures_of_one_anatomy_on_two_contracts_are_alike():
    image, amap, label, scores = _volume()
    ras = eval_overlay.volume_figure(image, amap, label, scores, k=1, case="c")
    lps = eval_overlay.volume_figure(image[::-1, ::-1], amap[::-1, ::-1], label[::-1, ::-1], scores, k=1, case="c",
                                     orientation="LPS")
    np.testing.assert_array_equal(ras, lps)


def test_eval_figures_draw_anisotropic_voxels_in_millimetre_proportions():
    """1 x 2 mm voxels (contract axes 0 and 1) are drawn as the same slice sampled at 1 x 1 mm (each voxel
    twice along axis 1), not squashed to half its width."""
    image, amap, label, scores = _volume(w=40)
    coarse = [a[:, ::2] for a in (image, amap, label)]  # axis 1 at 2 mm
    fine = [np.repeat(a, 2, axis=1) for a in coarse]     # the same voxels on a 1 mm grid
    want = eval_overlay.volume_figure(*fine, scores, k=1, case="c")
    got = eval_overlay.volume_figure(*coarse, scores, k=1, case="c", voxel_mm=(1.0, 2.0, 3.0))
    assert got.shape == want.shape
    row_h = 40 * -(-360 // 24)  # the drawn slice: 40 mm anterior-posterior, enlarged to >= 360 px panels
    # (the band above it counts label voxels, which differ: 1 x 2 mm voxels are half as many)
    np.testing.assert_array_equal(got[-row_h:], want[-row_h:])
    squashed = eval_overlay.volume_figure(*coarse, scores, k=1, case="c")
    assert squashed.shape != want.shape


def test_square_pixels_repeats_each_axis_by_its_voxel_size():
    rows, cols = eval_overlay.square_pixels((4, 5), (1.5, 1.0))
    assert rows.tolist() == [0, 1, 1, 2, 3, 3] and cols.tolist() == [0, 1, 2, 3, 4]
    assert [a.tolist() for a in eval_overlay.square_pixels((3, 2), None)] == [[0, 1, 2], [0, 1]]


def test_the_writer_and_condiff_eval_pass_the_contract_orientation(tmp_path, monkeypatch):
    """condiff-infer's overlay and condiff-eval's figure are drawn on the record's contract orientation and
    voxel sizes (checked where they are handed over)."""
    from _infer_helpers import FAST, PREPROCESSING, invoke_infer, make_model_set, make_scans, one_torch_thread
    from click.testing import CliRunner

    from condiff.engine.cli import eval_main

    seen = []
    real_png, real_figure = overlay.overlay_png, eval_overlay.volume_figure
    monkeypatch.setattr(overlay, "overlay_png", lambda *a, **k: seen.append(("infer", k)) or real_png(*a, **k))
    monkeypatch.setattr(eval_overlay, "volume_figure", lambda *a, **k: seen.append(("eval", k)) or real_figure(*a, **k))
    with one_torch_thread():
        models = make_model_set(tmp_path / "set", n_members=1, preprocessing={**PREPROCESSING, "orientation": "LPS"})
        make_scans(tmp_path / "scans", n=1, with_masks=True)
        res = invoke_infer([tmp_path / "scans", "-o", tmp_path / "out", "--models", models, *FAST])
        assert res.exit_code == 0, res.output + res.stderr
        res = CliRunner().invoke(eval_main, [str(tmp_path / "out"), "--masks", "{dir}/{stem}_seg.nii.gz"],
                                 catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (_, infer_kw), (_, eval_kw) = seen
    assert infer_kw["orientation"] == "LPS" and eval_kw["orientation"] == "LPS"
    assert eval_kw["voxel_mm"] is not None and len(eval_kw["voxel_mm"]) == 3


def test_a_volume_without_orientation_is_warned_about_naming_the_file(tmp_path, caplog):
    import nibabel as nib

    from condiff.io.volumes import read_volume

    img = nib.Nifti1Image(np.random.default_rng(0).random((16, 17, 10)).astype(np.float32) + 1, np.eye(4))
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    path = tmp_path / "nocode.nii.gz"
    nib.save(img, str(path))
    with caplog.at_level("WARNING"):
        read_volume(path)
    assert f"{path}: no orientation in its header (qform_code and sform_code are both 0)" in caplog.text
    caplog.clear()
    img.set_sform(np.eye(4), code=1)
    nib.save(img, str(path))
    with caplog.at_level("WARNING"):
        read_volume(path)
    assert "no orientation" not in caplog.text


def test_a_volume_with_a_trailing_singleton_dimension_gets_maps_of_its_shape(tmp_path):
    """README: maps have the input's shape and header; an (X, Y, Z, 1) input got (X, Y, Z) maps."""
    import nibabel as nib

    from _infer_helpers import FAST, brain_like, invoke_infer, make_model_set, one_torch_thread

    img, _ = brain_like(seed=0)
    nib.save(nib.Nifti1Image(img[..., None].astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])),
             str(tmp_path / "series1.nii.gz"))
    with one_torch_thread():
        models = make_model_set(tmp_path / "set", n_members=1)
        res = invoke_infer([tmp_path / "series1.nii.gz", "-o", tmp_path / "out", "--models", models, *FAST])
    assert res.exit_code == 0, res.output + res.stderr
    for folder in ("maps", "restorations"):
        out = nib.load(str(tmp_path / "out" / folder / "series1.nii.gz"))
        assert out.shape == img.shape + (1,) and np.allclose(out.affine, np.diag([2.0, 2.0, 2.0, 1.0]))
    # condiff-eval scores such maps against a 3-D label on the input's grid (it refused every case)
    from click.testing import CliRunner

    from condiff.engine.cli import eval_main

    _, blob = brain_like(seed=0)
    nib.save(nib.Nifti1Image(blob.astype(np.uint8), np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / "series1_seg.nii.gz"))
    res = CliRunner().invoke(eval_main, [str(tmp_path / "out"), "--masks", "{dir}/{stem}_seg.nii.gz", "--no-overlays"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output + res.stderr
