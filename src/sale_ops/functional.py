"""The public Python API: thin, documented wrappers over ``torch.ops.sale``.

Tensors use the layout of ``torch.nn.functional.scaled_dot_product_attention``:
``q`` ``[B, Hq, Nq, D]``, ``k`` and ``v`` ``[B, Hkv, Nk, D]`` with ``Hq % Hkv == 0`` (GQA: query head
``h`` reads kv head ``h // (Hq // Hkv)``; K/V are never copied), fp16 or bf16, ``D`` in {64, 128},
last dimension contiguous. With ``Nq < Nk`` the queries are the last ``Nq`` positions (chunked
prefill, bottom-right causal alignment). Defaults follow SPEC §1 and §6.

Every wrapper validates its input before any op runs. Checks that read values (thresholds,
empty mask rows) run in eager mode only: inside ``torch.compile`` or CUDA-graph capture they would
force a device synchronisation, so there the ops rely on the metadata checks alone.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from . import _checks, _pipeline
from .mask_bits import unpack_block_mask
from .reference import Quantized, block_density, block_density_varlen

__all__ = [
    "AttentionOutput",
    "attention",
    "attention_varlen",
    "quantize",
    "block_mask",
    "block_sparse_attention",
    "block_density",
    "merge_attention",
    "DEFAULT_BQ",
    "DEFAULT_BK",
    "DEFAULT_WINDOW",
    "DEFAULT_DENSE_BELOW",
]

DEFAULT_BQ = 64
DEFAULT_BK = 32
DEFAULT_WINDOW = 128
# Sequences shorter than this many keys are computed densely (SPEC §6). Measured on an H100
# (benchmarks/bench_breakeven.py, RESULTS.md 2026-11-22 session 4): from 16K keys SALE at block
# density <= 0.25 beats the exact dense path of the same kernels for Llama-3.1-8B and D 64 shapes;
# below it the selection pass (and its launch overhead) costs more than the skipped blocks save.
DEFAULT_DENSE_BELOW = 16384
DENSE_BACKENDS = ("exact", "cudnn")

Thresholds = Union[float, Sequence[float], torch.Tensor]


class AttentionOutput(NamedTuple):
    """What :func:`attention` returns when asked for more than the output.

    ``lse`` ``[B, Hq, Nq]`` fp32 (natural log, unsmoothed frame) or None; ``block_mask``
    ``[B, Hq, ceil(Nq/bq), ceil(Nk/bk)]`` bool or None; ``density`` ``[B, Hq]`` fp32 (kept over
    causal blocks) or None. :func:`attention_varlen` fills it with the packed shapes (see there).
    """

    out: torch.Tensor
    lse: Optional[torch.Tensor]
    block_mask: Optional[torch.Tensor]
    density: Optional[torch.Tensor]


def _values_are_checkable(t: torch.Tensor) -> bool:
    """True outside torch.compile tracing and CUDA-graph capture, where reading values is free."""
    if torch.compiler.is_compiling():
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _thresholds(op: str, thresholds: Thresholds, q: torch.Tensor) -> torch.Tensor:
    """Per-head thresholds as a float32 ``[Hq]`` tensor on ``q``'s device, checked (SPEC §4.5)."""
    Hq = q.shape[1]
    if isinstance(thresholds, torch.Tensor):
        tau = thresholds
        if tau.dim() == 0:
            tau = tau.reshape(1).expand(Hq)
    elif isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
        tau = torch.full((Hq,), float(thresholds), dtype=torch.float32)
    elif isinstance(thresholds, (list, tuple)):
        tau = torch.tensor([float(t) for t in thresholds], dtype=torch.float32)
    else:
        raise TypeError(
            f"{op}: argument 'thresholds' must be a float, a sequence of floats or a tensor, "
            f"got {type(thresholds).__name__}"
        )
    if tau.dim() != 1 or tau.shape[0] != Hq:
        raise ValueError(
            f"{op}: argument 'thresholds' must hold one value per query head ({Hq}), got shape {tuple(tau.shape)}"
        )
    if not tau.dtype.is_floating_point:
        raise TypeError(f"{op}: argument 'thresholds' has dtype {tau.dtype}; supported: floating-point dtypes")
    if _values_are_checkable(tau):
        _checks.check_tau_values(op, tau, 'thresholds')
    return tau.to(device=q.device, dtype=torch.float32)


def _scale(scale: Optional[float], q: torch.Tensor) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    thresholds: Thresholds,
    *,
    bq: int = DEFAULT_BQ,
    bk: int = DEFAULT_BK,
    window: int = DEFAULT_WINDOW,
    scale: Optional[float] = None,
    causal: bool = True,
    dense_below: Optional[int] = None,
    dense_backend: str = "exact",
    return_lse: bool = False,
    return_block_mask: bool = False,
) -> Union[torch.Tensor, AttentionOutput]:
    """SALE causal attention (SPEC §6): quantize → select blocks → block-sparse attention.

    Args:
        q, k, v: see the module docstring.
        thresholds: Relative Attention Score threshold per query head (``[Hq]`` tensor, sequence, or
            one float for all heads); ``0`` keeps every causal block (exact attention), larger
            values keep fewer blocks. Must be finite and >= 0.
        bq, bk: query / key block sizes (64; 32 or 64).
        window: local window ``W`` in keys, always computed exactly (a multiple of ``bk``, >= ``bq``).
        scale: softmax scale, default ``D ** -0.5``.
        causal: must be True (SALE is a causal-prefill method).
        dense_below: sequences with fewer keys than this are computed densely and exactly
            (default :data:`DEFAULT_DENSE_BELOW`; ``0`` always runs SALE).
        dense_backend: what computes those short sequences: ``"exact"`` (default) the SALE
            kernels with every causal block kept, identical to ``tau = 0`` (SPEC §6);
            ``"cudnn"`` PyTorch's cuDNN attention where it applies (CUDA, ``Nq == Nk``; otherwise
            ``"exact"``): cuDNN's speed and its numerics (P rounded to the input dtype, so not held
            to SPEC §7's elementwise bound). With ``"cudnn"`` SALE only pays from a longer length:
            about 16K keys at density 0.1 on an H100 (``benchmarks/bench_breakeven.py``).
        return_lse, return_block_mask: also return the log-sum-exp and/or the block mask with its
            density, as an :class:`AttentionOutput`.

    Returns:
        ``out`` ``[B, Hq, Nq, D]`` in the input dtype, or an :class:`AttentionOutput`.
    """
    op = "sale_ops.attention"
    _checks.check_causal_pipeline(op, causal)
    _checks.check_qkv(op, q, k, v)
    tau = _thresholds(op, thresholds, q)
    dense_below = DEFAULT_DENSE_BELOW if dense_below is None else int(dense_below)
    if dense_backend not in DENSE_BACKENDS:
        raise ValueError(f"{op}: argument 'dense_backend' must be one of {DENSE_BACKENDS}, got {dense_backend!r}")
    if dense_backend == "cudnn" and k.shape[2] < dense_below and _pipeline.cudnn_serves(q, k):
        _checks.check_blocks(op, bq, bk, window)
        _checks.check_scale(op, _scale(scale, q))
        out, lse = _pipeline.cudnn_causal(q, k, v, _scale(scale, q))
        bits = _pipeline.causal_bits(q.shape[0], q.shape[1], q.shape[2], k.shape[2], bq, bk, q.device)
    else:
        out, lse, bits = torch.ops.sale.attention(q, k, v, tau, bq, bk, window, _scale(scale, q), True, dense_below)
    if not (return_lse or return_block_mask):
        return out
    mask = unpack_block_mask(bits, -(-k.shape[2] // bk)) if return_block_mask else None
    density = block_density(mask, q.shape[2], k.shape[2], bq, bk) if return_block_mask else None
    return AttentionOutput(out, lse if return_lse else None, mask if return_block_mask else None, density)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    thresholds: Thresholds,
    *,
    bq: int = DEFAULT_BQ,
    bk: int = DEFAULT_BK,
    window: int = DEFAULT_WINDOW,
    scale: Optional[float] = None,
    causal: bool = True,
    dense_below: Optional[int] = None,
    return_lse: bool = False,
    return_block_mask: bool = False,
    packed_mask: bool = False,
) -> Union[torch.Tensor, AttentionOutput]:
    """SALE causal attention on a variable-length (packed) batch, the layout serving engines use.

    Every sequence is computed as :func:`attention` would compute it alone: its own means, scales,
    thresholds, block mask and bottom-right causal alignment (chunked prefill: ``Nq_b <= Nk_b``).

    Args:
        q: ``[total_q, Hq, D]``, the sequences' queries one after the other.
        k, v: ``[total_k, Hkv, D]`` (GQA as in :func:`attention`; K/V are never copied).
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` on ``q``'s device: sequence ``b`` is rows
            ``cu[b] .. cu[b + 1] - 1`` (``cu[0] = 0``, ``cu[B]`` = total). An empty sequence is allowed.
        max_seqlen_q, max_seqlen_k: Python ints, at least the longest sequence's length. They size
            every output and grid, so the op needs no host synchronisation (CUDA graphs,
            ``torch.compile(fullgraph=True)``).
        thresholds, bq, bk, window, scale, causal, dense_below: as in :func:`attention`;
            ``dense_below`` applies per sequence (its key count).
        return_lse, return_block_mask: also return ``lse`` ``[Hq, total_q]`` fp32 and/or the block
            mask ``[B, Hq, ceil(max_seqlen_q/bq), ceil(max_seqlen_k/bk)]`` (rows and blocks past a
            sequence's end are False) with its density ``[B, Hq]``, as an :class:`AttentionOutput`.
        packed_mask: return the mask bit-packed (int32 words, :mod:`sale_ops.mask_bits`) instead.

    Returns:
        ``out`` ``[total_q, Hq, D]`` in the input dtype, or an :class:`AttentionOutput`.

    In eager mode the offsets' values are checked first (a device synchronisation when they live on
    the GPU); inside ``torch.compile`` or CUDA-graph capture only their metadata are.
    """
    op = "sale_ops.attention_varlen"
    _checks.check_causal_pipeline(op, causal)
    _checks.check_packed_qk(op, q, k, v)
    _checks.check_cu_seqlens(op, q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if _values_are_checkable(cu_seqlens_q):
        _checks.check_cu_seqlens_values(
            op, cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k
        )
    tau = _thresholds(op, thresholds, q)
    dense_below = DEFAULT_DENSE_BELOW if dense_below is None else int(dense_below)
    out, lse, bits = torch.ops.sale.attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, tau, bq, bk, window, _scale(scale, q), True,
        dense_below,
    )
    if not (return_lse or return_block_mask):
        return out
    mask = density = None
    if return_block_mask:
        dense = unpack_block_mask(bits, -(-max_seqlen_k // bk))
        density = block_density_varlen(dense, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bq, bk)
        mask = bits if packed_mask else dense
    return AttentionOutput(out, lse if return_lse else None, mask, density)


def quantize(q: torch.Tensor, k: torch.Tensor, *, bk: int = DEFAULT_BK) -> Quantized:
    """SPEC §2: 4-bit codes (held in int8) and fp32 scales of the mean-centred ``q`` and ``k``, the
    bias ``qk_bias = q̄ · k̃`` and the key mean, as a :class:`~sale_ops.reference.Quantized`."""
    return Quantized(*torch.ops.sale.quantize(q, k, bk))


def block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    thresholds: Thresholds,
    *,
    quantized: Optional[Quantized] = None,
    bq: int = DEFAULT_BQ,
    bk: int = DEFAULT_BK,
    window: int = DEFAULT_WINDOW,
    scale: Optional[float] = None,
    packed: bool = False,
) -> torch.Tensor:
    """SPEC §4: the kept blocks ``[B, Hq, ceil(Nq/bq), ceil(Nk/bk)]`` (bool) for causal prefill.

    ``quantized`` reuses the output of :func:`quantize` (computed here when None). With
    ``packed=True`` the mask comes bit-packed as int32 ``[B, Hq, ceil(Nq/bq), ceil(nK/32)]``
    (:mod:`sale_ops.mask_bits`), the form :func:`block_sparse_attention` also accepts.
    """
    op = "sale_ops.block_mask"
    _checks.check_qk(op, q, k)
    tau = _thresholds(op, thresholds, q)
    qz = quantize(q, k, bk=bk) if quantized is None else quantized
    select = torch.ops.sale.block_mask_bits if packed else torch.ops.sale.block_mask
    return select(q, k, *qz, tau, bq, bk, window, _scale(scale, q))


def _check_no_empty_rows(op: str, mask: torch.Tensor, nq: int, nk: int, bq: int, bk: int, causal: bool) -> None:
    """SPEC §5: every query row must see at least one kept key."""
    nK = mask.shape[-1]
    cols = torch.arange(nK, device=mask.device)
    first = torch.where(mask, cols, nK).amin(dim=-1)  # first kept key block per query block
    if causal:
        first_row = torch.arange(mask.shape[-2], device=mask.device) * bq
        empty = first * bk > first_row + (nk - nq)  # the block's first row sees nothing kept
    else:
        empty = first == nK
    if bool(empty.any()):
        b, h, m = torch.nonzero(empty)[0].tolist()
        raise ValueError(
            f"{op}: argument 'block_mask' leaves query rows without any visible key (first: batch {b}, "
            f"head {h}, query block {m}); keep key block 0 (the sink) in every row"
        )


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    bq: int = DEFAULT_BQ,
    bk: int = DEFAULT_BK,
    scale: Optional[float] = None,
    causal: bool = True,
    return_lse: bool = False,
):
    """SPEC §5: attention over the kept ``bq × bk`` blocks of ``block_mask``
    (``[B, Hq, ceil(Nq/bq), ceil(Nk/bk)]`` bool, or its bit-packed int32 form from
    :mod:`sale_ops.mask_bits`), causally masked when ``causal``.

    Returns ``out`` or ``(out, lse)``; a mask that leaves a row without a visible key is refused
    (checked in eager mode).
    """
    op = "sale_ops.block_sparse_attention"
    _checks.check_qkv(op, q, k, v, causal)
    _checks.check_blocks(op, bq, bk)
    _checks.check_block_mask(op, block_mask, q, k, bq, bk)
    if _values_are_checkable(block_mask):
        dense = block_mask if block_mask.dtype == torch.bool else unpack_block_mask(block_mask, -(-k.shape[2] // bk))
        _check_no_empty_rows(op, dense, q.shape[2], k.shape[2], bq, bk, causal)
    out, lse = torch.ops.sale.block_sparse_attention(q, k, v, block_mask, bq, bk, _scale(scale, q), causal)
    return (out, lse) if return_lse else out


def merge_attention(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention computed over disjoint sets of keys into attention over their union.

    ``outs[i]`` ``[B, H, N, D]`` and ``lses[i]`` ``[B, H, N]`` (fp32, natural log, unsmoothed frame:
    what :func:`attention` and :func:`block_sparse_attention` return with ``return_lse``) are the
    results of the same queries against key set ``i``. For chunked prefill this joins a chunk's
    attention to cached keys with its attention to its own keys, or partial results of a key range
    split across calls: ``lse = log Σ_i exp(lse_i)`` and ``out = Σ_i exp(lse_i − lse) · out_i``,
    in fp32, returned in the dtype of ``outs[0]``. A row that saw no key in part ``i`` should carry
    ``lse_i = -inf`` there (it then contributes nothing).
    """
    op = "sale_ops.merge_attention"
    if len(outs) != len(lses) or len(outs) == 0:
        raise ValueError(f"{op}: needs one lse per output and at least one of each, got {len(outs)} outputs "
                         f"and {len(lses)} lse tensors")
    for i, (o, l) in enumerate(zip(outs, lses)):
        if not isinstance(o, torch.Tensor) or not isinstance(l, torch.Tensor):
            raise TypeError(f"{op}: part {i}: outputs and lse must be tensors")
        if o.dim() != 4 or tuple(l.shape) != tuple(o.shape[:3]):
            raise ValueError(f"{op}: part {i}: expected out [B, H, N, D] and lse [B, H, N], got shapes "
                             f"{tuple(o.shape)} and {tuple(l.shape)}")
        if o.shape != outs[0].shape or o.device != outs[0].device or l.device != o.device:
            raise ValueError(f"{op}: part {i} has shape {tuple(o.shape)} on {o.device}; every part must match "
                             f"part 0's {tuple(outs[0].shape)} on {outs[0].device}")
    lse_all = torch.stack([l.float() for l in lses])  # [P, B, H, N]
    lse = torch.logsumexp(lse_all, dim=0)
    # Rows with no key in any part keep lse = -inf; their weights are set to 0 instead of NaN.
    weights = torch.exp(lse_all - torch.where(torch.isfinite(lse), lse, 0.0)).nan_to_num(0.0)
    out = sum(w.unsqueeze(-1) * o.float() for w, o in zip(weights, outs))
    return out.to(outs[0].dtype), lse
