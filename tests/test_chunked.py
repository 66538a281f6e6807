"""Chunked prefill (issue 5): Nq < Nk, merging partial results through lse, and the dense path
below the break-even length."""

import pytest
import torch

import sale_ops
from sale_ops import reference as ref
from sale_ops.testing import make_qkv

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _exact(q, k, v, scale=None):
    """fp32 causal attention (bottom-right aligned) and its lse, straight from the definition."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    g = q.shape[1] // k.shape[1]
    kf, vf = (x.float().repeat_interleave(g, dim=1) for x in (k, v))
    s = scale * q.float() @ kf.transpose(-1, -2)
    nq, nk = q.shape[2], k.shape[2]
    visible = torch.arange(nk, device=q.device)[None, :] <= torch.arange(nq, device=q.device)[:, None] + (nk - nq)
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.softmax(s, dim=-1) @ vf, lse


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_of_key_ranges_equals_whole_chunk(device, dtype):
    # A chunk of 200 queries after 600 cached keys: attention to the cache (no causal mask: every
    # cached key precedes the chunk) merged with causal attention to its own keys equals tau = 0
    # attention of the chunk against all 800 keys.
    q, k, v = make_qkv(1, 6, 2, 200, 64, kv_len=800, dtype=dtype, device=device, seed=3)
    cached, own = slice(0, 600), slice(600, 800)
    full_mask = torch.ones(1, 6, 4, 19, dtype=torch.bool, device=device)
    out_a, lse_a = sale_ops.block_sparse_attention(q, k[:, :, cached], v[:, :, cached], full_mask, causal=False,
                                                   return_lse=True)
    res_b = sale_ops.attention(q, k[:, :, own], v[:, :, own], 0.0, return_lse=True, dense_below=0)
    out, lse = sale_ops.merge_attention([out_a, res_b.out], [lse_a, res_b.lse])
    want_out, want_lse = _exact(q, k, v)
    whole = sale_ops.attention(q, k, v, 0.0, return_lse=True, dense_below=0)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=0)
    torch.testing.assert_close(lse, whole.lse, atol=1e-3, rtol=0)
    tol = 2 * (whole.out.float() - want_out).abs().max().item() + 1e-3
    assert (out.float() - want_out).abs().max().item() <= tol


def test_merge_attention_rows_without_keys_and_errors():
    out = torch.randn(1, 2, 3, 8)
    lse = torch.randn(1, 2, 3)
    empty_lse = torch.full((1, 2, 3), float("-inf"))
    got, got_lse = sale_ops.merge_attention([out, torch.zeros_like(out)], [lse, empty_lse])
    torch.testing.assert_close(got, out)
    torch.testing.assert_close(got_lse, lse)
    nothing, nothing_lse = sale_ops.merge_attention([out], [empty_lse])
    assert torch.isneginf(nothing_lse).all() and (nothing == 0).all()
    with pytest.raises(ValueError, match="merge_attention: needs one lse per output"):
        sale_ops.merge_attention([out, out], [lse])
    with pytest.raises(ValueError, match=r"expected out \[B, H, N, D\] and lse \[B, H, N\]"):
        sale_ops.merge_attention([out], [lse[..., :2]])
    with pytest.raises(ValueError, match="every part must match"):
        sale_ops.merge_attention([out, out[:, :1]], [lse, lse[:, :1]])


@pytest.mark.parametrize("device", DEVICES)
def test_chunk_mask_equals_rows_of_full_prefill(device):
    # The last chunk of a prefill sees the same keys as the full prefill (same key statistics). Its
    # query mean is its own; the prefix queries are a permutation of the chunk's, so the query mean
    # is the same too, and the chunk's block mask must equal the full prefill's last rows.
    nq, n, hq, hkv, d = 256, 1024, 4, 2, 64
    q, k, v = make_qkv(1, hq, hkv, n, d, dtype=torch.bfloat16, device=device, seed=11)
    chunk = q[:, :, n - nq:]
    g = torch.Generator().manual_seed(0)
    prefix = torch.cat([chunk[:, :, torch.randperm(nq, generator=g).to(device)] for _ in range((n - nq) // nq)], dim=2)
    full_q = torch.cat([prefix, chunk], dim=2)
    tau = torch.tensor([1e-3, 1e-2, 3e-2, 1e-1])
    full = sale_ops.attention(full_q, k, v, tau, return_block_mask=True, dense_below=0)
    part = sale_ops.attention(chunk, k, v, tau, return_block_mask=True, dense_below=0)
    rows = full.block_mask[:, :, (n - nq) // 64:]
    assert part.block_mask.shape == rows.shape
    assert torch.equal(part.block_mask, rows)
    assert 0 < float(part.density.mean()) < 1  # the thresholds actually skip blocks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (7, 1)])
def test_dense_below_is_tau_zero(device, hq, hkv):
    # Below dense_below the op computes every causal block: bit-identical to tau = 0 (SPEC §6).
    q, k, v = make_qkv(1, hq, hkv, 1500, 128, dtype=torch.bfloat16, device=device, seed=hq)
    dense = sale_ops.attention(q, k, v, 0.05, dense_below=2048, return_lse=True, return_block_mask=True)
    exact = sale_ops.attention(q, k, v, 0.0, dense_below=0, return_lse=True, return_block_mask=True)
    assert torch.equal(dense.block_mask, exact.block_mask) and bool((dense.density == 1).all())
    assert torch.equal(dense.out, exact.out) and torch.equal(dense.lse, exact.lse)
    sparse = sale_ops.attention(q, k, v, 0.05, dense_below=0, return_block_mask=True)
    assert float(sparse.density.mean()) < 1  # the same call at or above dense_below skips blocks
    at_length = sale_ops.attention(q, k, v, 0.05, dense_below=1500, return_block_mask=True)
    assert torch.equal(at_length.block_mask, sparse.block_mask)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 128), (8, 2, 64), (7, 1, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_backend_cudnn(hq, hkv, d, dtype):
    # dense_backend="cudnn": exact causal attention from cuDNN (its own rounding of P), the same
    # lse, every causal block reported; chunks (Nq < Nk) stay on the exact SALE path.
    q, k, v = make_qkv(1, hq, hkv, 1500, d, dtype=dtype, device="cuda", seed=hq)
    got = sale_ops.attention(q, k, v, 0.05, dense_below=2048, dense_backend="cudnn", return_lse=True,
                             return_block_mask=True)
    exact = sale_ops.attention(q, k, v, 0.0, dense_below=0, return_lse=True, return_block_mask=True)
    want_out, want_lse = _exact(q, k, v)
    assert got.out.dtype == dtype and got.out.shape == q.shape
    assert torch.equal(got.block_mask, exact.block_mask)
    torch.testing.assert_close(got.lse, want_lse, atol=1e-3, rtol=0)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    assert (got.out.float() - want_out).abs().max().item() <= 2 * ulp * want_out.abs().max().item()
    chunk = sale_ops.attention(q[:, :, 500:], k, v, 0.05, dense_below=2048, dense_backend="cudnn",
                               return_block_mask=True)
    assert bool((chunk.density == 1).all())
    lowprec = ref.block_sparse_attention(q, k, v, exact.block_mask, dtype=dtype)[0].float()[:, :, 500:]
    tol = 2 * (lowprec - want_out[:, :, 500:]).abs() + 1e-3  # SPEC §7: the exact kernels served it
    assert bool(((chunk.out.float() - want_out[:, :, 500:]).abs() <= tol).all())


def test_dense_backend_is_checked():
    q, k, v = make_qkv(1, 2, 1, 100, 64)
    with pytest.raises(ValueError, match="'dense_backend' must be one of"):
        sale_ops.attention(q, k, v, 0.01, dense_backend="flash")
