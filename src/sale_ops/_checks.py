"""Input validation shared by the public API, the fake (meta) functions and the backends.

Every message names the op, the argument, what it got and what is supported. Shape and dtype
checks only read metadata, so they also run on fake tensors under ``torch.compile``; checks that
read values (thresholds) live in :func:`check_tau_values` and run only where that is free of a
device synchronisation.
"""

from __future__ import annotations

import math

import torch

from .mask_bits import words_per_row

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_BQ = (64,)
SUPPORTED_BK = (32, 64)
SUPPORTED_DEVICES = ("cpu", "cuda")


def _names(values) -> str:
    return ", ".join(str(v) for v in values)


def check_tensor(op: str, name: str, x, ndim: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{op}: argument '{name}' must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.device.type not in SUPPORTED_DEVICES and x.device.type != "meta":
        raise RuntimeError(
            f"{op}: argument '{name}' is on device {x.device}; supported: {_names(SUPPORTED_DEVICES)}"
        )


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise RuntimeError(
                f"{op}: all tensors must be on one device; '{first_name}' is on {first.device} "
                f"but '{name}' is on {t.device}"
            )


def check_dtype(op: str, name: str, x: torch.Tensor, supported) -> None:
    if x.dtype not in supported:
        raise TypeError(f"{op}: argument '{name}' has dtype {x.dtype}; supported: {_names(supported)}")


def check_last_dim_contiguous(op: str, name: str, x: torch.Tensor) -> None:
    if x.numel() > 0 and x.stride(-1) != 1:
        raise ValueError(
            f"{op}: argument '{name}' must have a contiguous last dimension (stride 1), got strides "
            f"{tuple(x.stride())}; call .contiguous() first"
        )


def check_qk(op: str, q, k, causal: bool = True) -> None:
    """Shapes of ``q [B, Hq, Nq, D]`` and ``k [B, Hkv, Nk, D]`` (SPEC §1)."""
    check_tensor(op, "q", q, 4)
    check_tensor(op, "k", k, 4)
    check_same_device(op, q=q, k=k)
    check_dtype(op, "q", q, SUPPORTED_DTYPES)
    if k.dtype != q.dtype:
        raise TypeError(f"{op}: argument 'k' has dtype {k.dtype} but 'q' has {q.dtype}; they must match")
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"{op}: batch sizes differ: 'q' has {B}, 'k' has {Bk}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(
            f"{op}: query heads must be a multiple of kv heads, got Hq={Hq} ('q') and Hkv={Hkv} ('k')"
        )
    if Dk != D:
        raise ValueError(f"{op}: head dims differ: 'q' has D={D}, 'k' has D={Dk}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{op}: argument 'q' has head dim {D}; supported: {_names(SUPPORTED_HEAD_DIMS)}")
    if Nq < 1 or Nk < 1:
        raise ValueError(f"{op}: empty sequence: 'q' has Nq={Nq}, 'k' has Nk={Nk}; both must be >= 1")
    if causal and Nq > Nk:
        raise ValueError(
            f"{op}: causal attention needs Nq <= Nk (queries are the last Nq positions), "
            f"got Nq={Nq} ('q') and Nk={Nk} ('k')"
        )
    check_last_dim_contiguous(op, "q", q)
    check_last_dim_contiguous(op, "k", k)


def check_qkv(op: str, q, k, v, causal: bool = True) -> None:
    check_qk(op, q, k, causal)
    check_v(op, q, k, v, 4)


def check_v(op: str, q, k, v, ndim: int) -> None:
    """'v' next to checked 'q' and 'k': ``ndim`` dims (4 batched, 3 packed), q's device and dtype,
    k's shape, a contiguous last dim."""
    check_tensor(op, "v", v, ndim)
    check_same_device(op, q=q, v=v)
    if v.dtype != q.dtype:
        raise TypeError(f"{op}: argument 'v' has dtype {v.dtype} but 'q' has {q.dtype}; they must match")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"{op}: 'v' must have the shape of 'k' {tuple(k.shape)}, got {tuple(v.shape)}")
    check_last_dim_contiguous(op, "v", v)


def check_blocks(op: str, bq: int, bk: int, window: int | None = None) -> None:
    if bq not in SUPPORTED_BQ:
        raise ValueError(f"{op}: argument 'bq' is {bq}; supported: {_names(SUPPORTED_BQ)}")
    if bk not in SUPPORTED_BK:
        raise ValueError(f"{op}: argument 'bk' is {bk}; supported: {_names(SUPPORTED_BK)}")
    if window is not None and (window % bk != 0 or window < bq):
        raise ValueError(
            f"{op}: argument 'window' is {window}; it must be a multiple of bk={bk} and at least bq={bq}"
        )


def check_scale(op: str, scale: float) -> None:
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{op}: argument 'scale' is {scale!r}; it must be a finite number > 0")


def check_tau(op: str, tau, q: torch.Tensor) -> None:
    """Metadata of the per-head thresholds: a float tensor ``[Hq]`` on the device of ``q``."""
    check_tensor(op, "tau", tau, 1)
    Hq = q.shape[1]
    if tau.shape[0] != Hq:
        raise ValueError(f"{op}: argument 'tau' must have one threshold per query head ({Hq}), got shape {tuple(tau.shape)}")
    if tau.dtype != torch.float32:
        raise TypeError(f"{op}: argument 'tau' has dtype {tau.dtype}; supported: torch.float32")
    check_same_device(op, q=q, tau=tau)


def check_tau_values(op: str, tau: torch.Tensor, name: str = "tau") -> None:
    """SPEC §4.5: ``tau_h >= 0`` and finite. Reads values: call where a sync is acceptable."""
    bad = ~torch.isfinite(tau) | (tau < 0)
    if bool(bad.any()):
        heads = torch.nonzero(bad).flatten().tolist()
        raise ValueError(
            f"{op}: argument '{name}' must be finite and >= 0 for every head; heads {heads} have "
            f"{[float(tau[h]) for h in heads]}"
        )


def check_block_mask(op: str, mask, q: torch.Tensor, k: torch.Tensor, bq: int, bk: int) -> None:
    """A bool mask ``[B, Hq, nQ, nK]`` or its bit-packed int32 form ``[B, Hq, nQ, ceil(nK/32)]``."""
    check_tensor(op, "block_mask", mask, 4)
    check_same_device(op, q=q, block_mask=mask)
    if mask.dtype not in (torch.bool, torch.int32):
        raise TypeError(
            f"{op}: argument 'block_mask' has dtype {mask.dtype}; supported: torch.bool, or torch.int32 "
            f"bit-packed words (sale_ops.mask_bits)"
        )
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    nK = -(-Nk // bk)
    if mask.dtype == torch.bool:
        want, what = (B, Hq, -(-Nq // bq), nK), "[B, Hq, ceil(Nq/bq), ceil(Nk/bk)]"
    else:
        want, what = (B, Hq, -(-Nq // bq), words_per_row(nK)), "[B, Hq, ceil(Nq/bq), ceil(ceil(Nk/bk)/32)]"
    if tuple(mask.shape) != want:
        raise ValueError(f"{op}: argument 'block_mask' must have shape {what} = {want}, got {tuple(mask.shape)}")


def check_quantized(op: str, q, k, q_codes, q_scale, k_codes, k_scale, qk_bias, k_mean) -> None:
    """The tensors of ``sale.quantize`` for these ``q`` and ``k``."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    expected = {
        "q_codes": (q_codes, torch.int8, (B, Hq, Nq, D)),
        "q_scale": (q_scale, torch.float32, (B, Hq, Nq)),
        "k_codes": (k_codes, torch.int8, (B, Hkv, Nk, D)),
        "k_scale": (k_scale, torch.float32, (B, Hkv, Nk)),
        "qk_bias": (qk_bias, torch.float32, (B, Hq, Nk)),
        "k_mean": (k_mean, torch.float32, (B, Hkv, D)),
    }
    _check_expected(op, q, expected)


def _check_expected(op: str, q, expected: dict) -> None:
    """Each ``name: (tensor, dtype, shape)``: a tensor on q's device with that dtype and shape."""
    for name, (t, dtype, shape) in expected.items():
        check_tensor(op, name, t, len(shape))
        check_same_device(op, q=q, **{name: t})
        check_dtype(op, name, t, (dtype,))
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: argument '{name}' must have shape {shape}, got {tuple(t.shape)}")


def check_causal_pipeline(op: str, causal: bool) -> None:
    if not causal:
        raise ValueError(
            f"{op}: argument 'causal' is False; the SALE pipeline supports causal prefill only "
            f"(use sale_ops.block_sparse_attention with your own mask for non-causal attention)"
        )


# One function per op: the metadata checks its fake function and every backend share.


def quantize_args(q, k, bk) -> None:
    op = "sale.quantize"
    check_qk(op, q, k, causal=False)
    check_blocks(op, SUPPORTED_BQ[0], bk)


def block_mask_args(q, k, q_codes, q_scale, k_codes, k_scale, qk_bias, k_mean, tau, bq, bk, window, scale) -> None:
    op = "sale.block_mask"
    check_qk(op, q, k)
    check_quantized(op, q, k, q_codes, q_scale, k_codes, k_scale, qk_bias, k_mean)
    check_tau(op, tau, q)
    check_blocks(op, bq, bk, window)
    check_scale(op, scale)


def select_args(q, k, tau, bq, bk, window, scale) -> None:
    op = "sale.select"
    check_qk(op, q, k)
    check_tau(op, tau, q)
    check_blocks(op, bq, bk, window)
    check_scale(op, scale)


def block_sparse_attention_args(q, k, v, block_mask, bq, bk, scale, causal) -> None:
    op = "sale.block_sparse_attention"
    check_qkv(op, q, k, v, causal)
    check_blocks(op, bq, bk)
    check_block_mask(op, block_mask, q, k, bq, bk)
    check_scale(op, scale)


def attention_args(q, k, v, tau, bq, bk, window, scale, causal, dense_below) -> None:
    op = "sale.attention"
    check_causal_pipeline(op, causal)
    check_qkv(op, q, k, v)
    check_tau(op, tau, q)
    check_blocks(op, bq, bk, window)
    check_scale(op, scale)


# Variable-length (packed) batches: q [total_q, Hq, D], k/v [total_k, Hkv, D], cu_seqlens int32 [B + 1].


def check_packed_qk(op: str, q, k, v=None) -> None:
    """Shapes of the packed ``q [total_q, Hq, D]``, ``k`` (and ``v``) ``[total_k, Hkv, D]``."""
    check_tensor(op, "q", q, 3)
    check_tensor(op, "k", k, 3)
    check_same_device(op, q=q, k=k)
    check_dtype(op, "q", q, SUPPORTED_DTYPES)
    if k.dtype != q.dtype:
        raise TypeError(f"{op}: argument 'k' has dtype {k.dtype} but 'q' has {q.dtype}; they must match")
    _, Hq, D = q.shape
    _, Hkv, Dk = k.shape
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"{op}: query heads must be a multiple of kv heads, got Hq={Hq} ('q') and Hkv={Hkv} ('k')")
    if Dk != D:
        raise ValueError(f"{op}: head dims differ: 'q' has D={D}, 'k' has D={Dk}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{op}: argument 'q' has head dim {D}; supported: {_names(SUPPORTED_HEAD_DIMS)}")
    check_last_dim_contiguous(op, "q", q)
    check_last_dim_contiguous(op, "k", k)
    if v is not None:
        check_v(op, q, k, v, 3)


def check_cu_seqlens(op: str, q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> int:
    """Metadata of the sequence offsets and the max lengths; returns the batch size B."""
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(op, name, cu, 1)
        check_same_device(op, q=q, **{name: cu})
        check_dtype(op, name, cu, (torch.int32,))
        if cu.shape[0] < 2:
            raise ValueError(f"{op}: argument '{name}' must hold B + 1 >= 2 offsets, got shape {tuple(cu.shape)}")
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(
            f"{op}: 'cu_seqlens_q' has {cu_seqlens_q.shape[0]} offsets but 'cu_seqlens_k' has "
            f"{cu_seqlens_k.shape[0]}; both must hold B + 1"
        )
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"{op}: argument '{name}' must be a Python int, got {type(n).__name__}")
        if not 1 <= n <= 1 << 30:
            raise ValueError(f"{op}: argument '{name}' is {n}; supported: 1 .. 2^30")
    return cu_seqlens_q.shape[0] - 1


def check_cu_seqlens_values(op: str, cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q, max_seqlen_k,
                            causal: bool = True) -> None:
    """Values of the offsets (reads them: call where a sync is acceptable): start at 0, never
    decrease, end at the packed length, no sequence longer than its max, and (causal) Nq_b <= Nk_b."""
    for name, cu, total, most in (
        ("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q),
        ("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k),
    ):
        c = cu.tolist()
        lengths = [b - a for a, b in zip(c, c[1:])]
        if c[0] != 0 or c[-1] != total or min(lengths) < 0:
            raise ValueError(
                f"{op}: argument '{name}' must start at 0, never decrease and end at the packed length {total}, "
                f"got {c if len(c) <= 16 else c[:8] + ['...'] + c[-4:]}"
            )
        if max(lengths) > most:
            b = lengths.index(max(lengths))
            raise ValueError(
                f"{op}: sequence {b} has {lengths[b]} rows in '{name}' but 'max_seqlen_{name[-1]}' is {most}; "
                f"it must be at least the longest sequence"
            )
    if causal:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for b in range(len(cq) - 1):
            nq, nk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
            if nq > nk:
                raise ValueError(
                    f"{op}: causal attention needs Nq <= Nk in every sequence (queries are the last Nq positions), "
                    f"got Nq={nq}, Nk={nk} in sequence {b}"
                )


def check_quantized_varlen(op: str, q, k, batch, q_codes, q_scale, k_codes, k_scale, qk_bias, k_mean) -> None:
    """The tensors of ``sale.quantize_varlen`` for these packed ``q`` and ``k``."""
    Tq, Hq, D = q.shape
    Tk, Hkv, _ = k.shape
    expected = {
        "q_codes": (q_codes, torch.int8, (Hq, Tq, D)),
        "q_scale": (q_scale, torch.float32, (Hq, Tq)),
        "k_codes": (k_codes, torch.int8, (Hkv, Tk, D)),
        "k_scale": (k_scale, torch.float32, (Hkv, Tk)),
        "qk_bias": (qk_bias, torch.float32, (Hq, Tk)),
        "k_mean": (k_mean, torch.float32, (batch, Hkv, D)),
    }
    _check_expected(op, q, expected)


def varlen_mask_shape(batch, hq, max_seqlen_q, max_seqlen_k, bq, bk, packed: bool):
    nK = -(-max_seqlen_k // bk)
    return (batch, hq, -(-max_seqlen_q // bq), words_per_row(nK) if packed else nK)


def quantize_varlen_args(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bk) -> int:
    op = "sale.quantize_varlen"
    check_packed_qk(op, q, k)
    batch = check_cu_seqlens(op, q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    check_blocks(op, SUPPORTED_BQ[0], bk)
    return batch


def block_mask_varlen_args(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_codes, q_scale, k_codes,
                           k_scale, qk_bias, k_mean, tau, bq, bk, window, scale, dense_below) -> int:
    op = "sale.block_mask_bits_varlen"
    check_packed_qk(op, q, k)
    batch = check_cu_seqlens(op, q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    check_quantized_varlen(op, q, k, batch, q_codes, q_scale, k_codes, k_scale, qk_bias, k_mean)
    check_tau(op, tau, q)
    check_blocks(op, bq, bk, window)
    check_scale(op, scale)
    return batch


def select_varlen_args(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, tau, bq, bk, window, scale,
                       dense_below) -> int:
    op = "sale.select_varlen"
    check_packed_qk(op, q, k)
    batch = check_cu_seqlens(op, q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    check_tau(op, tau, q)
    check_blocks(op, bq, bk, window)
    check_scale(op, scale)
    return batch


def block_sparse_attention_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_mask, bq,
                                       bk, scale, causal) -> int:
    op = "sale.block_sparse_attention_varlen"
    check_packed_qk(op, q, k, v)
    batch = check_cu_seqlens(op, q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    check_blocks(op, bq, bk)
    check_tensor(op, "block_mask", block_mask, 4)
    check_same_device(op, q=q, block_mask=block_mask)
    if block_mask.dtype not in (torch.bool, torch.int32):
        raise TypeError(
            f"{op}: argument 'block_mask' has dtype {block_mask.dtype}; supported: torch.bool, or torch.int32 "
            f"bit-packed words (sale_ops.mask_bits)"
        )
    packed = block_mask.dtype == torch.int32
    want = varlen_mask_shape(batch, q.shape[1], max_seqlen_q, max_seqlen_k, bq, bk, packed)
    if tuple(block_mask.shape) != want:
        what = "ceil(ceil(max_seqlen_k/bk)/32)" if packed else "ceil(max_seqlen_k/bk)"
        raise ValueError(
            f"{op}: argument 'block_mask' must have shape [B, Hq, ceil(max_seqlen_q/bq), {what}] = {want}, "
            f"got {tuple(block_mask.shape)}"
        )
    check_scale(op, scale)
    return batch


def attention_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, tau, bq, bk, window, scale,
                          causal, dense_below) -> int:
    op = "sale.attention_varlen"
    check_causal_pipeline(op, causal)
    check_packed_qk(op, q, k, v)
    batch = check_cu_seqlens(op, q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    check_tau(op, tau, q)
    check_blocks(op, bq, bk, window)
    check_scale(op, scale)
    return batch
