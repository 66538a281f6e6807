"""``sale.attention``: quantize → select → compute (SPEC §6) as a composite of the other ops.

The selection's transient tensors (4-bit codes held in int8, scales, bias, row thresholds) cost
about 0.44 × the bytes of q + k + v for Llama-3.1-8B shapes when made for every head at once; the
query codes alone are 0.33 ×. ``sale.select`` never stores the query codes where the Hopper wgmma
scorer serves (it makes them from q as it goes), which leaves ~0.12 × (the pipeline's default,
FUSED_SELECTION). Means and scales are per head, so whatever does not fit the memory share below
runs on groups of kv heads (with their query heads) one after the other, and only the bit-packed
mask (one bit per block) is kept for all heads. The group size depends on shapes and the kernel
path only, so the op stays free of host synchronisation and data-dependent allocation.
"""

from __future__ import annotations

import os

import torch

from . import _checks, _dispatch
from . import reference as ref
from .mask_bits import pack_block_mask, words_per_row

# Whether the pipeline selects through sale.select / sale.select_varlen (no stored query codes on the
# Hopper wgmma scorer, so every head fits one step) instead of sale.quantize + block_mask_bits.
# Verified on an H100 on 2026-12-07 (benchmarks/RESULTS.md): identical masks, 0.12-0.18x q+k+v.
FUSED_SELECTION = True

# Extra memory the selection may hold at once, with the bit-packed mask, as a share of the bytes
# of q + k + v (issue 3's target is 0.25; a little is left for the allocator's rounding).
SELECTION_MEMORY_SHARE = 0.245


def selection_bytes(batch: int, kv_heads: int, group: int, nq: int, nk: int, head_dim: int,
                    q_codes: bool = True) -> int:
    """Bytes of sale.quantize's outputs plus block_mask's scratch (row thresholds; the key codes
    packed two per byte, which only the sm8x path allocates) for ``kv_heads`` kv heads with
    ``group`` query heads each; without the query codes when ``q_codes`` is false (sale.select on
    the wgmma scorer)."""
    q_side = group * nq * ((head_dim if q_codes else 0) + 4 + 4)  # q codes, q scales, row thresholds
    k_side = nk * (head_dim + head_dim // 2 + 4) + group * nk * 4 + head_dim * 4  # k codes (+ packed), k scales, bias, k mean
    return batch * kv_heads * (q_side + k_side)


def select_stores_q_codes(q: torch.Tensor) -> bool:
    """Whether sale.select on q's device stores the query codes: everywhere but on the Hopper path
    with its wgmma scorer (the decision block_mask_cuda.cu's select_cuda makes)."""
    if not q.is_cuda:
        return True
    return _dispatch.kernel_path(q.device, "sale.select") != _dispatch.SM90 or os.environ.get("SALE_OPS_ESTIMATOR") == "mma"


def selection_steps(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bq: int, bk: int) -> tuple[int, int]:
    """``(kv heads, query heads per kv head)`` selected per step: as many as fit in
    SELECTION_MEMORY_SHARE of q + k + v next to the whole bit-packed mask (whole kv groups first,
    then parts of one group). Depends on shapes and the kernel path only."""
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    bits = B * Hq * -(-Nq // bq) * words_per_row(-(-Nk // bk)) * 4
    q_codes = not FUSED_SELECTION or select_stores_q_codes(q)
    return _largest_step(lambda h, s: selection_bytes(B, h, s, Nq, Nk, D, q_codes), (q, k, v), bits)


def _largest_step(cost, qkv, bits: int) -> tuple[int, int]:
    """The largest ``(kv heads, query heads per kv head)`` step whose ``cost`` fits next to ``bits``."""
    q, k = qkv[0], qkv[1]
    Hq, Hkv = q.shape[1], k.shape[1]  # [B, H, N, D] or packed [total, H, D]
    g = Hq // Hkv
    budget = SELECTION_MEMORY_SHARE * sum(t.numel() * t.element_size() for t in qkv) - bits
    for h in sorted((h for h in range(1, Hkv + 1) if Hkv % h == 0), reverse=True):
        if cost(h, g) <= budget:
            return h, g
    fits = [s for s in range(1, g + 1) if g % s == 0 and cost(1, s) <= budget]
    return 1, max(fits, default=1)


def select_blocks(q, k, v, tau, bq: int, bk: int, window: int, scale: float) -> torch.Tensor:
    """The bit-packed block mask ``[B, Hq, nQ, ceil(nK/32)]`` (int32) of SPEC §4, selected a few
    heads at a time (see the module docstring)."""
    Hq, Hkv = q.shape[1], k.shape[1]
    g = Hq // Hkv
    kv_step, q_step = selection_steps(q, k, v, bq, bk)
    heads = kv_step * q_step  # query heads per step (q_step < g only with one kv head per step)
    parts = []
    for hk in range(0, Hkv, kv_step):
        for h in range(hk * g, (hk + kv_step) * g, heads):
            hs = slice(h, h + heads)
            qh, kh = q[:, hs], k[:, hk : hk + kv_step]
            if FUSED_SELECTION:
                parts.append(torch.ops.sale.select(qh, kh, tau[hs], bq, bk, window, scale))
                continue
            qz = torch.ops.sale.quantize(qh, kh, bk)
            parts.append(torch.ops.sale.block_mask_bits(qh, kh, *qz, tau[hs], bq, bk, window, scale))
            del qz  # freed before the next heads are quantized
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


@torch.library.register_kernel("sale::attention", ("cpu", "cuda"))
def _attention(q, k, v, tau, bq, bk, window, scale, causal, dense_below):
    """sale.attention as quantize -> block_mask_bits -> block_sparse_attention (SPEC §6), each step
    dispatched to whatever serves it on this device (a kernel or the reference)."""
    _checks.attention_args(q, k, v, tau, bq, bk, window, scale, causal, dense_below)
    if tau.device.type == "cpu":
        _checks.check_tau_values("sale.attention", tau)
    B, Hq, Nq = q.shape[:3]
    Nk = k.shape[2]
    # The mask travels bit-packed (1/8 of a bool mask's memory; sale_ops.mask_bits).
    if Nk < dense_below:
        mask = causal_bits(B, Hq, Nq, Nk, bq, bk, q.device)
    else:
        mask = select_blocks(q, k, v, tau, bq, bk, window, scale)
    out, lse = torch.ops.sale.block_sparse_attention(q, k, v, mask, bq, bk, scale, True)
    return out, lse, mask


def causal_bits(B: int, Hq: int, Nq: int, Nk: int, bq: int, bk: int, device) -> torch.Tensor:
    """The bit-packed mask of every causal block (what tau = 0 selects)."""
    return pack_block_mask(ref.causal_blocks(Nq, Nk, bq, bk, device)).expand(B, Hq, -1, -1).contiguous()


def cudnn_serves(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether cuDNN's fused attention can stand in for the dense path: a CUDA tensor, cuDNN present
    and Nq == Nk (SDPA aligns its causal mask top-left, SPEC bottom-right: they differ for chunks).
    Metadata only, so the decision costs no synchronisation."""
    return q.is_cuda and q.shape[2] == k.shape[2] and torch.backends.cudnn.is_available()


def cudnn_causal(q, k, v, scale: float):
    """Dense causal attention and its log-sum-exp (natural log, fp32 ``[B, Hq, N]``) from cuDNN.
    GQA goes in unexpanded (cuDNN supports Hq != Hkv), so K/V are not copied. cuDNN rounds the
    probabilities to the input dtype before P·V, so its output is not held to SPEC §7's bound."""
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)
    return res[0], res[1].reshape(q.shape[:3]).float()


# ------------------------------------------------------------------------------------------------
# Variable-length (packed) batches: q [total_q, Hq, D], k/v [total_k, Hkv, D], cu_seqlens [B + 1].
# The same plan with the packed row counts; the per-row buffers are [heads, total] and the mask is
# [B, Hq, ceil(max_q/bq), words(ceil(max_k/bk))], all sized from shapes and the max lengths.
# ------------------------------------------------------------------------------------------------


def selection_steps_varlen(q, k, v, batch: int, max_seqlen_q: int, max_seqlen_k: int, bq: int, bk: int):
    """:func:`selection_steps` for a packed batch (``batch`` sequences, one key mean per sequence)."""
    Tq, Hq, D = q.shape
    Tk = k.shape[0]
    bits = batch * Hq * -(-max_seqlen_q // bq) * words_per_row(-(-max_seqlen_k // bk)) * 4
    q_codes = not FUSED_SELECTION or select_stores_q_codes(q)
    return _largest_step(lambda h, s: selection_bytes(1, h, s, Tq, Tk, D, q_codes) + h * (batch - 1) * D * 4, (q, k, v),
                         bits)


def select_blocks_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, tau, bq: int, bk: int, window: int, scale: float,
                         dense_below: int) -> torch.Tensor:
    """The bit-packed block mask ``[B, Hq, ceil(max_q/bq), words]`` of every sequence, selected a few
    heads at a time; sequences with fewer than ``dense_below`` keys keep every causal block."""
    Hq, Hkv = q.shape[1], k.shape[1]
    g = Hq // Hkv
    kv_step, q_step = selection_steps_varlen(q, k, v, cu_q.shape[0] - 1, max_q, max_k, bq, bk)
    heads = kv_step * q_step
    parts = []
    for hk in range(0, Hkv, kv_step):
        for h in range(hk * g, (hk + kv_step) * g, heads):
            hs = slice(h, h + heads)
            qh, kh = q[:, hs], k[:, hk : hk + kv_step]  # strided views: rows stay packed
            if FUSED_SELECTION:
                parts.append(torch.ops.sale.select_varlen(qh, kh, cu_q, cu_k, max_q, max_k, tau[hs], bq, bk, window,
                                                          scale, dense_below))
                continue
            qz = torch.ops.sale.quantize_varlen(qh, kh, cu_q, cu_k, max_q, max_k, bk)
            parts.append(torch.ops.sale.block_mask_bits_varlen(qh, kh, cu_q, cu_k, max_q, max_k, *qz, tau[hs], bq, bk,
                                                               window, scale, dense_below))
            del qz
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


@torch.library.register_kernel("sale::attention_varlen", ("cpu", "cuda"))
def _attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, tau, bq, bk, window, scale, causal, dense_below):
    """sale.attention_varlen: quantize_varlen -> block_mask_bits_varlen -> block_sparse_attention_varlen,
    each sequence with its own means, masks and causal alignment (SPEC §6 per sequence)."""
    batch = _checks.attention_varlen_args(q, k, v, cu_q, cu_k, max_q, max_k, tau, bq, bk, window, scale, causal,
                                          dense_below)
    if tau.device.type == "cpu":
        _checks.check_tau_values("sale.attention_varlen", tau)
    if cu_q.device.type == "cpu":
        _checks.check_cu_seqlens_values("sale.attention_varlen", cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k)
    if max_k < dense_below:  # every sequence is short: all causal blocks, no selection
        causal_blocks = ref.varlen_causal_blocks(cu_q, cu_k, max_q, max_k, bq, bk)
        mask = pack_block_mask(causal_blocks).unsqueeze(1).expand(batch, q.shape[1], -1, -1).contiguous()
    else:
        mask = select_blocks_varlen(q, k, v, cu_q, cu_k, max_q, max_k, tau, bq, bk, window, scale, dense_below)
    out, lse = torch.ops.sale.block_sparse_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, mask, bq, bk, scale, True)
    return out, lse, mask
