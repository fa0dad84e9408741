"""The healing metric tells a copier from a healer."""
import numpy as np
import pytest
import torch

from condiff.schedule import alpha_bar
from condiff.ssim import ssim_map
from condiff.train.healing import copier_reference, draw_averages, healing_report, make_cases, removed_share
from condiff.train.tasks import ArrayPool


def _phantoms(n=6, size=64, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        img = np.zeros((1, size, size), np.float32)
        inside = (yy - size / 2) ** 2 / (0.42 * size) ** 2 + (xx - size / 2) ** 2 / (0.36 * size) ** 2 < 1
        smooth = 0.5 + 0.2 * np.sin(xx / rng.uniform(3, 6)) * np.cos(yy / rng.uniform(3, 6))
        img[0][inside] = smooth[inside]
        out.append(img)
    return np.stack(out)


def _map(restored, cond):
    import torch
    from condiff.anomaly import zero_background
    r, c = torch.from_numpy(restored).float(), torch.from_numpy(cond).float()
    return zero_background(ssim_map(r, c), c)[:, 0].numpy()


@pytest.mark.parametrize("task_id", [0, 2, 3, 4])
def test_copier_scores_zero_removed_and_chance_ap_healer_scores_one(task_id):
    clean = _phantoms()
    pool = ArrayPool(clean)
    lookup = {c.corrupted.tobytes(): c.clean for c in make_cases(clean, task_id, seed=1, same_pool=pool)}

    def copier(cond):
        # restoration = the input: maps are all zero, AP = chance
        return cond.copy(), _map(cond, cond)

    def healer(cond):
        # the clean slices (restored for the copier reference) are returned as they are
        restored = np.stack([lookup.get(c.tobytes(), c) for c in cond])
        return restored, _map(restored, cond)

    rep_copy = healing_report(copier, clean, (task_id,), seed=1, same_pool=pool)
    rep_heal = healing_report(healer, clean, (task_id,), seed=1, same_pool=pool)
    (c,), (h,) = rep_copy.values(), rep_heal.values()
    assert c["removed"] == pytest.approx(0.0, abs=1e-9)
    assert c["ap"] == pytest.approx(c["chance"], rel=1e-6)  # a constant map ranks nothing
    assert h["removed"] == pytest.approx(1.0, abs=1e-9)
    assert h["ap"] > 0.5 and h["ap"] > 3 * h["chance"]
    for row in (c, h):  # both are exact on healthy input: no own error, a copier reference of 0
        assert row["clean_error"] == pytest.approx(0.0, abs=1e-12)
        assert row["copier_removed"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("task_id", [0, 4])
def test_noisy_copier_scores_its_copier_reference(task_id):
    """A restorer that keeps the anomaly and adds its own error (the same per slice position, as
    noise keyed by position would) scores exactly its copier reference, below 0; a noisy healer
    scores above it."""
    clean = _phantoms()
    pool = ArrayPool(clean)
    error = 0.08 * np.random.default_rng(5).standard_normal(clean.shape).astype(np.float32)
    lookup = {c.corrupted.tobytes(): c.clean for c in make_cases(clean, task_id, seed=1, same_pool=pool)}

    def noisy_copier(cond):
        restored = cond + error[: len(cond)]
        return restored, _map(restored, cond)

    def noisy_healer(cond):
        restored = np.stack([lookup.get(c.tobytes(), c) for c in cond]) + error[: len(cond)]
        return restored, _map(restored, cond)

    (c,) = healing_report(noisy_copier, clean, (task_id,), seed=1, same_pool=pool).values()
    (h,) = healing_report(noisy_healer, clean, (task_id,), seed=1, same_pool=pool).values()
    assert c["removed"] == pytest.approx(c["copier_removed"], abs=1e-6)
    assert c["removed"] < 0 and c["clean_error"] > 0
    assert h["removed"] > h["copier_removed"] + 0.2
    assert h["clean_error"] == pytest.approx(c["clean_error"], rel=1e-6)


def test_copier_reference_float64_oracle():
    rng = np.random.default_rng(1)
    x0 = rng.random((2, 1, 8, 8))
    mask = np.zeros((2, 8, 8), bool)
    mask[:, 1:4, 2:7] = True
    c = x0 + 0.3 * mask[:, None]
    own = rng.normal(0, 0.1, x0.shape)
    err, cop = copier_reference(x0, c, x0 + own, mask)
    m = mask[:, None]
    expected_err = sum(abs(own[i][m[i]]).sum() for i in range(2)) / (0.3 * m.sum())
    expected_cop = 1 - sum(abs(0.3 + own[i][m[i]]).sum() for i in range(2)) / (0.3 * m.sum())
    assert err == pytest.approx(expected_err, abs=1e-12)
    assert cop == pytest.approx(expected_cop, abs=1e-12)


def test_removed_share_float64_oracle():
    rng = np.random.default_rng(0)
    x0 = rng.random((2, 1, 8, 8))
    c = x0.copy()
    mask = np.zeros((2, 8, 8), bool)
    mask[:, 2:5, 2:6] = True
    c[:, 0][mask] += 0.4
    restored = x0 + 0.25 * (c - x0)  # removes three quarters of the anomaly
    assert removed_share(x0, c, restored, mask) == pytest.approx(0.75, abs=1e-12)


def test_val_hook_logs_every_task_with_finite_values():
    from condiff.config import preset
    from condiff.train.healing import val_hook
    from condiff.unet import ConditionalUNet

    clean = _phantoms(n=6, size=32)
    hook = val_hook({"val_images": clean, "device": "cpu", "seed": 0}, n_slices=3, n_steps=2, sampler="ddim")
    out = hook(100, ConditionalUNet(preset("tiny", 1, sample_size=32)))
    for k in (0, 2, 3, 4):
        assert np.isfinite(out[f"heal_removed/{k}"]) and 0 <= out[f"heal_ap/{k}"] <= 1
        assert 0 < out[f"heal_chance/{k}"] < 1
        assert np.isfinite(out[f"heal_copier/{k}"])


def test_draw_averages_shrink_sampling_noise_like_one_over_sqrt_k():
    """A copier plus Gaussian noise of a fixed seed per draw: averaging K draws divides its own error
    by sqrt(K) (mean |N(0, s^2/K)|), it still scores exactly its copier reference, K = 1 is draw 0
    alone, and each input is restored once per draw however many counts are asked."""
    clean = _phantoms(n=8)
    pool = ArrayPool(clean)
    calls = []

    def noisy_copier_for_seed(seed):
        def restore_fn(cond):
            calls.append(seed)
            noise = 0.05 * np.random.default_rng([seed, 7]).standard_normal(cond.shape).astype(np.float32)
            restored = cond + noise  # same noise for every input of this shape: keyed by position
            return restored, _map(restored, cond)
        return restore_fn

    averaged = draw_averages(noisy_copier_for_seed, [1, 4, 16])
    reps = {k: next(iter(healing_report(fn, clean, (2,), seed=1, same_pool=pool).values())) for k, fn in averaged.items()}
    err = {k: r["clean_error"] for k, r in reps.items()}
    assert err[4] / err[1] == pytest.approx(0.5, rel=0.08)
    assert err[16] / err[1] == pytest.approx(0.25, rel=0.08)
    for r in reps.values():
        assert r["removed"] == pytest.approx(r["copier_removed"], abs=1e-5)
    assert reps[1]["removed"] < reps[4]["removed"] < reps[16]["removed"] < 0
    assert len(calls) == 2 * 16  # clean and corrupted inputs, 16 draws each, shared by all counts
    one = averaged[1](clean)
    ref = noisy_copier_for_seed(0)(clean)
    np.testing.assert_array_equal(one[0], ref[0])
    np.testing.assert_array_equal(one[1], ref[1])
    with pytest.raises(ValueError, match="draw counts"):
        draw_averages(noisy_copier_for_seed, [0, 2])


def test_changed_pixels_are_those_whose_channel_mean_changes(monkeypatch):
    """RGB: a pixel counts as changed (part of "the anomaly") when its change averaged over the channels
    exceeds 1e-3; one channel moving by 2.5e-3 (channel mean 8.3e-4) is below that, all three moving by
    1.5e-3 is above it. A stand-in task makes exactly these changes inside its (larger) mask."""
    import condiff.train.healing as healing

    one_channel = np.zeros((8, 8), bool)
    one_channel[1:3, 1:6] = True
    all_channels = np.zeros((8, 8), bool)
    all_channels[5:7, 2:6] = True
    untouched = np.zeros((8, 8), bool)
    untouched[0, :] = True  # inside the task's mask, but nothing changed there

    class StandInTask:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, image, rng):
            c = image.copy()
            c[0][one_channel] += 2.5e-3
            c[:, all_channels] += 1.5e-3
            return c, one_channel | all_channels | untouched, 4

    monkeypatch.setattr(healing, "RestorationTask", StandInTask)
    clean = np.full((3, 3, 8, 8), 0.5, np.float32)
    clean[:, 1] = 0.25
    cases = make_cases(clean, 4)
    assert len(cases) == 3
    for case in cases:
        np.testing.assert_array_equal(case.mask, all_channels)

    def copier(cond):
        return cond.copy(), np.zeros((len(cond), 8, 8), np.float32)

    (row,) = healing_report(copier, clean, (4,), copier_baseline=False).values()
    assert row["chance"] == pytest.approx(all_channels.mean(), abs=1e-12)  # the share of anomaly pixels


class _FixedRestorer(torch.nn.Module):
    """An eps prediction that makes every step's x0 estimate ``target(cond)`` whatever x_t holds: the
    restoration (the last DDPM step returns that estimate) is independent of the sampling noise, up to
    float32 rounding."""

    def __init__(self, target):
        super().__init__()
        self.target = target
        self.register_buffer("ab", alpha_bar())

    def forward(self, x_t, cond, t):
        ab = self.ab[t].view(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * self.target(cond)) / (1 - ab).sqrt()


def test_model_restorer_averages_its_members():
    """Members' restorations and maps are averaged: two identical members give the single member's
    result, and two different ones the mean of each alone (noise-independent stand-in networks, so each
    member's result does not depend on the member's noise)."""
    from condiff.sampler import make_plan
    from condiff.train.healing import model_restorer

    plan = make_plan("ddpm", 5)
    cond = _phantoms(n=3, size=32)
    a = _FixedRestorer(lambda c: 0.8 * c.flip(-1))
    b = _FixedRestorer(lambda c: c.roll(5, -2) ** 2)
    ra, ma = model_restorer([a], plan)(cond)
    rb, mb = model_restorer([b], plan)(cond)
    np.testing.assert_allclose(ra, 0.8 * cond[..., ::-1], atol=1e-6)  # the stand-in does what it says
    assert ma.max() > 0.01 and mb.max() > 0.01  # maps with something in them (far above the tolerance)
    r2, m2 = model_restorer([a, a], plan)(cond)
    np.testing.assert_allclose(r2, ra, atol=1e-6)
    np.testing.assert_allclose(m2, ma, atol=1e-6)
    rab, mab = model_restorer([a, b], plan)(cond)
    np.testing.assert_allclose(rab, (ra + rb) / 2, atol=1e-6)
    np.testing.assert_allclose(mab, (ma + mb) / 2, atol=1e-6)


def test_model_restorer_noise_is_keyed_by_slice_not_by_batch_position():
    """The same slice gets the same noise at any batch size, and every slice its own: identical inputs
    at different positions are restored differently, and batch sizes 1, 2 and 5 agree."""
    from condiff.config import preset
    from condiff.sampler import make_plan
    from condiff.train.healing import model_restorer
    from condiff.unet import ConditionalUNet

    torch.manual_seed(0)
    model = ConditionalUNet(preset("tiny", 1, sample_size=32)).eval()
    plan = make_plan("ddpm", 2)
    cond = np.repeat(_phantoms(n=1, size=32), 5, axis=0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {bs: model_restorer([model], plan, seed=3, batch_size=bs)(cond) for bs in (1, 2, 5)}
    finally:
        torch.set_num_threads(before)
    restored, maps = results[5]
    for i in range(1, 5):  # same input, another slice index: other noise
        assert np.abs(restored[i] - restored[0]).max() > 0.05, i
    for bs in (1, 2):
        np.testing.assert_allclose(results[bs][0], restored, atol=1e-5, err_msg=f"batch size {bs}")
        np.testing.assert_allclose(results[bs][1], maps, atol=1e-5, err_msg=f"batch size {bs}")
