"""Time of SALE's selection pass (sale.quantize + sale.block_mask) against cuDNN dense causal
attention in the same process (issue 3's benchmark).

    python benchmarks/bench_estimate.py            # N = 8K, 16K, 32K, 64K, 128K
    python benchmarks/bench_estimate.py --quick    # N = 8K, 32K

Prints a markdown table: ms per step, the ratio to cuDNN, the block density the thresholds
produced, the 8-bit tensor-core rate on candidate tiles (2·D ops per candidate (query, key) pair
over the block_mask time), the time of the mma.sync scorer (SALE_OPS_ESTIMATOR=mma) for comparison,
sale.select (both steps in one op, the query codes made inside the scorer instead of stored), and
what sale.attention runs: sale.select on as many heads at a time as its memory share allows
(sale_ops._pipeline), with its peak extra GPU memory (quantized tensors + bit-packed mask) over the
bytes of q + k + v.
"""

from __future__ import annotations

import argparse
import os

import torch

import sale_ops
from common import cudnn_causal, time_ms
from sale_ops import reference as ref
from sale_ops import _pipeline
from sale_ops._pipeline import select_blocks, selection_steps
from sale_ops.testing import make_qkv

INT8_PEAK_TOPS = 1979.0  # H100 SXM dense int8


def candidate_pairs(n, bq=64, bk=32, window=128):
    """(query, key) pairs the estimator scores: candidate blocks (causal, outside the dense set)."""
    cand = ref.causal_blocks(n, n, bq, bk) & ~ref.dense_blocks(n, n, bq, bk, window)
    return int(cand.sum()) * bq * bk


def run(n, hq, hkv, d, tau, repeats, sets, with_mma=True):
    inputs = [make_qkv(1, hq, hkv, n, d, device="cuda", seed=s) for s in range(sets)]
    tau_t = torch.full((hq,), tau, device="cuda")
    scale = d**-0.5

    quantized = [torch.ops.sale.quantize(q, k, 32) for q, k, _ in inputs]

    def quantize(q, k, v):
        return torch.ops.sale.quantize(q, k, 32)

    def select(q, k, v, *qz):  # the pipeline's form: the bit-packed mask
        return torch.ops.sale.block_mask_bits(q, k, *qz, tau_t, 64, 32, 128, scale)

    t_dense = time_ms(cudnn_causal, inputs, repeats)
    t_quant = time_ms(quantize, inputs, repeats)
    args = [x + tuple(qz) for x, qz in zip(inputs, quantized)]
    t_mask_mma = float("nan")
    if with_mma:
        os.environ["SALE_OPS_ESTIMATOR"] = "mma"  # the mma.sync scorer, for comparison
        t_mask_mma = time_ms(select, args, repeats)
        del os.environ["SALE_OPS_ESTIMATOR"]  # the default: warp-specialised wgmma
    t_mask = time_ms(select, args, repeats)

    def fused(q, k, v):  # sale.select: quantize + block_mask_bits, no stored query codes (Hopper)
        return torch.ops.sale.select(q, k, tau_t, 64, 32, 128, scale)

    t_select = time_ms(fused, inputs, repeats)

    # What sale.attention runs: the same kernels a few heads at a time (bounded memory).
    def pipeline_select(q, k, v):
        return select_blocks(q, k, v, tau_t, 64, 32, 128, scale)

    t_pipeline = time_ms(pipeline_select, inputs, repeats)
    q, k, v = inputs[0]
    steps = selection_steps(q, k, v, 64, 32)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    bits = pipeline_select(q, k, v)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    qkv_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))
    mask = sale_ops.unpack_block_mask(bits, -(-n // 32))
    density = float(ref.block_density(mask, n, n, 64, 32).mean())
    tops = 2 * d * candidate_pairs(n) * hq / (t_mask * 1e-3) / 1e12
    del inputs, quantized, args, bits, mask
    torch.cuda.empty_cache()
    return dict(
        n=n, hq=hq, hkv=hkv, d=d, dense=t_dense, quant=t_quant, mask=t_mask, mask_mma=t_mask_mma,
        ratio=(t_quant + t_mask) / t_dense, density=density, tops=tops, mem=extra / qkv_bytes,
        pipeline=t_pipeline, steps=steps, select=t_select,
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tau", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--sets", type=int, default=2, help="input sets to rotate through")
    p.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (overrides --quick)")
    p.add_argument("--shapes", nargs="+", default=["32/8/128", "16/2/64"], help="Hq/Hkv/D")
    p.add_argument("--no-mma", action="store_true", help="skip the mma.sync scorer's comparison run")
    p.add_argument("--two-op-selection", action="store_true",
                   help="select through sale.quantize + sale.block_mask_bits instead of sale.select "
                        "(sale_ops._pipeline.FUSED_SELECTION off)")
    a = p.parse_args()
    _pipeline.FUSED_SELECTION = not a.two_op_selection
    lengths = a.lengths or ([8192, 32768] if a.quick else [8192, 16384, 32768, 65536, 131072])
    shapes = [tuple(int(x) for x in s.split("/")) for s in a.shapes]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {sale_ops.backend_summary('cuda')}")
    print(f"bf16, B=1, tau={a.tau}, bq=64, bk=32, W=128; synthetic sparse inputs (sale_ops.testing.make_qkv)\n")
    print("| N | Hq/Hkv/D | cuDNN ms | quantize ms | block_mask ms | (q+m)/cuDNN | density | candidate TOPS (% of 1979) | mma.sync scorer ms | select ms | select/cuDNN | pipeline's selection ms (steps) | its extra mem / qkv |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for hq, hkv, d in shapes:
        for n in lengths:
            r = run(n, hq, hkv, d, a.tau, a.repeats, a.sets, with_mma=not a.no_mma)
            print(
                f"| {n} | {hq}/{hkv}/{d} | {r['dense']:.2f} | {r['quant']:.2f} | {r['mask']:.2f} | "
                f"{r['ratio']:.3f} | {r['density']:.3f} | {r['tops']:.0f} ({100 * r['tops'] / INT8_PEAK_TOPS:.0f}%) | "
                f"{r['mask_mma']:.2f} | {r['select']:.2f} | {r['select'] / r['dense']:.3f} | "
                f"{r['pipeline']:.2f} ({r['steps'][0]} kv x {r['steps'][1]} q heads) | "
                f"{r['mem']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
