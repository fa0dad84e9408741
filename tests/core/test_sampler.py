"""Schedule and samplers against diffusers 0.24 DDPMScheduler / DDIMScheduler."""
import pytest
import torch

from condiff.noise import NoiseKey, draw_noise
from condiff.sampler import make_plan, restore, step
from condiff.schedule import alpha_bar, leading_timesteps, min_snr_weight

diffusers = pytest.importorskip("diffusers")


def test_alpha_bar_and_timesteps_match_diffusers():
    ref = diffusers.DDPMScheduler()
    ref.set_timesteps(50)
    assert leading_timesteps(50) == ref.timesteps.tolist()
    assert leading_timesteps(50)[:3] == [980, 960, 940] and leading_timesteps(50)[-1] == 0
    torch.testing.assert_close(alpha_bar(), ref.alphas_cumprod, rtol=0, atol=0)
    # check values of reference-method.md §4
    ab = alpha_bar()
    for t, v in [(0, 0.9999), (20, 0.993735), (259, 0.497614), (500, 0.0777967), (980, 5.90375e-5)]:
        assert abs(ab[t].item() - v) / v < 1e-5


def test_min_snr_weight_switches_at_259():
    ab = alpha_bar()
    w = min_snr_weight(torch.arange(1000), ab)
    assert torch.all(w[259:] == 1) and torch.all(w[:259] < 1)
    snr = ab / (1 - ab)
    torch.testing.assert_close(w[:259], 1 / snr[:259], rtol=1e-6, atol=0)


def _ddpm_mean(sched, eps, t, x):
    """diffusers' DDPM posterior mean: its step with a seeded generator, minus the noise it drew."""
    res = sched.step(eps, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))  # what randn_tensor drew
    return res - (sched._get_variance(t) ** 0.5) * z


def _toy_denoise(x, cond, t):
    # a smooth nonlinear function of all inputs, deterministic
    return torch.tanh(0.7 * x - 0.3 * cond + 0.001 * t.view(-1, 1, 1, 1).float())


@pytest.mark.parametrize("kind,n_steps", [("ddpm", 50), ("ddim", 50), ("ddim", 10), ("ddpm", 7)])
def test_trajectory_matches_diffusers_every_step(kind, n_steps):
    sched = diffusers.DDPMScheduler() if kind == "ddpm" else diffusers.DDIMScheduler()
    sched.set_timesteps(n_steps)
    plan = make_plan(kind, n_steps)
    assert plan.timesteps == sched.timesteps.tolist()
    g = torch.Generator().manual_seed(3)
    cond = torch.rand(3, 1, 9, 11, generator=g)
    noise = torch.randn(3, plan.n_noise_draws, 1, 9, 11, generator=g)
    x_ref = x_ours = noise[:, 0]
    step_noise = [noise[:, plan.noise_slot(i)] if kind == "ddpm" and t > 0 else None
                  for i, t in enumerate(plan.timesteps)]
    for i, t in enumerate(plan.timesteps):
        tt = torch.full((3,), t)
        eps_ref = _toy_denoise(x_ref, cond, tt)
        if kind == "ddpm":
            mean = _ddpm_mean(sched, eps_ref, torch.tensor(t), x_ref) if t > 0 else \
                sched.step(eps_ref, torch.tensor(t), x_ref).prev_sample
            x_ref = mean + (sched._get_variance(torch.tensor(t)) ** 0.5) * step_noise[i] if t > 0 else mean
        else:
            x_ref = sched.step(eps_ref, torch.tensor(t), x_ref, eta=0.0).prev_sample
        x_ours, _ = step(plan, i, x_ours, _toy_denoise(x_ours, cond, tt), step_noise[i])
        torch.testing.assert_close(x_ours, x_ref, rtol=0, atol=1e-5, msg=f"step {i} (t={t})")


def test_ddpm_step_coefficients_check_values():
    plan = make_plan("ddpm", 50)
    sig2 = {t: plan.coefficients[i, 4].item() ** 2 for i, t in enumerate(plan.timesteps)}
    assert abs(sig2[980] - 0.324605) < 1e-5 and abs(sig2[500] - 0.176623) < 1e-5
    assert abs(sig2[20] - 9.84293e-5) / 9.84293e-5 < 1e-4 and sig2[0] == 0
    assert plan.n_noise_draws == 50  # start noise + 49 stochastic steps


def test_loop_recovers_x0_with_true_eps():
    # a denoiser that returns the exact eps of a known x0 must give back x0 (STYLE.md oracle table)
    x0 = torch.rand(2, 1, 8, 8) * 1.6 - 0.8
    ab = alpha_bar()

    def true_eps(x_t, cond, t):
        a = ab[t].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    for kind in ("ddpm", "ddim"):
        plan = make_plan(kind, 50)
        noise = torch.randn(2, plan.n_noise_draws, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        out = restore(true_eps, torch.zeros_like(x0), plan, noise)
        torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)


def test_noise_independent_of_batch_size_and_order():
    keys = [NoiseKey(0, "abc", s, m) for s in range(4) for m in range(2)]
    full = draw_noise(keys, 5, (1, 6, 6))
    part = draw_noise(keys[::-1][:3], 5, (1, 6, 6))
    torch.testing.assert_close(part, full.flip(0)[:3], rtol=0, atol=0)
    assert not torch.equal(full[0], full[1])
    plan = make_plan("ddpm", 10)
    cond = torch.rand(len(keys), 1, 6, 6, generator=torch.Generator().manual_seed(1))
    noise = draw_noise(keys, plan.n_noise_draws, (1, 6, 6))
    whole = restore(_toy_denoise, cond, plan, noise)
    halves = torch.cat([restore(_toy_denoise, cond[:3], plan, noise[:3]),
                        restore(_toy_denoise, cond[3:], plan, noise[3:])])
    torch.testing.assert_close(whole, halves, rtol=0, atol=0)


@pytest.mark.parametrize("beta_start,beta_end", [(0.0001, 0.02), (0.00085, 0.012)])
def test_scaled_linear_alpha_bar_matches_diffusers(beta_start, beta_end):
    """beta_schedule="scaled_linear" (betas linear in sqrt(beta)) gives diffusers' alphas_cumprod exactly."""
    from condiff.config import ScheduleConfig

    cfg = ScheduleConfig(beta_start=beta_start, beta_end=beta_end, beta_schedule="scaled_linear")
    ref = diffusers.DDPMScheduler(beta_start=beta_start, beta_end=beta_end, beta_schedule="scaled_linear")
    torch.testing.assert_close(alpha_bar(cfg), ref.alphas_cumprod, rtol=0, atol=0)
    assert not torch.equal(alpha_bar(cfg), alpha_bar(ScheduleConfig(beta_start=beta_start, beta_end=beta_end)))


def _linear_denoise(x, cond, t):
    """Not the true eps of anything: a fixed linear function of x_t, cond and t (any float dtype)."""
    return 0.9 * x - 0.4 * cond + 2e-4 * t.view(-1, 1, 1, 1).to(x.dtype) - 0.1


def _ddpm_loop_float64(n_steps, cond, noise):
    """reference-method.md §4 written out in float64 from diffusers' alphas_cumprod: "leading"
    timesteps, x0 clamped to [-1, 1], and the k-th stochastic step (t > 0) adding sigma_t times
    noise draw k (draw 0 is the start noise); the last step, t = 0, adds none."""
    import numpy as np

    ab = diffusers.DDPMScheduler().alphas_cumprod.double().numpy()
    ratio = 1000 // n_steps
    timesteps = [i * ratio for i in range(n_steps)][::-1]
    c, z = cond.double().numpy(), noise.double().numpy()
    x = z[:, 0]
    for k, t in enumerate(timesteps):
        eps = _linear_denoise(torch.from_numpy(x), torch.from_numpy(c), torch.full((len(x),), t)).numpy()
        ab_t, ab_p = ab[t], (ab[t - ratio] if t - ratio >= 0 else 1.0)
        beta = 1 - ab_t / ab_p
        x0 = np.clip((x - np.sqrt(1 - ab_t) * eps) / np.sqrt(ab_t), -1, 1)
        x = np.sqrt(ab_p) * beta / (1 - ab_t) * x0 + np.sqrt(1 - beta) * (1 - ab_p) / (1 - ab_t) * x
        if t > 0:
            x = x + np.sqrt(max((1 - ab_p) / (1 - ab_t) * beta, 1e-20)) * z[:, 1 + k]
    return torch.from_numpy(x)


@pytest.mark.parametrize("n_steps,atol", [(50, 2e-5), (10, 2e-6)])
def test_ddpm_restore_with_a_non_exact_denoiser_matches_a_float64_loop(n_steps, atol):
    """restore() adds each stochastic step's own noise draw (1, 2, ... in step order, t = 20 included
    at 50 steps, none at t = 0) and runs in float32 throughout. The tolerance is float32's: at 50
    steps the plan's float32 coefficients (diffusers' order, 1 - alpha_t cancels near t = 0) put
    the result ~4e-6 from exact arithmetic, at 10 steps ~3e-7; rounding eps to fp16 once per step
    moves it by ~1e-4, taking a wrong noise draw (or none at t = 20) by ~1e-2."""
    plan = make_plan("ddpm", n_steps)
    assert plan.n_noise_draws == n_steps  # start noise + every step but t = 0
    g = torch.Generator().manual_seed(0)
    cond = torch.rand(2, 1, 6, 7, generator=g) * 2 - 1
    noise = torch.randn(2, plan.n_noise_draws, 1, 6, 7, generator=g)
    out = restore(_linear_denoise, cond, plan, noise)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _ddpm_loop_float64(n_steps, cond, noise), rtol=0, atol=atol)


def test_noise_depends_on_every_part_of_its_key():
    """Two scans (digests) at the same slice index, or two slices or members of one scan, get different noise."""
    base = NoiseKey(7, "a" * 64, 3, 1)
    others = [NoiseKey(7, "b" * 64, 3, 1), NoiseKey(7, "a" * 64, 4, 1), NoiseKey(7, "a" * 64, 3, 0),
              NoiseKey(8, "a" * 64, 3, 1)]
    noise = draw_noise([base, *others], 2, (1, 4, 4))
    assert len({k.generator_seed() for k in [base, *others]}) == 5
    for b in range(1, 5):
        assert not torch.equal(noise[b], noise[0]), others[b - 1]


def test_noise_stream_is_pinned():
    """Reproducibility contract: the noise of a key must not change between condiff versions (earlier
    runs are reproduced from seed and input digest). The values are pinned as condiff drew them
    (torch's CPU generator, torch 2.x); a change to the key hashing or to draw_noise breaks this test."""
    key = NoiseKey(0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", 3, 1)
    assert key.generator_seed() == 7389114036108045457
    got = draw_noise([key], 2, (1, 1, 3))
    pinned = torch.tensor([-1.7379354238510132, -1.2573657035827637, -0.35204431414604187,
                           -0.8918970227241516, 1.1502751111984253, -1.0390602350234985], dtype=torch.float32)
    assert got.shape == (1, 2, 1, 1, 3)
    assert torch.equal(got.flatten(), pinned)
