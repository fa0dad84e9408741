"""Photo eval figures follow the fixed colour scale (mutation audit 3)."""
import numpy as np
import pytest

from condiff.engine import eval_overlay, overlay
from test_eval_overlay import _head_height  # its helper

ndimage = pytest.importorskip("scipy.ndimage")


def _photo():
    rng = np.random.default_rng(1)
    rgb = rng.uniform(0, 1, (40, 52, 3))
    amap = ndimage.gaussian_filter(rng.uniform(0, 1, (40, 52)), 2)
    label = np.zeros((40, 52), dtype=bool)
    label[10:20, 15:30] = True
    return rgb, amap, label


def test_photograph_figures_follow_a_fixed_colour_scale_and_say_per_case_without_one():
    """condiff-eval --overlay-max on photographs: the map panel uses the fixed top (at the case's own maximum:
    the default figure); without it the bar is the per-case one, not the fixed scale's text."""
    rgb, amap, label = _photo()
    top, head = float(amap.max()), _head_height()
    default = eval_overlay.image_figure(rgb, amap, label, case="eye")
    fixed = eval_overlay.image_figure(rgb, amap, label, case="eye", vmax=2 * top)
    assert not np.array_equal(fixed[head:], default[head:])  # half as bright on a scale twice the maximum
    np.testing.assert_array_equal(eval_overlay.image_figure(rgb, amap, label, case="eye", vmax=top)[head:],
                                  default[head:])
    band = overlay.LABEL_BAND
    np.testing.assert_array_equal(default[2 * band:2 * band + overlay.BAR_BAND],
                                  overlay.colour_bar(default.shape[1], top))
    np.testing.assert_array_equal(fixed[2 * band:2 * band + overlay.BAR_BAND],
                                  overlay.colour_bar(fixed.shape[1], 2 * top, case_max=top))
