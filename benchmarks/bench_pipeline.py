"""End-to-end SALE (quantize + select + compute: sale_ops.attention) against dense causal attention
on cuDNN and on the FLASH SDPA backend, in the same process (issue 5's benchmark).

    python benchmarks/bench_pipeline.py                      # N = 4K ... 128K, both shapes
    python benchmarks/bench_pipeline.py --lengths 4096 32768 --json out.json

Inputs: sale_ops.testing.make_qkv (a few heavy keys dominate the softmax), bf16, B 1, at fixed
thresholds; the density each threshold produced is printed. Also SALE with tau = 0 (every causal
block kept: the exact dense path through the same kernels) and the peak extra memory of a SALE
call (peak allocation during the call minus inputs and output) over the bytes of q + k + v.
Prints a markdown table; --json writes the rows for benchmarks/plot_pipeline.py.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import sale_ops
from sale_ops import _pipeline
from common import cudnn_causal, time_ms
from sale_ops.testing import make_qkv


def flash_causal(q, k, v):
    """The FLASH SDPA backend (GQA through enable_gqa)."""
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def extra_memory(fn, q, k, v):
    """Peak bytes a call allocates beyond its inputs and its output, over the bytes of q + k + v."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size()
    qkv = sum(t.numel() * t.element_size() for t in (q, k, v))
    return peak / qkv


def measure(hq, hkv, d, n, taus, repeats):
    """The rows of one shape and length (one per threshold)."""
    q, k, v = make_qkv(1, hq, hkv, n, d, device="cuda", seed=n)
    t_cudnn = time_ms(cudnn_causal, [(q, k, v)], repeats)
    t_flash = time_ms(flash_causal, [(q, k, v)], repeats)
    t_exact = time_ms(lambda: sale_ops.attention(q, k, v, 0.0), repeats=repeats)
    rows = []
    for tau in taus:
        density = float(sale_ops.attention(q, k, v, tau, return_block_mask=True).density.mean())
        t_sale = time_ms(lambda: sale_ops.attention(q, k, v, tau), repeats=repeats)
        mem = extra_memory(lambda: sale_ops.attention(q, k, v, tau), q, k, v)
        rows.append(dict(hq=hq, hkv=hkv, d=d, n=n, cudnn_ms=t_cudnn, flash_ms=t_flash, exact_ms=t_exact, tau=tau,
                         density=density, sale_ms=t_sale, extra_mem=mem))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    p.add_argument("--taus", type=float, nargs="+", default=[1e-3, 1e-1, 0.5])
    p.add_argument("--shapes", nargs="+", default=["32/8/128", "16/2/64"], help="Hq/Hkv/D")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--two-op-selection", action="store_true",
                   help="select through sale.quantize + sale.block_mask_bits instead of sale.select "
                        "(sale_ops._pipeline.FUSED_SELECTION off)")
    a = p.parse_args()
    _pipeline.FUSED_SELECTION = not a.two_op_selection
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {sale_ops.backend_summary('cuda')}")
    print("bf16, B=1, bq 64, bk 32, W 128; inputs sale_ops.testing.make_qkv; SALE = sale_ops.attention\n")
    print("| Hq/Hkv/D | N | cuDNN ms | FLASH ms | SALE tau=0 ms | tau | density | SALE ms | cuDNN / SALE | FLASH / SALE | extra mem / qkv |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for shape in a.shapes:
        hq, hkv, d = (int(x) for x in shape.split("/"))
        for n in a.lengths:
            for r in measure(hq, hkv, d, n, a.taus, a.repeats):
                rows.append(r)
                print(
                    f"| {shape} | {n} | {r['cudnn_ms']:.2f} | {r['flash_ms']:.2f} | {r['exact_ms']:.2f} | {r['tau']:g} | "
                    f"{r['density']:.3f} | {r['sale_ms']:.2f} | {r['cudnn_ms'] / r['sale_ms']:.2f} | "
                    f"{r['flash_ms'] / r['sale_ms']:.2f} | {r['extra_mem']:.3f} |",
                    flush=True,
                )
            torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
