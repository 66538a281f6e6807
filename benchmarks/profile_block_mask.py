"""One sale.block_mask call at a given length, for ncu (see benchmarks/RESULTS.md for the command)."""
import sys

import torch

import sale_ops
from sale_ops.testing import make_qkv

n = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
q, k, _ = make_qkv(1, 32, 8, n, 128, device="cuda")
tau = torch.full((32,), 1e-3, device="cuda")
qz = torch.ops.sale.quantize(q, k, 32)
for _ in range(2):
    torch.ops.sale.block_mask(q, k, *qz, tau, 64, 32, 128, 128**-0.5)
torch.cuda.synchronize()
