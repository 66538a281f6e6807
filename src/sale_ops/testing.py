"""Helpers for checking an implementation against the reference (SPEC §7) and for making inputs.

Used by the test suite, the demo and the benchmarks; importable by users who test their own
integration.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import reference as ref


def make_qkv(
    batch: int,
    q_heads: int,
    kv_heads: int,
    seq_len: int,
    head_dim: int,
    *,
    kv_len: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    seed: int = 0,
    heavy_fraction: float = 0.01,
    heavy_strength: float = 1.5,
):
    """Random ``q, k, v`` whose attention is sparse the way long-context attention is: a small
    fraction of keys (``heavy_fraction``) share a direction with every query and dominate the
    softmax, the rest is noise. Random Gaussian inputs alone give near-uniform attention, where
    every block matters and block selection has nothing to find.
    """
    nk = seq_len if kv_len is None else kv_len
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(head_dim, generator=g)
    direction *= heavy_strength * math.sqrt(head_dim) / direction.norm()
    q = torch.randn(batch, q_heads, seq_len, head_dim, generator=g) + direction
    heavy = (torch.rand(batch, kv_heads, nk, 1, generator=g) < heavy_fraction).float()
    k = torch.randn(batch, kv_heads, nk, head_dim, generator=g) + heavy * direction
    v = torch.randn(batch, kv_heads, nk, head_dim, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


class MaskComparison(NamedTuple):
    mismatched: int  # blocks that differ from the reference
    near_ties: int  # of those, blocks within the SPEC §7 margin tolerance (allowed)
    candidates: int  # candidate blocks (causal, outside the dense set)


def compare_block_mask(mask, q, k, quantized, tau, bq=64, bk=32, window=128, scale=None) -> MaskComparison:
    """SPEC §7 for block masks: a block may differ from the reference only if its reference margin
    ``max(ŝ − T)`` is within ``1e-3 · (1 + |T|)`` of 0 (``|T|``: the largest finite threshold
    magnitude among the block's rows)."""
    Nq, Nk = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    margins = ref.block_margins(q, k, quantized, tau, bq, bk, window, scale)
    m, l = ref.row_statistics(q, k, quantized.k_mean, bq, bk, window, scale)
    T = ref.thresholds(m, l, torch.as_tensor(tau, device=q.device, dtype=torch.float32), scale)
    T = torch.where(torch.isfinite(T), T.abs(), torch.zeros_like(T))
    T = torch.nn.functional.pad(T, (0, (-Nq) % bq)).view(*T.shape[:2], -1, bq).amax(-1)  # per query block
    tol = 1e-3 * (1 + T).unsqueeze(-1)
    differs = mask.cpu() != (margins > 0).cpu()
    near = differs & (margins.abs() <= tol).cpu()
    causal = ref.causal_blocks(Nq, Nk, bq, bk) & ~ref.dense_blocks(Nq, Nk, bq, bk, window)
    candidates = int(causal.sum()) * q.shape[0] * q.shape[1]
    return MaskComparison(int(differs.sum()), int(near.sum()), candidates)


def assert_block_mask_agrees(mask, q, k, quantized, tau, bq=64, bk=32, window=128, scale=None) -> MaskComparison:
    """Fails unless every mismatch is a near tie and near ties are below 0.1% of candidates."""
    c = compare_block_mask(mask, q, k, quantized, tau, bq, bk, window, scale)
    assert c.mismatched == c.near_ties, f"{c.mismatched - c.near_ties} blocks differ beyond the SPEC §7 tolerance ({c})"
    assert c.near_ties <= 0.001 * max(c.candidates, 1), f"too many near-tie mismatches: {c}"
    return c


def assert_attention_close(out, lse, q, k, v, mask, bq=64, bk=32, scale=None, causal=True) -> float:
    """SPEC §7 for outputs: ``|out − ref_fp32| <= 2·|ref_lowprec − ref_fp32| + 1e-3`` elementwise, with
    the same block mask, and ``lse`` within 1e-3. Returns the largest ``|out − ref_fp32|``."""
    mask = mask.to(q.device)
    ref_lo, _ = ref.block_sparse_attention(q, k, v, mask, bq, bk, scale, causal, dtype=q.dtype)
    hi, lse_hi = _unrounded(q, k, v, mask, bq, bk, scale, causal)
    err = (out.double() - hi).abs()
    lse_hi = lse_hi.double()
    bound = 2 * (ref_lo.double() - hi).abs() + 1e-3
    bad = err > bound
    assert not bool(bad.any()), (
        f"{int(bad.sum())} of {bad.numel()} outputs outside the SPEC §7 bound; worst excess "
        f"{float((err - bound).max()):.3e}"
    )
    if lse is not None:
        finite = torch.isfinite(lse_hi)
        assert bool((torch.isfinite(lse.cpu()) == finite.cpu()).all()), "lse must be finite exactly where the reference's is"
        dl = torch.where(finite, lse.double() - lse_hi, torch.zeros_like(lse_hi)).abs()
        assert float(dl.max()) <= 1e-3, f"lse differs by {float(dl.max()):.3e}"
    return float(err.max())


def _unrounded(q, k, v, mask, bq, bk, scale, causal):
    """fp64 reference output without the final rounding to the input dtype."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    return ref.block_sparse_attention(q64, k64, v64, mask, bq, bk, scale, causal, dtype=torch.float64)


def _group_queries(x, hkv):
    return x.view(x.shape[0], hkv, x.shape[1] // hkv, *x.shape[2:])


def _assert_within(name, got, want, tol):
    err = (got.double() - want.double()).abs()
    bad = err > tol
    assert not bool(bad.any()), (
        f"{name}: {int(bad.sum())} of {bad.numel()} values differ beyond tolerance; worst |diff| "
        f"{float(err.max()):.3e} (tolerance there {float(tol.expand_as(err).flatten()[int(err.argmax())]):.3e})"
    )


def assert_quantization_agrees(got, q, k, bk=32, tie_tol=1e-6, scale_rtol=1e-6) -> int:
    """SPEC §7 for quantization, against the fp32 reference computed on the CPU. Codes may differ by
    1 only where ``x / scale`` lies within ``tie_tol`` (relative) of a rounding tie. Scales are
    compared with ``scale_rtol``: a kernel's mean is summed in another order than the CPU's, so
    centred values (and their group maxima) can differ in the last bit. Returns the tie count."""
    want = ref.quantize(q.cpu(), k.cpu(), bk)
    got = [t.cpu() for t in got]
    for name, g, w in zip(want._fields, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{name}: {g.dtype}{tuple(g.shape)} vs {w.dtype}{tuple(w.shape)}"
    got_q = ref.Quantized(*got)
    for name in ("q_scale", "k_scale"):
        torch.testing.assert_close(getattr(got_q, name), getattr(want, name), rtol=scale_rtol, atol=0)
    # Sums in another order: bound the difference by the magnitude of the summed terms.
    kf, qf = k.cpu().float(), q.cpu().float()
    _assert_within("k_mean", got_q.k_mean, want.k_mean, 1e-6 * kf.abs().mean(2) + 1e-7)
    q_mean = qf.mean(2)
    k_smooth = (kf - want.k_mean.unsqueeze(2)).abs()
    terms = (_group_queries(q_mean.abs(), k.shape[1]) @ k_smooth.transpose(-1, -2)).reshape(want.qk_bias.shape)
    _assert_within("qk_bias", got_q.qk_bias, want.qk_bias, 1e-5 * terms + 1e-6)
    ties = 0
    for x, codes, scale, want_codes in (
        (q, got[0], want.q_scale, want.q_codes),
        (k, got[2], want.k_scale, want.k_codes),
    ):
        x = x.cpu().float()
        ratio = (x - x.mean(2, keepdim=True)) / scale.unsqueeze(-1)
        diff = (codes.int() - want_codes.int()).abs()
        near_tie = ((ratio.abs() - ratio.abs().floor() - 0.5).abs() <= tie_tol * ratio.abs().clamp(min=1))
        assert int(diff.max()) <= 1, "codes differ by more than 1"
        assert bool((near_tie | (diff == 0)).all()), f"{int(((diff > 0) & ~near_tie).sum())} codes differ away from a tie"
        ties += int((diff > 0).sum())
    return ties
