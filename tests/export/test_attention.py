"""Export-time attention variants against SDPA and a float64 oracle (performance.md §2: same math)."""
import pytest
import torch
import torch.nn.functional as F

from condiff.export.attention import (chunked_attention, choose_chunk_size, make_attention, ort_mha_attention,
                                      plain_attention, with_padded_head_dim)


def _qkv(batch=2, heads=3, n=77, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, d, generator=g, dtype=dtype) for _ in range(3))


def _oracle(q, k, v):
    """softmax(q kᵀ / sqrt(d)) v in float64, written out by hand."""
    q, k, v = (a.double() for a in (q, k, v))
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    p = torch.exp(s - s.amax(-1, keepdim=True))
    return (p / p.sum(-1, keepdim=True)) @ v


@pytest.mark.parametrize("chunk", [1, 7, 16, 32, 76, 77, 200])  # 7, 32, 76: last chunk shorter
def test_chunked_equals_sdpa(chunk):
    q, k, v = _qkv()
    out = chunked_attention(q, k, v, chunk_size=chunk)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=2e-6)
    torch.testing.assert_close(out.double(), _oracle(q, k, v), rtol=0, atol=2e-6)


def test_chunked_with_budget_chunks_and_stays_exact():
    q, k, v = _qkv(n=300, heads=4)
    # budget for 40 rows of 4 heads x 300 keys: 16-row multiple -> 32 rows, 10 chunks, short tail
    assert choose_chunk_size(4, 300, budget_bytes=4 * 300 * 4 * 40) == 32
    out = chunked_attention(q, k, v, budget_bytes=4 * 300 * 4 * 40)
    torch.testing.assert_close(out.double(), _oracle(q, k, v), rtol=0, atol=2e-6)


def test_choose_chunk_size_paper_layers():
    # paper 128-px layer: 16 heads x 16384 keys = 1 MiB of fp32 scores per query row
    assert choose_chunk_size(16, 16384) == 128
    assert choose_chunk_size(32, 4096) == 256
    assert choose_chunk_size(32, 1024) == 1024  # 128 MiB whole: no chunking
    assert choose_chunk_size(64, 256) == 256


def test_plain_attention_equals_oracle():
    q, k, v = _qkv(n=50)
    torch.testing.assert_close(plain_attention(q, k, v).double(), _oracle(q, k, v), rtol=0, atol=2e-6)


@pytest.mark.parametrize("variant", ["sdpa", "chunked"])
def test_padded16_equals_unpadded(variant):
    q, k, v = _qkv(n=65)
    fn = make_attention(variant, chunk_size=16, pad_head_dim=16)
    out = fn(q, k, v)
    assert out.shape == q.shape
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=2e-6)


def test_padding_keeps_the_original_scale():
    # with the default scale of the padded size (1/4 instead of 1/sqrt(8)) the result would differ
    q, k, v = (3 * a for a in _qkv(n=40))
    padded = with_padded_head_dim(lambda q, k, v, scale: plain_attention(q, k, v, scale), 16)(q, k, v)
    wrong = plain_attention(*(F.pad(a, (0, 8)) for a in (q, k, v)))[..., :8]
    torch.testing.assert_close(padded.double(), _oracle(q, k, v), rtol=0, atol=2e-5)  # v and scores 3x, 9x larger
    assert (wrong - padded).abs().max() > 1e-2


def test_ort_mha_eager_equals_sdpa():
    q, k, v = _qkv(n=33, heads=4)
    torch.testing.assert_close(ort_mha_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=0, atol=1e-6)


def test_make_attention_refuses_bad_requests():
    with pytest.raises(ValueError, match="unknown attention"):
        make_attention("flash")
    with pytest.raises(ValueError, match="not ORT"):
        make_attention("ort_mha", pad_head_dim=16)
