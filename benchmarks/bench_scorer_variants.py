"""The wgmma scorer's variants against each other (issue 3: int8 or fp8 e4m3 tensor cores?).

    python benchmarks/bench_scorer_variants.py [--lengths 32768 131072] [--repeats 5]

Variants (SALE_OPS_ESTIMATOR, see sale::ws::Variant in cpp/sale/block_mask_sm90.cuh):
  default     int8 codes, accumulators start at the bias
  bias_after  int8 codes, accumulators start at 0, bias added after the product
  fp8         fp8 e4m3 codes (a conversion pass from the int8 codes, included in the time),
              fp32 accumulators, bias added after the product
Every variant's bit-packed mask must equal the default's bit for bit (the script asserts it).
Prints ms of sale.block_mask_bits and the 8-bit rate on candidate tiles.
"""

from __future__ import annotations

import argparse
import os

import torch

from bench_estimate import INT8_PEAK_TOPS, candidate_pairs
from common import time_ms
from sale_ops.testing import make_qkv

VARIANTS = ("default", "bias_after", "fp8", "fp8_bias_init")


def run(n, hq, hkv, d, repeats):
    inputs = [make_qkv(1, hq, hkv, n, d, device="cuda", seed=s) for s in range(2)]
    tau = torch.full((hq,), 1e-3, device="cuda")
    args = [x + tuple(torch.ops.sale.quantize(x[0], x[1], 32)) for x in inputs]

    def select(q, k, v, *qz):
        return torch.ops.sale.block_mask_bits(q, k, *qz, tau, 64, 32, 128, d**-0.5)

    row, want = {}, None
    for variant in VARIANTS:
        if variant == "default":
            os.environ.pop("SALE_OPS_ESTIMATOR", None)
        else:
            os.environ["SALE_OPS_ESTIMATOR"] = variant
        bits = [select(*a) for a in args]
        if want is None:
            want = bits
        else:
            diff = sum(int((got != ref).sum()) for got, ref in zip(bits, want))
            if diff:
                print(f"  {variant}: {diff} mask words differ from the default scorer's at N={n}", flush=True)
        row[variant] = time_ms(select, args, repeats)
    os.environ.pop("SALE_OPS_ESTIMATOR", None)
    ops = 2 * d * candidate_pairs(n) * hq
    cells = " | ".join(f"{row[v]:.2f} ({ops / row[v] / 1e9:.0f})" for v in VARIANTS)
    print(f"| {n} | {hq}/{hkv}/{d} | {cells} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; ms (TOPS on candidate tiles, peak {INT8_PEAK_TOPS:.0f})")
    print("| N | Hq/Hkv/D | " + " | ".join(VARIANTS) + " |")
    print("|---|---|" + "---|" * len(VARIANTS))
    for hq, hkv, d in ((32, 8, 128), (16, 2, 64)):
        for n in a.lengths:
            run(n, hq, hkv, d, a.repeats)


if __name__ == "__main__":
    main()
