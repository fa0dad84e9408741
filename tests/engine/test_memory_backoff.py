"""Out of memory during inference: with --batch-size auto the batch is halved and the group rerun,
with the same outputs; with a fixed batch size it is a clear error that suggests the next size.

A real CUDA out-of-memory cannot be provoked on the CPU test machine, so the runner is wrapped to
raise torch's ``OutOfMemoryError`` (what the CUDA allocator raises) whenever it is asked for more
slices per batch than a pretend device holds; everything around it (pipeline, CLI, writer) is real.
"""
import json
from types import SimpleNamespace

import pytest
import torch

from _infer_helpers import FAST, digests, invoke_infer, one_torch_thread, reference_run
from condiff.engine import backoff, pipeline
from condiff.errors import BackendUnavailableError


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def _device_holding(limit: int, real=pipeline.run_slices, calls=None):
    """``run_slices`` on a pretend device that holds ``limit`` slices per batch: larger batches
    report the first batch's progress (work was under way) and then run out of memory."""
    def run(denoisers, jobs, plan, *, batch_size, progress=None, **kw):
        if calls is not None:
            calls.append(batch_size)
        if batch_size > limit:
            if progress is not None:
                progress(min(batch_size, len(jobs)))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total)")
        return real(denoisers, jobs, plan, batch_size=batch_size, progress=progress, **kw)

    return run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    models, scans, ref = reference_run(tmp_path_factory.mktemp("oom"), n_members=2, n_scans=2)  # at batch 4, never out of memory
    return models, scans, digests(ref)


def test_out_of_memory_halves_the_batch_and_gives_the_same_outputs(tmp_path, reference, monkeypatch):
    models, scans, want = reference
    calls = []
    monkeypatch.setattr(pipeline, "run_slices", _device_holding(1, calls=calls))
    out = tmp_path / "out"
    res = invoke_infer([scans, "-o", out, "--models", models, *FAST, "--batch-size", "auto"])  # the last one wins
    assert res.exit_code == 0, res.output + res.stderr
    assert "2 done, 0 already done, 0 failed" in res.stdout
    assert digests(out) == want  # bit for bit on the CPU, though the reference ran at batch 4
    run = json.loads((out / "run.json").read_text())
    assert (run["batch_size_requested"], run["batch_size_start"], run["batch_size"], run["batch_halvings"]) == \
        ("auto", 16, 1, 4)
    # 16 -> 8 -> 4 -> 2 -> 1 once, then every later group starts at the size that worked
    assert calls[:5] == [16, 8, 4, 2, 1] and set(calls[5:]) <= {1}
    log = (out / "condiff.log").read_text()
    assert "out of memory on cpu at batch size 16" in log and "halving to 8" in log


def test_out_of_memory_with_a_fixed_batch_size_is_an_error_that_suggests_the_next(tmp_path, reference, monkeypatch):
    models, scans, _ = reference
    calls = []
    monkeypatch.setattr(pipeline, "run_slices", _device_holding(2, calls=calls))
    out = tmp_path / "out"
    res = invoke_infer([scans, "-o", out, "--models", models, *FAST])  # --batch-size 4
    assert res.exit_code == 2, res.output + res.stderr
    assert "out of memory on cpu at --batch-size 4" in res.stderr
    assert "use --batch-size 2, or --batch-size auto" in res.stderr
    assert calls == [4]  # not retried
    run = json.loads((out / "run.json").read_text())
    assert (run["batch_size_requested"], run["batch_size"], run["batch_halvings"]) == (4, 4, 0)
    assert not list(out.glob("records/*.json")) and not list(out.rglob("*.tmp"))


def test_out_of_memory_at_batch_1_stops_the_run_with_a_clear_error(tmp_path, reference, monkeypatch):
    models, scans, _ = reference
    monkeypatch.setattr(pipeline, "run_slices", _device_holding(0))
    out = tmp_path / "out"
    res = invoke_infer([scans, "-o", out, "--models", models, *FAST, "--batch-size", "auto"])
    assert res.exit_code == 2, res.output + res.stderr
    assert "out of memory on cpu even at batch size 1" in res.stderr
    assert "fewer --members" in res.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["batch_halvings"] == 4 and run["batch_size"] == 1
    assert not list(out.glob("records/*.json"))  # the group in flight leaves no record
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("text, expected", [("auto", None), ("AUTO", None), ("7", 7)])
def test_batch_size_option_takes_a_number_or_auto(text, expected):
    from condiff.cli_common import BatchSize

    assert BatchSize().convert(text, None, None) == expected


@pytest.mark.parametrize("text", ["0", "-2", "big", "1.5"])
def test_batch_size_option_refuses_anything_else(text):
    import click

    from condiff.cli_common import BatchSize

    with pytest.raises(click.BadParameter):
        BatchSize().convert(text, None, None)


def _context(batch_size, progress):
    return SimpleNamespace(denoisers=[object(), object()], plan=None, options=SimpleNamespace(seed=0, member_maps=False),
                           batch_size=batch_size, members=[0, 1], progress=progress, device="cpu",
                           stats=pipeline.RunStats(), batch_auto=True)


def test_progress_counts_each_restoration_once_across_attempts():
    n_jobs, n_members = 10, 2

    def fake_run(denoisers, jobs, plan, *, batch_size, progress, **kw):
        for m in range(n_members):
            for start in range(0, len(jobs), batch_size):
                if batch_size > 3 and m == 1 and start > 0:  # dies in the second member's second batch
                    raise torch.OutOfMemoryError("CUDA out of memory.")
                progress(min(batch_size, len(jobs) - start))
        return "results"

    ticks = []
    ctx = _context(8, ticks.append)
    assert backoff.run_within_memory(fake_run, list(range(n_jobs)), ctx) == "results"
    assert (ctx.batch_size, ctx.stats.batch_halvings) == (2, 2)
    assert sum(ticks) == n_jobs * n_members and all(t > 0 for t in ticks)


def test_other_errors_are_not_retried():
    calls = []

    def broken(*a, batch_size, **kw):
        calls.append(batch_size)
        raise RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")

    ctx = _context(8, None)
    with pytest.raises(RuntimeError, match="EXECUTION_FAILED"):
        backoff.run_within_memory(broken, [0, 1], ctx)
    assert calls == [8] and ctx.batch_size == 8 and ctx.stats.batch_halvings == 0


def test_backends_release_their_cached_state_before_the_retry():
    released = []

    class GraphLike:  # what the fast engine offers: captured loops that pin memory per batch shape
        def release_cached(self):
            released.append(True)

    def run(denoisers, jobs, plan, *, batch_size, **kw):
        if batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return "ok"

    ctx = _context(4, None)
    ctx.denoisers = [GraphLike(), object(), GraphLike()]
    assert backoff.run_within_memory(run, [0], ctx) == "ok"
    assert released == [True, True]


@pytest.mark.parametrize("exc, expected", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to allocate 8 GB"), True),
    (RuntimeError("Failed to allocate memory for requested buffer of size 1073741824"), True),  # ONNX Runtime, CUDA EP
    (RuntimeError("Expected all tensors to be on the same device"), False),
    (ValueError("out of range"), False),
    (BackendUnavailableError(None, "unknown engine"), False),
])
def test_out_of_memory_is_recognised_from_each_runtime(exc, expected):
    assert backoff.is_out_of_memory(exc) is expected


def test_out_of_memory_behind_another_error_is_recognised():
    """Out of memory during a CUDA graph capture: the capture's end raises its own error while the
    OutOfMemoryError is being handled (torch.cuda.graph's __exit__ calls capture_end)."""
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        except torch.OutOfMemoryError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
    except RuntimeError as exc:
        chained = exc
    assert backoff.is_out_of_memory(chained)
    try:
        try:
            raise ValueError("bad shape")
        except ValueError:
            raise RuntimeError("capture invalidated")
    except RuntimeError as exc:
        assert not backoff.is_out_of_memory(exc)


@pytest.mark.gpu
def test_real_cuda_out_of_memory_with_the_fast_engine_backs_off_to_a_batch_that_fits():
    """On a GPU: cap this process's memory at 3x what batch 4 needs, ask for batch 64 and let the
    real allocator fail (in the warm-up or inside a graph capture); the back-off must release the
    captured graphs, find a batch that fits and give the batch-4 maps to fp16 rounding."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from condiff.config import preset
    from condiff.engine.graphs import GraphDenoiser
    from condiff.engine.runner import SliceJob, run_slices
    from condiff.sampler import make_plan
    from condiff.unet import ConditionalUNet

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = ConditionalUNet(preset("small", 1, sample_size=64)).eval()
    g = torch.Generator().manual_seed(0)
    jobs = [SliceJob(torch.rand(1, 64, 64, generator=g) * 0.8, "digest", i) for i in range(24)]
    plan = make_plan("ddim", 5)
    den = GraphDenoiser(model, dev, "fp16", 64)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    ref = run_slices([den], jobs, plan, batch_size=4)
    peak4 = torch.cuda.max_memory_reserved(dev)
    den.release_cached()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(dev).total_memory
    ctx = SimpleNamespace(denoisers=[den], plan=plan, options=SimpleNamespace(seed=0, member_maps=False), batch_size=64,
                          members=[0], progress=None, device="cuda", stats=pipeline.RunStats(), batch_auto=True)
    torch.cuda.set_per_process_memory_fraction(min(1.0, 3 * peak4 / total), dev)
    try:
        got = backoff.run_within_memory(run_slices, jobs, ctx)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
    assert ctx.stats.batch_halvings >= 1 and ctx.batch_size < 64
    for a, b in zip(ref, got):
        peak = a.amap.abs().max().item()
        assert (a.amap - b.amap).abs().max().item() <= 5e-2 * peak


def _loading_context(device, batch_size, batch_auto=True):
    return SimpleNamespace(options=SimpleNamespace(engine="trt", fast_kernels="torch", precision="fp16"),
                           model_set=SimpleNamespace(member_dirs=["m0", "m1"]), members=[0, 1], device=device,
                           batch_size=batch_size, batch_auto=batch_auto, deterministic=False, stats=pipeline.RunStats(),
                           batch_size_given=None)


def test_the_batch_never_exceeds_what_a_tensorrt_plan_was_built_for(monkeypatch):
    """--batch-size auto starts at 64 on a GPU; a plan built with --max-batch 32 takes at most 32, so the
    runner must ask for 32 (it asked for 64 and the plan refused every group)."""
    from condiff.engine import backends

    monkeypatch.setattr(backends, "open_denoiser", lambda engine, folder, *, max_batch, **kw:
                        SimpleNamespace(max_batch=min(max_batch, 32 if folder == "m1" else 48)))
    ctx = _loading_context("cpu", 64)
    pipeline.load_denoisers(ctx)
    assert ctx.batch_size == 32 and ctx.batch_size_given == 64  # run.json: requested 64, started at 32
    ctx = _loading_context("cpu", 16)
    pipeline.load_denoisers(ctx)
    assert ctx.batch_size == 16  # within every plan: as asked


def test_a_numbered_cuda_device_becomes_the_current_one(monkeypatch):
    """CUDA graphs capture on, and TensorRT contexts run on, the current device: cuda:1 must be it."""
    from condiff.engine import backends

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(backends, "open_denoiser", lambda *a, max_batch, **kw: SimpleNamespace(max_batch=max_batch))
    pipeline.load_denoisers(_loading_context("cuda:1", 8))
    assert chosen == [torch.device("cuda:1")]
    # plain "cuda" (what --device auto gives on a GPU machine) is the current device already: torch's own
    # set_device refuses a device without index, so it must not be called (it crashed every GPU run)
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "open_denoiser", lambda *a, max_batch, **kw: SimpleNamespace(max_batch=max_batch))
    ctx = _loading_context("cuda", 8)
    pipeline.load_denoisers(ctx)
    assert len(ctx.denoisers) == 2


def test_a_fallback_releases_the_graphs_of_the_engine_it_stands_in_for(monkeypatch):
    """The eager fallback needs more memory than the fast engine, whose captured graphs (all members)
    stayed pinned, also through the fallback's own halving."""
    released = []

    class GraphLike:
        def __init__(self, name):
            self.name = name

        def release_cached(self):
            released.append(self.name)

    def run(denoisers, jobs, plan, *, batch_size, **kw):
        assert all(d.name.startswith("eager") for d in denoisers)
        if batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return ["result"] * len(jobs)

    monkeypatch.setattr(pipeline, "run_slices", run)
    ctx = _context(8, None)
    ctx.denoisers = [GraphLike("fast0"), GraphLike("fast1")]
    ctx.fallback_denoisers = [GraphLike("eager0"), GraphLike("eager1")]
    ctx.options = SimpleNamespace(seed=0, member_maps=False, engine="fast", precision="fp16")
    ctx.fallback_precision, ctx.on_work, ctx.plan = "fp32", None, SimpleNamespace(n_steps=50)
    pending = SimpleNamespace(case=SimpleNamespace(name="case0"), jobs=[0, 1, 2])
    results, fallback = pipeline._fallback_results(pending, ctx)
    assert results == ["result"] * 3 and fallback["precision"] == "fp32"
    assert released[:2] == ["fast0", "fast1"]  # before the fallback runs
    assert {"fast0", "fast1", "eager0", "eager1"} <= set(released[2:])  # and at each halving
    assert [d.name for d in ctx.denoisers] == ["fast0", "fast1"] and ctx.batch_size == 2


def test_held_input_volumes_bound_a_group_and_leave_the_outputs_unchanged(tmp_path, monkeypatch):
    """A group gathered cases until it had 4 x --batch-size slices, each holding its full-resolution volume
    and mask: --batch-size 1024 held ~25 volumes of 256x256x180 (+64 MB each, reproduced). The held
    bytes now bound a group too; here a budget below one volume makes every case its own group, and the
    outputs are the same bytes as one group's."""
    models, scans, ref = reference_run(tmp_path / "r", n_members=1, n_scans=3)
    groups = []
    real = pipeline.run_slices

    def record(denoisers, jobs, *a, **kw):
        groups.append(len(jobs))
        return real(denoisers, jobs, *a, **kw)

    monkeypatch.setattr(pipeline, "run_slices", record)
    res = invoke_infer([scans, "-o", tmp_path / "big", "--models", models, *FAST, "--batch-size", "1024"])
    assert res.exit_code == 0 and len(groups) == 1  # the default budget holds these small volumes at once
    n_slices = groups[0]
    monkeypatch.setattr(pipeline, "GROUP_HELD_BYTES", 1)
    groups.clear()
    res = invoke_infer([scans, "-o", tmp_path / "out", "--models", models, *FAST, "--batch-size", "1024"])
    assert res.exit_code == 0, res.output + res.stderr
    assert len(groups) == 3 and sum(groups) == n_slices
    assert digests(tmp_path / "out") == digests(ref)


def test_out_of_memory_at_a_fixed_batch_size_of_1_never_suggests_batch_size_0():
    def oom(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    ctx = _context(1, None)
    ctx.batch_auto = False
    with pytest.raises(BackendUnavailableError) as info:
        backoff.run_within_memory(oom, [0], ctx)
    text = str(info.value)
    assert "out of memory on cpu even at batch size 1" in text and "fewer --members" in text
    assert "--batch-size 0" not in text
