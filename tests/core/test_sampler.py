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
