"""Forward flash attention for small head dims (condiff: d = 8), in Triton.

Why a kernel of our own: with d = 8 a score costs 32 tensor-core FLOP but one exponential, so the
128x128-token layers are bound by the SFU's 16 exp2 / SM / clock, not by matmuls (performance.md §1,
§3); cuDNN reaches about half that rate (§4). The inner loop therefore does as little as possible
besides the exponential: the softmax scale is folded into exp2's argument (log2(e)/sqrt(d), one FMA
per score with the max subtraction), the head dim is zero-padded to the MMA K-step of 16 in
registers only (masked loads, never a padded copy in memory), and the N tail is masked in a separate
last step so the main loop carries no masks. ``poly_exp_share`` moves a share of the exponentials to
the FMA pipe (a Cody-Waite style split and a cubic, as FlashAttention-4 does), which pays only once
the kernel is SFU-bound (§6 item 1).

Two experimental switches, off by default until a GPU measures them (bench/attention.py rows "MMA row
sum" and "paired f16 exp"): on an H100 every implementation ran at 48 % of the SFU peak and the
polynomial share made things slower, so the limit is the other per-score work. ``mma_rowsum`` drops
the row-sum reduction (an add per score and cross-lane shuffles): V's first zero-padded column is set
to 1, so the P @ V MMA accumulates the softmax denominator in fp32 for free, rescaled with the output.
``half_exp`` (fp16 only) rounds the exponent argument to fp16 and takes exp2 two at a time with PTX
``ex2.approx.f16x2``: half the SFU instructions, and P comes out in the MMA's input type, so its
separate fp32 -> fp16 conversion goes too. P is rounded to fp16 for the MMA either way.

Same order as the Triton tutorials: reference, kernels, launcher. Tests: tests/engine/test_triton_kernels.py
(CPU through ``TRITON_INTERPRET=1``, compiled on CUDA with ``-m gpu``); timing: bench/attention.py.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 16  # one MMA K-step of fp16/bf16; larger heads would need a K loop this kernel does not have
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Launch configurations keyed by sequence length: (max N, BLOCK_M, BLOCK_N, num_warps, num_stages).
# No autotune (autotuning inside a captured CUDA graph is not possible and costs minutes per shape).
# Tuned on an H100 by bench/attention.py (bench/results/gpu-2026-12-06-h100/attention.md), head dim 8:
# 128x64 tiles with 4 warps and 2 stages were fastest at both of the paper preset's attention sizes,
# 17.0 ms at N = 16384 (B 8, 16 heads; SDPA 17.2 ms, the former 128x128/8-warp entry 24.4 ms) and
# 2.20 ms at N = 4096 (SDPA 2.23 ms); 128x128/4/3 and 256x128/8/2 were slower at both.
CONFIGS = (
    (256, 64, 64, 4, 2),
    (math.inf, 128, 64, 4, 2),
)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in float64: the oracle the kernel is tested against.

    Materialises the (N, N) scores: B*H*N^2 * 8 bytes, 34 GB per sample of a 128-px paper
    layer (16 heads x 16384^2); the kernel streams K and V through an online softmax instead.
    """
    q64, k64, v64 = q.double(), k.double(), v.double()
    scores = q64 @ k64.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v64


# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def _exp2_poly(x):
    """2**x for x <= 0 on the FMA pipe: x = j + f with j = round(x), f in [-1/2, 1/2]; 2**f by a cubic;
    j added to the exponent field. The magic constant 1.5 * 2**23 rounds in two FADDs and leaves j in
    the low mantissa bits, so ``bits(t) << 23`` is ``j << 23``. The clamp keeps the exponent field >= 0
    (2**-126 stands in for 0: masked scores then weigh ~1e-38 against a row sum >= 1). The cubic is
    the relative-error minimax for 2**f on [-1/2, 1/2] (Remez): 7.5e-5 in fp32 over [-30, 0]."""
    x = tl.maximum(x, -126.0)
    t = x + 12582912.0
    j = t - 12582912.0
    f = x - j
    p = ((0.05517167 * f + 0.24261113) * f + 0.69326097) * f + 0.99992806
    bits = p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _exp2_half(x, INTERPRET: tl.constexpr):
    """2**x in fp16, two per SFU instruction (PTX ex2.approx.f16x2; the argument rounded to fp16 first).
    The interpreter cannot run PTX: it rounds the same way around an exact exp2, so CPU tests check
    the kernel's data flow and the GPU tests the instruction's accuracy."""
    xh = x.to(tl.float16)
    if INTERPRET:
        y = tl.math.exp2(xh.to(tl.float32)).to(tl.float16)
    else:
        y = tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [xh], dtype=tl.float16,
                                      is_pure=True, pack=2)
    return y


@triton.jit
def _load_2d(ptrs, row_ok, col_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a tile with only the masks this call needs (the unmasked case stays a plain load)."""
    if MASK_ROWS:
        if MASK_COLS:
            tile = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if MASK_COLS:
            tile = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot. UPCAST is for the interpreter only: Triton 3.6's interpreter multiplies the bit patterns of
    bf16 operands (triton-lang/triton#11584), so bf16 tiles are multiplied in fp32 there; products of
    bf16 numbers are exact in fp32, so this gives the numbers of the bf16 MMA up to summation order."""
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        c = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return c


@triton.jit
def _scores(q, k_base, start_n, N, offs_d, d_ok, stride_kn, stride_kd,
            SUB_N: tl.constexpr, MASK_N: tl.constexpr, PAD_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
            UPCAST: tl.constexpr):
    """q @ k[start_n : start_n + SUB_N]^T in fp32, unscaled; keys past N score -inf."""
    offs_n = start_n + tl.arange(0, SUB_N)
    n_ok = offs_n < N
    kt = _load_2d(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, d_ok, n_ok, PAD_D, MASK_N)
    s = _dot(q, kt, None, DOT_PRECISION, UPCAST)
    if MASK_N:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    return s


@triton.jit
def _accumulate_pv(acc, p, v_base, start_n, N, offs_d, d_ok, stride_vn, stride_vd,
                   SUB_N: tl.constexpr, MASK_N: tl.constexpr, PAD_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr, ROWSUM_COL: tl.constexpr):
    offs_n = start_n + tl.arange(0, SUB_N)
    # masked V rows load 0 (not garbage that 0 * NaN would spread); their p is 0 (or 2**-126) anyway
    v = _load_2d(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, offs_n < N, d_ok, MASK_N, PAD_D)
    if ROWSUM_COL >= 0:  # a column of ones (valid keys only): acc[:, ROWSUM_COL] becomes the row sum of p
        v_dtype = v.dtype
        v = tl.where((offs_d[None, :] == ROWSUM_COL) & (offs_n[:, None] < N), 1.0, v).to(v_dtype)
    return _dot(p.to(v.dtype), v, acc, DOT_PRECISION, UPCAST)


@triton.jit
def _attn_step(acc, l_i, m_i, q, k_base, v_base, start_n, N, qk_scale, offs_d, d_ok,
               stride_kn, stride_kd, stride_vn, stride_vd,
               BLOCK_N: tl.constexpr, POLY_N: tl.constexpr, MASK_N: tl.constexpr, PAD_D: tl.constexpr,
               DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROWSUM_COL: tl.constexpr,
               HALF_EXP: tl.constexpr, INTERPRET: tl.constexpr):
    """One online-softmax step over BLOCK_N keys on MUFU exp2, then POLY_N keys on the polynomial.

    m_i is kept in scaled log2 units, so p = exp2(s * qk_scale - m) is one FMA and one exponential.
    With ROWSUM_COL >= 0 the row sum rides in acc (l_i is left alone); HALF_EXP: see _exp2_half.
    """
    s_a = _scores(q, k_base, start_n, N, offs_d, d_ok, stride_kn, stride_kd,
                  BLOCK_N, MASK_N, PAD_D, DOT_PRECISION, UPCAST)
    m_new = tl.maximum(m_i, tl.max(s_a, 1) * qk_scale)
    if POLY_N > 0:
        s_b = _scores(q, k_base, start_n + BLOCK_N, N, offs_d, d_ok, stride_kn, stride_kd,
                      POLY_N, MASK_N, PAD_D, DOT_PRECISION, UPCAST)
        m_new = tl.maximum(m_new, tl.max(s_b, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    if HALF_EXP:
        p_a = _exp2_half(s_a * qk_scale - m_new[:, None], INTERPRET)
    else:
        p_a = tl.math.exp2(s_a * qk_scale - m_new[:, None])
    if ROWSUM_COL < 0:
        l_i = l_i * alpha + tl.sum(p_a.to(tl.float32), 1)
    acc = acc * alpha[:, None]
    acc = _accumulate_pv(acc, p_a, v_base, start_n, N, offs_d, d_ok, stride_vn, stride_vd,
                         BLOCK_N, MASK_N, PAD_D, DOT_PRECISION, UPCAST, ROWSUM_COL)
    if POLY_N > 0:
        p_b = _exp2_poly(s_b * qk_scale - m_new[:, None])
        if ROWSUM_COL < 0:
            l_i += tl.sum(p_b, 1)
        acc = _accumulate_pv(acc, p_b, v_base, start_n + BLOCK_N, N, offs_d, d_ok, stride_vn, stride_vd,
                             POLY_N, MASK_N, PAD_D, DOT_PRECISION, UPCAST, ROWSUM_COL)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd(Q, K, V, O,
              stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_on, stride_od,
              H, qk_scale, N: tl.constexpr,
              D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              POLY_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
              ROWSUM_COL: tl.constexpr, HALF_EXP: tl.constexpr, INTERPRET: tl.constexpr):
    """Grid (cdiv(N, BLOCK_M), B * H): one program owns BLOCK_M queries of one head.

    N is a compile-time constant: a UNet has a handful of token counts, a known trip count lets the
    compiler drop the tail step where N divides, and Triton 3.6's interpreter cannot loop to a runtime
    bound under numpy >= 2.4 (triton-lang/triton#9171).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = O + b * stride_ob + h * stride_oh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    d_ok = offs_d < D
    q = _load_2d(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, m_ok, d_ok, True, D < BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # the full steps end at (N // STEP) * STEP; written inline because the interpreter turns every
    # assigned value into a tensor, and a tensor cannot bound a Python loop there
    for start_n in range(0, (N // (BLOCK_N + POLY_N)) * (BLOCK_N + POLY_N), BLOCK_N + POLY_N):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, start_n, N, qk_scale, offs_d, d_ok,
                                   stride_kn, stride_kd, stride_vn, stride_vd,
                                   BLOCK_N, POLY_N, False, D < BLOCK_D, DOT_PRECISION, UPCAST,
                                   ROWSUM_COL, HALF_EXP, INTERPRET)
    if N % (BLOCK_N + POLY_N) != 0:  # static: the tail, the only step with key masks (>= 1 valid key in BLOCK_N)
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, (N // (BLOCK_N + POLY_N)) * (BLOCK_N + POLY_N),
                                   N, qk_scale, offs_d, d_ok,
                                   stride_kn, stride_kd, stride_vn, stride_vd,
                                   BLOCK_N, POLY_N, True, D < BLOCK_D, DOT_PRECISION, UPCAST,
                                   ROWSUM_COL, HALF_EXP, INTERPRET)
    if ROWSUM_COL >= 0:
        l_i = tl.sum(tl.where(offs_d[None, :] == ROWSUM_COL, acc, 0.0), 1)
    out = acc / l_i[:, None]
    o_ptrs = o_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------------- launcher


def interpreting() -> bool:
    """True when this module's kernels run in Triton's CPU interpreter: ``@triton.jit`` chose it because
    ``TRITON_INTERPRET=1`` was set when the module was imported (a later change of the variable does not count)."""
    return isinstance(_attn_fwd, InterpretedFunction)


def check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not t.is_cuda and not interpreting():
            raise ValueError(f"Triton kernels need CUDA tensors (got {t.device}); on the CPU set TRITON_INTERPRET=1 "
                             "before condiff.engine.kernels is first imported (the interpreter: for tests only)")


def launch_config(n: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) from ``CONFIGS`` for sequence length n."""
    for max_n, block_m, block_n, warps, stages in CONFIGS:
        if n <= max_n:
            return block_m, block_n, warps, stages
    raise AssertionError("CONFIGS ends with math.inf")


def poly_split(block_n: int, share: float) -> tuple[int, int]:
    """(MUFU keys, polynomial keys) per step whose polynomial share is nearest ``share``.

    Both parts must be powers of two >= 16 (tl.dot), so the shares on offer are 0, 1/9, 1/5, 1/3,
    1/2, ...; ties go to the step nearest ``block_n``. ``share`` 0 gives (block_n, 0).
    """
    if not 0.0 <= share < 1.0:
        raise ValueError(f"poly_exp_share must be in [0, 1), got {share}")
    if share == 0.0:
        return block_n, 0
    parts = (16, 32, 64, 128)
    pairs = [(a, b) for a in parts for b in parts if a + b <= 2 * block_n]
    return min(pairs, key=lambda ab: (abs(ab[1] / (ab[0] + ab[1]) - share), abs(ab[0] + ab[1] - block_n)))


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, out: torch.Tensor | None = None,
                     poly_exp_share: float = 0.0, config: tuple[int, int, int, int] | None = None,
                     mma_rowsum: bool = False, half_exp: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v (B, H, N, d), d <= 16: ``F.scaled_dot_product_attention(q, k, v)``.

    Any strides (the UNet's head view of a (B, N, H*d) projection is read in place). The output has
    q's layout unless ``out`` is given. fp16/bf16/fp32 inputs, fp32 softmax and accumulation; fp32
    matmuls run in IEEE fp32 (SDPA's semantics, not TF32). ``poly_exp_share``: the share of
    exponentials on the FMA pipe (snapped by ``poly_split``). ``config``: (BLOCK_M, BLOCK_N,
    num_warps, num_stages) instead of the ``CONFIGS`` table, for tuning. ``mma_rowsum`` (d < 16) and
    ``half_exp`` (fp16): the experimental switches of the module docstring.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (B, H, N, d) shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)} (this kernel does not do cross-attention lengths)")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, n, d = q.shape
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} is not supported: this kernel pads d to {MAX_HEAD_DIM} in registers "
                         "(use F.scaled_dot_product_attention for larger heads)")
    if mma_rowsum and d >= MAX_HEAD_DIM:
        raise ValueError(f"mma_rowsum needs a free padded column: head dim {d} must be below {MAX_HEAD_DIM}")
    if half_exp and q.dtype != torch.float16:
        raise ValueError(f"half_exp computes P in fp16 for an fp16 P @ V; got {q.dtype} inputs")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    check_device(q, k, v)
    if out is None:
        out = torch.empty_like(q)  # keeps q's strides for a dense q, so the caller's transpose back is free
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}")
    if n == 0 or b * h == 0:
        return out
    block_m, block_n, warps, stages = config or launch_config(n)
    block_n, poly_n = poly_split(block_n, poly_exp_share)
    grid = (triton.cdiv(n, block_m), b * h)
    _attn_fwd[grid](q, k, v, out, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                    h, LOG2E / math.sqrt(d), N=n,
                    D=d, BLOCK_D=MAX_HEAD_DIM, BLOCK_M=block_m, BLOCK_N=block_n, POLY_N=poly_n,
                    DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                    UPCAST=interpreting() and q.dtype == torch.bfloat16,
                    ROWSUM_COL=d if mma_rowsum else -1, HALF_EXP=half_exp, INTERPRET=interpreting(),
                    num_warps=warps, num_stages=stages)
    return out
