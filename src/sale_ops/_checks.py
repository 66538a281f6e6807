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
    check_tensor(op, "v", v, 4)
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
