"""condiff's Triton kernels (engine/kernels) against float64 oracles.

Without CUDA the kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` is set below, before
the kernel modules are imported, because ``@triton.jit`` picks interpreter or compiler at import.
With CUDA the same tests run compiled on the GPU, and the ``gpu`` tests add the paper's shapes, bf16
MMAs, SDPA (cuDNN) as a second reference and the fast engine (bench/gpu_check.sh runs ``-m gpu``).
Inputs are fresh seeded random numbers; outputs are pre-filled with NaN so an element the kernel
never writes fails the test. Errors are relative: ||out - ref|| / ||ref||.
"""
import copy
import importlib
import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed (pip install 'condiff[test]', Linux only)")

from condiff.config import preset  # noqa: E402
from condiff.engine import kernels  # noqa: E402
from condiff.engine.kernels import attention_triton, groupnorm_silu_triton  # noqa: E402
from condiff.unet import ConditionalUNet, sdpa_attention, torch_group_norm  # noqa: E402

if attention_triton.interpreting() == CUDA:  # imported earlier in the other mode: decorate again
    attention_triton = importlib.reload(attention_triton)
    groupnorm_silu_triton = importlib.reload(groupnorm_silu_triton)
    importlib.reload(kernels)

DEVICE = torch.device("cuda" if CUDA else "cpu")
# fp16 keeps 11 bits (2**-11 = 4.9e-4 per rounding: P, the output), bf16 8 bits (3.9e-3)
ATTN_REL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
NORM_REL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _qkv(b, h, n, d, dtype, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    # scale 2: scores up to ~+-30/sqrt(d), so rows have a clear maximum and long exp tails
    return [(2 * torch.randn(b, h, n, d, generator=g)).to(device=device, dtype=dtype) for _ in range(3)]


def _attention(q, k, v, **kw):
    out = torch.full_like(q, float("nan"))
    result = attention_triton.triton_attention(q, k, v, out=out, **kw)
    assert result is out
    assert bool(torch.isfinite(out).all()), "the kernel left elements unwritten (NaN poison survived)"
    return out


# ---------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("d", [8, 16])
@pytest.mark.parametrize("n", [64, 100, 256])
def test_attention_matches_float64_oracle(n, d, dtype):
    q, k, v = _qkv(1, 2, n, d, dtype, seed=n * 100 + d)
    out = _attention(q, k, v)
    err = rel_err(out, attention_triton.attention_reference(q, k, v))
    assert err <= ATTN_REL[dtype], f"relative error {err:.2e} > {ATTN_REL[dtype]:.0e}"


@pytest.mark.parametrize("n,d", [(100, 8), (64, 5)])
def test_attention_bf16_and_odd_head_dim(n, d):
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = _qkv(2, 1, n, d, dtype, seed=7 + d)
        err = rel_err(_attention(q, k, v), attention_triton.attention_reference(q, k, v))
        assert err <= ATTN_REL[dtype], f"{dtype}: relative error {err:.2e}"


def test_attention_reads_the_unets_head_view_in_place():
    """q, k, v as AttentionBlock makes them: (B, N, H*d) projections viewed as (B, H, N, d)."""
    b, n, h, d = 2, 100, 2, 8
    g = torch.Generator().manual_seed(3)
    proj = [torch.randn(b, n, h * d, generator=g).to(DEVICE, torch.float16) for _ in range(3)]
    q, k, v = (t.view(b, n, h, d).transpose(1, 2) for t in proj)
    assert not q.is_contiguous()
    out = attention_triton.triton_attention(q, k, v)
    assert out.stride() == q.stride()  # the caller's transpose back to (B, N, H*d) stays a view
    assert rel_err(out, attention_triton.attention_reference(q, k, v)) <= ATTN_REL[torch.float16]


@pytest.mark.parametrize("share", [0.2, 0.5])
def test_attention_poly_exp_share_accuracy(share):
    for dtype in (torch.float32, torch.float16):
        q, k, v = _qkv(1, 2, 100, 8, dtype, seed=11)
        err = rel_err(_attention(q, k, v, poly_exp_share=share), attention_triton.attention_reference(q, k, v))
        # the cubic's 7.5e-5 relative error per weight is far below fp16 rounding, visible in fp32
        assert err <= max(ATTN_REL[dtype], 2e-4), f"{dtype} share {share}: relative error {err:.2e}"


VARIANTS = {"mma row sum": dict(mma_rowsum=True), "paired f16 exp": dict(half_exp=True),
            "both": dict(mma_rowsum=True, half_exp=True)}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("n,d", [(100, 8), (256, 8), (64, 5)])
def test_attention_experimental_switches_match_oracle(n, d, variant):
    """mma_rowsum (the softmax denominator from a ones column in the P @ V MMA) and half_exp (exp2 in
    fp16): within fp16 rounding of the float64 oracle, and of the default kernel (same P rounding)."""
    kw = VARIANTS[variant]
    dtypes = (torch.float16,) if kw.get("half_exp") else (torch.float16, torch.float32)
    for dtype in dtypes:
        q, k, v = _qkv(2, 2, n, d, dtype, seed=31 + n + d)
        ref = attention_triton.attention_reference(q, k, v)
        out = _attention(q, k, v, **kw)
        assert rel_err(out, ref) <= ATTN_REL[dtype], f"{dtype}: relative error {rel_err(out, ref):.2e}"
        # against the default kernel: same tiles and P rounding, so far closer than to the oracle in fp32
        assert rel_err(out, _attention(q, k, v)) <= (1e-6 if dtype == torch.float32 else ATTN_REL[dtype])


def test_attention_mma_rowsum_is_the_denominator():
    """Softmax rows sum to 1: with v = 1 everywhere the output is 1 exactly up to rounding; a denominator
    that missed keys (tail) or counted masked ones would move it. N = 100 leaves a masked tail."""
    q, k, _ = _qkv(1, 2, 100, 8, torch.float32, seed=5)
    ones = torch.ones_like(q)
    for kw in VARIANTS.values():
        dtype = torch.float16 if kw.get("half_exp") else torch.float32
        out = _attention(q.to(dtype), k.to(dtype), ones.to(dtype), **kw).double()
        torch.testing.assert_close(out, torch.ones_like(out), rtol=0, atol=2e-3 if dtype == torch.float16 else 1e-6)


def _check_exp2_poly():
    import triton
    import triton.language as tl

    @triton.jit
    def _poly(X, Y, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, attention_triton._exp2_poly(tl.load(X + offs)))

    x = torch.cat([torch.linspace(-30, 0, 4095), torch.tensor([-float("inf")])]).to(DEVICE)
    y = torch.full_like(x, float("nan"))
    _poly[(x.numel() // 1024,)](x, y, BLOCK=1024)
    y = y.cpu().double()
    ref = torch.exp2(x.cpu().double())
    assert float(((y[:-1] - ref[:-1]) / ref[:-1]).abs().max()) <= 1e-4
    assert 0.0 <= float(y[-1]) <= 2.0 ** -125  # -inf (masked keys) weighs ~0, never negative or NaN


def test_exp2_poly_relative_error_on_the_softmax_range():
    _check_exp2_poly()


@pytest.mark.gpu
def test_gpu_exp2_poly_compiled():
    """Compiled, the rounding trick (x + 1.5*2**23) - 1.5*2**23 must survive the compiler's float rules."""
    _check_exp2_poly()


def test_poly_split_offers_power_of_two_parts():
    assert attention_triton.poly_split(128, 0.0) == (128, 0)
    assert attention_triton.poly_split(64, 0.5) == (32, 32)  # the step keeps the table's 64 keys
    a, b = attention_triton.poly_split(128, 0.25)
    assert b / (a + b) == pytest.approx(0.2) and a + b <= 256
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="poly_exp_share"):
            attention_triton.poly_split(128, bad)


def test_attention_refuses_what_it_cannot_do(monkeypatch):
    q, k, v = _qkv(1, 1, 16, 32, torch.float16, seed=0)
    with pytest.raises(ValueError, match="head dim 32"):
        attention_triton.triton_attention(q, k, v)
    q, k, v = _qkv(1, 1, 16, 8, torch.float16, seed=0)
    with pytest.raises(ValueError, match="dtype"):
        attention_triton.triton_attention(q, k.float(), v)
    with pytest.raises(ValueError, match="shape"):
        attention_triton.triton_attention(q, k[:, :, :8], v[:, :, :8])
    with pytest.raises(ValueError, match="half_exp"):
        attention_triton.triton_attention(q.float(), k.float(), v.float(), half_exp=True)
    q16, k16, v16 = _qkv(1, 1, 16, 16, torch.float16, seed=0)
    with pytest.raises(ValueError, match="mma_rowsum needs a free padded column"):
        attention_triton.triton_attention(q16, k16, v16, mma_rowsum=True)
    monkeypatch.setattr(attention_triton, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="CUDA tensors"):
        attention_triton.triton_attention(*(t.cpu() for t in (q, k, v)))


# ---------------------------------------------------------------------------------------------- GroupNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape,groups", [((2, 16, 7, 9), 4), ((1, 32, 16, 16), 8), ((3, 8, 5, 5), 8)])
def test_groupnorm_silu_matches_torch_in_float64(shape, groups, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (3 * torch.randn(shape, generator=g) + 1).to(DEVICE, dtype)
    w, b = (torch.randn(shape[1], generator=g).to(DEVICE) for _ in range(2))
    for silu in (True, False):
        for weight, bias in ((w, b), (None, None)):
            out = torch.full_like(x, float("nan"))
            groupnorm_silu_triton.groupnorm_silu(x, groups, weight, bias, 1e-5, silu, out=out)
            assert bool(torch.isfinite(out).all()), "unwritten elements"
            ref = groupnorm_silu_triton.group_norm_silu_reference(x, groups, weight, bias, 1e-5, silu)
            err = rel_err(out, ref)
            assert err <= NORM_REL[dtype], f"silu={silu} affine={weight is not None}: relative error {err:.2e}"


def test_groupnorm_reads_channels_last_and_odd_strides():
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(16, generator=g).to(DEVICE), torch.randn(16, generator=g).to(DEVICE)
    cl = torch.randn(2, 16, 6, 10, generator=g).to(DEVICE).to(memory_format=torch.channels_last)
    sliced = torch.randn(2, 20, 6, 10, generator=g).to(DEVICE)[:, :16]  # gaps between samples
    strided = torch.randn(2, 16, 6, 10, 2, generator=g).to(DEVICE)[..., 0]  # pixel stride 2
    for x in (cl, sliced, strided):
        out = groupnorm_silu_triton.groupnorm_silu(x, 4, w, b, 1e-6, True)
        assert rel_err(out, groupnorm_silu_triton.group_norm_silu_reference(x, 4, w, b, 1e-6, True)) <= 1e-6
    assert groupnorm_silu_triton.groupnorm_silu(cl, 4, w, b, 1e-6, True).stride() == cl.stride()


def test_groupnorm_statistics_survive_a_large_mean():
    """mean 100, std 0.01: E[x^2] - E[x]^2 in fp32 cancels to noise, and even centring on an fp32 mean
    costs 4e-4 (torch's own fp32 GroupNorm on the CPU: 3e-4); the kernel keeps fp32 rounding, 1e-7."""
    g = torch.Generator().manual_seed(9)
    x = (100 + 0.01 * torch.randn(2, 8, 32, 32, generator=g)).to(DEVICE)
    w, b = torch.randn(8, generator=g).to(DEVICE), torch.randn(8, generator=g).to(DEVICE)
    for weight, bias in ((None, None), (w, b)):
        out = groupnorm_silu_triton.groupnorm_silu(x, 4, weight, bias, 1e-12, False)
        ref = groupnorm_silu_triton.group_norm_silu_reference(x, 4, weight, bias, 1e-12, False)
        assert rel_err(out, ref) <= 1e-6


# ---------------------------------------------------------------------------------------------- the UNet seam


def _tiny_unet(seed=0, size=16):
    torch.manual_seed(seed)
    model = ConditionalUNet(preset("tiny", 1, sample_size=size)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # perturb so zero-initialised biases and unit norms are exercised too
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def test_tiny_unet_with_triton_kernels_equals_eager():
    model = _tiny_unet().to(DEVICE)
    keys = list(model.state_dict())
    g = torch.Generator().manual_seed(2)
    x_t, cond = torch.randn(2, 1, 16, 16, generator=g).to(DEVICE), torch.rand(2, 1, 16, 16, generator=g).to(DEVICE)
    t = torch.tensor([3, 700], device=DEVICE)
    with torch.no_grad():
        eager = model(x_t, cond, t)
        kernels.use_triton_kernels(model)
        assert all(b.norm_fn is groupnorm_silu_triton.triton_group_norm for b in model.attention_blocks())
        fused = model(x_t, cond, t)
        kernels.use_torch_kernels(model)
        again = model(x_t, cond, t)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(fused, eager, rtol=0, atol=2e-5)  # fp32: summation order only
    torch.testing.assert_close(again, eager, rtol=0, atol=0)
    assert model.norm_fn is torch_group_norm and model.attention_blocks()[0].attention_fn is sdpa_attention


def test_tiny_unet_with_experimental_switches_equals_eager(monkeypatch):
    """use_triton_kernels(mma_rowsum, half_exp) in fp32: the row sum moves into the MMA (summation order
    only) and half_exp stays off for fp32 calls, so the network still equals eager to rounding. The
    kernels must really run, with the switches as documented (without this, a use_triton_kernels that
    installed nothing passed: eager equals eager)."""
    model = _tiny_unet().to(DEVICE)
    g = torch.Generator().manual_seed(3)
    x_t, cond = torch.randn(2, 1, 16, 16, generator=g).to(DEVICE), torch.rand(2, 1, 16, 16, generator=g).to(DEVICE)
    t = torch.tensor([5, 900], device=DEVICE)
    calls = []
    real = attention_triton.triton_attention

    def recording(q, k, v, **kw):
        calls.append((q.dtype, kw))
        return real(q, k, v, **kw)

    monkeypatch.setattr(attention_triton, "triton_attention", recording)
    with torch.no_grad():
        eager = model(x_t, cond, t)
        kernels.use_triton_kernels(model, mma_rowsum=True, half_exp=True)
        assert all(b.norm_fn is groupnorm_silu_triton.triton_group_norm for b in model.attention_blocks())
        fused = model(x_t, cond, t)
    assert len(calls) == len(model.attention_blocks())
    assert all(kw["mma_rowsum"] and not kw["half_exp"] for _, kw in calls)  # fp32 calls: no half exponentials
    torch.testing.assert_close(fused, eager, rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------------------------- GPU (compiled)


GPU_CASES = [(n, 8, dtype) for n in (100, 1000, 4096)  # < one block + tail; several + tail; the 64-px table row
             for dtype in (torch.float16, torch.bfloat16, torch.float32)]
GPU_CASES += [(1000, 5, torch.float16), (1000, 16, torch.float16), (1000, 16, torch.bfloat16)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,d,dtype", GPU_CASES, ids=[f"{n}-{d}-{str(t)[6:]}" for n, d, t in GPU_CASES])
def test_gpu_attention_matches_oracle_and_sdpa(n, d, dtype):
    q, k, v = _qkv(2, 4, n, d, dtype, seed=n + d)
    out = _attention(q, k, v)
    ref = attention_triton.attention_reference(q, k, v)
    err, sdpa_err = rel_err(out, ref), rel_err(sdpa_attention(q, k, v), ref)
    assert err <= ATTN_REL[dtype] and err <= 2 * sdpa_err + 1e-6, f"{err:.2e} (SDPA {sdpa_err:.2e})"


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("n", [100, 1000])
def test_gpu_experimental_switches_with_a_key_tail(n, variant):
    """Compiled, with a masked tail step: ex2.approx.f16x2 must turn the masked keys' -inf into 0, and
    the ones column must count valid keys only."""
    q, k, v = _qkv(2, 4, n, 8, torch.float16, seed=n + 17)
    out = _attention(q, k, v, **VARIANTS[variant])
    assert rel_err(out, attention_triton.attention_reference(q, k, v)) <= ATTN_REL[torch.float16]
    assert rel_err(out, _attention(q, k, v)) <= ATTN_REL[torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("n,heads", [(16384, 16), (4096, 32)])
def test_gpu_attention_paper_shapes(n, heads):
    """The paper preset's 128- and 64-px layers at batch 2; the float64 oracle on 128 query rows."""
    b, d = 2, 8
    g = torch.Generator().manual_seed(n)
    proj = [torch.randn(b, n, heads * d, generator=g).to(DEVICE, torch.float16) for _ in range(3)]
    q, k, v = (t.view(b, n, heads, d).transpose(1, 2) for t in proj)
    rows = torch.arange(0, n, n // 128, device=DEVICE)
    ref = attention_triton.attention_reference(q[:, :, rows], k, v)
    for share in (0.0, 0.2):
        out = _attention(q, k, v, poly_exp_share=share)
        assert rel_err(out[:, :, rows], ref) <= ATTN_REL[torch.float16], f"share {share}"
    for name, kw in VARIANTS.items():  # compiled: ex2.approx.f16x2 itself, not the interpreter's stand-in
        out = _attention(q, k, v, **kw)
        assert rel_err(out[:, :, rows], ref) <= ATTN_REL[torch.float16], name


@pytest.mark.gpu
@pytest.mark.parametrize("shape,groups", [((8, 128, 128, 128), 32), ((8, 384, 64, 64), 32), ((8, 512, 16, 16), 32)])
def test_gpu_groupnorm_paper_shapes(shape, groups):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(DEVICE, torch.float16)
    w, b = (torch.randn(shape[1], generator=g).to(DEVICE, torch.float16) for _ in range(2))
    for xin in (x, x.to(memory_format=torch.channels_last)):
        out = groupnorm_silu_triton.groupnorm_silu(xin, groups, w, b, 1e-5, True)
        ref = groupnorm_silu_triton.group_norm_silu_reference(xin, groups, w, b, 1e-5, True)
        assert rel_err(out, ref) <= NORM_REL[torch.float16]


@pytest.mark.gpu
def test_gpu_small_unet_fp16_triton_close_to_eager():
    torch.manual_seed(0)
    model = ConditionalUNet(preset("small", 1, sample_size=64)).eval().to(DEVICE)
    g = torch.Generator().manual_seed(4)
    x_t, cond = (torch.randn(4, 1, 64, 64, generator=g).to(DEVICE) for _ in range(2))
    t = torch.tensor([1, 250, 500, 999], device=DEVICE)
    with torch.inference_mode():
        ref = model(x_t, cond, t).double()
        half = model.half()
        eager16 = half(x_t.half(), cond.half(), t)
        kernels.use_triton_kernels(half)
        fused16 = half(x_t.half(), cond.half(), t)
    err, eager_err = rel_err(fused16, ref), rel_err(eager16, ref)
    assert err <= 1e-2 and err <= 2 * eager_err + 1e-4, f"triton fp16 {err:.2e}, eager fp16 {eager_err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("options", [None, {"mma_rowsum": True, "half_exp": True}], ids=["default", "switches"])
def test_gpu_fast_engine_with_triton_kernels(options):
    """The CUDA-graph engine with kernels="triton" (and the experimental switches, as bench/throughput.py's
    fast-triton-x runs them): replays equal its eager loop, maps close to torch kernels."""
    from condiff.engine.graphs import GraphDenoiser
    from condiff.engine.runner import SliceJob, run_slices
    from condiff.sampler import make_plan

    torch.manual_seed(0)
    models = [ConditionalUNet(preset("small", 1, sample_size=64)).eval() for _ in range(2)]
    twins = [copy.deepcopy(m) for m in models]  # GraphDenoiser converts and rewires its model in place
    g = torch.Generator().manual_seed(0)
    jobs = [SliceJob(torch.rand(1, 64, 64, generator=g) * 2 - 1, "digest", i) for i in range(5)]
    plan = make_plan("ddpm", 20)
    ref = run_slices([GraphDenoiser(m, DEVICE, "fp16", 4) for m in models], jobs, plan, batch_size=4)
    dens = [GraphDenoiser(m, DEVICE, "fp16", 4, kernels="triton", kernel_options=options) for m in twins]
    fast = run_slices(dens, jobs, plan, batch_size=4)
    assert sum(d.graph_fallbacks for d in dens) == 0
    for a, b in zip(ref, fast):
        peak = a.amap.abs().max().item()
        assert (a.amap - b.amap).abs().max().item() <= 5e-2 * peak and math.isfinite(b.score)
