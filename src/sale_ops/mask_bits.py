"""The compact block-mask format the estimator writes and the sparse-attention kernel reads.

A mask ``[B, Hq, nQ, nK]`` (bool) is stored as int32 words ``[B, Hq, nQ, ceil(nK / 32)]``: bit
``n % 32`` of word ``n // 32`` says whether key block ``n`` is kept; bits past ``nK`` are 0.
That is 1/8 of a bool mask (at 128K tokens, Llama-3.1-8B shapes: 34 MB instead of 268 MB) and
needs no host synchronisation to produce or consume. Both functions here are plain PyTorch,
run on any device and trace under ``torch.compile``.
"""

from __future__ import annotations

import torch

__all__ = ["pack_block_mask", "unpack_block_mask", "words_per_row"]


def words_per_row(nk_blocks: int) -> int:
    """Number of int32 words per query block for ``nk_blocks`` key blocks."""
    return -(-nk_blocks // 32)


def _bit_values(device) -> torch.Tensor:
    return torch.ones((), dtype=torch.int64, device=device) << torch.arange(32, device=device)


def pack_block_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[..., nK]`` → int32 words ``[..., ceil(nK / 32)]``."""
    if mask.dtype != torch.bool:
        raise TypeError(f"sale_ops.pack_block_mask: argument 'mask' has dtype {mask.dtype}; supported: torch.bool")
    nk = mask.shape[-1]
    nw = words_per_row(nk)
    padded = torch.nn.functional.pad(mask, (0, nw * 32 - nk)).reshape(*mask.shape[:-1], nw, 32)
    words = (padded.to(torch.int64) * _bit_values(mask.device)).sum(-1)
    # two's complement: words >= 2^31 become negative int32 with the same bits
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_block_mask(words: torch.Tensor, nk_blocks: int) -> torch.Tensor:
    """int32 words ``[..., ceil(nK / 32)]`` → bool ``[..., nK]`` (the inverse of :func:`pack_block_mask`)."""
    if words.dtype != torch.int32:
        raise TypeError(f"sale_ops.unpack_block_mask: argument 'words' has dtype {words.dtype}; supported: torch.int32")
    if words.shape[-1] != words_per_row(nk_blocks):
        raise ValueError(
            f"sale_ops.unpack_block_mask: {nk_blocks} key blocks need {words_per_row(nk_blocks)} words per row, "
            f"got {words.shape[-1]}"
        )
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*words.shape[:-1], -1)[..., :nk_blocks].to(torch.bool)
