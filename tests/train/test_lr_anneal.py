"""Learning-rate anneal: the schedule against a float64 hand formula, parsing, and its path into training."""
import json

import numpy as np
import pytest
import torch

from condiff.train import checkpoint as ckpt
from condiff.train.loop import TrainConfig, bit_equal
from condiff.train.lr_anneal import LrAnneal, parse_lr_anneal

from test_loop import _trainer, slices  # noqa: F401  (the module fixture, reused)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_factor_is_one_then_a_half_cosine_then_the_final_value():
    a = LrAnneal(100, 300, 0.05)
    steps = np.arange(0, 400)
    expected = np.where(steps <= 100, 1.0, np.where(steps >= 300, 0.05, 0.05 + 0.95 * 0.5 * (
        1 + np.cos(np.pi * (steps - 100) / 200.0))))
    got = np.array([a.factor(int(s)) for s in steps])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)
    assert a.factor(200) == pytest.approx(0.525)  # half way: the mean of 1 and the final factor
    assert all(x >= y for x, y in zip(got, got[1:]))  # never rises
    assert not LrAnneal().active and LrAnneal().factor(10**6) == 1.0


@pytest.mark.parametrize("text, expected", [("38000:42000", LrAnneal(38000, 42000, 0.01)),
                                            ("0:500:0.1", LrAnneal(0, 500, 0.1)),
                                            ("none", LrAnneal()), (None, LrAnneal())])
def test_parse(text, expected):
    assert parse_lr_anneal(text) == expected


@pytest.mark.parametrize("text", ["38000", "a:b", "5:5", "9:3", "0:100:0", "0:100:1.5", "0:0", "-1:10", "1:2:3:4"])
def test_parse_rejects_malformed_or_empty_schedules(text):
    with pytest.raises(ValueError, match="anneal"):
        parse_lr_anneal(text)


def test_config_validates_and_gives_the_rate_per_step():
    cfg = TrainConfig(lr=2e-3, lr_anneal_start=4, lr_anneal_end=8, lr_final_factor=0.5)
    assert cfg.lr_at(0) == cfg.lr_at(4) == 2e-3 and cfg.lr_at(8) == cfg.lr_at(99) == pytest.approx(1e-3)
    assert cfg.to_dict()["lr_anneal_end"] == 8
    with pytest.raises(ValueError, match="end after it starts"):
        TrainConfig(lr_anneal_start=8, lr_anneal_end=8)


def test_training_follows_the_schedule_and_resumes_bit_identically(slices, tmp_path):  # noqa: F811
    common = dict(max_steps=7, checkpoint_every=3, keep_checkpoints=5, lr=1e-3, lr_anneal_start=2, lr_anneal_end=6,
                  lr_final_factor=0.1)
    full = _trainer(slices, tmp_path / "full", **common)
    full.fit()
    logged = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    rates = {r["step"]: r["lr"] for r in logged if r["kind"] == "train"}
    # the record of step s carries the rate of that step, taken after s - 1 completed steps
    assert rates == pytest.approx({s: 1e-3 * LrAnneal(2, 6, 0.1).factor(s - 1) for s in range(1, 8)}, abs=1e-15)
    assert rates[1] == rates[3] == 1e-3 and rates[7] == pytest.approx(1e-4) and rates[4] < rates[3]

    constant = _trainer(slices, tmp_path / "constant", **{**common, "lr_anneal_end": 0})
    constant.fit()
    assert not bit_equal(full.model, constant.model)  # the schedule reached the optimiser

    cut = _trainer(slices, tmp_path / "cut", **{**common, "max_steps": 4})
    cut.fit()
    resumed = _trainer(slices, tmp_path / "cut", init_seed=99, **common)
    resumed.load(ckpt.latest_checkpoint(tmp_path / "cut" / "checkpoints"))
    assert resumed.step == 4
    resumed.fit()
    assert bit_equal(full.model, resumed.model) and bit_equal(full.ema.module, resumed.ema.module)
