"""condiff's own GPU kernels, and the switch that puts them into a ConditionalUNet.

``use_triton_kernels(model)`` swaps the network's two seams (``set_attention_fn``, ``set_norm_fn``)
for the Triton kernels in ``attention_triton`` and ``groupnorm_silu_triton``; weights, parameter names
and state dicts do not change, and ``use_torch_kernels(model)`` restores the eager forms. Triton is
imported only here, inside the functions, so condiff runs (and the fast engine keeps its torch
kernels) where Triton is not installed. The kernels need CUDA tensors, or ``TRITON_INTERPRET=1`` set
before the first call for Triton's CPU interpreter (tests only: it is orders of magnitude slower).
"""
from __future__ import annotations

import torch
from torch import nn

from condiff.errors import BackendUnavailableError

KERNELS = ("torch", "triton", "compile")  # the fast engine's --fast-kernels values


def _triton_modules():
    try:
        from . import attention_triton, groupnorm_silu_triton
    except ImportError as exc:
        raise BackendUnavailableError(None, f"the Triton kernels need the 'triton' package ({exc})",
                                      "install it with: pip install triton==3.6.0 (CUDA builds of torch on "
                                      "Linux ship it), or use --fast-kernels torch") from exc
    return attention_triton, groupnorm_silu_triton


def use_triton_kernels(model: nn.Module, poly_exp_share: float = 0.0, mma_rowsum: bool = False,
                       half_exp: bool = False) -> nn.Module:
    """Route ``model``'s attention and GroupNorm(+SiLU) through the Triton kernels, in place; returns it.

    ``poly_exp_share``: share of the attention exponentials computed on the FMA pipe (0 = none;
    see ``attention_triton.poly_split`` for the shares on offer). ``mma_rowsum`` and ``half_exp``: the
    attention kernel's experimental switches (its module docstring); ``half_exp`` applies to fp16
    calls only, other dtypes keep fp32 exponentials.
    """
    attention, groupnorm = _triton_modules()
    attention.poly_split(128, poly_exp_share)  # refuse a bad share now, not at the first forward
    fn = attention.triton_attention
    if poly_exp_share or mma_rowsum or half_exp:
        def fn(q, k, v):
            return attention.triton_attention(q, k, v, poly_exp_share=poly_exp_share,
                                              mma_rowsum=mma_rowsum and q.shape[-1] < attention.MAX_HEAD_DIM,
                                              half_exp=half_exp and q.dtype == torch.float16)
    model.set_attention_fn(fn)
    model.set_norm_fn(groupnorm.triton_group_norm)
    return model


def compile_model(model: nn.Module) -> nn.Module:
    """``torch.compile`` (inductor, default mode, static shapes) of the network: fuses GroupNorm, SiLU,
    residual adds and casts (performance.md §6 row 3: 1.15x paper, 1.6x symmetric per evaluation on
    Hopper). Default mode, not "reduce-overhead": the fast engine captures the whole loop in its own
    CUDA graph, after a warm-up run that compiles (about a minute per batch shape on the GPU)."""
    import torch

    return torch.compile(model, dynamic=False)


def use_torch_kernels(model: nn.Module) -> nn.Module:
    """Undo ``use_triton_kernels``: PyTorch SDPA and the eager GroupNorm + SiLU modules."""
    from condiff.unet import sdpa_attention, torch_group_norm

    model.set_attention_fn(sdpa_attention)
    model.set_norm_fn(torch_group_norm)
    return model
