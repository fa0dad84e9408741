"""The overlay PNG: which slices, which panels, the enlargement of low-resolution panels, and the bands
and marks that make it readable (case name, colour bar, model input size, L/R)."""
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


def _ramp_oracle(v):
    """Black (0) -> red (0.5) -> golden yellow (1), linear between: never white."""
    v = np.clip(v, 0, 1)
    return np.stack([np.clip(2 * v, 0, 1) * 255, np.clip(2 * v - 1, 0, 1) * 215, 0 * v], -1)


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
        v = maps[i] / maps.max()
        hot = _ramp_oracle(v)
        np.testing.assert_allclose(band[:, 256:384], hot, atol=0.5 + 1e-9)  # the map: the ramp, scaled to the maximum
        # map on input: the input's grey where the map is below 20 % of the case's largest value; above it the
        # ramp at up to 85 % opacity (reached at 80 %) over the grey dimmed by up to half (float64 oracle)
        on = band[:, 384:]
        grey = band[:, :128]
        weight = np.clip((v - 0.2) / 0.6, 0, 1)[..., None]
        alpha = 0.85 * weight
        np.testing.assert_array_equal(on[v <= 0.2], grey[v <= 0.2])
        np.testing.assert_allclose(on, grey * (1 - 0.5 * weight) * (1 - alpha) + np.round(hot) * alpha, atol=1.5)
        assert np.abs(on[v >= 0.8] - hot[v >= 0.8]).max() > 0  # the anatomy still shows through


def test_ramp_stops_short_of_white_and_stands_out_on_white_tissue():
    v = np.linspace(0, 1, 101)
    rgb = overlay.ramp(v).astype(int)
    np.testing.assert_allclose(rgb, _ramp_oracle(v), atol=0.5 + 1e-9)
    assert rgb.min(axis=-1).max() == 0  # never white, nor near it: blue stays 0 all along
    white = np.full((1, 101, 3), 255, dtype=np.uint8)
    on = overlay.map_on(white, v[None])[0].astype(int)
    # on white tissue the strongest responses keep the ramp's hue: blue (what white adds) under 20
    assert on[v >= 0.8, 2].max() < 20 and (on[v >= 0.8, 0] - on[v >= 0.8, 2]).min() > 200
    np.testing.assert_array_equal(on[v <= 0.2], 255)  # uncoloured: the grey as it is


def _labelled(case="site-a/sub-01_T1w", kind="volume", size=32):
    slices, restorations, maps, scores = _case(size, n=5)
    if kind == "image":
        slices, restorations = slices * 2 - 1, restorations * 2 - 1
    names = [f"slice {k} of axis 2" for k in range(10, 15)] if kind == "volume" else None
    grid = overlay.overlay_image(slices, restorations, maps, scores, kind=kind)
    img = overlay.labelled_overlay(slices, restorations, maps, scores, kind=kind, row_names=names, case=case)
    return img, grid, (slices, restorations, maps, scores, names)


def _head_height(case=True):
    return (overlay.LABEL_BAND if case else 0) + overlay.BAR_BAND + overlay.LABEL_BAND


def test_labelled_overlay_adds_bands_and_keeps_every_panel_pixel_but_the_side_markers():
    img, grid, (slices, restorations, maps, scores, names) = _labelled()
    band, row_h, head = overlay.LABEL_BAND, grid.shape[0] // 3, _head_height()
    assert img.shape == (grid.shape[0] + head + 3 * band, grid.shape[1], 3) and img.dtype == np.uint8
    probe = overlay.mark_sides(np.full((row_h, grid.shape[1], 3), 7, np.uint8), 4)
    marks = np.tile(probe[..., 0] != 7, (3, 1))  # where mark_sides draws: the side letters' boxes
    bands = []
    for r in range(3):
        top = head + r * (band + row_h)
        bands.append(img[top:top + band])
        rows = slice(top + band, top + band + row_h)
        keep = ~marks[r * row_h:(r + 1) * row_h]
        np.testing.assert_array_equal(img[rows][keep], grid[r * row_h:(r + 1) * row_h][keep])
    assert all(b.max() > 0 for b in bands)  # text was drawn
    assert not np.array_equal(bands[0], bands[1])  # each row names its own slice and score
    # the same rows with other names give other bands, and nothing else changes
    other = overlay.labelled_overlay(slices, restorations, maps, scores, row_names=[n + "0" for n in names],
                                     case="site-a/sub-01_T1w")
    assert not np.array_equal(other[head:head + band], img[head:head + band])
    np.testing.assert_array_equal(other[:head], img[:head])


def test_header_band_names_the_case_and_titles_name_the_model_input_size():
    img, grid, _ = _labelled(case="site-a/sub-01_T1w")
    width, band = grid.shape[1], overlay.LABEL_BAND
    np.testing.assert_array_equal(img[:band], overlay.text_band(["case site-a/sub-01_T1w"], width, 1))
    assert not np.array_equal(img[:band], overlay.text_band(["case site-a/sub-01_T2w"], width, 1))
    titles = img[band + overlay.BAR_BAND:2 * band + overlay.BAR_BAND]
    np.testing.assert_array_equal(titles, overlay.text_band(["model input (32 px)", "restoration", "map",
                                                             "map on input"], width, 4))
    img64, grid64, _ = _labelled(size=64)
    np.testing.assert_array_equal(img64[band + overlay.BAR_BAND:2 * band + overlay.BAR_BAND],
                                  overlay.text_band(["model input (64 px)", "restoration", "map", "map on input"],
                                                    grid64.shape[1], 4))


def test_colour_bar_band_shows_the_ramps_used_with_per_case_scale_and_ticks():
    img, grid, (_, _, maps, _, _) = _labelled()
    width, band, vmax = grid.shape[1], overlay.LABEL_BAND, float(maps.max())
    bar = img[band:band + overlay.BAR_BAND]
    assert "scaled to this case's maximum" in overlay.BAR_TEXT
    np.testing.assert_array_equal(bar[:band], overlay.text_band([overlay.BAR_TEXT], width, 1))
    x0, n = overlay.bar_span(width)
    v = np.linspace(0, 1, n)
    (m0, m1), (g0, g1) = overlay.BAR_ROWS
    assert n > width // 2 and m1 - m0 >= 8 and g1 - g0 >= 8
    for y in range(m0, m1):  # "map": exactly the map panel's ramp; "on input": map_on over a bright grey
        np.testing.assert_array_equal(bar[y, x0:x0 + n], overlay.ramp(v))
    grey = np.full((1, n, 3), overlay.BAR_GREY, dtype=np.uint8)
    for y in range(g0, g1):
        np.testing.assert_array_equal(bar[y, x0:x0 + n], overlay.map_on(grey, v[None])[0])
    assert (bar[g0, x0:x0 + n][v <= overlay.OVERLAY_FROM] == overlay.BAR_GREY).all()  # no colour below 20 %
    for share in (0.0, overlay.OVERLAY_FROM, 1.0):  # ticks at 0, where colour starts on the input, the maximum
        assert (bar[g1:g1 + 4, x0 + int(round(share * (n - 1)))] == 255).all()
    # the tick values are the case's own: another maximum changes only the values' row
    other = overlay.colour_bar(width, 2 * vmax)
    np.testing.assert_array_equal(other[:g1 + 3], bar[:g1 + 3])
    assert not np.array_equal(other[g1 + 3:], bar[g1 + 3:])
    np.testing.assert_array_equal(overlay.colour_bar(width, vmax), bar)


@pytest.mark.parametrize("kind", ["volume", "image"])
def test_side_markers_on_every_mri_panel_and_never_on_photographs(kind):
    img, grid, _ = _labelled(kind=kind)
    band, row_h, head = overlay.LABEL_BAND, grid.shape[0] // 3, _head_height()
    left, right = overlay.side_letter("L"), overlay.side_letter("R")
    assert left.max() > 200 and right.max() > 200 and not np.array_equal(left, right)  # letters drawn
    h, w = left.shape[:2]
    y = (row_h - h) // 2
    panel = grid.shape[1] // 4
    for r in range(3):
        top = head + r * (band + row_h) + band
        if kind == "image":  # a photograph has no patient left and right: its rows are the grid's
            np.testing.assert_array_equal(img[top:top + row_h], grid[r * row_h:(r + 1) * row_h])
            continue
        for j in range(4):  # neurological: patient left on image left, right on the right
            np.testing.assert_array_equal(img[top + y:top + y + h, j * panel + 1:j * panel + 1 + w], left)
            rw = right.shape[1]
            np.testing.assert_array_equal(img[top + y:top + y + h, (j + 1) * panel - rw - 1:(j + 1) * panel - 1], right)


def test_identical_arrays_give_identical_png_bytes():
    slices, restorations, maps, scores = _case(32, n=5)
    a = overlay.overlay_png(slices, restorations, maps, scores, case="c")
    b = overlay.overlay_png(slices.copy(), restorations.copy(), maps.copy(), scores.copy(), case="c")
    assert a == b and a[:8] == b"\x89PNG\r\n\x1a\n" and b"tIME" not in a and b"tEXt" not in a


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


def test_a_fixed_colour_scale_gives_one_value_one_colour_in_every_case_and_saturates_above_it():
    """--overlay-max: two cases with different maxima colour the same map value alike (per-case scaling
    does not), values above the fixed top take the ramp's last colour, and the bar says so."""
    slices, restorations, maps, scores = _case(128, n=4, seed=1)
    other = maps * 3.0  # a case with a larger maximum; its map values are 3x
    probe = 0.7  # a map value both cases hold at one pixel of their top slice
    i = int(np.argmax(scores))
    maps_a, maps_b = maps.copy(), other.copy()
    maps_a[i, 5, 7] = maps_b[i, 5, 7] = probe
    fixed = 2.5  # below case b's maximum (about 6), above case a's (about 2)

    def map_pixel(m, vmax):
        img = overlay.overlay_image(slices, restorations, m, scores, kind="image", k=1, vmax=vmax)
        return img[:, 256:384], img

    (pa, _), (pb, _) = map_pixel(maps_a, fixed), map_pixel(maps_b, fixed)
    np.testing.assert_array_equal(pa[5, 7], pb[5, 7])
    np.testing.assert_allclose(pa[5, 7], _ramp_oracle(probe / fixed), atol=0.5 + 1e-9)
    np.testing.assert_allclose(pb, _ramp_oracle(maps_b[i] / fixed), atol=0.5 + 1e-9)  # float64 oracle, clipped
    assert (maps_b[i] > fixed).any()
    np.testing.assert_array_equal(pb[maps_b[i] > fixed], np.broadcast_to([255, 215, 0], pb[maps_b[i] > fixed].shape))
    (qa, _), (qb, _) = map_pixel(maps_a, None), map_pixel(maps_b, None)
    assert not np.array_equal(qa[5, 7], qb[5, 7])  # per case: the same value, two colours
    # the fixed scale at a case's own maximum draws the same panels as the per-case default
    np.testing.assert_array_equal(map_pixel(maps_a, float(maps_a.max()))[1], map_pixel(maps_a, None)[1])

    width = 512
    for m, above in ((maps_a, ""), (maps_b, " (saturated)")):
        img = overlay.labelled_overlay(slices, restorations, m, scores, kind="image", vmax=fixed, case="c")
        bar = img[overlay.LABEL_BAND:overlay.LABEL_BAND + overlay.BAR_BAND]
        text = overlay.BAR_TEXT_FIXED.format(case_max=float(m.max()), above=above)
        assert f"{float(m.max()):.3g}" in text and "comparable across cases" in text
        np.testing.assert_array_equal(bar[:overlay.LABEL_BAND], overlay.text_band([text], width, 1))
        np.testing.assert_array_equal(bar, overlay.colour_bar(width, fixed, case_max=float(m.max())))
    # the top tick reads "2.5+" only when the case goes above the scale
    (_, g1) = overlay.BAR_ROWS[1]
    assert not np.array_equal(overlay.colour_bar(width, fixed, case_max=1.0)[g1 + 3:],
                              overlay.colour_bar(width, fixed, case_max=3.0)[g1 + 3:])
    with pytest.raises(ValueError, match="positive"):
        overlay.colour_scale(maps, 0.0)


def test_bar_texts_fit_the_narrowest_overlay():
    from PIL import Image, ImageDraw

    draw, width = ImageDraw.Draw(Image.new("RGB", (1, 1))), 4 * overlay.MIN_PANEL
    for text in (overlay.BAR_TEXT, overlay.BAR_TEXT_FIXED.format(case_max=1.23e-05, above=" (saturated)")):
        left, _, right, _ = draw.textbbox((0, 0), text, font=overlay._font())
        assert 3 + right - left <= width, text
