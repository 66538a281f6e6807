"""Memory bandwidth of torch.ops.sale.quantize (SPEC §2) on a GPU, next to cuDNN dense causal
attention in the same process.

    python benchmarks/bench_quantize.py            # N = 8K, 32K, 128K
    python benchmarks/bench_quantize.py --quick    # N = 8K, 32K, fewer repeats

Bytes counted: q and k read twice (the mean pass, then the quantize pass); int8 codes, fp32
scales, qk_bias and k_mean written. Each timing runs the op once per input set over enough sets
to exceed 4x the L2 cache, so no read is served from L2; the median over the repeats is printed.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import math

import torch

import sale_ops
from common import cudnn_causal, time_ms

COPY_BW = 3.0e12  # bytes/s: measured device-to-device copy on an H100 SXM


def bytes_moved(b, hq, hkv, n, d, elem=2):
    q, k = b * hq * n * d, b * hkv * n * d
    reads = 2 * (q + k) * elem
    writes = q + k + 4 * (b * hq * n + b * hkv * n + b * hq * n + b * hkv * d)
    return reads + writes


def quantize(q, k, v):
    return torch.ops.sale.quantize(q, k, 32)


def inputs(hq, hkv, n, d, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(
        torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for h in (hq, hkv, hkv)
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N = 8K, 32K and 20 repeats")
    p.add_argument("--repeats", type=int, default=None, help="timings per measurement (default 50, quick 20)")
    p.add_argument("--no-sdpa", action="store_true", help="skip the cuDNN baseline")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_quantize: needs a CUDA GPU")
    repeats = a.repeats or (20 if a.quick else 50)
    lengths = [8192, 32768] if a.quick else [8192, 32768, 131072]
    shapes = [(32, 8, 128), (16, 2, 64)]
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)

    print(f"sale.quantize on {props.name}; torch {torch.__version__}; sale_ops {sale_ops.__version__}")
    print(f"backend: {sale_ops.backend_summary('cuda')}")
    print(f"bf16, B=1, bk=32; median of {repeats}; % of {COPY_BW / 1e12:.1f} TB/s (copy bandwidth)\n")
    print("| Hq | Hkv | D | N | quantize ms | bytes moved | GB/s | % of copy BW | cuDNN causal ms | quantize / cuDNN |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for hq, hkv, d in shapes:
        for n in lengths:
            set_bytes = (hq + 2 * hkv) * n * d * 2
            n_sets = max(3, math.ceil(4 * l2 / set_bytes))
            sets = [inputs(hq, hkv, n, d, s) for s in range(n_sets)]
            t = time_ms(quantize, sets, repeats)
            moved = bytes_moved(1, hq, hkv, n, d)
            gbs = moved / (t * 1e-3) / 1e9
            if a.no_sdpa:
                t_sdpa = ratio = "-"
            else:
                ms = time_ms(cudnn_causal, sets[:3], max(5, repeats // 4))
                t_sdpa, ratio = f"{ms:.3f}", f"{t / ms:.4f}"
            print(
                f"| {hq} | {hkv} | {d} | {n} | {t:.4f} | {moved / 1e6:.1f} MB | {gbs:.0f} | "
                f"{100 * gbs * 1e9 / COPY_BW:.1f}% | {t_sdpa} | {ratio} |",
                flush=True,
            )
            del sets
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
