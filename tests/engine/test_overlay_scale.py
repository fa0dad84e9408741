"""The labelled overlay draws its panels on the scale its colour bar shows (mutation audit 3)."""
import numpy as np

from condiff.engine import overlay
from test_overlay import _case  # its helper


def test_the_labelled_overlay_draws_its_panels_on_the_fixed_scale_its_bar_shows():
    """condiff-infer --overlay-max: the preview's panels use the fixed top, not only its colour bar
    (photographs: no side markers, so the panels are overlay_image's pixel for pixel)."""
    slices, restorations, maps, scores = _case(128, n=3, seed=2)
    fixed = 0.5 * float(maps.max())
    grid = overlay.overlay_image(slices, restorations, maps, scores, kind="image", k=1, vmax=fixed)
    img = overlay.labelled_overlay(slices, restorations, maps, scores, kind="image", k=1, vmax=fixed)
    np.testing.assert_array_equal(img[-grid.shape[0]:], grid)
    per_case = overlay.overlay_image(slices, restorations, maps, scores, kind="image", k=1)
    assert not np.array_equal(grid, per_case)


def test_a_case_whose_maximum_is_the_fixed_top_is_not_called_saturated():
    """--overlay-max shared puts the largest case exactly on the scale's top: nothing of it is above the scale."""
    width = 512
    bar = overlay.colour_bar(width, 2.5, case_max=2.5)
    text = overlay.BAR_TEXT_FIXED.format(case_max=2.5, above="")
    np.testing.assert_array_equal(bar[:overlay.LABEL_BAND], overlay.text_band([text], width, 1))
    (_, g1) = overlay.BAR_ROWS[1]
    np.testing.assert_array_equal(bar[g1 + 3:], overlay.colour_bar(width, 2.5, case_max=1.0)[g1 + 3:])  # "2.5", no "+"
