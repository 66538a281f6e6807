"""Time of SALE's computation pass (sale.block_sparse_attention) against cuDNN dense causal
attention and FlexAttention on the same block mask, in the same process (issue 4's benchmark).

    python benchmarks/bench_attention.py            # N = 8K, 16K, 32K, 64K, 128K
    python benchmarks/bench_attention.py --quick    # N = 8K, 16K, 32K

Masks: random kept blocks plus the sink and the diagonal blocks, at a target density of the
causal blocks (the measured density is printed). Prints a markdown table: ms per call, the
ratio to cuDNN, the target ratio d / 0.85 (the sparse pass should take at most density x cuDNN
/ 0.85), FlexAttention's time on the same mask, and the effective rate on computed work
(4·D flops per causally visible (query, key) pair of the kept blocks).
"""

from __future__ import annotations

import argparse

import torch

import sale_ops
from common import cudnn_causal, random_block_mask, time_ms
from sale_ops import reference as ref

BQ = 64


def random_mask(hq, n, bk, density, seed):
    """[1, hq, nQ, nK]: causal blocks kept with probability p, plus sink and diagonal blocks,
    p chosen so the kept fraction of causal blocks is about `density`."""
    return random_block_mask(hq, n, bk, density, seed, bq=BQ, window=BQ, device="cuda")


def visible_pairs(mask, n, bk):
    """Causally visible (query, key) pairs inside the kept blocks, summed over heads."""
    nQ, nK = mask.shape[-2:]
    rows = torch.arange(nQ, device=mask.device)[:, None] * BQ
    keys = torch.arange(nK, device=mask.device)[None, :] * bk
    pairs = torch.zeros(nQ, nK, device=mask.device)
    for r in range(BQ):  # row r of each query block sees keys [key0, row] of each key block
        i = rows + r
        width = (i - keys + 1).clamp(0, bk).clamp(max=(n - keys).clamp(max=bk))
        pairs += torch.where(i < n, width, 0).float()
    return float((mask.float() * pairs).sum())


def flex_block_mask(mask, n, bk):
    """FlexAttention BlockMask with the same kept blocks: blocks wholly below the diagonal are
    'full' (no mask_mod), the kept diagonal blocks get the causal mask_mod."""
    from torch.nn.attention.flex_attention import BlockMask

    nQ, nK = mask.shape[-2:]
    rows = torch.arange(nQ, device=mask.device)[:, None] * BQ
    ends = (torch.arange(nK, device=mask.device)[None, :] + 1) * bk - 1
    below = ends <= rows  # every key of the block is visible to the block's first row
    full, partial = mask & below, mask & ~below

    def indices(sel):
        cols = torch.arange(nK, device=mask.device).expand_as(sel)
        order = torch.where(sel, cols, cols + nK).sort(dim=-1).values % nK  # kept blocks first
        return sel.sum(-1).to(torch.int32), order.to(torch.int32).contiguous()

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    num, idx = indices(partial)
    full_num, full_idx = indices(full)
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=(BQ, bk), mask_mod=causal,
                                    seq_lengths=(n, n), compute_q_blocks=False)  # forward only


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--bk", type=int, default=32)
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a while)")
    p.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (overrides --quick)")
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1, 0.05])
    a = p.parse_args()
    lengths = a.lengths or ([8192, 16384, 32768] if a.quick else [8192, 16384, 32768, 65536, 131072])
    densities = a.densities
    hq, hkv, d, bk = 32, 8, 128, a.bk
    scale = d**-0.5
    flex = None
    if not a.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {sale_ops.backend_summary('cuda')}")
    print(f"bf16, B=1, Hq={hq}, Hkv={hkv}, D={d}, bq={BQ}, bk={bk}; random masks with sink + diagonal\n")
    print("| N | density (causal blocks) | cuDNN dense ms | SALE ms | SALE / cuDNN | target d/0.85 | Flex ms | SALE TFLOPS |")
    print("|---|---|---|---|---|---|---|---|")
    for n in lengths:
        g = torch.Generator(device="cuda").manual_seed(n)
        q = torch.randn(1, hq, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=g)

        t_dense = time_ms(cudnn_causal, [(q, k, v)], a.repeats)
        for density in densities:
            mask = random_mask(hq, n, bk, density, seed=n)
            measured = float(ref.block_density(mask, n, n, BQ, bk).mean())
            t_sale = time_ms(lambda: torch.ops.sale.block_sparse_attention(q, k, v, mask, BQ, bk, scale, True), repeats=a.repeats)
            t_flex = float("nan")
            if flex is not None:
                try:
                    bm = flex_block_mask(mask, n, bk)
                    opts = {"BLOCK_M": BQ, "BLOCK_N": bk}  # the kernel's tiles must divide the mask's blocks
                    t_flex = time_ms(
                        lambda: flex(q, k, v, block_mask=bm, scale=scale, enable_gqa=True, kernel_options=opts),
                        repeats=a.repeats,
                    )
                    del bm
                except Exception as e:  # keep the other columns; say why Flex is missing
                    print(f"FlexAttention failed at N={n}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    flex = None
            tflops = 4 * d * visible_pairs(mask, n, bk) / (t_sale * 1e-3) / 1e12
            print(
                f"| {n} | {measured:.3f} | {t_dense:.2f} | {t_sale:.2f} | {t_sale / t_dense:.3f} | "
                f"{measured / 0.85:.3f} | {t_flex:.2f} | {tflops:.0f} |",
                flush=True,
            )
            del mask
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
