"""EMA schedule of reference-method §3 against a float64 hand computation and diffusers' EMAModel."""
import numpy as np
import pytest
import torch
from torch import nn

from condiff.train.ema import EMA, MAX_DECAY, ema_decay


def test_decay_schedule_values():
    assert ema_decay(1) == 0.0  # the first update copies the weights
    assert ema_decay(2) == pytest.approx(2 / 11, abs=1e-15)  # 0.1818...
    assert ema_decay(2) == pytest.approx(0.1818, abs=1e-4)
    assert ema_decay(1001) == pytest.approx(1001 / 1010, abs=1e-15)  # 0.99109...
    assert ema_decay(1001) == pytest.approx(0.99109, abs=1e-5)
    # the 0.9999 cap: (1 + k) / (10 + k) = 0.9999 exactly at k = 89,990; above it from k = 89,991
    assert ema_decay(89_990) < MAX_DECAY  # k = 89,989
    assert ema_decay(89_992) == MAX_DECAY  # k = 89,991
    assert 89_992 / 90_001 > MAX_DECAY
    assert ema_decay(10**7) == MAX_DECAY
    with pytest.raises(ValueError):
        ema_decay(0)


def _weights_sequence(n_steps, shape, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(n_steps)]


def test_ema_matches_float64_hand_computation():
    model = nn.Linear(5, 3)
    ema = EMA(model)
    seq_w = _weights_sequence(40, (3, 5), seed=1)
    seq_b = _weights_sequence(40, (3,), seed=2)
    hand_w = np.zeros((3, 5))
    hand_b = np.zeros(3)
    for n, (w, b) in enumerate(zip(seq_w, seq_b), start=1):
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(w))
            model.bias.copy_(torch.from_numpy(b))
        used = ema.update(model)
        k = n - 1
        decay = 0.0 if k == 0 else min(0.9999, (1 + k) / (10 + k))
        assert used == decay
        w32 = w.astype(np.float32).astype(np.float64)  # the model holds float32 weights
        b32 = b.astype(np.float32).astype(np.float64)
        hand_w = hand_w - (1 - decay) * (hand_w - w32) if k else w32.copy()
        hand_b = hand_b - (1 - decay) * (hand_b - b32) if k else b32.copy()
        np.testing.assert_allclose(ema.module.weight.detach().double().numpy(), hand_w, rtol=0, atol=2e-6)
        np.testing.assert_allclose(ema.module.bias.detach().double().numpy(), hand_b, rtol=0, atol=2e-6)
    assert ema.n_updates == 40
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_is_bit_identical_to_diffusers_emamodel():
    training_utils = pytest.importorskip("diffusers.training_utils")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 1, 1))
    ref = training_utils.EMAModel(model.parameters())  # all defaults, as the reference (§3)
    ours = EMA(model)
    gen = torch.Generator().manual_seed(1)
    for _ in range(25):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        ref.step(model.parameters())
        ours.update(model)
    for s, p in zip(ref.shadow_params, ours.module.parameters()):
        assert torch.equal(s, p)
    assert ref.cur_decay_value == ours.last_decay


def test_ema_state_round_trip():
    model = nn.Linear(3, 2)
    ema = EMA(model)
    for _ in range(3):
        ema.update(model)
    other = EMA(nn.Linear(3, 2))
    other.load_state_dict(ema.state_dict(), ema.n_updates)
    assert other.n_updates == 3 and other.last_decay == ema_decay(3)
    assert all(torch.equal(a, b) for a, b in zip(ema.module.parameters(), other.module.parameters()))
