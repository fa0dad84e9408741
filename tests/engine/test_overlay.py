"""The overlay PNG: which slices, which panels, and the enlargement of low-resolution panels."""
import numpy as np
import pytest

from condiff.engine import overlay


def _case(size, n=5, seed=0):
    rng = np.random.default_rng(seed)
    slices = rng.uniform(0, 1, (n, 1, size, size)).astype(np.float32)
    restorations = rng.uniform(0, 1, (n, 1, size, size)).astype(np.float32)
    maps = rng.uniform(0, 2, (n, size, size)).astype(np.float32)
    scores = rng.uniform(0, 1, n)
    return slices, restorations, maps, scores


@pytest.mark.parametrize("size, factor", [(32, 4), (64, 2), (100, 2), (128, 1), (160, 1)])
def test_small_panels_are_enlarged_by_pixel_replication_only(size, factor, monkeypatch):
    args = _case(size)
    big = overlay.overlay_image(*args)
    assert big.shape == (3 * factor * size, 4 * factor * size, 3) and big.dtype == np.uint8
    monkeypatch.setattr(overlay, "MIN_PANEL", 1)
    plain = overlay.overlay_image(*args)
    assert plain.shape == (3 * size, 4 * size, 3)
    np.testing.assert_array_equal(big, np.repeat(np.repeat(plain, factor, axis=0), factor, axis=1))


def test_rows_are_the_top_slices_with_input_restoration_map_and_map_on_input():
    slices, restorations, maps, scores = _case(128, n=4)
    slices, restorations = slices * 2 - 1, restorations * 2 - 1  # photographs live in [-1, 1]
    img = overlay.overlay_image(slices, restorations, maps, scores, kind="image", k=2)
    assert img.shape == (2 * 128, 4 * 128, 3)
    top = np.argsort(-scores)[:2]
    for row, i in enumerate(top):
        band = img[row * 128:(row + 1) * 128].astype(np.float64)
        for col, source in enumerate((slices[i, 0], restorations[i, 0])):
            panel = band[:, col * 128:(col + 1) * 128]
            assert (panel[..., 0] == panel[..., 1]).all() and (panel[..., 1] == panel[..., 2]).all()  # grey
            np.testing.assert_allclose(panel[..., 0] / 255 * 2 - 1, source, atol=2 / 255)
        ramp = band[:, 256:384, 0]  # red rises first on the black-red-yellow-white ramp
        np.testing.assert_allclose(ramp / 255, np.clip(3 * maps[i] / maps.max(), 0, 1), atol=1 / 255)
        # map on input: the input's grey where the map is below 20 % of the case's largest value, the
        # ramp at 85 % opacity from 80 % on, a linear blend between (float64 oracle)
        on = band[:, 384:]
        grey = band[:, :128]
        v = maps[i] / maps.max()
        hot = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1) * 255
        alpha = 0.85 * np.clip((v - 0.2) / 0.6, 0, 1)[..., None]
        np.testing.assert_array_equal(on[v <= 0.2], grey[v <= 0.2])
        np.testing.assert_allclose(on, grey * (1 - alpha) + hot * alpha, atol=1.5)
        assert np.abs(on[v >= 0.8] - hot[v >= 0.8]).max() > 0  # the anatomy still shows through


def test_labelled_overlay_adds_bands_and_keeps_every_panel_pixel():
    slices, restorations, maps, scores = _case(32, n=5)
    grid = overlay.overlay_image(slices, restorations, maps, scores)
    names = [f"slice {k} of axis 2" for k in range(10, 15)]
    img = overlay.labelled_overlay(slices, restorations, maps, scores, row_names=names)
    band, row_h = overlay.LABEL_BAND, grid.shape[0] // 3
    assert img.shape == (grid.shape[0] + 4 * band, grid.shape[1], 3) and img.dtype == np.uint8
    bands = []
    for r in range(3):
        top = band + r * (band + row_h)
        bands.append(img[top:top + band])
        np.testing.assert_array_equal(img[top + band:top + band + row_h], grid[r * row_h:(r + 1) * row_h])
    assert img[:band].max() > 0 and all(b.max() > 0 for b in bands)  # text was drawn
    assert not np.array_equal(bands[0], bands[1])  # each row names its own slice and score
    # the same rows with other names give other bands, and nothing else changes
    other = overlay.labelled_overlay(slices, restorations, maps, scores, row_names=[n + "0" for n in names])
    assert not np.array_equal(other[band:2 * band], img[band:2 * band])
    np.testing.assert_array_equal(other[:band], img[:band])


def test_slice_names_are_the_input_files_own_voxel_indices_even_when_the_axis_is_reversed():
    """The model slices along canonical inferior->superior; a file storing that axis first and
    superior->inferior must still be named by its own index, as a viewer shows it."""
    from condiff.io.volumes import Volume
    from condiff.preprocess import PreprocessConfig, prepare_volume

    n = 9
    rng = np.random.default_rng(3)
    base = rng.uniform(0.5, 1.0, (24, 24)).astype(np.float32)
    data = np.stack([base * (j + 1) for j in range(n)], axis=0)  # input axis 0: brightness rises with its index
    affine = np.array([[0, 2.0, 0, 0], [0, 0, 2.0, 0], [-2.0, 0, 0, 0], [0, 0, 0, 1]])  # axis 0 runs S -> I
    prepared = prepare_volume(Volume(data, affine, None, "x"), PreprocessConfig(modality="mri", fov_mm=None,
                                                                               normalisation="max"))
    names = overlay.input_slice_names(prepared.geometry)
    assert len(names) == len(prepared.slices) == n and all(m.endswith("of axis 0") for m in names)
    index = np.array([int(m.split()[1]) for m in names])
    brightness = prepared.slices.reshape(n, -1).mean(axis=1)
    assert np.all(np.diff(index[np.argsort(brightness)]) == 1)  # brighter model slice = higher input index
    assert overlay.input_slice_names({"kind": "image"}) is None
