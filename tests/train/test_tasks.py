"""Synthetic anomaly tasks (reference-method §5): locality, ranges, seeding, and the §5 statistics."""
import numpy as np
import pytest
from scipy import stats

from condiff.errors import TrainingDataError
from condiff.train import deform, shapes, tasks


def _mri(size=64, n_channels=1):
    """A smooth 'brain' disc on an exactly-zero background, (C, size, size) float32."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2 + 0.5, xx - size / 2 + 2)
    values = 0.3 + 0.4 * np.sin(yy / 5) ** 2 * np.cos(xx / 7) ** 2 + 0.25 * r / size
    return np.stack([np.where(r < 0.38 * size, values, 0.0)] * n_channels).astype(np.float32)


def _rgb(size=64, seed=0):
    """A smooth 3-channel 'fundus photo' without background, (3, size, size) float32 in (0, 1)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    f = rng.uniform(2, 6, size=(3, 2))
    return np.stack([0.5 + 0.35 * np.sin(f[c, 0] * yy + c) * np.cos(f[c, 1] * xx) for c in range(3)]).astype(np.float32)


MRI_POOL = tasks.ArrayPool(np.stack([_mri(), _mri()[:, :, ::-1]]))
RGB_POOL = tasks.ArrayPool(np.stack([_rgb(seed=s) for s in range(3)]))
GRAY_POOL = tasks.ArrayPool(np.stack([_mri()[:, ::-1]]))


def _case(task_id, modality):
    """(image, fg_mask, source_pool) for a task on an MRI-like (masked) or RGB-like (unmasked) image."""
    if modality == "mri":
        image = _mri()
        return image, tasks.foreground_mask(image), {0: MRI_POOL, 1: RGB_POOL}.get(task_id)
    return _rgb(seed=9), None, {0: RGB_POOL, 1: GRAY_POOL}.get(task_id)


def _bbox_outside(mask):
    rows, cols = np.nonzero(mask)
    outside = np.ones_like(mask)
    outside[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = False
    return outside


# --- locality, range, seeding -------------------------------------------------------------------------

@pytest.mark.parametrize("modality", ["mri", "rgb"])
@pytest.mark.parametrize("task_id", range(5))
def test_one_anomaly_changes_only_inside_its_mask_bbox(task_id, modality):
    n_changed = 0
    for seed in range(4):
        image, fg, pool = _case(task_id, modality)
        out, mask = tasks.apply_anomaly(task_id, image, np.random.default_rng(seed), fg, source_pool=pool)
        assert out.shape == image.shape and out.dtype == np.float32 and mask.shape == image.shape[1:]
        assert mask.any()
        n_changed += not np.array_equal(out, image)
        outside = _bbox_outside(mask)
        if task_id in tasks.BLEND_TASKS:
            # Exact outside the patch box (tests/train/test_poisson.py); between the mask's bbox and the
            # box the Poisson solution may move pixels by less than the 0.001 that puts them in the mask.
            change = np.abs(out.astype(np.float64) - image).mean(axis=0)
            assert change[outside].max(initial=0) <= 1e-3
        else:
            # Deformations and intensity changes touch only mask pixels: exact everywhere else.
            np.testing.assert_array_equal(out[:, ~mask], image[:, ~mask])
            np.testing.assert_array_equal(out[:, outside], image[:, outside])
    # A mixed-gradient blend may leave a small patch untouched where the target's gradients are the
    # stronger ones everywhere; every other draw must change the image.
    assert n_changed >= (3 if task_id in tasks.BLEND_TASKS else 4)


@pytest.mark.parametrize("modality", ["mri", "rgb"])
@pytest.mark.parametrize("task_id", range(5))
def test_task_output_stays_in_per_channel_range_and_is_seeded(task_id, modality):
    image, fg, pool = _case(task_id, modality)
    lo, hi = image.min(axis=(1, 2), keepdims=True), image.max(axis=(1, 2), keepdims=True)
    outputs = {}
    for seed in (11, 11, 12):
        out, mask, n = tasks.apply_task(task_id, image, np.random.default_rng(seed), fg, source_pool=pool)
        assert np.all(out >= lo) and np.all(out <= hi)
        assert 1 <= n <= 4 and mask.any()
        if seed in outputs:
            np.testing.assert_array_equal(out, outputs[seed][0])  # same seed -> identical (D4)
            np.testing.assert_array_equal(mask, outputs[seed][1])
        outputs[seed] = (out, mask)
    assert not np.array_equal(outputs[11][0], outputs[12][0])


def test_restoration_task_same_seed_same_output():
    task = tasks.RestorationTask(range(5), same_pool=MRI_POOL, other_pools=[RGB_POOL], has_background=True)
    image = _mri()
    for seed in range(8):
        a = task(image, np.random.default_rng(seed))
        b = task(image, np.random.default_rng(seed))
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert a[2] == b[2]
        assert a[0].dtype == np.float32
        if a[2] is None:
            np.testing.assert_array_equal(a[0], image)
            assert not a[1].any()


# --- §5 statistics ------------------------------------------------------------------------------------

def test_number_of_anomalies_is_1_to_4_with_halving_probabilities():
    rng = np.random.default_rng(2024)
    image = _rgb(size=32)
    counts = np.bincount([tasks.apply_task(4, image, rng)[2] for _ in range(2000)], minlength=5)
    assert counts[0] == 0
    expected = 2000 * np.array([1 / 2, 1 / 4, 1 / 8, 1 / 8])
    assert stats.chisquare(counts[1:], expected).pvalue > 1e-3


def test_size_bounds_follow_the_reference():
    lb, ub = shapes.size_bounds((128, 128))
    assert list(lb) == [8, 8] and list(ub) == [103, 103]
    fg = np.zeros((128, 128), bool)
    fg[10:60, 20:120] = True  # biggest bbox 50 x 100
    fg[100:103, 5:8] = True
    lb, ub = shapes.size_bounds((128, 128), shapes.foreground_regions(fg))
    assert list(lb) == [3, 6] and list(ub) == [40, 80]


def _expected_side(lb, ub, image_side):
    """E[int(clip((0.03 + G)·n, lb, ub))], G ~ Gamma(2, 0.1): lb + Σ_{k=lb+1}^{ub} P((0.03 + G)·n ≥ k)."""
    k = np.arange(lb + 1, ub + 1)
    return lb + stats.gamma.sf(k / image_side - 0.03, a=2, scale=0.1).sum()


def test_shape_type_and_side_lengths_follow_the_clipped_gamma_law():
    rng = np.random.default_rng(5)
    lb, ub = np.array([8, 8]), np.array([30, 103])  # a tight ub on axis 0 so the clip matters
    drawn = [shapes.make_shape(lb, ub, (128, 128), rng) for _ in range(4000)]
    sides = np.array([s.sides for s in drawn])
    is_rect = np.array([s.kind == shapes.RECTANGLE for s in drawn])
    assert abs(is_rect.mean() - 0.5) < 4 * np.sqrt(0.25 / len(drawn))
    for axis in (0, 1):
        want = _expected_side(lb[axis], ub[axis], 128)
        sem = sides[:, axis].std() / np.sqrt(len(drawn))
        assert abs(sides[:, axis].mean() - want) < 4 * sem, (axis, sides[:, axis].mean(), want)
    # Clipped masses: P(d = ub) = P(X ≥ ub); P(d = lb) = P(X < lb + 1).
    p_top = stats.gamma.sf(30 / 128 - 0.03, a=2, scale=0.1)
    assert abs((sides[:, 0] == 30).mean() - p_top) < 4 * np.sqrt(p_top * (1 - p_top) / len(drawn))
    # After the one rescale the floor/ceil grid can still exceed ub by up to 2 (the reference does not
    # iterate), never more; every mask holds its centre pixel.
    grids = np.array([s.mask.shape for s in drawn])
    assert np.all(grids <= ub + 2)
    assert all(s.mask[tuple(((np.array(s.mask.shape) - 1) // 2))] for s in drawn)


def test_monte_carlo_of_the_side_formula_agrees_with_the_oracle():
    # The same law drawn directly with numpy: guards the oracle above against a slip of its own.
    g = np.random.default_rng(6).gamma(2, 0.1, size=200_000)
    d = np.clip((0.03 + g) * 128, 8, 103).astype(int)
    assert abs(d.mean() - _expected_side(8, 103, 128)) < 0.05


def test_placed_anomalies_overlap_the_foreground_by_a_quarter():
    image = _mri()
    fg = tasks.foreground_mask(image)
    regions = shapes.foreground_regions(fg)
    lb, ub = shapes.size_bounds(image.shape[1:], regions)
    rng = np.random.default_rng(8)
    for _ in range(400):
        shape = shapes.make_shape(lb, ub, image.shape[1:], rng)
        corner = shapes.place_anomaly(shape.mask, image.shape[1:], rng, fg, regions)
        h, w = shape.mask.shape
        assert 0 <= corner[0] <= 64 - h and 0 <= corner[1] <= 64 - w
        overlap = (fg[corner[0]:corner[0] + h, corner[1]:corner[1] + w] & shape.mask).sum() / shape.mask.sum()
        assert overlap >= 0.25


class _CountingRng:
    """Delegates to a Generator and counts ``integers`` calls (one per placement attempt)."""

    def __init__(self, seed):
        self.rng, self.n_integers = np.random.default_rng(seed), 0

    def integers(self, *args, **kwargs):
        self.n_integers += 1
        return self.rng.integers(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.rng, name)


@pytest.mark.parametrize("n_rows, first_accepted_attempt", [(5, 1000), (10, 2000)])
def test_overlap_threshold_halves_every_thousand_attempts(n_rows, first_accepted_attempt):
    # F is one full-width row: a full n_rows x 10 patch always overlaps it by exactly 1/n_rows, which
    # τ = 0.25 rejects; 1/5 = 0.2 passes τ = 0.125 (attempt 1000), 1/10 passes τ = 0.0625 (attempt 2000).
    fg = np.zeros((64, 64), bool)
    fg[30] = True
    rng = _CountingRng(0)
    corner = shapes.place_anomaly(np.ones((n_rows, 10), bool), (64, 64), rng, fg)
    assert rng.n_integers == first_accepted_attempt + 1
    assert corner[0] <= 30 < corner[0] + n_rows


def test_placement_gives_up_after_5000_attempts():
    fg = np.zeros((64, 64), bool)
    fg[30, 30] = True  # 1 pixel of a 10 x 10 patch = 0.01 < 0.015625
    rng = _CountingRng(0)
    with pytest.raises(TrainingDataError, match="could not place"):
        shapes.place_anomaly(np.ones((10, 10), bool), (64, 64), rng, fg)
    assert rng.n_integers == 5000


def test_edge_distance_matches_a_bisection_on_the_inclusion_test():
    # Oracle: bisect along each ray with the aligned inclusion test (q = A⁻¹ p inside the aligned shape).
    rng = np.random.default_rng(12)
    for _ in range(20):
        shape = shapes.make_shape(np.array([6, 6]), np.array([40, 40]), (64, 64), rng)
        inv = np.linalg.inv(shape.matrix)
        half = shape.sides / 2

        def inside(p):
            q = inv @ (p - shape.centre)
            if shape.kind == shapes.RECTANGLE:
                return np.all(np.abs(q) <= half)
            return np.sum(q ** 2 / half ** 2) <= 1

        pixels = np.argwhere(shape.mask)
        centre = pixels[rng.integers(len(pixels))]
        angles = rng.uniform(0, 2 * np.pi, size=8)
        dirs = np.stack([np.cos(angles), np.sin(angles)])
        got = shape.edge_distance(centre, dirs)
        for j in range(8):
            lo, hi = 0.0, 200.0
            for _ in range(60):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if inside(centre + mid * dirs[:, j]) else (lo, mid)
            assert abs(got[j] - lo) < 1e-6


# --- deformations ----------------------------------------------------------------------------------------

def _disc_shape(radius=15):
    n = 2 * radius + 1
    yy, xx = np.mgrid[:n, :n] - radius
    mask = (yy / (n / 2)) ** 2 + (xx / (n / 2)) ** 2 <= 1
    return shapes.AnomalyShape(shapes.ELLIPSE, np.array([n, n]), np.identity(2), mask)


@pytest.mark.parametrize("kind", [deform.SINK, deform.SOURCE])
def test_bend_exponent_passes_the_displaced_midpoint(kind):
    a, push = 12.0, 3.0
    k = deform.bend_exponent(kind, a, push)
    off = push / np.sqrt(2)
    x, y = (a / 2 + off, a / 2 - off) if kind == deform.SOURCE else (a / 2 - off, a / 2 + off)
    assert k > 1
    np.testing.assert_allclose(deform.new_radius(kind, np.array([x]), np.array([a]), k), [y], rtol=1e-12)


def test_sink_pulls_a_ring_inward_and_source_pushes_it_outward():
    # A bright ring of radius 7 around the disc's centre c; after the warp its intensity-weighted mean
    # distance from c must grow for the source deformation and shrink for the sink deformation.
    shape = _disc_shape(15)
    corner = np.array([10, 12])
    c_patch = np.array([15, 15])
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - corner[0] - c_patch[0], xx - corner[1] - c_patch[1])
    image = np.exp(-((r - 7) ** 2) / (2 * 1.5 ** 2))[None].astype(np.float32)
    region = np.zeros((64, 64), bool)
    region[corner[0]:corner[0] + 31, corner[1]:corner[1] + 31] = shape.mask

    def ring_radius(img):
        wgt = img[0][region].astype(np.float64)
        return (wgt * r[region]).sum() / wgt.sum()

    before = ring_radius(image)
    moved = {}
    for kind in (deform.SINK, deform.SOURCE):
        out = deform.deform_anomaly(image, corner, shape, np.random.default_rng(0), kind, centre=c_patch)
        moved[kind] = ring_radius(out) - before
    assert moved[deform.SOURCE] > 0.3 and moved[deform.SINK] < -0.3


def test_radial_gradient_source_samples_nearer_and_sink_farther():
    # On I(p) = |p − c| the source warp shows values from nearer c (output ≤ input), the sink from
    # farther out (output ≥ input), pixel by pixel up to spline rounding.
    shape = _disc_shape(12)
    c_patch = np.array([12, 9])
    yy, xx = np.mgrid[:40, :40]
    image = np.hypot(yy - 5 - c_patch[0], xx - 5 - c_patch[1])[None].astype(np.float32) / 40
    for kind, sign in ((deform.SOURCE, -1), (deform.SINK, 1)):
        out = deform.deform_anomaly(image, np.array([5, 5]), shape, np.random.default_rng(1), kind,
                                    centre=c_patch)
        diff = (out - image)[0] * sign
        assert diff.min() > -1e-3 and diff.mean() > 1e-3


@pytest.mark.parametrize("kind", [deform.SINK, deform.SOURCE])
def test_deformed_sample_points_stay_inside_the_shape_on_their_ray(kind):
    rng = np.random.default_rng(3)
    for _ in range(30):
        shape = shapes.make_shape(np.array([8, 8]), np.array([40, 40]), (64, 64), rng)
        pixels = np.argwhere(shape.mask)
        centre = pixels[rng.integers(len(pixels))]
        pixels, coords = deform.deformation_targets(shape, centre, 1.7, kind)
        r = np.linalg.norm(pixels - centre, axis=1)
        r_new = np.linalg.norm(coords.T - centre, axis=1)
        if kind == deform.SOURCE:
            assert np.all(r_new <= r + 1e-9)
        else:
            assert np.all(r_new >= r - 1e-9)
            u = (pixels - centre) / r[:, None]
            assert np.all(r_new <= shape.edge_distance(centre, u.T) + 1e-9)


# --- RestorationTask --------------------------------------------------------------------------------------

def test_no_task_fraction_is_one_fifth(monkeypatch):
    def fake_apply_task(task_id, image, rng, fg_mask=None, **kwargs):
        return image + 0.0, np.ones(image.shape[1:], bool), 1

    monkeypatch.setattr(tasks, "apply_task", fake_apply_task)
    task = tasks.RestorationTask([2, 3, 4], has_background=True)
    rng = np.random.default_rng(0)
    image = _mri(size=16)
    chosen = [task(image, rng)[2] for _ in range(5000)]
    no_task = np.mean([c is None for c in chosen])
    assert abs(no_task - 0.2) <= 0.02
    counts = np.array([chosen.count(t) for t in (2, 3, 4)])
    assert stats.chisquare(counts).pvalue > 1e-3  # the fold's tasks are chosen uniformly


def test_no_task_fraction_without_mocking():
    task = tasks.RestorationTask([4], has_background=False)
    rng = np.random.default_rng(1)
    image = _rgb(size=24)
    chosen = [task(image, rng)[2] for _ in range(600)]
    assert abs(np.mean([c is None for c in chosen]) - 0.2) < 4 * np.sqrt(0.16 / 600)


def _column_image():
    """Each column a narrow band of values around its own level: the per-column clip bites hard."""
    yy, xx = np.mgrid[:48, :48]
    base = 0.2 + 0.6 * xx / 47 + 0.01 * np.sin(yy / 3)
    return np.stack([base, base[::-1, ::-1], 0.5 + 0.0 * base + 0.02 * np.cos(xx + yy)]).astype(np.float32)


def test_reference_clip_keeps_each_column_in_its_own_range():
    image = _column_image()
    col_lo, col_hi = image.min(axis=1, keepdims=True), image.max(axis=1, keepdims=True)
    ch_lo, ch_hi = image.min(axis=(1, 2), keepdims=True), image.max(axis=(1, 2), keepdims=True)
    ref = tasks.RestorationTask([2, 3, 4], p_no_task=0.0, has_background=False, reference_clip=True)
    fixed = tasks.RestorationTask([2, 3, 4], p_no_task=0.0, has_background=False)
    left_column_range = False
    for seed in range(30):
        out_ref, _, _ = ref(image, np.random.default_rng(seed))
        assert np.all(out_ref >= col_lo) and np.all(out_ref <= col_hi)
        out, _, _ = fixed(image, np.random.default_rng(seed))
        assert np.all(out >= ch_lo) and np.all(out <= ch_hi)
        left_column_range |= bool(np.any(out < col_lo) or np.any(out > col_hi))
    assert left_column_range  # D1: the default clip lets anomalies leave their column's range


def test_clip_bounds_shapes():
    image = _column_image()
    assert tasks.clip_bounds(image)[0].shape == (3, 1, 1)
    assert tasks.clip_bounds(image, reference_clip=True)[0].shape == (3, 1, 48)


def test_every_task_runs_through_restoration_task_on_both_modalities():
    mri = tasks.RestorationTask(range(5), p_no_task=0.0, same_pool=MRI_POOL, other_pools=[RGB_POOL, GRAY_POOL],
                                has_background=True)
    rgb = tasks.RestorationTask(range(5), p_no_task=0.0, same_pool=RGB_POOL, other_pools=[GRAY_POOL],
                                has_background=False)
    for task, image in ((mri, _mri()), (rgb, _rgb(seed=4))):
        seen = set()
        for seed in range(25):
            out, mask, task_id = task(image, np.random.default_rng(seed))
            seen.add(task_id)
            assert out.shape == image.shape and out.dtype == np.float32 and mask.any()
        assert seen == set(range(5))


def test_missing_source_pools_are_refused_clearly():
    with pytest.raises(ValueError, match="task 1 .*other_pools"):
        tasks.RestorationTask([0, 1, 2], same_pool=MRI_POOL, has_background=True)
    with pytest.raises(ValueError, match="task 0 .*same_pool"):
        tasks.RestorationTask([0, 2, 3], has_background=True)
    with pytest.raises(ValueError, match="task_ids"):
        tasks.RestorationTask([2, 7], has_background=True)
    with pytest.raises(ValueError, match="source pool"):
        tasks.apply_anomaly(1, _mri(), np.random.default_rng(0))
    tasks.RestorationTask([2, 3, 4], has_background=True)  # no pools needed without tasks 0/1


def test_blank_image_with_background_is_a_data_error():
    task = tasks.RestorationTask([4], p_no_task=0.0, has_background=True)
    with pytest.raises(TrainingDataError, match="no foreground"):
        task(np.zeros((1, 32, 32), np.float32), np.random.default_rng(0))


def test_a_slice_too_small_to_host_an_anomaly_serves_as_a_no_task_sample():
    """The top of a head trained without brain masks: 3 foreground pixels. apply_task cannot place an
    anomaly there (and says so); the training task hands the slice back unchanged, without a task."""
    image = np.zeros((1, 32, 32), np.float32)
    image[0, 0, :3] = 0.5
    fg = tasks.foreground_mask(image)
    with pytest.raises(TrainingDataError, match="could not place|visibility floor"):
        tasks.apply_task(2, image, np.random.default_rng(0), fg)
    task = tasks.RestorationTask([2, 3, 4], p_no_task=0.0, has_background=True)
    for seed in range(5):
        out, mask, task_id = task(image, np.random.default_rng(seed))
        assert task_id is None and not mask.any()
        np.testing.assert_array_equal(out, image)


# --- task 4: smooth Perlin-noise intensity change (train/perlin.py) -----------------------------------------

from condiff.train import perlin  # noqa: E402


def test_smootherstep_is_the_quintic_with_flat_ends():
    t = np.linspace(0, 1, 101)
    np.testing.assert_allclose(perlin.smootherstep(t), np.polyval([6, -15, 10, 0, 0, 0], t), rtol=0, atol=1e-15)
    h = 1e-3  # value, slope and curvature at both ends: 0/1, 0, 0 (what hides the lattice seams)
    for end, value in ((0.0, 0.0), (1.0, 1.0)):
        f = perlin.smootherstep(np.array([end - h, end, end + h]))
        assert f[1] == value
        assert abs(f[2] - f[0]) / (2 * h) < 1e-4 and abs(f[2] - 2 * f[1] + f[0]) / h ** 2 < 1e-1


def _perlin_oracle(shape, periods, gradients):
    """Classic gradient noise pixel by pixel: corner dot products blended with 6t^5 - 15t^4 + 10t^3."""
    fade = lambda t: 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3  # noqa: E731
    out = np.zeros(shape)
    for i in range(shape[0]):
        for j in range(shape[1]):
            p = np.array([i * periods[0] / shape[0], j * periods[1] / shape[1]])
            i0, j0 = int(np.floor(p[0])), int(np.floor(p[1]))
            f = p - [i0, j0]
            dots = {(a, b): gradients[i0 + a, j0 + b] @ (f - [a, b]) for a in (0, 1) for b in (0, 1)}
            top = dots[0, 0] * (1 - fade(f[1])) + dots[0, 1] * fade(f[1])
            bottom = dots[1, 0] * (1 - fade(f[1])) + dots[1, 1] * fade(f[1])
            out[i, j] = top * (1 - fade(f[0])) + bottom * fade(f[0])
    return out


@pytest.mark.parametrize("shape, periods", [((17, 23), (2.7, 4.1)), ((12, 12), (3.0, 1.5))])
def test_perlin_layer_matches_a_pixel_by_pixel_oracle(shape, periods):
    periods = np.array(periods)
    got = perlin.perlin_noise(shape, periods, np.random.default_rng(4))
    rng = np.random.default_rng(4)  # the same gradient draw: ceil(I + 1) lattice points per axis, unit vectors
    v = rng.standard_normal(tuple(int(np.ceil(p + 1)) for p in periods) + (2,))
    want = _perlin_oracle(shape, periods, v / np.linalg.norm(v, axis=-1, keepdims=True))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_fractal_noise_halves_each_layers_amplitude_and_spans_zero_to_one():
    shape, layers = (20, 26), [np.array([1.6, 2.2]), np.array([3.3, 4.1]), np.array([6.9, 8.2])]
    got = perlin.fractal_noise(shape, layers, np.random.default_rng(6))
    rng = np.random.default_rng(6)
    total = sum(0.5 ** j * perlin.perlin_noise(shape, p, rng) for j, p in enumerate(layers))
    want = (total - total.min()) / (total.max() - total.min())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert got.min() == 0.0 and got.max() == 1.0


@pytest.mark.parametrize("shape", [(40, 40), (12, 60), (90, 30)])
def test_layer_periods_follow_the_documented_draws(shape):
    """I_max = mean(h, w)/3; I_1 = 1 + Exp((I_max - 1)/4.5); n = min(floor(log2(I_max/I_1)) + 1, 1 + Poisson(1));
    I_(j+1) = 2 I_j N(1, 0.1) while fewer than n and I_j < I_max; each then jittered per axis by N(1, 0.1)."""
    for seed in range(10):
        got = perlin.draw_layer_periods(shape, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        i_max = (shape[0] + shape[1]) / 2 / 3
        cores = [1 + rng.exponential((i_max - 1) / 4.5)]
        n = min(np.floor(np.log2(i_max / cores[0])) + 1, 1 + rng.poisson(1))
        while len(cores) < n and cores[-1] < i_max:
            cores.append(cores[-1] * 2 * rng.normal(1, 0.1))
        want = [rng.normal(1, 0.1, size=2) * c for c in cores]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-13)


def _intensity_oracle(image, corner, mask, seed, scale=perlin.INTENSITY_SCALE):
    """§5 task 4 in float64: ramp min(d / w, 1), w = min(min(H, W)·(0.02 + Gamma(3, 0.01)), max d); one sign per
    channel; a = scale/2 + Gamma(3, scale); the fractal noise drawn next; clip to each channel's range."""
    from scipy.ndimage import distance_transform_edt

    rng = np.random.default_rng(seed)
    d = distance_transform_edt(mask)
    w = min(min(image.shape[1:]) * (0.02 + rng.gamma(3.0, 0.01)), d.max())
    ramp = np.minimum(d / w, 1.0)
    signs = rng.choice([1.0, -1.0], size=image.shape[0])
    a = scale / 2 + rng.gamma(3, scale)
    noise = perlin.fractal_noise(mask.shape, perlin.draw_layer_periods(mask.shape, rng), rng)
    out = image.astype(np.float64).copy()
    h, wd = mask.shape
    box = out[:, corner[0]:corner[0] + h, corner[1]:corner[1] + wd]
    box += ramp[None] * (a * signs)[:, None, None] * noise[None]
    lo, hi = image.min(axis=(1, 2), keepdims=True), image.max(axis=(1, 2), keepdims=True)
    return np.clip(out, lo, hi).astype(image.dtype), signs


@pytest.mark.parametrize("radius", [3, 12])  # a small disc (ramp capped by its depth) and a large one (a plateau)
@pytest.mark.parametrize("modality", ["mri", "rgb"])
def test_intensity_anomaly_matches_the_float64_recipe(radius, modality):
    image = _mri(64) if modality == "mri" else _rgb(64, seed=2)
    n = 2 * radius + 1
    yy, xx = np.mgrid[:n, :n] - radius
    mask = yy ** 2 + xx ** 2 <= radius ** 2
    corner = np.array([20, 18])
    signs_seen = set()
    for seed in range(6):
        got = perlin.intensity_anomaly(image, corner, mask, np.random.default_rng(seed))
        want, signs = _intensity_oracle(image, corner, mask, seed)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        signs_seen.add(tuple(signs))
    if modality == "rgb":
        assert any(len(set(s)) == 2 for s in signs_seen)  # channels may brighten and darken in one anomaly


# --- deformations: the push distance, the radius clamp, the spline, the fixed border ---------------------------

@pytest.mark.parametrize("mean_edge, min_push, max_push, fallback", [
    (12.0, 0.5, 5.0, None),      # U(max(0.1 m, 0.5), min(0.9 m, 5)), m = A / sqrt(2)
    (40.0, 0.5, 5.0, None),      # 0.1 m = 2.83 > 0.5: the lower bound is 0.1 m
    (3.0, 0.5, 5.0, None),       # 0.9 m = 1.91 < 5: the upper bound is 0.9 m
    (2.0, 3.0, 5.0, "hi"),       # min_push >= 0.9 m: 0.9 m
    (60.0, 0.5, 1.0, "lo"),      # max_push <= 0.1 m: 0.1 m
])
def test_push_distance_follows_the_reference_bounds(mean_edge, min_push, max_push, fallback):
    m = mean_edge / np.sqrt(2)
    for seed in range(5):
        got = deform.push_distance(mean_edge, np.random.default_rng(seed), min_push, max_push)
        if fallback == "hi":
            assert got == pytest.approx(0.9 * m, rel=1e-12)
        elif fallback == "lo":
            assert got == pytest.approx(0.1 * m, rel=1e-12)
        else:
            want = np.random.default_rng(seed).uniform(max(0.1 * m, min_push), min(0.9 * m, max_push))
            assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("kind", [deform.SINK, deform.SOURCE])
def test_a_radius_a_rounding_past_the_edge_maps_onto_the_edge(kind):
    """r is at most R up to rounding (1e-9 here): the powers must stay real and the pixel sample at the edge."""
    edge = np.array([5.0, 7.25, 0.0])
    r = np.array([5.0 + 1e-9, 7.25 + 4e-9, 0.0])
    got = deform.new_radius(kind, r, edge, 1.7)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, edge, rtol=0, atol=1e-8)


def _square_shape(n=15):
    return shapes.AnomalyShape(shapes.RECTANGLE, np.array([n, n]), np.identity(2), np.ones((n, n), bool))


@pytest.mark.parametrize("kind", [deform.SINK, deform.SOURCE])
def test_deformation_samples_a_cubic_spline_and_keeps_the_patch_border(kind):
    """Oracle: scipy's cubic spline (mode "nearest") over the patch at the documented sample points; the pixels on
    the patch's outer border and the centre keep their values even where the mask covers them."""
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(0)
    image = rng.random((2, 30, 32)).astype(np.float32)
    shape, corner, centre = _square_shape(15), np.array([6, 9]), np.array([7, 6])
    out = deform.deform_anomaly(image, corner, shape, np.random.default_rng(5), kind, centre=centre)
    a = deform.mean_edge_distance(centre, shape.mask)
    k = deform.bend_exponent(kind, a, deform.push_distance(a, np.random.default_rng(5)))
    pixels, coords = deform.deformation_targets(shape, centre, k, kind)
    assert len(pixels) == 13 * 13 - 1  # the inner 13 x 13 without the centre
    want = image.copy()
    for c in range(2):
        patch = image[c, 6:21, 9:24].astype(np.float64)
        want[c, corner[0] + pixels[:, 0], corner[1] + pixels[:, 1]] = map_coordinates(patch, coords, order=3,
                                                                                     mode="nearest")
    np.testing.assert_array_equal(out, want)
    box = out[:, 6:21, 9:24]
    np.testing.assert_array_equal(box[:, [0, -1], :], image[:, 6:21, 9:24][:, [0, -1], :])
    np.testing.assert_array_equal(box[:, :, [0, -1]], image[:, 6:21, 9:24][:, :, [0, -1]])
    assert not np.array_equal(box[:, 1:-1, 1:-1], image[:, 7:20, 10:23])
