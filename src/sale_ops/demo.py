"""SALE vs dense causal attention on one long sequence: time, block density and error.

    python -m sale_ops.demo                 # a GPU if there is one, else a small CPU run
    python -m sale_ops.demo --seq-len 32768 --tau 1e-3

On a GPU the dense baseline is cuDNN SDPA; on the CPU it is PyTorch's SDPA. Inputs come from
:func:`sale_ops.testing.make_qkv` (a few heavy keys dominate the softmax, as in long-context
attention), so the density depends on ``--tau`` and on the data, and is printed.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import sale_ops
from sale_ops.testing import make_qkv


def _timed(fn, device: torch.device, repeats: int):
    fn()  # warm-up: first-call costs stay out of the numbers
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            result = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return result, sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-len", type=int, default=None, help="default: 16384 on a GPU, 2048 on the CPU")
    p.add_argument("--dense-below", type=int, default=0,
                   help="keys below which the op computes densely (the library's default is "
                        "sale_ops.DEFAULT_DENSE_BELOW); 0, the default here, shows SALE at any length")
    p.add_argument("--heads", type=int, default=None, help="query heads (default: 32 GPU, 8 CPU)")
    p.add_argument("--kv-heads", type=int, default=None, help="kv heads (default: 8 GPU, 2 CPU)")
    p.add_argument("--head-dim", type=int, default=None, choices=[64, 128], help="default: 128 GPU, 64 CPU")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--tau", type=float, default=1e-3, help="threshold for every head")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)

    device = torch.device(a.device)
    gpu = device.type == "cuda"
    n = a.seq_len or (16384 if gpu else 2048)
    hq = a.heads or (32 if gpu else 8)
    hkv = a.kv_heads or (8 if gpu else 2)
    d = a.head_dim or (128 if gpu else 64)
    dtype = getattr(torch, a.dtype)
    q, k, v = make_qkv(1, hq, hkv, n, d, dtype=dtype, device=device)

    where = torch.cuda.get_device_name(device) if gpu else "CPU (no GPU found: small size)"
    print(f"sale_ops {sale_ops.__version__} on {where}; torch {torch.__version__}")
    print(f"shape: B=1 Hq={hq} Hkv={hkv} N={n} D={d} {a.dtype}; tau={a.tau}")
    print(f"backend: {sale_ops.backend_summary(device)}")

    def dense():
        backend = SDPBackend.CUDNN_ATTENTION if gpu else SDPBackend.MATH
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def sale():
        return sale_ops.attention(q, k, v, a.tau, dense_below=a.dense_below, return_block_mask=True)

    ref_out, t_dense = _timed(dense, device, a.repeats)
    res, t_sale = _timed(sale, device, a.repeats)
    err = (res.out.float() - ref_out.float())
    rel = float(err.norm() / ref_out.float().norm())
    density = float(res.density.mean())
    dense_name = "cuDNN SDPA" if gpu else "SDPA (math)"
    print(f"{dense_name:>12}: {t_dense:10.2f} ms")
    print(f"{'SALE':>12}: {t_sale:10.2f} ms   ({t_dense / t_sale:.2f}x dense)")
    print(f"density: {density:.3f} of causal blocks kept; error vs dense: max |Δ| {float(err.abs().max()):.3e}, "
          f"relative L2 {rel:.3e}")


if __name__ == "__main__":
    main()
