"""Executable form of ``shared/SPEC.md`` in plain PyTorch.

Every function here is the definition the CUDA kernels are tested against. The code favours
clarity over speed, but it is vectorised (no Python loop over tokens: only over chunks of query
blocks, to bound memory) so it runs on the CPU at N = 4096 in seconds and on any GPU.

Layout (SPEC §1): ``q`` is ``[B, Hq, Nq, D]``, ``k`` and ``v`` are ``[B, Hkv, Nk, D]``, query head
``h`` reads kv head ``h // (Hq // Hkv)``. GQA is computed by viewing the query heads of one kv
head as extra rows (``[B, Hkv, g * rows, D]``), so K and V are never copied into ``Hq`` heads.

``dtype`` arguments select the arithmetic (``torch.float32``, the contract's, or
``torch.float64``); inputs of any floating dtype are accepted.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "Quantized",
    "quantize",
    "quantize_queries",
    "quantize_keys",
    "estimate_logits",
    "causal_blocks",
    "dense_blocks",
    "row_statistics",
    "thresholds",
    "block_margins",
    "block_mask",
    "block_sparse_attention",
    "attention",
    "block_density",
    "expand_block_mask",
    "sequences",
    "varlen_causal_blocks",
    "quantize_varlen",
    "block_mask_varlen",
    "block_sparse_attention_varlen",
    "attention_varlen",
    "block_density_varlen",
]

QMAX = 7  # 4-bit symmetric codes live in [-7, 7]

# Rows of the logit matrix processed at once; bounds memory to about this many fp32 elements.
_CHUNK_ELEMENTS = 1 << 24


class Quantized(NamedTuple):
    """Output of :func:`quantize` (and of ``torch.ops.sale.quantize``).

    q_codes ``int8 [B, Hq, Nq, D]``, q_scale ``fp32 [B, Hq, Nq]`` (one scale per row, repeated
    inside its scale group), k_codes ``int8 [B, Hkv, Nk, D]``, k_scale ``fp32 [B, Hkv, Nk]``,
    qk_bias ``fp32 [B, Hq, Nk]``, k_mean ``fp32 [B, Hkv, D]``.
    """

    q_codes: torch.Tensor
    q_scale: torch.Tensor
    k_codes: torch.Tensor
    k_scale: torch.Tensor
    qk_bias: torch.Tensor
    k_mean: torch.Tensor


# --------------------------------------------------------------------------------------------
# §2 Quantization
# --------------------------------------------------------------------------------------------


def _codes_and_scale(x: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC §2.3: ``scale = amax / 7`` (1 where amax == 0), codes rounded half-to-even, clamped."""
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / QMAX)
    codes = torch.round(x / scale.unsqueeze(-1)).clamp_(-QMAX, QMAX)
    return codes.to(torch.int8), scale


def quantize_queries(q: torch.Tensor, dtype: torch.dtype = torch.float32):
    """SPEC §2.1–2.3 for queries: centre on the mean over ``Nq``, then one scale per pair of rows
    ``16a + r`` and ``16a + 8 + r`` (r = 0..7) inside each 16-row group.

    Returns ``(codes int8 [B,H,N,D], scale [B,H,N], mean [B,H,D])``; rows past ``N`` do not exist,
    so the zero padding used here never enlarges a scale.
    """
    B, H, N, D = q.shape
    x = q.to(dtype)
    mean = x.mean(dim=2)
    xc = x - mean.unsqueeze(2)
    pad = (-N) % 16
    a = torch.nn.functional.pad(xc.abs(), (0, 0, 0, pad))
    # row 16a + 8*half + r  ->  [.., a, half, r, D]; the group is (a, r)
    amax = a.view(B, H, -1, 2, 8, D).amax(dim=(3, 5))  # [B, H, N16/16, 8]
    amax = amax.unsqueeze(3).expand(-1, -1, -1, 2, -1).reshape(B, H, -1)[:, :, :N]
    codes, scale = _codes_and_scale(xc, amax)
    return codes, scale, mean


def quantize_keys(k: torch.Tensor, bk: int = 32, dtype: torch.dtype = torch.float32):
    """SPEC §2.1–2.3 for keys: centre on the mean over ``Nk``; inside every ``bk``-key block the
    keys at offsets ``o`` with equal ``(o mod 8) div 2`` share a scale (4 groups per block).

    Returns ``(codes int8 [B,H,N,D], scale [B,H,N], mean [B,H,D])``.
    """
    if bk % 8 != 0:
        raise ValueError(f"reference.quantize_keys: bk must be a multiple of 8, got {bk}")
    B, H, N, D = k.shape
    x = k.to(dtype)
    mean = x.mean(dim=2)
    xc = x - mean.unsqueeze(2)
    pad = (-N) % bk
    a = torch.nn.functional.pad(xc.abs(), (0, 0, 0, pad))
    # offset o = 8c + 2g + e  ->  [.., block, c, g, e, D]; the group is (block, g)
    amax = a.view(B, H, -1, bk // 8, 4, 2, D).amax(dim=(3, 5, 6))  # [B, H, nK, 4]
    amax = amax[:, :, :, None, :, None].expand(-1, -1, -1, bk // 8, -1, 2).reshape(B, H, -1)[:, :, :N]
    codes, scale = _codes_and_scale(xc, amax)
    return codes, scale, mean


def _group_queries(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """``[B, Hq, N, ...]`` -> ``[B, Hkv, g, N, ...]`` (a view: query heads of one kv head together)."""
    B, Hq = x.shape[:2]
    return x.view(B, hkv, Hq // hkv, *x.shape[2:])


def quantize(q: torch.Tensor, k: torch.Tensor, bk: int = 32, dtype: torch.dtype = torch.float32) -> Quantized:
    """SPEC §2: codes and scales of the smoothed Q and K, and §2.4's bias ``qk_bias_j = q̄ · k̃_j``."""
    q_codes, q_scale, q_mean = quantize_queries(q, dtype)
    k_codes, k_scale, k_mean = quantize_keys(k, bk, dtype)
    hkv = k.shape[1]
    k_smooth = k.to(dtype) - k_mean.unsqueeze(2)  # [B, Hkv, Nk, D]
    # [B, Hkv, g, D] @ [B, Hkv, D, Nk] -> [B, Hkv, g, Nk]
    bias = _group_queries(q_mean, hkv) @ k_smooth.transpose(-1, -2)
    qk_bias = bias.reshape(q.shape[0], q.shape[1], k.shape[2])
    return Quantized(q_codes, q_scale, k_codes, k_scale, qk_bias, k_mean)


# --------------------------------------------------------------------------------------------
# §3 The estimate
# --------------------------------------------------------------------------------------------


def _estimate_rows(qz: Quantized, rows: slice, hkv: int, dtype: torch.dtype) -> torch.Tensor:
    """ŝ for query rows ``rows`` of every head: ``[B, Hkv, g, R, Nk]`` in ``dtype``."""
    cq = _group_queries(qz.q_codes[:, :, rows], hkv).to(dtype)  # [B, Hkv, g, R, D]
    ck = qz.k_codes.to(dtype).unsqueeze(2)  # [B, Hkv, 1, Nk, D]
    # Codes are integers |c| <= 7: every product and sum (|E| <= 49 D) is exact in fp32/fp64.
    E = cq @ ck.transpose(-1, -2)
    sq = _group_queries(qz.q_scale[:, :, rows], hkv).to(dtype).unsqueeze(-1)  # [B,Hkv,g,R,1]
    sk = qz.k_scale.to(dtype)[:, :, None, None, :]  # [B, Hkv, 1, 1, Nk]
    denom = sq * sk
    bias = _group_queries(qz.qk_bias, hkv).to(dtype).unsqueeze(3)  # [B, Hkv, g, 1, Nk]
    b = torch.round(bias / denom)
    return (E + b) * denom


def estimate_logits(qz: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SPEC §3: ``ŝ_ij = (E_ij + b_ij) · sq_i · sk_j`` for every pair, ``[B, Hq, Nq, Nk]``."""
    B, Hq, Nq, _ = qz.q_codes.shape
    hkv = qz.k_codes.shape[1]
    s = _estimate_rows(qz, slice(0, Nq), hkv, dtype)
    return s.reshape(B, Hq, Nq, -1)


# --------------------------------------------------------------------------------------------
# §4 Block selection
# --------------------------------------------------------------------------------------------


def _block_ends(nq: int, nk: int, bq: int, device=None) -> torch.Tensor:
    """``e_m``: exclusive causal end of the last row of each query block (SPEC §4)."""
    m = torch.arange(math.ceil(nq / bq), device=device)
    return torch.clamp((m + 1) * bq, max=nq) + (nk - nq)


def causal_blocks(nq: int, nk: int, bq: int, bk: int, device=None) -> torch.Tensor:
    """``[nQ, nK]`` bool: key block ``n`` is causal for query block ``m`` iff ``n·bk < e_m``."""
    e = _block_ends(nq, nk, bq, device)
    n = torch.arange(math.ceil(nk / bk), device=device)
    return (n * bk)[None, :] < e[:, None]


def dense_blocks(nq: int, nk: int, bq: int, bk: int, window: int, device=None) -> torch.Tensor:
    """SPEC §4.1, ``[nQ, nK]`` bool: the sink block 0 and every key block intersecting
    ``[max(0, e_m − W), e_m)``."""
    e = _block_ends(nq, nk, bq, device)
    n = torch.arange(math.ceil(nk / bk), device=device)
    lo = torch.clamp(e - window, min=0)
    start, end = n * bk, (n + 1) * bk
    local = (start[None, :] < e[:, None]) & (end[None, :] > lo[:, None])
    local[:, 0] = True
    return local


def _visible(rows: torch.Tensor, nq: int, nk: int, causal: bool = True) -> torch.Tensor:
    """``[R, Nk]`` bool: key ``j`` is visible to row ``i`` (``j <= i + Nk − Nq`` when causal)."""
    j = torch.arange(nk, device=rows.device)
    if not causal:
        return torch.ones(rows.numel(), nk, dtype=torch.bool, device=rows.device)
    return j[None, :] <= rows[:, None] + (nk - nq)


def _row_chunks(nq: int, bq: int, per_row: int):
    """Slices of whole query blocks whose logits hold about ``_CHUNK_ELEMENTS`` elements."""
    rows = max(bq, (_CHUNK_ELEMENTS // max(per_row, 1)) // bq * bq)
    for r0 in range(0, nq, rows):
        yield slice(r0, min(r0 + rows, nq))


def _expand_rows(block_rows: torch.Tensor, rows: slice, bq: int, bk: int, nk: int) -> torch.Tensor:
    """Block-level ``[..., nQ, nK]`` -> element-level ``[..., R, Nk]`` for query rows ``rows``."""
    r = torch.arange(rows.start, rows.stop, device=block_rows.device) // bq
    c = torch.arange(nk, device=block_rows.device) // bk
    return block_rows[..., r, :][..., :, c]


def row_statistics(q, k, k_mean, bq=64, bk=32, window=128, scale=None, dtype=torch.float32):
    """SPEC §4.2: exact ``m_i = max_j s_ij`` and ``l_i = Σ_j exp(scale·(s_ij − m_i))`` over each
    row's dense set (sink + local window), causally masked, with ``s_ij = q_i · (k_j − k̄)``.

    Returns ``(m, l)``, each ``[B, Hq, Nq]`` in ``dtype``.
    """
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    k_smooth = k.to(dtype) - k_mean.to(dtype).unsqueeze(2)
    dense = dense_blocks(Nq, Nk, bq, bk, window, q.device)
    ms, ls = [], []
    for rows in _row_chunks(Nq, bq, B * Hq * Nk):
        ridx = torch.arange(rows.start, rows.stop, device=q.device)
        dense_el = _expand_rows(dense, rows, bq, bk, Nk) & _visible(ridx, Nq, Nk)
        m, l = _dense_statistics(q, k_smooth, rows, dense_el, scale, dtype)
        ms.append(m.reshape(B, Hq, -1))
        ls.append(l.reshape(B, Hq, -1))
    return torch.cat(ms, dim=2), torch.cat(ls, dim=2)


def _dense_statistics(q, k_smooth, rows: slice, dense_el, scale: float, dtype):
    """m_i and l_i (SPEC §4.2) for ``rows`` of every head: each ``[B, Hkv, g, R]``."""
    hkv = k_smooth.shape[1]
    qg = _group_queries(q[:, :, rows], hkv).to(dtype)
    s = qg @ k_smooth.unsqueeze(2).transpose(-1, -2)  # [B, Hkv, g, R, Nk]
    s = s.masked_fill(~dense_el, -math.inf)
    m = s.amax(dim=-1)
    l = torch.exp(scale * (s - m.unsqueeze(-1))).sum(dim=-1)
    return m, l


def thresholds(m: torch.Tensor, l: torch.Tensor, tau: torch.Tensor, scale: float) -> torch.Tensor:
    """SPEC §4.3: ``T_i = m_i + ln(tau_h · l_i) / scale`` (−inf when ``tau_h == 0``).

    ``m``, ``l``: ``[..., Hq, R]`` with ``tau`` ``[Hq]``.
    """
    return m + torch.log(tau.to(m.dtype)[:, None] * l) / scale


def block_margins(q, k, qz: Quantized, tau, bq=64, bk=32, window=128, scale=None, dtype=torch.float32):
    """SPEC §4.4 per block: ``max_{i,j}(ŝ_ij − T_i)`` over the existing, causally visible pairs of
    each candidate block, ``[B, Hq, nQ, nK]`` in ``dtype`` (−inf where no pair is visible). Dense
    blocks get +inf (always kept). A candidate is kept iff its margin is > 0.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    nQ, nK = math.ceil(Nq / bq), math.ceil(Nk / bk)
    dev = q.device
    tau = torch.as_tensor(tau, dtype=dtype, device=dev).reshape(Hq)
    k_smooth = k.to(dtype) - qz.k_mean.to(dtype).unsqueeze(2)
    dense = dense_blocks(Nq, Nk, bq, bk, window, dev)
    causal = causal_blocks(Nq, Nk, bq, bk, dev)
    out = torch.empty(B, Hq, nQ, nK, dtype=dtype, device=dev)
    for rows in _row_chunks(Nq, bq, B * Hq * Nk):
        ridx = torch.arange(rows.start, rows.stop, device=dev)
        vis = _visible(ridx, Nq, Nk)  # [R, Nk]
        dense_el = _expand_rows(dense, rows, bq, bk, Nk) & vis
        m, l = _dense_statistics(q, k_smooth, rows, dense_el, scale, dtype)
        T = thresholds(m.reshape(B, Hq, -1), l.reshape(B, Hq, -1), tau, scale)  # [B, Hq, R]
        s_hat = _estimate_rows(qz, rows, Hkv, dtype).reshape(B, Hq, -1, Nk)
        margin = (s_hat - T.unsqueeze(-1)).masked_fill(~vis, -math.inf)
        # rows -> whole query blocks, keys -> whole key blocks (padding never wins a max)
        R = rows.stop - rows.start
        margin = torch.nn.functional.pad(margin, (0, nK * bk - Nk, 0, (-R) % bq), value=-math.inf)
        blk = margin.view(B, Hq, -1, bq, nK, bk).amax(dim=(3, 5))
        m0, m1 = rows.start // bq, math.ceil(rows.stop / bq)
        blk = blk.masked_fill(dense[m0:m1], math.inf).masked_fill(~causal[m0:m1], -math.inf)
        out[:, :, m0:m1] = blk
    return out


def block_mask(q, k, qz: Quantized, tau, bq=64, bk=32, window=128, scale=None, dtype=torch.float32):
    """SPEC §4: the kept blocks ``[B, Hq, nQ, nK]`` (bool): the dense set plus every candidate
    with a pair whose estimated logit exceeds its row threshold. Never keeps a non-causal block."""
    return block_margins(q, k, qz, tau, bq, bk, window, scale, dtype) > 0


# --------------------------------------------------------------------------------------------
# §5 The computation pass
# --------------------------------------------------------------------------------------------


def expand_block_mask(mask: torch.Tensor, nq: int, nk: int, bq: int, bk: int, causal: bool = True) -> torch.Tensor:
    """``[..., nQ, nK]`` block mask -> element mask ``[..., Nq, Nk]`` (with the causal mask)."""
    el = _expand_rows(mask, slice(0, nq), bq, bk, nk)
    if causal:
        el = el & _visible(torch.arange(nq, device=mask.device), nq, nk)
    return el


def block_sparse_attention(q, k, v, mask, bq=64, bk=32, scale=None, causal=True, dtype=torch.float32):
    """SPEC §5: attention over the keys of the kept blocks (causally masked when ``causal``).

    Returns ``out`` ``[B, Hq, Nq, D]`` in ``q.dtype`` and ``lse`` ``[B, Hq, Nq]`` fp32 (natural log of
    the sum of ``exp(scale · q·k)`` over the visible kept keys, unsmoothed frame). Rows with no
    visible key get ``out = 0`` and ``lse = −inf`` (the public API refuses such masks).
    Arithmetic in ``dtype``: pass ``q.dtype`` to get the low-precision reference of SPEC §7.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    dev = q.device
    out = torch.empty(B, Hq, Nq, D, dtype=q.dtype, device=dev)
    lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=dev)
    kd, vd = k.to(dtype).unsqueeze(2), v.to(dtype).unsqueeze(2)  # [B, Hkv, 1, Nk, D]
    for rows in _row_chunks(Nq, bq, B * Hq * Nk):
        ridx = torch.arange(rows.start, rows.stop, device=dev)
        el = _expand_rows(mask, rows, bq, bk, Nk) & _visible(ridx, Nq, Nk, causal)
        el = _group_queries(el, Hkv)  # [B, Hkv, g, R, Nk]
        qg = _group_queries(q[:, :, rows], Hkv).to(dtype)
        s = (qg @ kd.transpose(-1, -2)) * scale
        s = s.masked_fill(~el, -math.inf)
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        denom = p.sum(dim=-1, keepdim=True)
        o = (p @ vd) / torch.where(denom > 0, denom, torch.ones_like(denom))
        out[:, :, rows] = o.reshape(B, Hq, -1, D).to(q.dtype)
        lse[:, :, rows] = (torch.log(denom) + m).squeeze(-1).reshape(B, Hq, -1).float()
    return out, lse


# --------------------------------------------------------------------------------------------
# §6 The pipeline
# --------------------------------------------------------------------------------------------


def attention(q, k, v, tau, bq=64, bk=32, window=128, scale=None, dense_below=0, dtype=torch.float32):
    """SPEC §6: quantize → select → compute. Returns ``(out, lse, block_mask)``.

    Sequences with ``Nk < dense_below`` are computed densely and exactly (every causal block kept,
    the same result as ``tau = 0``).
    """
    Nq, Nk = q.shape[2], k.shape[2]
    if Nk < dense_below:
        B, Hq = q.shape[:2]
        mask = causal_blocks(Nq, Nk, bq, bk, q.device).expand(B, Hq, -1, -1).clone()
    else:
        qz = quantize(q, k, bk, dtype)
        mask = block_mask(q, k, qz, tau, bq, bk, window, scale, dtype)
    out, lse = block_sparse_attention(q, k, v, mask, bq, bk, scale, True, dtype)
    return out, lse, mask


def block_density(mask: torch.Tensor, nq: int, nk: int, bq: int, bk: int) -> torch.Tensor:
    """Kept blocks over causal blocks, per ``[B, Hq]`` (fp32)."""
    causal = causal_blocks(nq, nk, bq, bk, mask.device)
    kept = (mask & causal).sum(dim=(-2, -1)).float()
    return kept / causal.sum().float()


# --------------------------------------------------------------------------------------------
# Variable-length (packed) batches
# --------------------------------------------------------------------------------------------
#
# q ``[total_q, Hq, D]``, k and v ``[total_k, Hkv, D]``; sequence b owns rows
# ``[cu_seqlens_q[b], cu_seqlens_q[b + 1])`` of q (and likewise of k, v). Every sequence is its own
# SPEC problem: its own means, scales, bias, masks and bottom-right causal alignment. The reference
# runs each sequence through the batched functions above; per-row results are laid out packed:
# codes ``[H, total, D]``, scales ``[H, total]``, qk_bias ``[Hq, total_k]``, k_mean ``[B, Hkv, D]``,
# out ``[total_q, Hq, D]``, lse ``[Hq, total_q]``; block masks are ``[B, Hq, ceil(max_q / bq),
# ceil(max_k / bk)]`` with rows and columns past a sequence's end False.


def sequences(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor):
    """``[(q0, q1, k0, k1), ...]``: each sequence's rows (reads the values: a host copy)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1)]


def _seq(x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of a packed ``[total, H, D]`` tensor as a batched ``[1, H, n, D]`` view."""
    return x[r0:r1].transpose(0, 1).unsqueeze(0)


def varlen_causal_blocks(cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, bq: int, bk: int):
    """``[B, ceil(max_q/bq), ceil(max_k/bk)]`` bool: :func:`causal_blocks` of every sequence, False
    past its end. Tensor ops only (no host copy of the lengths), on ``cu_seqlens_q``'s device."""
    dev = cu_seqlens_q.device
    nq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()[:, None]  # [B, 1]
    nk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()[:, None]
    m = torch.arange(-(-max_seqlen_q // bq), device=dev)[None, :]  # [1, nQ]
    e = torch.minimum((m + 1) * bq, nq) + (nk - nq)  # [B, nQ]: e_m of each sequence
    n = torch.arange(-(-max_seqlen_k // bk), device=dev)
    return ((n * bk)[None, None, :] < e[:, :, None]) & (m * bq < nq)[:, :, None]


def quantize_varlen(q, k, cu_seqlens_q, cu_seqlens_k, bk: int = 32, dtype: torch.dtype = torch.float32) -> Quantized:
    """SPEC §2 per sequence, packed (see above). A sequence without queries has q̄ = 0 (its keys'
    bias is 0), one without keys k̄ = 0."""
    Tq, Hq, D = q.shape
    Tk, Hkv, _ = k.shape
    seqs = sequences(cu_seqlens_q, cu_seqlens_k)
    f32 = torch.float32
    q_codes = torch.zeros(Hq, Tq, D, dtype=torch.int8, device=q.device)
    q_scale = torch.zeros(Hq, Tq, dtype=f32, device=q.device)
    k_codes = torch.zeros(Hkv, Tk, D, dtype=torch.int8, device=q.device)
    k_scale = torch.zeros(Hkv, Tk, dtype=f32, device=q.device)
    qk_bias = torch.zeros(Hq, Tk, dtype=f32, device=q.device)
    k_mean = torch.zeros(len(seqs), Hkv, D, dtype=f32, device=q.device)
    for b, (q0, q1, k0, k1) in enumerate(seqs):
        if q1 > q0 and k1 > k0:
            qz = quantize(_seq(q, q0, q1), _seq(k, k0, k1), bk, dtype)
            q_codes[:, q0:q1], q_scale[:, q0:q1] = qz.q_codes[0], qz.q_scale[0].float()
            k_codes[:, k0:k1], k_scale[:, k0:k1] = qz.k_codes[0], qz.k_scale[0].float()
            qk_bias[:, k0:k1], k_mean[b] = qz.qk_bias[0].float(), qz.k_mean[0].float()
        elif q1 > q0:
            codes, scale, _ = quantize_queries(_seq(q, q0, q1), dtype)
            q_codes[:, q0:q1], q_scale[:, q0:q1] = codes[0], scale[0].float()
        elif k1 > k0:
            codes, scale, mean = quantize_keys(_seq(k, k0, k1), bk, dtype)
            k_codes[:, k0:k1], k_scale[:, k0:k1], k_mean[b] = codes[0], scale[0].float(), mean[0].float()
    return Quantized(q_codes, q_scale, k_codes, k_scale, qk_bias, k_mean)


def block_mask_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, qz: Quantized, tau,
                      bq=64, bk=32, window=128, scale=None, dense_below=0, dtype=torch.float32):
    """SPEC §4 per sequence, ``[B, Hq, ceil(max_q/bq), ceil(max_k/bk)]`` bool; ``qz`` is
    :func:`quantize_varlen`'s. A sequence with fewer than ``dense_below`` keys keeps every causal block."""
    Hq = q.shape[1]
    seqs = sequences(cu_seqlens_q, cu_seqlens_k)
    mask = torch.zeros(len(seqs), Hq, -(-max_seqlen_q // bq), -(-max_seqlen_k // bk), dtype=torch.bool, device=q.device)
    for b, (q0, q1, k0, k1) in enumerate(seqs):
        nq, nk = q1 - q0, k1 - k0
        if nq == 0:
            continue
        if nk < dense_below:
            m = causal_blocks(nq, nk, bq, bk, q.device)
        else:
            one = Quantized(
                qz.q_codes[:, q0:q1].unsqueeze(0), qz.q_scale[:, q0:q1].unsqueeze(0),
                qz.k_codes[:, k0:k1].unsqueeze(0), qz.k_scale[:, k0:k1].unsqueeze(0),
                qz.qk_bias[:, k0:k1].unsqueeze(0), qz.k_mean[b : b + 1],
            )
            m = block_mask(_seq(q, q0, q1), _seq(k, k0, k1), one, tau, bq, bk, window, scale, dtype)[0]
        mask[b, :, : m.shape[-2], : m.shape[-1]] = m
    return mask


def block_sparse_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, mask, bq=64, bk=32, scale=None, causal=True,
                                  dtype=torch.float32):
    """SPEC §5 per sequence: ``out [total_q, Hq, D]`` (dtype of q), ``lse [Hq, total_q]`` fp32;
    ``mask`` bool ``[B, Hq, >= nQ_b, >= nK_b]``."""
    Tq, Hq, D = q.shape
    out = torch.zeros(Tq, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.full((Hq, Tq), -math.inf, dtype=torch.float32, device=q.device)
    for b, (q0, q1, k0, k1) in enumerate(sequences(cu_seqlens_q, cu_seqlens_k)):
        nq, nk = q1 - q0, k1 - k0
        if nq == 0 or nk == 0:
            continue
        mb = mask[b : b + 1, :, : -(-nq // bq), : -(-nk // bk)]
        o, l = block_sparse_attention(_seq(q, q0, q1), _seq(k, k0, k1), _seq(v, k0, k1), mb, bq, bk, scale, causal, dtype)
        out[q0:q1], lse[:, q0:q1] = o[0].transpose(0, 1), l[0]
    return out, lse


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, tau, bq=64, bk=32,
                     window=128, scale=None, dense_below=0, dtype=torch.float32):
    """SPEC §6 per sequence of a packed batch: ``(out [total_q, Hq, D], lse [Hq, total_q],
    mask [B, Hq, ceil(max_q/bq), ceil(max_k/bk)])``; each sequence's part equals :func:`attention`
    on that sequence alone."""
    qz = quantize_varlen(q, k, cu_seqlens_q, cu_seqlens_k, bk, dtype)
    mask = block_mask_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, qz, tau, bq, bk, window,
                             scale, dense_below, dtype)
    out, lse = block_sparse_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, mask, bq, bk, scale, True, dtype)
    return out, lse, mask


def block_density_varlen(mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, bq: int, bk: int):
    """Kept blocks over causal blocks per ``[B, Hq]`` (fp32; 0 for a sequence without causal blocks)."""
    causal = varlen_causal_blocks(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bq, bk).unsqueeze(1)
    kept = (mask & causal).sum(dim=(-2, -1)).float()
    return kept / causal.sum(dim=(-2, -1)).clamp(min=1).float()
