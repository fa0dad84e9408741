"""Export-time attention: the same function as SDPA, written so the exported graph stays runnable.

Every function here maps ``q, k, v`` of shape (B, heads, N, d) to (B, heads, N, d) and computes
``softmax(q kᵀ / sqrt(d)) v`` exactly as ``condiff.unet.sdpa_attention`` does; they differ only in
the ONNX they trace to (performance.md §2):

- ``sdpa``: whatever the exporter emits for ``F.scaled_dot_product_attention``: one MatMul →
  Softmax → MatMul per layer. Its score tensor is heads × N × N floats (16 GiB per image for a
  128-px layer of the ``paper`` preset), so ONNX Runtime on the CPU cannot run it; TensorRT fuses
  the pattern into a flash kernel, which is why the TensorRT ONNX uses it.
- ``chunked``: query-chunked plain ops. Q is split (static sizes) along the token axis; each
  chunk computes ``softmax(q_c kᵀ) v`` over *all* keys and the outputs are concatenated. Each row's
  softmax is unchanged, so this is the same function with live score memory heads × C × N × 4 B.
  Portable to any ONNX runtime.
- ``ort_mha``: ONNX Runtime's fused ``com.microsoft::MultiHeadAttention`` contrib operator; never
  materialises the scores and beats torch's CPU kernel for d = 8. ORT only.

``pad_head_dim`` zero-pads d (8 → 16) for TensorRT's fused kernels while keeping the softmax
scale at 1/sqrt(8): zero columns add nothing to q·k, and the padded output columns are zero and
are cut off again, so scores and outputs are unchanged.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
VARIANTS = ("sdpa", "chunked", "ort_mha")
# Live score bytes per image and chunk (the softmax input and output each take this much):
# 128 MiB gives 128-row chunks for the paper preset's 128-px layers (16 heads x 16384 keys).
DEFAULT_SCORE_BUDGET = 128 << 20


def _static(n) -> int:
    """A shape entry as a Python int. Only batch is dynamic in the export; heads, tokens and head
    dim are fixed by the image size, so baking them into the graph is intended (it silences the
    tracer's warning, which we turn off in ``export_warnings_off``)."""
    return int(n)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """(B, h, N, d) -> (B, h, N, d): ``softmax((q * scale) kᵀ) v`` as three plain ops.

    The scale goes on q before the first MatMul (N × d values instead of N × N), which is also
    where TensorRT wants it for its attention fusion.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    return torch.matmul(scores.softmax(dim=-1), v)


def choose_chunk_size(heads: int, n_tokens: int, budget_bytes: int = DEFAULT_SCORE_BUDGET) -> int:
    """Query rows per chunk so that one chunk's fp32 scores (heads × C × N) fit ``budget_bytes``.

    Returns ``n_tokens`` (no chunking) when the whole score tensor fits. Rounded down to a
    multiple of 16 rows when at least 16 fit, so MatMul tiles stay regular.
    """
    rows = max(1, budget_bytes // (heads * n_tokens * 4))
    if rows >= n_tokens:
        return n_tokens
    return rows - rows % 16 if rows >= 16 else rows


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int | None = None,
                      scale: float | None = None, budget_bytes: int = DEFAULT_SCORE_BUDGET) -> torch.Tensor:
    """(B, h, N, d) -> (B, h, N, d): plain attention over static query chunks of ``chunk_size`` rows.

    ``chunk_size=None`` picks it from ``budget_bytes`` per layer (``choose_chunk_size``); the last
    chunk may be shorter (non-dividing sizes are fine). Every chunk sees every key, so each row's
    softmax, and the result, equal ``plain_attention``'s.
    """
    heads, n_tokens = _static(q.shape[1]), _static(q.shape[2])
    size = chunk_size or choose_chunk_size(heads, n_tokens, budget_bytes)
    if size >= n_tokens:
        return plain_attention(q, k, v, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k_t = k.transpose(-1, -2)  # shared by every chunk
    # explicit sizes: the exporter turns split(int) with a short tail into an invalid ONNX Split
    sizes = [min(size, n_tokens - start) for start in range(0, n_tokens, size)]
    outs = [torch.matmul(torch.matmul(q_c * scale, k_t).softmax(dim=-1), v) for q_c in q.split(sizes, dim=2)]
    return torch.cat(outs, dim=2)


class _OrtMultiHeadAttention(torch.autograd.Function):
    """Eager: SDPA on (B, N, heads*d) inputs. Traced: one ``com.microsoft::MultiHeadAttention`` node."""

    @staticmethod
    def forward(ctx, q, k, v, num_heads: int, scale: float):
        b, n, c = q.shape
        d = c // num_heads

        def split(t):
            return t.reshape(b, n, num_heads, d).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v), scale=scale)
        return out.transpose(1, 2).reshape(b, n, c)

    @staticmethod
    def symbolic(g, q, k, v, num_heads: int, scale: float):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=num_heads, scale_f=scale)
        out.setType(q.type())
        return out


def ort_mha_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """(B, h, N, d) -> (B, h, N, d) through ORT's MultiHeadAttention ((B, N, h*d) in, num_heads = h)."""
    heads, n_tokens, d = _static(q.shape[1]), _static(q.shape[2]), _static(q.shape[3])
    scale = d ** -0.5 if scale is None else float(scale)

    def merge(t):  # (B, h, N, d) -> (B, N, h*d); batch stays symbolic (-1)
        return t.transpose(1, 2).reshape(-1, n_tokens, heads * d)

    out = _OrtMultiHeadAttention.apply(merge(q), merge(k), merge(v), heads, scale)
    return out.reshape(-1, n_tokens, heads, d).transpose(1, 2)


def sdpa_scaled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """PyTorch SDPA with an explicit scale (the exporter lowers it to MatMul → Softmax → MatMul)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def with_padded_head_dim(fn: Callable[..., torch.Tensor], head_dim: int = 16) -> AttentionFn:
    """Wrap ``fn(q, k, v, scale=...)`` so it sees d zero-padded to ``head_dim``, scale 1/sqrt(original d).

    Zero columns leave every q·k unchanged; v's zero columns give zero output columns, dropped here.
    """
    def padded(q, k, v):
        d = _static(q.shape[-1])
        if d >= head_dim:
            return fn(q, k, v, scale=d ** -0.5)
        pad = (0, head_dim - d)
        out = fn(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), scale=d ** -0.5)
        return out[..., :d]

    return padded


def make_attention(variant: str, *, chunk_size: int | None = None, pad_head_dim: int | None = None,
                   budget_bytes: int = DEFAULT_SCORE_BUDGET) -> AttentionFn:
    """The attention function for one export variant (``sdpa``, ``chunked`` or ``ort_mha``).

    ``pad_head_dim`` (e.g. 16) zero-pads the head dimension; not for ``ort_mha``, whose kernel
    takes d = 8 as it is.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown attention variant {variant!r}; choose one of {VARIANTS}")
    if variant == "ort_mha":
        if pad_head_dim:
            raise ValueError("pad_head_dim is for TensorRT's plain-op graphs, not ORT's MultiHeadAttention")
        base = ort_mha_attention
    elif variant == "chunked":
        def base(q, k, v, scale=None):
            return chunked_attention(q, k, v, chunk_size, scale, budget_bytes)
    else:
        base = sdpa_scaled
    if pad_head_dim:
        return with_padded_head_dim(base, pad_head_dim)

    def attention(q, k, v):
        return base(q, k, v)

    return attention


class export_warnings_off(warnings.catch_warnings):
    """Silence the tracer's warnings about Python ints taken from shapes (intended: only batch is dynamic)."""

    def __enter__(self):
        out = super().__enter__()
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        return out


__all__ = ["VARIANTS", "DEFAULT_SCORE_BUDGET", "plain_attention", "choose_chunk_size", "chunked_attention",
           "ort_mha_attention", "sdpa_scaled", "with_padded_head_dim", "make_attention", "export_warnings_off"]
