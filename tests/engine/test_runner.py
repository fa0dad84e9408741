"""The batched ensemble runner: batch-size and order independence, ensemble = mean of members."""
import numpy as np
import pytest
import torch

from condiff.config import preset
from condiff.engine.backends.torch_backend import TorchDenoiser
from condiff.engine.runner import SliceJob, run_slices
from condiff.sampler import make_plan
from condiff.unet import ConditionalUNet


@pytest.fixture(scope="module")
def real_jobs():
    """Eight real 32x32 IXI slices (data kit) or, where it is absent, smooth phantoms."""
    from tests.conftest import SHARED_DATA

    path = SHARED_DATA / "ixi-t1" / "IXI132-HH-1415-T1.nii.gz"
    if path.is_file():
        import nibabel as nib
        from skimage.transform import resize

        vol = np.asarray(nib.load(path).get_fdata(), np.float32)
        slices = [resize(vol[:, 40 + 3 * k, :], (32, 32)) for k in range(8)]
        slices = [s / vol.max() for s in slices]
    else:
        yy, xx = np.mgrid[:32, :32]
        slices = [np.where((yy - 16) ** 2 + (xx - 16) ** 2 < 150, 0.5 + 0.1 * np.sin(xx / (2 + k)), 0) for k in range(8)]
    return [SliceJob(torch.from_numpy(np.asarray(s, np.float32))[None], "case-digest", k) for k, s in enumerate(slices)]


@pytest.fixture(scope="module")
def members():
    torch.manual_seed(0)
    return [TorchDenoiser(ConditionalUNet(preset("tiny", 1, sample_size=32)), torch.device("cpu"), "fp32", 8)
            for _ in range(3)]


def test_identical_maps_at_batch_sizes_1_3_8_and_any_order(real_jobs, members):
    torch.set_num_threads(1)
    plan = make_plan("ddpm", 6)
    ref = run_slices(members, real_jobs, plan, batch_size=1)
    for bs in (3, 8):
        other = run_slices(members, real_jobs, plan, batch_size=bs)
        for a, b in zip(ref, other):
            assert torch.equal(a.amap, b.amap) and torch.equal(a.restoration, b.restoration)
    shuffled = run_slices(members, real_jobs[::-1], plan, batch_size=3)[::-1]
    assert all(torch.equal(a.amap, b.amap) for a, b in zip(ref, shuffled))


def test_ensemble_map_is_mean_of_members_run_alone(real_jobs, members):
    plan = make_plan("ddim", 4)
    ens = run_slices(members, real_jobs, plan, batch_size=4, keep_member_maps=True)
    alone = [run_slices([d], real_jobs, plan, batch_size=4, member_ids=[m]) for m, d in enumerate(members)]
    for i, r in enumerate(ens):
        stacked = torch.stack([alone[m][i].amap for m in range(3)])
        torch.testing.assert_close(r.amap, stacked.mean(0), rtol=0, atol=1e-7)
        torch.testing.assert_close(r.member_maps, stacked, rtol=0, atol=0)
        assert r.score == pytest.approx(np.mean([alone[m][i].score for m in range(3)]), rel=1e-6)


def test_member_ids_key_the_noise(real_jobs, members):
    plan = make_plan("ddpm", 3)
    as0 = run_slices([members[2]], real_jobs[:2], plan, member_ids=[0])
    as2 = run_slices([members[2]], real_jobs[:2], plan, member_ids=[2])
    full = run_slices(members, real_jobs[:2], plan, keep_member_maps=True)
    assert not torch.equal(as0[0].amap, as2[0].amap)
    assert torch.equal(as2[0].amap, full[0].member_maps[2])


def _perturbed_tiny(seed: int = 0) -> ConditionalUNet:
    torch.manual_seed(seed)
    net = ConditionalUNet(preset("tiny", 1, sample_size=32))
    with torch.no_grad():
        for p in net.parameters():  # non-zero everywhere, so every convolution's rounding shows
            p.add_(0.05 * torch.randn(p.shape))
    return net


def test_cpu_results_do_not_depend_on_the_thread_count():
    """Each row runs on one intra-op thread, so 1, 2 or 4 torch threads give the same bytes; the plain
    batch-1 call at 2 threads rounds differently (the reason), which keeps this test able to fail."""
    den = TorchDenoiser(_perturbed_tiny(), torch.device("cpu"), "fp32", 8)
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(5, 1, 32, 32, generator=g), torch.rand(5, 1, 32, 32, generator=g)
    t = torch.tensor([999, 700, 400, 100, 0])
    before = torch.get_num_threads()
    try:
        outs = {}
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            outs[n] = den.denoise(x, c, t)
            assert torch.get_num_threads() == n  # restored after the call
        with torch.inference_mode():
            torch.set_num_threads(2)
            two_threads = torch.cat([den.model(x[i:i + 1], c[i:i + 1], t[i:i + 1]) for i in range(5)])
            torch.set_num_threads(1)
            one_thread = torch.cat([den.model(x[i:i + 1], c[i:i + 1], t[i:i + 1]) for i in range(5)])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[1], outs[2]) and torch.equal(outs[1], outs[4])
    assert torch.equal(outs[1], one_thread)
    assert not torch.equal(one_thread, two_threads)  # what per-row single-threading removes


def test_cpu_rows_run_side_by_side_on_one_thread_each():
    import threading

    den = TorchDenoiser(_perturbed_tiny(), torch.device("cpu"), "fp32", 8)
    seen = []
    den.model.register_forward_hook(
        lambda *_: seen.append((threading.current_thread().name, torch.get_num_threads(), torch.is_inference_mode_enabled())))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        den.denoise(torch.randn(4, 1, 32, 32), torch.rand(4, 1, 32, 32), torch.full((4,), 500))
        assert len(seen) == 4 and all(threads == 1 and inference for _, threads, inference in seen)
        assert all(name.startswith("condiff-row") for name, _, _ in seen)
        seen.clear()
        den.denoise(torch.randn(1, 1, 32, 32), torch.rand(1, 1, 32, 32), torch.full((1,), 500))
        assert [s[0] for s in seen] == [threading.current_thread().name]  # one row: no pool hop
    finally:
        torch.set_num_threads(before)


def test_noise_drawn_ahead_on_a_thread_gives_the_same_results(real_jobs, members, monkeypatch):
    """The GPU path draws the next batch's noise while the device runs this one: forced here on the CPU,
    every map, restoration and member score must equal the sequential run, and each batch's noise must
    be drawn before it runs (the prefetch thread is the one drawing)."""
    import threading

    from condiff.engine import runner

    plan = make_plan("ddpm", 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = run_slices(members, real_jobs, plan, batch_size=3, keep_member_maps=True, prefetch=False)
        drawn_on = []
        real_draw = runner.draw_noise

        def recording_draw(*a, **k):
            drawn_on.append(threading.current_thread().name)
            return real_draw(*a, **k)

        monkeypatch.setattr(runner, "draw_noise", recording_draw)
        ahead = run_slices(members, real_jobs, plan, batch_size=3, keep_member_maps=True, prefetch=True)
    finally:
        torch.set_num_threads(threads)
    assert len(drawn_on) == 3 * 3 and all(name.startswith("condiff-noise") for name in drawn_on)
    for a, b in zip(ref, ahead):
        assert torch.equal(a.amap, b.amap) and torch.equal(a.restoration, b.restoration)
        assert torch.equal(a.member_maps, b.member_maps) and a.member_scores == b.member_scores
