"""The training loop: objective against float64 oracles, learning, exact resume, validation rules, data keys.

Real IXI slices (1 subject at 32 px) when the data kit is present, synthetic phantoms otherwise.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from condiff.config import preset
from condiff.errors import TrainingDataError
from condiff.schedule import alpha_bar, min_snr_weight
from condiff.train import checkpoint as ckpt
from condiff.train import data as tdata
from condiff.train.loop import TrainConfig, Trainer, bit_equal, diffusion_loss, recipe_config
from condiff.train.tasks import ArrayPool, RestorationTask
from condiff.unet import ConditionalUNet
from _train_helpers import phantoms

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CONDIFF_SHARED_DATA", REPO.parent / "shared" / "data"))
SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny 32-px nets gain nothing from a second thread, and OpenMP spin-waits make a busy 2-core machine
    10x slower with two; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    """A handful of healthy slices (N, 1, 32, 32) in [0, 1]."""
    subject = SHARED / "ixi-t1" / "IXI132-HH-1415-T1.nii.gz"
    if not subject.is_file():
        return phantoms()
    from condiff.preprocess import PreprocessConfig

    folder = tmp_path_factory.mktemp("ixi1")
    for suffix in ("", "_brainmask"):
        (folder / f"IXI132-HH-1415-T1{suffix}.nii.gz").symlink_to(SHARED / "ixi-t1" / f"IXI132-HH-1415-T1{suffix}.nii.gz")
    pre = PreprocessConfig(modality="mri", image_size=SIZE, normalisation="percentile", use_mask=True)
    s = tdata.load_slices(folder, pre, "{dir}/{stem}_brainmask.nii.gz")
    return s.images[18:54:3]  # 12 mid-brain slices


def _task(images, p_no_task=0.2):
    return RestorationTask([0, 2, 4], p_no_task=p_no_task, same_pool=ArrayPool(images), has_background=True)


def _trainer(images, work, seed=0, init_seed=0, val_images=None, **cfg):
    torch.manual_seed(init_seed)
    model = ConditionalUNet(preset("tiny", 1, SIZE))
    base = dict(batch_size=2, max_steps=6, checkpoint_every=0, log_every=1, val_start=10**9, seed=seed)
    base.update(cfg)
    train = tdata.TaskSamples(images, _task(images), seed)
    val = None if val_images is None else tdata.TaskSamples(val_images, _task(val_images), seed, tdata.VAL_STREAM)
    return Trainer(model, TrainConfig(**base), train, work, val_set=val)


# ----------------------------------------------------------------------------------- objective oracles


def _alpha_bar64():
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def test_min_snr_weights_match_float64():
    t = torch.arange(1000)
    got = min_snr_weight(t, alpha_bar(), 1.0).double().numpy()
    # the formula, in float64 on the (float32, as diffusers) schedule table
    ab32 = alpha_bar().double().numpy()
    snr32 = ab32 / (1 - ab32)
    np.testing.assert_allclose(got, np.minimum(snr32, 1.0) / snr32, rtol=1e-6, atol=0)
    # and against a schedule computed in float64 from scratch (the float32 cumprod drifts by < 5e-7)
    ab = _alpha_bar64()
    snr = ab / (1 - ab)
    np.testing.assert_allclose(got, np.minimum(snr, 1.0) / snr, rtol=0, atol=5e-7)
    assert int(np.argmax(snr < 1)) == 259  # reference-method §3: first t with SNR < 1
    assert np.all(got[259:] == 1.0) and np.all(got[:259] < 1.0)


def test_offset_noise_replays_a_float64_hand_draw_and_has_the_right_statistics():
    shape = (3, 8, 8)
    t, eps = tdata.draw_diffusion_noise(np.random.default_rng(5), shape)
    rng = np.random.default_rng(5)  # replay the documented draw order in float64
    t_hand = int(rng.integers(0, 1000))
    base = rng.standard_normal(shape)
    offset = rng.standard_normal((3, 1, 1))
    assert t == t_hand
    np.testing.assert_allclose(eps, base + 0.1 * offset, rtol=0, atol=1e-6)
    # statistics over many samples: Var = 1 + 0.1², Cov(same channel) = 0.1², Cov(other channel) = 0
    rng = np.random.default_rng(0)
    draws = np.stack([tdata.draw_diffusion_noise(rng, (2, 4, 4))[1] for _ in range(20000)]).astype(np.float64)
    n = len(draws)
    se = 4 / np.sqrt(n)  # generous: ~4 standard errors of a variance estimate with kurtosis 3
    assert draws.var() == pytest.approx(1.01, abs=se)
    cov_same = np.mean(draws[:, 0, 0, 0] * draws[:, 0, 3, 2])
    cov_other = np.mean(draws[:, 0, 0, 0] * draws[:, 1, 0, 0])
    assert cov_same == pytest.approx(0.01, abs=se / 2)
    assert cov_other == pytest.approx(0.0, abs=se / 2)
    ts = np.array([tdata.draw_diffusion_noise(rng, (1, 1, 1))[0] for _ in range(20000)])
    assert ts.min() == 0 and ts.max() == 999 and ts.mean() == pytest.approx(499.5, abs=10)


class _Recorder(torch.nn.Module):
    """Returns a fixed 'prediction' and records what the network would see."""

    def __init__(self, pred):
        super().__init__()
        self.pred = pred
        self.seen = None

    def forward(self, x_t, cond, t):
        self.seen = (x_t.clone(), cond.clone(), t.clone())
        return self.pred


@pytest.mark.parametrize("mask_weight", [1.0, 4.0])
def test_loss_matches_float64_hand_computation(mask_weight):
    g = torch.Generator().manual_seed(0)
    b, c, h, w = 3, 2, 5, 4
    batch = {"x0": torch.rand(b, c, h, w, generator=g), "cond": torch.rand(b, c, h, w, generator=g),
             "eps": torch.randn(b, c, h, w, generator=g), "t": torch.tensor([3, 258, 900]),
             "mask": torch.rand(b, h, w, generator=g) > 0.6}
    pred = torch.randn(b, c, h, w, generator=g)
    model = _Recorder(pred)
    loss, per = diffusion_loss(model, batch, alpha_bar(), 1.0, mask_weight)
    ab = alpha_bar().double().numpy()[batch["t"].numpy()][:, None, None, None]  # float64 on the float32 table
    x0, eps = batch["x0"].double().numpy(), batch["eps"].double().numpy()
    np.testing.assert_allclose(model.seen[0].double().numpy(), np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, atol=1e-6)
    assert torch.equal(model.seen[1], batch["cond"]) and torch.equal(model.seen[2], batch["t"])
    snr = ab[:, 0, 0, 0] / (1 - ab[:, 0, 0, 0])
    weight_px = np.where(batch["mask"].numpy()[:, None], mask_weight, 1.0)
    err = weight_px * (pred.double().numpy() - eps) ** 2
    per_hand = np.minimum(snr, 1) / snr * err.mean(axis=(1, 2, 3))
    np.testing.assert_allclose(per.double().numpy(), per_hand, rtol=2e-5)
    assert float(loss) == pytest.approx(per_hand.mean(), rel=2e-5)


def test_recipes():
    ref = recipe_config("reference")
    assert (ref.lr, ref.mask_weight, ref.p_no_task, ref.weight_decay, ref.grad_clip) == (1e-4, 1.0, 0.2, 1e-2, 1.0)
    assert (ref.size_scale_start, ref.size_curriculum_steps) == (1.0, 0)
    heal = recipe_config("healing", lr=3e-4)
    assert heal.mask_weight > 1 and heal.p_no_task < 0.2 and heal.lr == 3e-4
    assert heal.size_scale_start > 1 and heal.size_curriculum_steps > 0  # the recipe's size curriculum
    off = recipe_config("healing", size_scale_start=1.0, size_curriculum_steps=0)
    assert (off.size_scale_start, off.size_curriculum_steps, off.mask_weight) == (1.0, 0, heal.mask_weight)
    with pytest.raises(ValueError):
        recipe_config("nope")


# ----------------------------------------------------------------------------------- data keys


def test_samples_are_pure_functions_of_their_key_and_ranks_shard_the_global_batch(slices):
    ds = tdata.TaskSamples(slices, _task(slices), seed=3)
    a, b = ds[(2, 5)], ds[(2, 5)]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(ds[(3, 5)]["eps"], a["eps"])  # a new epoch redraws
    single = tdata.StepBatchSampler(len(slices), 4, seed=3, start=8)
    ranks = [tdata.StepBatchSampler(len(slices), 2, seed=3, start=8, rank=r, world_size=2) for r in range(2)]
    for step in range(7):  # crosses epoch boundaries (12 samples, 4 per step)
        assert single.batch_for_step(step) == ranks[0].batch_for_step(step) + ranks[1].batch_for_step(step)
    keys = single.keys_at(0, 36)
    for e in range(3):
        assert sorted(i for ep, i in keys if ep == e) == list(range(len(slices)))  # each epoch a permutation
    # the number of data-loader workers never changes a batch
    loaders = [torch.utils.data.DataLoader(ds, batch_sampler=tdata.StepBatchSampler(len(slices), 3, 3),
                                           collate_fn=tdata.collate, num_workers=w) for w in (0, 2)]
    for b0, b2, _ in zip(*loaders, range(3)):
        assert all(torch.equal(b0[k], b2[k]) for k in b0)


def test_rgb_is_centred_after_the_task():
    rgb = np.random.default_rng(0).random((4, 3, 16, 16)).astype(np.float32)
    seen = []

    def identity_task(image, rng):
        seen.append(image.copy())
        return image + 0.1, np.zeros(image.shape[1:], bool), 2

    s = tdata.TaskSamples(rgb, identity_task, 0, centre=True)[(0, 1)]
    np.testing.assert_array_equal(seen[0], rgb[1])  # the task saw the uncentred [0, 1] image
    np.testing.assert_allclose(s["x0"].numpy(), 2 * rgb[1] - 1, atol=1e-6)
    np.testing.assert_allclose(s["cond"].numpy(), 2 * (rgb[1] + 0.1) - 1, atol=1e-6)


def test_empty_dataset_is_refused_naming_the_folder(tmp_path):
    from condiff.preprocess import PreprocessConfig

    pre = PreprocessConfig(modality="mri", image_size=SIZE)
    with pytest.raises(TrainingDataError, match=str(tmp_path)):
        tdata.load_slices(tmp_path, pre)
    (tmp_path / "IXI1-T1_brainmask.nii.gz").write_bytes(b"")  # masks alone are no training data
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(TrainingDataError, match="no training images"):
        tdata.load_slices(tmp_path, pre)
    with pytest.raises(TrainingDataError, match="is not a folder"):
        tdata.load_slices(tmp_path / "missing", pre)


# ----------------------------------------------------------------------------------- training


def test_loss_goes_down_on_a_fixed_batch(slices, tmp_path):
    tr = _trainer(slices, tmp_path, batch_size=4)
    batch = tr.batch_at(0)
    losses = []
    for _ in range(60):
        losses.append(float(tr.forward_backward(batch)))
        tr.optimizer_step()
    assert tr.step == 60 and tr.ema.n_updates == 60
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_resume_is_bit_identical_to_an_uninterrupted_run(slices, tmp_path):
    train, val = slices[:9], slices[9:]
    common = dict(max_steps=6, val_start=2, val_every=2, checkpoint_every=3, keep_checkpoints=5)
    full = _trainer(train, tmp_path / "full", val_images=val, **common)
    res_full = full.fit()
    assert res_full.reason == "max_steps" and full.val.n_evals == 3

    first = _trainer(train, tmp_path / "cut", val_images=val, **{**common, "max_steps": 3})
    assert first.fit().steps == 3
    # disturb every global generator: resume must restore them
    torch.manual_seed(123), np.random.seed(123)
    second = _trainer(train, tmp_path / "cut", val_images=val, init_seed=99, **common)  # other init weights
    second.load(ckpt.latest_checkpoint(tmp_path / "cut" / "checkpoints"))
    assert second.step == 3 and second.position == 6
    res = second.fit()
    assert res.steps == 6
    assert bit_equal(full.model, second.model)
    assert bit_equal(full.ema.module, second.ema.module)
    assert full.val == second.val
    sa, sb = full.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[p][k], sb[p][k]) for p in sa for k in sa[p])
    best_full = res_full.best_path.read_bytes()
    assert res.best_path.name == res_full.best_path.name and res.best_path.read_bytes() == best_full
    logged = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "ema_decay", "images_per_s", "elapsed_s"} <= set(logged[0])


def test_resume_with_another_learning_rate_warns_and_uses_the_new_one(slices, tmp_path, caplog):
    first = _trainer(slices, tmp_path, max_steps=2, checkpoint_every=2, lr=1e-4)
    first.fit()
    second = _trainer(slices, tmp_path, max_steps=3, lr=4e-4)
    with caplog.at_level("WARNING", logger="condiff.train.loop"):
        second.load(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert "lr 0.0001 -> 0.0004" in caplog.text
    assert all(g["lr"] == pytest.approx(4e-4) for g in second.optimizer.param_groups)
    caplog.clear()
    same = _trainer(slices, tmp_path, max_steps=3, lr=1e-4)
    with caplog.at_level("WARNING", logger="condiff.train.loop"):
        same.load(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert "optimisation changed" not in caplog.text


def test_best_checkpoint_moving_average_and_early_stopping(slices, tmp_path):
    tr = _trainer(slices[:8], tmp_path, val_images=slices[8:], max_steps=50, val_start=1, val_every=1, patience=2)
    losses = iter([0.5, 1.0, 1.0, 1.0, 1.0, 1.0])
    tr.validate = lambda: next(losses)
    snapshots = {}
    tr.hooks.append(lambda step, ema: snapshots.setdefault(step, {k: v.clone() for k, v in ema.state_dict().items()})
                    and {"hook_metric": step})
    res = tr.fit()
    # m: 0.5 (best, step 1), then 0.55, 0.595, 0.6355: never lower; stop when step - 1 > 2
    assert res.reason == "early_stopping" and res.steps == 4
    assert res.val.best_step == 1 and res.val.best == pytest.approx(0.5)
    assert res.val.ma == pytest.approx(0.9 * (0.9 * (0.9 * 0.5 + 0.1) + 0.1) + 0.1)
    from safetensors.torch import load_file

    best = load_file(str(res.best_path))
    assert all(torch.equal(best[k], snapshots[1][k]) for k in best)
    assert json.loads((tmp_path / "best" / "best.json").read_text())["step"] == 1
    vals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [v["hook_metric"] for v in vals if v["kind"] == "val"] == [1, 2, 3, 4]
    # a finished (early-stopped) run does not train further on resume
    again = _trainer(slices[:8], tmp_path, val_images=slices[8:], max_steps=50, val_start=1, val_every=1, patience=2)
    again.load(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert again.fit().steps == 4


def test_time_budget_and_stop_request_end_cleanly_with_a_checkpoint(slices, tmp_path):
    tr = _trainer(slices, tmp_path / "a", max_steps=1000, time_budget_s=0.0)
    res = tr.fit()
    assert res.reason == "time_budget" and res.steps == 1
    assert ckpt.latest_checkpoint(tmp_path / "a" / "checkpoints").name == "checkpoint-000000001"
    calls = iter([False, False, True])
    tr = _trainer(slices, tmp_path / "b", max_steps=1000)
    tr.stop = lambda: next(calls)
    res = tr.fit()
    assert res.reason == "signal" and res.steps == 3 and tr.finished is None
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "b" / "checkpoints")).state["step"] == 3


# ----------------------------------------------------------------------------------- divergence


def _finite(tensors) -> bool:
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def _end_record(work):
    return [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()][-1]


def test_a_diverging_run_stops_naming_the_steps_and_keeps_the_last_finite_checkpoint(slices, tmp_path):
    from condiff.train.loop import TrainingDivergedError

    healthy = _trainer(slices, tmp_path, max_steps=2, checkpoint_every=2)
    healthy.fit()
    # resumed at an absurd learning rate: step 3 throws the weights far off, step 4's loss is NaN
    tr = _trainer(slices, tmp_path, lr=1e6, max_steps=30, log_every=1, checkpoint_every=2, keep_checkpoints=50)
    tr.load(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    with pytest.raises(TrainingDivergedError) as info:
        tr.fit()
    err = info.value
    first, last = err.steps
    assert 3 <= first <= last < 30 and "training diverged" in err.message and "--lr" in err.message
    assert f"in step {last} " in err.message or f"in steps {first}-{last} " in err.message
    assert str(tmp_path / "metrics.jsonl") in err.message
    end = _end_record(tmp_path)
    assert end["kind"] == "end" and end["reason"] == "diverged" and end["step"] == last
    found = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [s for s, _ in found] == [2] and "checkpoint-000000002 (step 2" in err.message  # the hint names it
    assert _finite(ckpt.load_checkpoint(found[-1][1]).tensors.values())
    # the last finite checkpoint is usable: a resume at a sane learning rate trains on
    again = _trainer(slices, tmp_path, lr=1e-4, max_steps=4)
    again.load(found[-1][1])
    assert again.fit().reason == "max_steps" and _finite(again.ema.state_dict().values())


def test_non_finite_weights_are_never_checkpointed_between_log_records(slices, tmp_path):
    from condiff.train.loop import TrainingDivergedError

    tr = _trainer(slices, tmp_path, lr=1e6, max_steps=10, log_every=100, checkpoint_every=2)
    with pytest.raises(TrainingDivergedError, match=r"non-finite weights in steps 1-2.*no checkpoint was written"):
        tr.fit()
    assert ckpt.list_checkpoints(tmp_path / "checkpoints") == []
    assert _end_record(tmp_path)["reason"] == "diverged"


def test_a_poisoned_ema_is_never_written_as_the_best_weights(slices, tmp_path):
    from condiff.train.loop import TrainingDivergedError

    tr = _trainer(slices[:8], tmp_path, val_images=slices[8:], lr=1e6, max_steps=10, log_every=100, val_start=1,
                  val_every=1)
    with pytest.raises(TrainingDivergedError, match="diverged"):
        tr.fit()
    # the first validation (step 1) already sees a non-finite loss: nothing may be kept as the best
    # (checking only that kept weights are finite passed with a write_best before the finiteness check)
    assert not list((tmp_path / "best").glob("ema*")) and not (tmp_path / "best" / "best.json").exists()


def test_fp16_gradient_overflow_is_the_scalers_business_not_divergence(slices, tmp_path):
    from condiff.train.loop import TrainingDivergedError

    tr = _trainer(slices, tmp_path)
    tr.step = 5
    tr.precision = "fp16"  # a skipped step's gradient norm is inf under the GradScaler
    tr._check_record({"loss": 0.3, "grad_norm": float("inf")})
    with pytest.raises(TrainingDivergedError, match="mean loss nan"):
        tr._check_record({"loss": float("nan"), "grad_norm": 1.0})
    tr.precision = "fp32"
    with pytest.raises(TrainingDivergedError, match="gradient norm inf"):
        tr._check_record({"loss": 0.3, "grad_norm": float("inf")})


# ----------------------------------------------------------------------------------- one optimiser step


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _norm(grads) -> float:
    return float(torch.cat([g.double().flatten() for g in grads.values()]).norm())


@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "enabled-grad-scaler"])
def test_the_optimiser_steps_on_the_unscaled_gradient_clipped_to_grad_clip(slices, tmp_path, scaled):
    """AdamW must see the true gradient scaled down to norm ``grad_clip``, and the returned (logged) norm is
    the true gradient's. The fp16 path is exercised on the CPU with a real, enabled ``GradScaler("cpu")``
    standing in for the CUDA one: the loss is multiplied by 2^12, so clipping before unscaling would clip
    the scaled gradient (and the scaler's own late unscale would then leave a norm of grad_clip / 2^12)."""
    clip, scale = 0.01, 2.0 ** 12
    tr = _trainer(slices, tmp_path, batch_size=2, grad_clip=clip)
    if scaled:
        tr.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    tr.forward_backward(tr.batch_at(0))
    true = {n: g / scale for n, g in _grads(tr.model).items()} if scaled else _grads(tr.model)
    true_norm = _norm(true)
    assert true_norm > 10 * clip  # the clip is active: a step without it would differ
    seen = {}
    real_step = tr.optimizer.step

    def spy(*args, **kwargs):  # what AdamW is handed
        seen.update(_grads(tr.model))
        return real_step(*args, **kwargs)

    tr.optimizer.step = spy
    norm = float(tr.optimizer_step())
    assert seen.keys() == true.keys() and tr.step == 1
    assert norm == pytest.approx(true_norm, rel=1e-5)
    assert _norm(seen) == pytest.approx(clip, rel=1e-4)
    factor = clip / (true_norm + 1e-6)  # torch's clip_grad_norm_ rule, applied by hand in float64
    for name, g in true.items():
        np.testing.assert_allclose(seen[name].double().numpy(), g.double().numpy() * factor, rtol=1e-4,
                                   atol=1e-9 * clip, err_msg=name)


def test_ranks_advance_by_the_global_batch_and_never_reread_each_others_samples(slices, tmp_path):
    """Two ranks of a world of 2 (simulated as ``test_ddp`` does the arithmetic, without a process group:
    only the data order is under test): after n steps each has consumed n global batches, its batches
    are its half of a single process's batch of 2 x B, and no sample of the stream is read twice."""
    from condiff.train.distributed import DistInfo

    class Recording:
        def __init__(self, ds):
            self.ds, self.keys = ds, []

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, key):
            self.keys.append(key)
            return self.ds[key]

    per_rank, steps, seed = 2, 3, 0
    read = {}
    for rank in (0, 1):
        tr = _trainer(slices, tmp_path / f"rank{rank}", seed=seed, batch_size=per_rank)
        tr.dist = DistInfo(rank=rank, world_size=2)
        tr.sampler = tdata.StepBatchSampler(len(slices), per_rank, seed, 0, rank, 2)
        tr.train_set = Recording(tr.train_set)
        read[rank] = []
        for _ in range(steps):
            tr.train_set.keys.clear()
            tr.forward_backward(tr.batch_at(0))
            tr.optimizer_step()
            read[rank].append(list(tr.train_set.keys))
        assert tr.step == steps and tr.position == steps * 2 * per_rank
        assert tr.state()[1]["data_order"]["position"] == steps * 2 * per_rank  # what a resume continues from
    single = tdata.StepBatchSampler(len(slices), 2 * per_rank, seed)  # one process, the global batch
    for s in range(steps):
        assert read[0][s] + read[1][s] == single.batch_for_step(s), s
    every = [k for r in (0, 1) for batch in read[r] for k in batch]
    assert len(set(every)) == len(every) == steps * 2 * per_rank


@pytest.mark.parametrize("name", ["run", b"run\xff".decode("utf-8", "surrogateescape")])
def test_best_weights_are_found_in_a_folder_of_any_name(tmp_path, name):
    """safetensors opens UTF-8 paths only: in a folder with another byte in its name the best weights'
    step was unreadable, so the best was never exported (and their loading raised a TypeError)."""
    from condiff.modelset import load_safetensors
    from condiff.train.validation import ValState, best_weights_path, write_best

    work = tmp_path / name
    state = ValState()
    ema = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    path = write_best(work, ema, 12, state)
    state.best_step = 12
    assert best_weights_path(work, state) == path
    assert torch.equal(load_safetensors(path)["w"], ema["w"])
    (work / "best" / "ema-000000013.safetensors").write_bytes(path.read_bytes()[:-4])  # torn
    state.best_step = 13
    assert best_weights_path(work, state) is None
