"""CPU study (no GPU): how often does rounding P once leave SPEC §7's elementwise bound on a real
model's attention inputs?

The Hopper sparse-attention kernel splits P into fp16 hi + lo parts (three products per tile) so
that its output stays within SPEC §7's bound |out - ref_fp32| <= 2 |ref_lowprec - ref_fp32| + 1e-3
in every element; rounding P once (SALE_OPS_ATTENTION=fast, two products) is ~30% faster on dense
tiles but can leave the bound where |V| is large. This script emulates both on SmolLM2-135M's
Q/K/V (captured with exact attention; bf16; every causal block kept) and counts the elements outside
the bound, for:
  - split: P = hi + lo, both fp16 (scaled by 2^15), V as fp16 (the kernel's default);
  - fp16 once: P rounded once to fp16 (the fast mode);
  - bf16 once: P rounded once to bf16 (what FlashAttention / cuDNN do).
Sums are done in float64 (the tensor cores' fp32 accumulation adds ~1e-7 relative, far below
either rounding), the output is rounded to bf16 as the kernels store it.

Rounding P once provably stays inside the bound where the values it multiplies satisfy
3 * 2^-11 * |V| <= 1e-3 (|V| <= SAFE_V = 0.68), whatever ref_lowprec is. The last two columns say
how much of the model that guarantee would cover if the kernel chose the rounding per 128-key V
tile, or (with the split part run on a subset of V's columns) per column of V.

    python benchmarks/study_p_rounding.py --tokens 2048
"""

from __future__ import annotations

import argparse

import torch

from common import smollm2_attention_inputs
from sale_ops import reference as ref

P_SHIFT = 2.0**15
SAFE_V = 1e-3 / (3 * 2.0**-11)  # |V| up to which one fp16 rounding of P is provably inside the bound


def emulate(q, k, v, scale, mode):
    """Causal attention out [B, H, N, D] (bf16) with P rounded as `mode` says."""
    B, Hq, N, D = q.shape
    g = Hq // k.shape[1]
    kk = k.repeat_interleave(g, 1).double()
    vv = v.repeat_interleave(g, 1).double()  # bf16 V is exact in fp16 here (|V| < 2^15, 8 bits)
    s = (q.double() @ kk.transpose(-1, -2)).float()  # fp32 logits, as the tensor cores give them
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    s = s.masked_fill(~causal, float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp2((s - m) * (scale * 1.4426950408889634)) * P_SHIFT  # fp32, as the kernel's exp2
    if mode == "split":
        hi = p.half().float()
        pr = hi.double() + (p - hi).half().double()
    elif mode == "fp16":
        pr = p.half().double()
    else:  # bf16
        pr = p.bfloat16().double()
    out = (pr @ vv) / p.double().sum(-1, keepdim=True)
    return out.bfloat16()


def violations(q, k, v, scale):
    N = q.shape[2]
    mask = ref.causal_blocks(N, N, 64, 32).expand(q.shape[0], q.shape[1], -1, -1)
    lo, _ = ref.block_sparse_attention(q, k, v, mask, 64, 32, scale, True, dtype=q.dtype)
    hi, _ = ref.block_sparse_attention(q.double(), k.double(), v.double(), mask, 64, 32, scale, True,
                                       dtype=torch.float64)
    bound = 2 * (lo.double() - hi).abs() + 1e-3
    res = {}
    for mode in ("split", "fp16", "bf16"):
        err = (emulate(q, k, v, scale, mode).double() - hi).abs()
        res[mode] = int((err > bound).sum())
    return res, hi.numel(), float(v.abs().max())


def safe_fractions(v, tile=128):
    """Fractions of causal (row, 128-key tile) pairs and of V's columns (per kv head) whose max |V| is
    at most SAFE_V."""
    B, H, N, D = v.shape
    a = v.float().abs()
    n = N // tile * tile
    tiles = a[:, :, :n].reshape(B, H, n // tile, tile, D).amax((-1, -2))  # [B, H, tiles]
    rows_seeing = N - torch.arange(n // tile) * tile  # causal rows that reach each tile
    tile_frac = float(((tiles <= SAFE_V) * rows_seeing).sum() / (rows_seeing.sum() * B * H)) if n else 1.0
    col_frac = float((a.amax(2) <= SAFE_V).float().mean())
    return tile_frac, col_frac


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--layers", type=int, nargs="+", help="default: every layer")
    a = p.parse_args()

    captured = smollm2_attention_inputs(a.tokens)
    print(f"SmolLM2-135M, {captured[0][0].shape[2]} tokens, bf16, every causal block; elements outside SPEC §7's bound\n")
    print("| layer | max abs V | outputs | split P (default) | P rounded once, fp16 (fast mode) | P rounded once, bf16 "
          f"| V tiles with max abs V <= {SAFE_V:.2f} | V columns with max abs V <= {SAFE_V:.2f} |")
    print("|---|---|---|---|---|---|---|---|")
    total = {"split": 0, "fp16": 0, "bf16": 0}
    count = 0
    for layer in a.layers or sorted(captured):
        q, k, v, scale = captured[layer]
        res, n, vmax = violations(q, k, v, scale)
        count += n
        for m in total:
            total[m] += res[m]
        tile_frac, col_frac = safe_fractions(v)
        print(f"| {layer} | {vmax:.2f} | {n} | {res['split']} | {res['fp16']} | {res['bf16']} | {tile_frac:.3f} "
              f"| {col_frac:.3f} |", flush=True)
    print(f"| all | | {count} | {total['split']} | {total['fp16']} | {total['bf16']} | | |")


if __name__ == "__main__":
    main()
