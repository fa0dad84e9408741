"""Fused GroupNorm (+ SiLU) over (B, C, H, W) tensors, NCHW or channels_last, in Triton.

Why: eager PyTorch runs GroupNorm and SiLU as separate kernels with layout copies around them; with
the elementwise work they are 16-17 % of the paper preset's GPU time and 38-41 % of the symmetric
preset's (performance.md §4, §6 item 3). This kernel reads a group once for its statistics and once
more to write normalised, affine-transformed and (optionally) SiLU-activated output: 2 reads + 1
write, against 3 reads + 2 writes for ``F.silu(F.group_norm(x))`` unfused (GroupNorm's two passes,
then SiLU's own read and write), and no layout copy for the channels_last sums the attention blocks
hand on.

Statistics are fp32 and use the shifted-data sums (Chan, Golub & LeVeque): subtracting an early
estimate of the mean (the first tile's) before summing x and x**2 keeps the variance from cancelling
when |mean| >> std, at the cost of re-reading one tile. Tests: tests/engine/test_triton_kernels.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .attention_triton import check_device

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Elements per program step. UNTUNED: one program per (sample, group) streams up to 197 K elements
# (128 px, 12 channels per group); the GPU session should check occupancy at batch 8 (256 programs on
# 132 SMs) and the strided channels_last reads, and split large groups over several programs if this
# kernel shows up in the profile. Each (H*W, channels per group, layout, SiLU) compiles once: 22
# variants for the paper preset, compiled during the fast engine's warm-up.
MAX_BLOCK = 4096


def group_norm_silu_reference(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                              bias: torch.Tensor | None, eps: float, silu: bool) -> torch.Tensor:
    """The float64 oracle: ``F.group_norm`` then ``F.silu``, upcast."""
    w = None if weight is None else weight.double()
    b = None if bias is None else bias.double()
    y = F.group_norm(x.double(), num_groups, w, b, eps)
    return F.silu(y) if silu else y


@triton.jit
def _offsets(i, c0, stride_c, stride_p, HW: tl.constexpr, C_PER_G: tl.constexpr, LAYOUT: tl.constexpr):
    """Memory offsets (from the sample's start) of a group's flat indices i, in the order memory holds them.

    LAYOUT 0: contiguous NCHW, the group is one run of memory. 1: channels innermost (channels_last,
    and what the UNet's attention blocks return): i walks the group's channels at one pixel first.
    2: any other (B, C, H*W)-viewable strides, channel-major.
    """
    if LAYOUT == 0:
        off = c0 * HW + i
    elif LAYOUT == 1:
        off = (c0 + i % C_PER_G) * stride_c + (i // C_PER_G) * stride_p
    else:
        off = (c0 + i // HW) * stride_c + (i % HW) * stride_p
    return off


@triton.jit
def _group_norm_silu_fwd(X, Y, W, B, eps, G, stride_xb, stride_xc, stride_xp, stride_yb, stride_yc, stride_yp,
                         HW: tl.constexpr, C_PER_G: tl.constexpr, LAYOUT: tl.constexpr, LAYOUT_Y: tl.constexpr,
                         BLOCK: tl.constexpr,
                         FIRST_N: tl.constexpr, AFFINE: tl.constexpr, SILU: tl.constexpr):
    """Grid (B * G,): one program owns the C_PER_G * HW elements of one group of one sample.

    Sizes are compile-time constants (a UNet has a handful of shapes; Triton 3.6's interpreter cannot
    loop to a runtime bound under numpy >= 2.4, triton-lang/triton#9171). LAYOUT_Y may differ from
    LAYOUT only where both walk the group in the same order (0 and 2: channel-major).
    """
    pid = tl.program_id(0)
    c0 = (pid % G) * C_PER_G
    x_base = X + (pid // G).to(tl.int64) * stride_xb
    y_base = Y + (pid // G).to(tl.int64) * stride_yb
    offs = tl.arange(0, BLOCK)
    ok = offs < C_PER_G * HW
    first = tl.load(x_base + _offsets(offs, c0, stride_xc, stride_xp, HW, C_PER_G, LAYOUT), mask=ok, other=0.0)
    shift = tl.sum(first.to(tl.float32), 0) / FIRST_N
    s1 = tl.zeros([BLOCK], tl.float32)
    s2 = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C_PER_G * HW, BLOCK):
        i = start + offs
        ok = i < C_PER_G * HW
        x = tl.load(x_base + _offsets(i, c0, stride_xc, stride_xp, HW, C_PER_G, LAYOUT), mask=ok, other=0.0)
        d = tl.where(ok, x.to(tl.float32) - shift, 0.0)
        s1 += d
        s2 += d * d
    mean_d = tl.sum(s1, 0) / (C_PER_G * HW)
    var = tl.maximum(tl.sum(s2, 0) / (C_PER_G * HW) - mean_d * mean_d, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    for start in range(0, C_PER_G * HW, BLOCK):
        i = start + offs
        ok = i < C_PER_G * HW
        x = tl.load(x_base + _offsets(i, c0, stride_xc, stride_xp, HW, C_PER_G, LAYOUT), mask=ok, other=0.0)
        x = x.to(tl.float32) - shift  # centred on the shift, not the mean: x - shift is exact near it,
        if AFFINE:                    # while an fp32 mean of 100 is off by 4e-6, 4e-4 of a std of 0.01
            if LAYOUT == 1:
                c = c0 + i % C_PER_G
            else:
                c = c0 + i // HW
            scale = tl.load(W + c, mask=ok, other=0.0).to(tl.float32) * rstd
            y = x * scale + (tl.load(B + c, mask=ok, other=0.0).to(tl.float32) - mean_d * scale)
        else:
            y = (x - mean_d) * rstd
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_base + _offsets(i, c0, stride_yc, stride_yp, HW, C_PER_G, LAYOUT_Y), y.to(Y.dtype.element_ty),
                 mask=ok)


def _layout(x3: torch.Tensor) -> int:
    """``_offsets``' LAYOUT for a (B, C, P) view."""
    _, c, p = x3.shape
    if x3.stride(2) == 1 and x3.stride(1) == p or c == 1:
        return 0 if x3.stride(2) == 1 else 2
    return 1 if x3.stride(1) < x3.stride(2) else 2


def groupnorm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float, silu: bool, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.silu(F.group_norm(x, num_groups, weight, bias, eps))`` (SiLU only when ``silu``) for x (B, C, H, W)
    (or (B, C, ...)); fp16/bf16/fp32 in, the same dtype and layout out.

    Reads NCHW and channels_last in place (the UNet's attention blocks hand on channels-last sums);
    a layout whose spatial dims do not flatten into one stride is copied to NCHW first.
    """
    if x.dim() < 2 or x.shape[1] % num_groups != 0:
        raise ValueError(f"x of shape {tuple(x.shape)}: the channel dim must be divisible by {num_groups} groups")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be one of {_DTYPES}, got {x.dtype}")
    if (weight is None) != (bias is None):
        raise ValueError("give both weight and bias, or neither")
    check_device(x, *([] if weight is None else [weight, bias]))
    n, c = x.shape[:2]
    try:
        x3 = x.view(n, c, -1)
    except RuntimeError:
        x = x.contiguous()
        x3 = x.view(n, c, -1)
    if out is None:
        out = torch.empty_like(x)  # x's strides where x is dense (NCHW, channels_last), else NCHW
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must be a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}")
    if x.numel() == 0:
        return out
    y3 = out.view(n, c, -1)
    layout, layout_y = _layout(x3), _layout(y3)
    if (layout == 1) != (layout_y == 1):
        raise ValueError("out must keep x's channel order in memory (both channels_last, or both not)")
    hw = x3.shape[2]
    group_size = (c // num_groups) * hw
    block = min(MAX_BLOCK, triton.next_power_of_2(group_size))
    affine = weight is not None
    _group_norm_silu_fwd[(n * num_groups,)](
        x3, y3, weight if affine else x3, bias if affine else x3, float(eps), num_groups, *x3.stride(), *y3.stride(),
        HW=hw, C_PER_G=c // num_groups, LAYOUT=layout, LAYOUT_Y=layout_y, BLOCK=block, FIRST_N=min(block, group_size),
        AFFINE=affine, SILU=silu, num_warps=8 if block >= 2048 else 4)
    return out


def triton_group_norm(norm: torch.nn.GroupNorm, x: torch.Tensor, silu: bool) -> torch.Tensor:
    """The UNet's ``NormFn`` seam (``ConditionalUNet.set_norm_fn``): ``norm(x)``, then SiLU when ``silu``."""
    return groupnorm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu)
