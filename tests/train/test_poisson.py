"""Poisson blending (tasks 0/1): the DST solver against a direct sparse solve, and the blend task's contract."""
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg

from condiff.train import poisson


def _guidance_oracle(target, source, mask):
    """Mixed-gradient guidance by plain loops: edge (i, j)->(i+1, j) and (i, j)->(i, j+1), mask edges zeroed."""
    mask = mask.copy()
    mask[[0, -1], :] = False
    mask[:, [0, -1]] = False
    c, h, w = target.shape
    g_r = np.zeros((c, h - 1, w))
    g_c = np.zeros((c, h, w - 1))
    for k in range(c):
        for i in range(h):
            for j in range(w):
                for g, di, dj in ((g_r, 1, 0), (g_c, 0, 1)):
                    if i + di >= h or j + dj >= w:
                        continue
                    gt = target[k, i + di, j + dj] - target[k, i, j]
                    gs = source[k, i + di, j + dj] - source[k, i, j]
                    if mask[i, j]:
                        gt = gt if abs(gt) >= abs(gs) else gs
                    g[k, i, j] = gt
    return g_r, g_c


def _sparse_poisson_oracle(target, source, mask):
    """Solve Σ_neighbours u − 4u = div(guidance) on the interior, u = target on the border, by spsolve."""
    g_r, g_c = _guidance_oracle(target, source, mask)
    c, h, w = target.shape
    index = -np.ones((h, w), int)
    interior = [(i, j) for i in range(1, h - 1) for j in range(1, w - 1)]
    for n, (i, j) in enumerate(interior):
        index[i, j] = n
    out = target.astype(np.float64).copy()
    for k in range(c):
        a = scipy.sparse.lil_matrix((len(interior), len(interior)))
        b = np.zeros(len(interior))
        for n, (i, j) in enumerate(interior):
            b[n] = g_r[k, i, j] - g_r[k, i - 1, j] + g_c[k, i, j] - g_c[k, i, j - 1]
            a[n, n] = -4.0
            for q in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)):
                if index[q] >= 0:
                    a[n, index[q]] = 1.0
                else:
                    b[n] -= target[k][q]  # known Dirichlet value moves to the right-hand side
        out[k, 1:-1, 1:-1] = scipy.sparse.linalg.spsolve(a.tocsr(), b).reshape(h - 2, w - 2)
    return out


@pytest.mark.parametrize("n_channels", [1, 2, 3])
def test_dst_blend_matches_sparse_spsolve(n_channels):
    rng = np.random.default_rng(n_channels)
    target = rng.random((n_channels, 12, 15))
    source = rng.random((n_channels, 12, 15)) * 2 - 0.5
    yy, xx = np.mgrid[:12, :15]
    mask = ((yy - 5.5) / 5) ** 2 + ((xx - 7) / 6) ** 2 <= 1
    mask[0, 7] = True  # an edge pixel the solver must ignore
    got = poisson.blend_mixed_gradients(target, source, mask)
    want = _sparse_poisson_oracle(target, source, mask)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[:, 0], target[:, 0])  # the border is the Dirichlet data, untouched
    np.testing.assert_array_equal(got[:, :, -1], target[:, :, -1])


def test_blend_with_identical_source_returns_target():
    rng = np.random.default_rng(3)
    target = rng.random((2, 9, 11))
    got = poisson.blend_mixed_gradients(target, target, np.ones((9, 11), bool))
    np.testing.assert_allclose(got, target, rtol=0, atol=1e-10)


def test_solver_reproduces_a_known_discrete_solution():
    # u known; its discrete Laplacian as divergence; the solver must give u back exactly (to rounding).
    rng = np.random.default_rng(4)
    u = rng.random((1, 10, 13))
    lap = np.zeros_like(u)
    lap[:, 1:-1, 1:-1] = (u[:, :-2, 1:-1] + u[:, 2:, 1:-1] + u[:, 1:-1, :-2] + u[:, 1:-1, 2:]
                          - 4 * u[:, 1:-1, 1:-1])
    np.testing.assert_allclose(poisson.solve_poisson_dst(lap, u), u, rtol=0, atol=1e-10)


def test_mirror_differences_match_scipy_correlate():
    from scipy import ndimage

    x = np.random.default_rng(5).random((2, 7, 9))
    for axis in (1, 2):
        want_f = ndimage.correlate1d(x, [0, -1, 1], axis=axis, mode="mirror")
        np.testing.assert_allclose(poisson.forward_differences(x, axis), want_f, rtol=0, atol=1e-15)
        want_b = ndimage.correlate1d(x, [-1, 1, 0], axis=axis, mode="mirror")
        np.testing.assert_allclose(poisson.backward_differences(x, axis), want_b, rtol=0, atol=1e-15)


def _phantom(n_channels=1, size=64):
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2 + 0.5, xx - size / 2 + 2)
    inside = r < 0.38 * size
    values = 0.3 + 0.4 * np.sin(yy / 5) ** 2 * np.cos(xx / 7) ** 2 + 0.2 * r / size
    return np.stack([np.where(inside, values * (1 - 0.2 * c), 0.0) for c in range(n_channels)]).astype(np.float32)


@pytest.mark.parametrize("seed", range(6))
def test_blend_anomaly_changes_only_the_patch_box(seed):
    rng = np.random.default_rng(seed)
    image = _phantom(3)
    source = np.random.default_rng(100 + seed).random((3, 64, 64)).astype(np.float32)
    yy, xx = np.mgrid[:17, :21]
    mask = ((yy - 8) / 8) ** 2 + ((xx - 10) / 10) ** 2 <= 1
    corner = np.array([20, 25])
    out, patch_mask = poisson.blend_anomaly(image, corner, mask, lambda: (source, None), rng)
    assert out.dtype == image.dtype and patch_mask.shape == mask.shape
    outside = np.ones((64, 64), bool)
    outside[20:37, 25:46] = False
    np.testing.assert_array_equal(out[:, outside], image[:, outside])
    # Per-channel range of the target holds.
    assert np.all(out.min(axis=(1, 2)) >= image.min(axis=(1, 2)))
    assert np.all(out.max(axis=(1, 2)) <= image.max(axis=(1, 2)))
    # Mask bookkeeping: edges of the shape dropped, every visibly changed pixel added.
    assert np.all(patch_mask >= poisson.zero_mask_edges(mask))
    change = np.abs(out[:, 20:37, 25:46].astype(np.float64) - image[:, 20:37, 25:46]).mean(axis=0)
    assert np.all(change[~patch_mask] <= poisson.CHANGED_THRESHOLD)
    assert change.max() > 0.01


def test_blend_anomaly_same_seed_same_output():
    image = _phantom(1)
    source = _phantom(1)[:, ::-1].copy()
    mask = np.ones((12, 12), bool)
    runs = [poisson.blend_anomaly(image, np.array([26, 26]), mask, lambda: (source, source[0] > 0),
                                  np.random.default_rng(s)) for s in (7, 7, 8)]
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert not np.array_equal(runs[0][0], runs[2][0])


def test_channel_matching_fills_from_target_or_subsamples_source():
    rng = np.random.default_rng(0)
    target = np.stack([np.full((4, 5), v) for v in (0.1, 0.2, 0.3)])
    gray = np.full((1, 4, 5), 0.9)
    filled = poisson.match_channels(gray, target, rng)
    assert filled.shape == (3, 4, 5)
    np.testing.assert_array_equal(filled[0], gray[0])
    assert all(any(np.array_equal(ch, t) for t in target) for ch in filled[1:])

    rgb = np.stack([np.full((4, 5), v) for v in (0.5, 0.6, 0.7)])
    for seed in range(20):
        picked = poisson.match_channels(rgb, gray, np.random.default_rng(seed))
        assert picked.shape == (1, 4, 5) and picked[0, 0, 0] in (0.5, 0.6, 0.7)
    two = [poisson.match_channels(rgb, target[:2], np.random.default_rng(s))[:, 0, 0] for s in range(20)]
    assert all(len(set(v)) == 2 for v in two)  # without replacement


def test_resampled_source_is_inside_the_source_range_and_patch_sized():
    rng = np.random.default_rng(9)
    source = _phantom(2)
    fg = source.max(axis=0) > 0
    for _ in range(20):
        patch = poisson.resample_source(source, (15, 22), rng, fg)
        assert patch is not None and patch.shape == (2, 15, 22)
        assert np.all(patch >= source.min(axis=(1, 2), keepdims=True))
        assert np.all(patch <= source.max(axis=(1, 2), keepdims=True))
    # No foreground pixel can centre a crop: the caller must draw another source.
    corner_fg = np.zeros((64, 64), bool)
    corner_fg[0, 0] = True
    assert poisson.resample_source(source, (30, 30), rng, corner_fg) is None


def test_a_grey_target_takes_any_colour_channel_of_a_photo():
    """The reference draws the kept channels at random: over seeds every channel of an RGB source is used."""
    gray = np.full((1, 4, 5), 0.9)
    rgb = np.stack([np.full((4, 5), v) for v in (0.5, 0.6, 0.7)])
    picked = {float(poisson.match_channels(rgb, gray, np.random.default_rng(s))[0, 0, 0]) for s in range(30)}
    assert picked == {0.5, 0.6, 0.7}


def test_resampled_source_follows_the_documented_geometry():
    """Oracle: the documented draws replayed with scipy: φ ~ U(-π/4, π/4), e = 1 + Exp(0.1), scale e or 1/e capped
    so the rotated patch box spans at most 80 % of the source, a uniform corner with the crop inside the
    source, cubic affine_transform of the crop, clipped to the source's range."""
    from scipy.ndimage import affine_transform

    src = np.random.default_rng(1).random((2, 37, 41))
    patch_hw = (30, 34)  # large: the 80 % cap binds in most draws
    n_capped = 0
    for seed in range(25):
        got = poisson.resample_source(src, patch_hw, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        phi = rng.uniform(-np.pi / 4, np.pi / 4)
        rot = np.array([[np.cos(phi), -np.sin(phi)], [np.sin(phi), np.cos(phi)]])
        corners = np.array([[0, 0, patch_hw[0], patch_hw[0]], [0, patch_hw[1], 0, patch_hw[1]]], float)
        span = np.ceil((rot @ corners).max(1)) - np.floor((rot @ corners).min(1))
        cap = np.min(0.8 * np.array(src.shape[1:]) / span)
        e = 1 + rng.exponential(0.1)
        scale = min(e if rng.random() < 0.5 else 1 / e, cap)
        n_capped += scale == cap
        m = scale * rot
        lo, hi = np.floor((m @ corners).min(1)), np.ceil((m @ corners).max(1))
        crop_hw = (hi - lo).astype(int)
        assert np.all(crop_hw <= 0.8 * np.array(src.shape[1:]) + 1)
        corner = rng.integers(0, np.array(src.shape[1:]) - crop_hw, endpoint=True)
        crop = src[:, corner[0]:corner[0] + crop_hw[0], corner[1]:corner[1] + crop_hw[1]]
        want = np.stack([affine_transform(ch, m, offset=-lo, output_shape=patch_hw, order=3, mode="constant",
                                          cval=0.0, prefilter=True) for ch in crop])
        want = np.clip(want, src.min(axis=(1, 2), keepdims=True), src.max(axis=(1, 2), keepdims=True))
        assert got is not None
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert n_capped >= 5
