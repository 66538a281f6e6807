"""CPU study (no GPU): how often would a cheaper candidate test leave a block undecided?

The wgmma scorer starts every accumulator at bias minus row threshold in code units: one FFMA per
element (64 of its ~250 instructions per warp and 128-key stage). A cheaper test would start the
accumulators at zero and bound each thread's 2 rows x 8 keys of a block instead:
    Z = max_r (max_j E_rj - t_r),  hi = Z + max_j B_j,  lo = Z + min_j B_j
(B_j = bias_j / d, t_r = T_r / d, d = sq * sk; one (sq, sk) per thread and block, SPEC §2), with
per-(head, block, key group) maxima and minima of the bias precomputed. A block is kept surely when
some thread has lo above the margin, dropped surely when every thread has hi below it; otherwise
the warp falls back to today's per-element test. This script measures that fallback rate, against
today's own unsure rate (some element within the margin, none surely above), on SmolLM2-135M's real
Q/K (captured with exact attention) and on the benchmarks' synthetic inputs, at SPEC's bq 64, bk 32.

    python benchmarks/study_scorer_bound.py --tokens 2048 --layers 0 7 15 23 29
"""

from __future__ import annotations

import argparse

import torch

from common import smollm2_attention_inputs
from sale_ops import reference as ref
from sale_ops.testing import make_qkv

MARGIN = 4.5  # code units: today's kFoldedMargin plus the bias' rounding


def warp_rates(q, k, tau, scale, bq=64, bk=32, window=128):
    """(candidate warp-blocks, share unsure today, share needing the fallback) for one layer."""
    B, Hq, N, D = q.shape
    qz = ref.quantize(q, k, bk)
    m, l = ref.row_statistics(q, k, qz.k_mean, bq, bk, window, scale)
    T = ref.thresholds(m, l, torch.full((Hq,), float(tau)), scale)  # [B, Hq, N]
    g = Hq // k.shape[1]
    kc = qz.k_codes.float().repeat_interleave(g, dim=1)
    ks = qz.k_scale.repeat_interleave(g, dim=1)
    E = qz.q_codes.float() @ kc.transpose(-1, -2)  # exact: |E| <= 49 * D
    d = qz.q_scale.unsqueeze(-1) * ks.unsqueeze(-2)  # [B, Hq, N, N]
    Bj = qz.qk_bias.unsqueeze(-2) / d  # bias in code units, per (row, key)
    t = T.unsqueeze(-1) / d
    cand = (ref.causal_blocks(N, N, bq, bk) & ~ref.dense_blocks(N, N, bq, bk, window))
    total = unsure_now = fallback = 0
    nQ = cand.shape[0]
    for mq in range(nQ):
        for w in range(4):  # warp w: rows 16w .. 16w + 15 of the block
            r0 = mq * bq + 16 * w
            if r0 >= N:
                continue
            rows = torch.arange(r0, min(r0 + 16, N))
            blocks = cand[mq].nonzero().flatten()
            if blocks.numel() == 0:
                continue
            keys = (blocks[:, None] * bk + torch.arange(bk)).flatten()  # [nb * 32]
            sub = lambda x: x[..., rows[:, None], keys[None, :]].reshape(B, Hq, len(rows), len(blocks), bk)
            e, b, tt = sub(E), sub(Bj), sub(t)
            x = e + torch.round(b) - tt  # today's folded value (exactly, before its +-3 error)
            finite = torch.isfinite(tt)
            hit_now = ((x >= MARGIN) & finite).any(2).any(-1)  # [B, Hq, nb]
            near = ((x > -MARGIN) & (x < MARGIN) & finite).any(2).any(-1)
            unsure_now += int((near & ~hit_now).sum())
            # Thread (gq, tk): rows gq and gq + 8 of the warp, keys 8i + 2tk + c of each block.
            lo_hit = torch.zeros_like(hit_now)
            maybe = torch.zeros_like(hit_now)
            for gq in range(8):
                rr = [r for r in (gq, gq + 8) if r < len(rows)]
                if not rr:
                    continue
                for tk in range(4):
                    cols = [8 * i + 2 * tk + c for i in range(4) for c in range(2)]
                    et = e[:, :, rr][..., cols]  # [B, Hq, 2, nb, 8]
                    bt = b[:, :, rr[0]][..., cols]  # B_j is the same for both rows (one sq)
                    tr = tt[:, :, rr][..., cols[0]]  # [B, Hq, 2, nb]: t_r (one sk per thread)
                    z = (et.amax(-1) - tr).amax(2)  # [B, Hq, nb]
                    hi, lo = z + bt.amax(-1), z + bt.amin(-1)
                    lo_hit |= lo >= MARGIN + 0.5
                    maybe |= hi > -MARGIN - 0.5
            fallback += int((maybe & ~lo_hit).sum())
            total += hit_now.numel()
    return total, unsure_now / max(total, 1), fallback / max(total, 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 7, 15, 23, 29])
    p.add_argument("--taus", type=float, nargs="+", default=[1e-3, 8e-3, 0.1])
    a = p.parse_args()
    print("| inputs | layer | tau | candidate warp-blocks | unsure today | fallback of the bound test |")
    print("|---|---|---|---|---|---|")
    q, k, _ = make_qkv(1, 9, 3, a.tokens, 64, dtype=torch.bfloat16, seed=1)
    for tau in a.taus:
        n, now, fb = warp_rates(q.float(), k.float(), tau, 64**-0.5)
        print(f"| synthetic (make_qkv) | - | {tau:g} | {n} | {now:.3f} | {fb:.3f} |", flush=True)

    captured = smollm2_attention_inputs(a.tokens)
    for layer in a.layers:
        q, k, _, scale = captured[layer]
        for tau in a.taus:
            n, now, fb = warp_rates(q.float(), k.float(), tau, scale)
            print(f"| SmolLM2-135M | {layer} | {tau:g} | {n} | {now:.3f} | {fb:.3f} |", flush=True)


if __name__ == "__main__":
    main()
