"""One sale.block_sparse_attention call inside a CUDA profiler range, for Nsight Compute:

    ncu --profile-from-start off --section SpeedOfLight ... python benchmarks/ncu_attention.py --n 32768 --density 0.1

Shapes and masks as in bench_attention.py (Llama-3.1-8B: Hq 32, Hkv 8, D 128, bf16; random kept
blocks plus sink and diagonal). Two warm-up calls run outside the range.
"""

from __future__ import annotations

import argparse

import torch

from bench_attention import BQ, random_mask


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=32768)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--bk", type=int, default=32)
    a = p.parse_args()
    hq, hkv, d = 32, 8, 128
    g = torch.Generator(device="cuda").manual_seed(a.n)
    q, k, v = (torch.randn(1, h, a.n, d, device="cuda", dtype=torch.bfloat16, generator=g) for h in (hq, hkv, hkv))
    mask = random_mask(hq, a.n, a.bk, a.density, seed=a.n)
    call = lambda: torch.ops.sale.block_sparse_attention(q, k, v, mask, BQ, a.bk, d**-0.5, True)  # noqa: E731
    for _ in range(2):
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
