"""Variable-length (packed) SALE against the same sequences one call each, and against cuDNN dense
causal attention per sequence, in the same process (issue 5: varlen speed and memory).

    python benchmarks/bench_varlen.py
    python benchmarks/bench_varlen.py --mixes 32768,4096,4096,4096 16384,16384

Each mix is a batch of sequences (lengths comma-separated), bf16, Hq 32 / Hkv 8 / D 128, inputs from
sale_ops.testing.make_qkv per sequence, packed into [total, H, D] for sale_ops.attention_varlen.
Columns: the packed call; sale_ops.attention on each sequence in turn (the same work, one launch
chain per sequence); cuDNN per sequence; the mean block density of the packed call; its peak
extra memory over the bytes of the packed q + k + v (the varlen mask and selection buffers are
sized B x the longest sequence, so skewed mixes cost more). dense_below is the library default
unless --dense-below is given.
"""

from __future__ import annotations

import argparse

import torch

import sale_ops
from bench_pipeline import extra_memory
from common import cudnn_causal, time_ms
from sale_ops.testing import make_qkv


def pack(tensors):
    """[1, H, N_b, D] per sequence -> [sum N_b, H, D] contiguous."""
    return torch.cat([t[0].transpose(0, 1) for t in tensors]).contiguous()


def run_mix(lengths, tau, dense_below, repeats):
    hq, hkv, d = 32, 8, 128
    seqs = [make_qkv(1, hq, hkv, n, d, device="cuda", seed=i) for i, n in enumerate(lengths)]
    q, k, v = (pack([s[j] for s in seqs]) for j in range(3))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    longest = max(lengths)
    kw = {} if dense_below is None else {"dense_below": dense_below}

    def packed():
        return sale_ops.attention_varlen(q, k, v, cu, cu, longest, longest, tau, **kw)

    def one_by_one():
        return [sale_ops.attention(*s, tau, **kw) for s in seqs]

    def cudnn():
        return [cudnn_causal(*s) for s in seqs]

    res = sale_ops.attention_varlen(q, k, v, cu, cu, longest, longest, tau, return_block_mask=True, packed_mask=True,
                                    **kw)
    density = float(res.density.mean())
    # Agreement with each sequence alone (the varlen contract), checked on the timed inputs.
    starts = cu.tolist()
    for b, o in enumerate(one_by_one()):
        assert torch.equal(res.out[starts[b]:starts[b + 1]], o[0].transpose(0, 1)), f"sequence {b} differs"
    del res
    t_packed = time_ms(packed, repeats=repeats)
    t_loop = time_ms(one_by_one, repeats=repeats)
    t_cudnn = time_ms(cudnn, repeats=repeats)
    mem = extra_memory(packed, q, k, v)
    return dict(lengths=lengths, density=density, packed_ms=t_packed, loop_ms=t_loop, cudnn_ms=t_cudnn, extra_mem=mem)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixes", nargs="+",
                   default=["16384,16384,16384,16384", "8192,16384,24576,32768", "32768,4096,4096,4096,2048,1024",
                            "65536,8192,8192"])
    p.add_argument("--tau", type=float, default=1e-3)
    p.add_argument("--dense-below", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    below = sale_ops.functional.DEFAULT_DENSE_BELOW if a.dense_below is None else a.dense_below
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; bf16, Hq 32 / Hkv 8 / D 128, tau {a.tau}, "
          f"dense_below {below}\n")
    print("| lengths | total | density | packed ms | one call per sequence ms | cuDNN per sequence ms | "
          "packed / per-sequence | cuDNN / packed | extra mem / qkv |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mix in a.mixes:
        lengths = [int(x) for x in mix.split(",")]
        r = run_mix(lengths, a.tau, a.dense_below, a.repeats)
        print(f"| {mix} | {sum(lengths)} | {r['density']:.3f} | {r['packed_ms']:.2f} | {r['loop_ms']:.2f} | "
              f"{r['cudnn_ms']:.2f} | {r['packed_ms'] / r['loop_ms']:.2f} | {r['cudnn_ms'] / r['packed_ms']:.2f} | "
              f"{r['extra_mem']:.3f} |", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
