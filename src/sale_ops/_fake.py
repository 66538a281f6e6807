"""Fake (meta) functions of every ``torch.ops.sale`` op, in one place.

They run the same metadata checks as the backends and allocate outputs of the right shape,
dtype and device, so the ops trace under ``torch.compile`` (also with symbolic sequence lengths)
and ``torch.export`` without touching data.
"""

from __future__ import annotations

import torch

from . import _checks
from .mask_bits import words_per_row


def _cdiv(a, b):
    return (a + b - 1) // b


@torch.library.register_fake("sale::quantize")
def _quantize_fake(q, k, bk):
    _checks.quantize_args(q, k, bk)
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    f32 = torch.float32
    return (
        q.new_empty((B, Hq, Nq, D), dtype=torch.int8),
        q.new_empty((B, Hq, Nq), dtype=f32),
        k.new_empty((B, Hkv, Nk, D), dtype=torch.int8),
        k.new_empty((B, Hkv, Nk), dtype=f32),
        q.new_empty((B, Hq, Nk), dtype=f32),
        k.new_empty((B, Hkv, D), dtype=f32),
    )


@torch.library.register_fake("sale::block_mask")
def _block_mask_fake(q, k, q_codes, q_scale, k_codes, k_scale, qk_bias, k_mean, tau, bq, bk, window, scale):
    _checks.block_mask_args(q, k, q_codes, q_scale, k_codes, k_scale, qk_bias, k_mean, tau, bq, bk, window, scale)
    B, Hq, Nq, _ = q.shape
    return q.new_empty((B, Hq, _cdiv(Nq, bq), _cdiv(k.shape[2], bk)), dtype=torch.bool)


@torch.library.register_fake("sale::block_mask_bits")
def _block_mask_bits_fake(q, k, q_codes, q_scale, k_codes, k_scale, qk_bias, k_mean, tau, bq, bk, window, scale):
    _checks.block_mask_args(q, k, q_codes, q_scale, k_codes, k_scale, qk_bias, k_mean, tau, bq, bk, window, scale)
    B, Hq, Nq, _ = q.shape
    return q.new_empty((B, Hq, _cdiv(Nq, bq), words_per_row(_cdiv(k.shape[2], bk))), dtype=torch.int32)


@torch.library.register_fake("sale::select")
def _select_fake(q, k, tau, bq, bk, window, scale):
    _checks.select_args(q, k, tau, bq, bk, window, scale)
    B, Hq, Nq, _ = q.shape
    return q.new_empty((B, Hq, _cdiv(Nq, bq), words_per_row(_cdiv(k.shape[2], bk))), dtype=torch.int32)


@torch.library.register_fake("sale::block_sparse_attention")
def _block_sparse_attention_fake(q, k, v, block_mask, bq, bk, scale, causal):
    _checks.block_sparse_attention_args(q, k, v, block_mask, bq, bk, scale, causal)
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.register_fake("sale::attention")
def _attention_fake(q, k, v, tau, bq, bk, window, scale, causal, dense_below):
    _checks.attention_args(q, k, v, tau, bq, bk, window, scale, causal, dense_below)
    B, Hq, Nq, _ = q.shape
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        q.new_empty((B, Hq, Nq), dtype=torch.float32),
        q.new_empty((B, Hq, _cdiv(Nq, bq), words_per_row(_cdiv(k.shape[2], bk))), dtype=torch.int32),
    )


# Variable-length (packed) ops: every size comes from shapes and the max_seqlen ints.


@torch.library.register_fake("sale::quantize_varlen")
def _quantize_varlen_fake(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bk):
    batch = _checks.quantize_varlen_args(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bk)
    Tq, Hq, D = q.shape
    Tk, Hkv, _ = k.shape
    f32 = torch.float32
    return (
        q.new_empty((Hq, Tq, D), dtype=torch.int8),
        q.new_empty((Hq, Tq), dtype=f32),
        k.new_empty((Hkv, Tk, D), dtype=torch.int8),
        k.new_empty((Hkv, Tk), dtype=f32),
        q.new_empty((Hq, Tk), dtype=f32),
        k.new_empty((batch, Hkv, D), dtype=f32),
    )


@torch.library.register_fake("sale::block_mask_bits_varlen")
def _block_mask_bits_varlen_fake(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_codes, q_scale,
                                 k_codes, k_scale, qk_bias, k_mean, tau, bq, bk, window, scale, dense_below):
    batch = _checks.block_mask_varlen_args(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_codes,
                                           q_scale, k_codes, k_scale, qk_bias, k_mean, tau, bq, bk, window, scale,
                                           dense_below)
    shape = _checks.varlen_mask_shape(batch, q.shape[1], max_seqlen_q, max_seqlen_k, bq, bk, packed=True)
    return q.new_empty(shape, dtype=torch.int32)


@torch.library.register_fake("sale::select_varlen")
def _select_varlen_fake(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, tau, bq, bk, window, scale,
                        dense_below):
    batch = _checks.select_varlen_args(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, tau, bq, bk,
                                       window, scale, dense_below)
    shape = _checks.varlen_mask_shape(batch, q.shape[1], max_seqlen_q, max_seqlen_k, bq, bk, packed=True)
    return q.new_empty(shape, dtype=torch.int32)


@torch.library.register_fake("sale::block_sparse_attention_varlen")
def _block_sparse_attention_varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_mask,
                                        bq, bk, scale, causal):
    _checks.block_sparse_attention_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                               block_mask, bq, bk, scale, causal)
    Tq, Hq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((Hq, Tq), dtype=torch.float32)


@torch.library.register_fake("sale::attention_varlen")
def _attention_varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, tau, bq, bk, window, scale,
                           causal, dense_below):
    batch = _checks.attention_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, tau, bq,
                                          bk, window, scale, causal, dense_below)
    Tq, Hq, _ = q.shape
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        q.new_empty((Hq, Tq), dtype=torch.float32),
        q.new_empty(_checks.varlen_mask_shape(batch, Hq, max_seqlen_q, max_seqlen_k, bq, bk, packed=True),
                    dtype=torch.int32),
    )
