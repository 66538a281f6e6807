"""Where SALE starts to pay: the break-even length against cuDNN dense causal attention (issue 5).

    python benchmarks/bench_breakeven.py                         # Llama-3.1-8B and D 64 shapes
    python benchmarks/bench_breakeven.py --lengths 4096 16384 --json out.json

SALE's time is the selection pass (sale.quantize + sale.block_mask_bits, as sale.attention runs
them, on sale_ops.testing.make_qkv inputs) plus the computation pass at a given block density.
Inputs with a chosen density cannot be made for every N, so the computation pass runs on a random
mask of that density (sink + diagonal + random blocks, as in bench_attention.py). For each density
the break-even length is the shortest measured N from which SALE is faster than cuDNN at every
longer measured N. sale_ops.attention computes sequences shorter than ``dense_below`` densely
(``sale_ops.DEFAULT_DENSE_BELOW``); the last table checks that the op at tau 1e-3 is then never
slower than cuDNN by more than the overhead of one op call.
"""

from __future__ import annotations

import argparse
import json

import torch

import sale_ops
from bench_attention import random_mask
from common import cudnn_causal, time_ms
from sale_ops import _pipeline
from sale_ops.mask_bits import pack_block_mask
from sale_ops.testing import make_qkv

BK = 32


def measure(hq, hkv, d, n, densities, repeats):
    q, k, v = make_qkv(1, hq, hkv, n, d, device="cuda", seed=n)
    scale = d**-0.5
    tau = torch.full((hq,), 1e-3, device="cuda")
    t_cudnn = time_ms(cudnn_causal, [(q, k, v)], repeats)
    t_select = time_ms(lambda: _pipeline.select_blocks(q, k, v, tau, 64, BK, 128, scale), repeats=repeats)
    row = dict(hq=hq, hkv=hkv, d=d, n=n, cudnn_ms=t_cudnn, select_ms=t_select, attention_ms={}, total_ms={})
    for dens in densities:
        bits = pack_block_mask(random_mask(hq, n, BK, dens, seed=n))
        t_att = time_ms(lambda: sale_ops.block_sparse_attention(q, k, v, bits, bk=BK), repeats=repeats)
        row["attention_ms"][dens] = t_att
        row["total_ms"][dens] = t_select + t_att
    # The op as users call it, with its default dense_below.
    row["op_ms"] = time_ms(lambda: sale_ops.attention(q, k, v, 1e-3), repeats=repeats)
    row["op_dense"] = n < sale_ops.DEFAULT_DENSE_BELOW
    return row


def break_even(rows, dens):
    """Shortest N from which SALE at density `dens` beats cuDNN at every longer N (None: never)."""
    best = None
    for r in sorted(rows, key=lambda r: -r["n"]):
        if r["total_ms"][dens] < r["cudnn_ms"]:
            best = r["n"]
        else:
            break
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+",
                   default=[1024, 2048, 4096, 8192, 12288, 16384, 24576, 32768, 49152, 65536])
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    p.add_argument("--shapes", nargs="+", default=["32/8/128", "16/2/64"], help="Hq/Hkv/D")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {sale_ops.backend_summary('cuda')}")
    print(f"bf16, B=1, bq 64, bk {BK}, W 128, tau 1e-3 for the selection; DEFAULT_DENSE_BELOW "
          f"{sale_ops.DEFAULT_DENSE_BELOW}\n")
    dens_cols = " | ".join(f"SALE/cuDNN d{x:g}" for x in a.densities)
    print(f"| Hq/Hkv/D | N | cuDNN ms | selection ms | {dens_cols} | op ms (tau 1e-3) | op / cuDNN | op path |")
    print("|---|---|---|---|" + "---|" * len(a.densities) + "---|---|---|")
    rows = []
    for shape in a.shapes:
        hq, hkv, d = (int(x) for x in shape.split("/"))
        shape_rows = []
        for n in a.lengths:
            r = measure(hq, hkv, d, n, a.densities, a.repeats)
            shape_rows.append(r)
            ratios = " | ".join(f"{r['total_ms'][x] / r['cudnn_ms']:.2f}" for x in a.densities)
            print(f"| {shape} | {n} | {r['cudnn_ms']:.3f} | {r['select_ms']:.3f} | {ratios} | {r['op_ms']:.3f} | "
                  f"{r['op_ms'] / r['cudnn_ms']:.2f} | {'dense' if r['op_dense'] else 'SALE'} |", flush=True)
            torch.cuda.empty_cache()
        for x in a.densities:
            print(f"break-even {shape} density {x:g}: {break_even(shape_rows, x)}")
        rows += shape_rows
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
