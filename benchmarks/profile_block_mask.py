"""Per-kernel GPU time of sale.quantize + sale.block_mask at one length (torch.profiler), and a
single call for ncu:

    python benchmarks/profile_block_mask.py 32768            # kernel table
    ncu --kernel-name regex:candidate python benchmarks/profile_block_mask.py 16384 --ncu
"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import sale_ops  # noqa: F401
from sale_ops.testing import make_qkv

n = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
q, k, _ = make_qkv(1, 32, 8, n, 128, device="cuda")
tau = torch.full((32,), 1e-3, device="cuda")


def step():
    qz = torch.ops.sale.quantize(q, k, 32)
    return torch.ops.sale.block_mask(q, k, *qz, tau, 64, 32, 128, 128**-0.5)


for _ in range(2):
    step()
torch.cuda.synchronize()
if "--ncu" not in sys.argv:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"N={n}, Hq 32, Hkv 8, D 128, bf16; 5 calls")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
