"""CPU and CUDA implementations of the ``torch.ops.sale`` ops that run :mod:`sale_ops.reference`.

On the CPU this is the intended implementation. On CUDA it serves the ops in REFERENCE_ON_CUDA: the same PyTorch
reference running on the GPU (correct, not fast) until the Hopper kernels replace each op; the
README's support table says which ops are still served from here.
"""

from __future__ import annotations

import os

import torch

from . import _checks, _dispatch
from . import reference as ref
from .mask_bits import pack_block_mask, unpack_block_mask

# Ops whose CUDA implementation is still the reference below; each CUDA kernel that lands takes
# its op off this list and registers itself for the CUDA key in C++ (cpp/torch_bindings/*_cuda.cu).
REFERENCE_ON_CUDA = ()


def _devices(op: str):
    return ("cpu", "cuda") if op in REFERENCE_ON_CUDA else ("cpu",)


def _contiguous(*tensors):
    return tuple(t.contiguous() for t in tensors)


@torch.library.register_kernel("sale::quantize", _devices("quantize"))
def _quantize(q, k, bk):
    """sale.quantize through the PyTorch reference (SPEC §2)."""
    _checks.quantize_args(q, k, bk)
    return _contiguous(*ref.quantize(q, k, bk))


def _reference_mask(q, k, q_codes, q_scale, k_codes, k_scale, qk_bias, k_mean, tau, bq, bk, window, scale):
    _checks.block_mask_args(q, k, q_codes, q_scale, k_codes, k_scale, qk_bias, k_mean, tau, bq, bk, window, scale)
    if tau.device.type == "cpu":
        _checks.check_tau_values("sale.block_mask", tau)
    qz = ref.Quantized(q_codes, q_scale, k_codes, k_scale, qk_bias, k_mean)
    return ref.block_mask(q, k, qz, tau, bq, bk, window, scale).contiguous()


@torch.library.register_kernel("sale::block_mask", _devices("block_mask"))
def _block_mask(*args):
    """sale.block_mask through the PyTorch reference (SPEC §4)."""
    return _reference_mask(*args)


@torch.library.register_kernel("sale::block_mask_bits", _devices("block_mask"))
def _block_mask_bits(q, k, q_codes, q_scale, k_codes, k_scale, qk_bias, k_mean, tau, bq, bk, window, scale):
    """sale.block_mask_bits: the reference mask, bit-packed (sale_ops.mask_bits)."""
    return pack_block_mask(
        _reference_mask(q, k, q_codes, q_scale, k_codes, k_scale, qk_bias, k_mean, tau, bq, bk, window, scale)
    )


@torch.library.register_kernel("sale::select", "cpu")
def _select(q, k, tau, bq, bk, window, scale):
    """sale.select: sale.quantize then sale.block_mask_bits, through the reference."""
    _checks.select_args(q, k, tau, bq, bk, window, scale)
    if tau.device.type == "cpu":
        _checks.check_tau_values("sale.select", tau)
    qz = ref.quantize(q, k, bk)
    return pack_block_mask(ref.block_mask(q, k, qz, tau, bq, bk, window, scale)).contiguous()


@torch.library.register_kernel("sale::block_sparse_attention", _devices("block_sparse_attention"))
def _block_sparse_attention(q, k, v, block_mask, bq, bk, scale, causal):
    """sale.block_sparse_attention through the PyTorch reference (SPEC §5)."""
    _checks.block_sparse_attention_args(q, k, v, block_mask, bq, bk, scale, causal)
    if block_mask.dtype == torch.int32:
        block_mask = unpack_block_mask(block_mask, -(-k.shape[2] // bk))
    return _contiguous(*ref.block_sparse_attention(q, k, v, block_mask, bq, bk, scale, causal))


# Variable-length (packed) ops on the CPU: each sequence through the reference (a loop over sequences;
# reading cu_seqlens is free here, so their values are checked too).


def _check_varlen_values(op, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True):
    _checks.check_cu_seqlens_values(op, cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q,
                                    max_seqlen_k, causal)


@torch.library.register_kernel("sale::quantize_varlen", "cpu")
def _quantize_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bk):
    """sale.quantize_varlen through the reference, one sequence at a time."""
    _checks.quantize_varlen_args(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bk)
    _check_varlen_values("sale.quantize_varlen", q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, False)
    return _contiguous(*ref.quantize_varlen(q, k, cu_seqlens_q, cu_seqlens_k, bk))


@torch.library.register_kernel("sale::block_mask_bits_varlen", "cpu")
def _block_mask_bits_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_codes, q_scale, k_codes,
                            k_scale, qk_bias, k_mean, tau, bq, bk, window, scale, dense_below):
    """sale.block_mask_bits_varlen: the reference mask of every sequence, bit-packed."""
    op = "sale.block_mask_bits_varlen"
    _checks.block_mask_varlen_args(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_codes, q_scale,
                                   k_codes, k_scale, qk_bias, k_mean, tau, bq, bk, window, scale, dense_below)
    _check_varlen_values(op, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _checks.check_tau_values(op, tau)
    qz = ref.Quantized(q_codes, q_scale, k_codes, k_scale, qk_bias, k_mean)
    mask = ref.block_mask_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, qz, tau, bq, bk,
                                 window, scale, dense_below)
    return pack_block_mask(mask).contiguous()


@torch.library.register_kernel("sale::select_varlen", "cpu")
def _select_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, tau, bq, bk, window, scale,
                   dense_below):
    """sale.select_varlen: sale.quantize_varlen then sale.block_mask_bits_varlen, through the reference."""
    op = "sale.select_varlen"
    _checks.select_varlen_args(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, tau, bq, bk, window,
                               scale, dense_below)
    _check_varlen_values(op, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _checks.check_tau_values(op, tau)
    qz = ref.quantize_varlen(q, k, cu_seqlens_q, cu_seqlens_k, bk)
    mask = ref.block_mask_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, qz, tau, bq, bk,
                                 window, scale, dense_below)
    return pack_block_mask(mask).contiguous()


@torch.library.register_kernel("sale::block_sparse_attention_varlen", "cpu")
def _block_sparse_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_mask, bq,
                                   bk, scale, causal):
    """sale.block_sparse_attention_varlen through the reference, one sequence at a time."""
    _checks.block_sparse_attention_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                               block_mask, bq, bk, scale, causal)
    _check_varlen_values("sale.block_sparse_attention_varlen", q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, causal)
    if block_mask.dtype == torch.int32:
        block_mask = unpack_block_mask(block_mask, -(-max_seqlen_k // bk))
    return _contiguous(*ref.block_sparse_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, block_mask, bq, bk,
                                                          scale, causal))


def backend_summary(device) -> str:
    """Which implementation serves the ``torch.ops.sale`` ops on ``device`` (for logs and demos)."""
    device = torch.device(device)
    if device.type == "cpu":
        return "PyTorch reference (sale_ops.reference) for every op"
    if not torch.cuda.is_available():
        return f"no CUDA device visible (CUDA kernels built for SALE_CUDA_ARCHS={';'.join(_dispatch.built_archs())})"
    major, minor = torch.cuda.get_device_capability(device)
    try:
        path = _dispatch.kernel_path(device)
    except RuntimeError as e:
        return f"no CUDA kernels for this GPU: {e}"
    # The kernel variants the CUDA entries pick (environment switches read at each call).
    estimator_mma = os.environ.get("SALE_OPS_ESTIMATOR") == "mma"
    if path == _dispatch.SM90:
        where = "Hopper kernels, sm_90a"
        variant = {
            "block_mask": "mma.sync scorer" if estimator_mma else "wgmma scorer",
            "block_sparse_attention": "mma.sync" if os.environ.get("SALE_OPS_ATTENTION") == "mma" else "wgmma",
        }
    else:
        # 8.x runs the sm_80/86/89 SASS; anything later JIT-compiles the compute_80 PTX.
        where = "sm8x kernels, " + (f"sm_{major}{minor} SASS" if major == 8 else f"compute_80 PTX JIT-compiled for {major}.{minor}")
        if major == 9 and minor == 0:
            where += f", {_dispatch.FORCE_SM8X_ENV}=1"
        variant = {
            "block_mask": "8-bit mma.sync scorer" if estimator_mma else "int4 mma.sync scorer",
            "block_sparse_attention": "mma.sync",
        }
    kernels = [
        f"{op} ({variant[op]})" if op in variant else op
        for op in ("quantize", "block_mask", "block_sparse_attention")
        if op not in REFERENCE_ON_CUDA
    ]
    reference = ", ".join(REFERENCE_ON_CUDA) or "none"
    return (
        f"CUDA kernels: {', '.join(kernels) or 'none'} [{where}]; "
        f"PyTorch reference on the GPU (correct, not fast): {reference}"
    )
