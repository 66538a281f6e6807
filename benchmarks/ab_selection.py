"""Time sale.select (all heads, one call) for an A/B of two builds of _C.so, and print a checksum of
the mask so that the builds can be checked to select the same blocks. Run it once per build, in
alternation, on the same machine:

    PYTHONPATH=build_a python benchmarks/ab_selection.py 32768 131072
    PYTHONPATH=build_b python benchmarks/ab_selection.py 32768 131072

Llama-3.1-8B shapes (Hq 32, Hkv 8, D 128) unless --shape says otherwise; bf16, tau 1e-3, inputs from
sale_ops.testing.make_qkv. Prints one line per length: median and min of the per-call times (CUDA
events around each call) and the mask's popcount and checksum.
"""
import argparse
import statistics

import torch

import sale_ops  # noqa: F401  (registers the ops)
from sale_ops.testing import make_qkv


def mask_checksum(bits: torch.Tensor) -> tuple[int, int]:
    """(kept blocks, a position-weighted checksum) of a bit-packed mask: equal masks give equal pairs."""
    words = bits.to(torch.int64) & 0xFFFFFFFF
    popcount = sum(int(((words >> i) & 1).sum()) for i in range(32))
    weights = torch.arange(1, words.numel() + 1, device=words.device, dtype=torch.int64) % 1000003
    return popcount, int((words.flatten() % 1000003 * weights).sum() % (2**61 - 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lengths", type=int, nargs="*", default=[32768])
    ap.add_argument("--shape", default="32/8/128", help="Hq/Hkv/D")
    ap.add_argument("--tau", type=float, default=1e-3)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    hq, hkv, d = (int(x) for x in args.shape.split("/"))
    for n in args.lengths:
        q, k, _ = make_qkv(1, hq, hkv, n, d, device="cuda")
        tau = torch.full((hq,), args.tau, device="cuda")

        def call():
            return torch.ops.sale.select(q, k, tau, 64, 32, 128, d**-0.5)

        mask = call()
        call()
        times = []
        for _ in range(args.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        kept, check = mask_checksum(mask)
        print(f"N={n} shape={args.shape} tau={args.tau}: select median {statistics.median(times):.3f} ms, "
              f"min {min(times):.3f} ms ({args.repeats} calls); mask kept={kept} checksum={check}", flush=True)
        del q, k, mask
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
