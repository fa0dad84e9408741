"""Photo eval figures follow the fixed colour scale (mutation audit 3)."""
import numpy as np
import pytest

from condiff.engine import eval_overlay, overlay
pytest.importorskip("scipy.ndimage")
from test_eval_overlay import _head_height, _photo  # noqa: E402  (its helpers)


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
