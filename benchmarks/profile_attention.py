"""A few sale.block_sparse_attention calls at one length and density, for ncu:

    bash benchmarks/ncu_stalls.sh block_sparse -- python3 benchmarks/profile_attention.py 16384 0.25
"""
import sys

import torch

import sale_ops
from sale_ops import reference as ref
from sale_ops.testing import make_qkv

n = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
density = float(sys.argv[2]) if len(sys.argv) > 2 else 0.25
q, k, v = make_qkv(1, 32, 8, n, 128, device="cuda")
nQ, nK = -(-n // 64), -(-n // 32)
causal = ref.causal_blocks(n, n, 64, 32, "cuda")
mask = (torch.rand(1, 32, nQ, nK, device="cuda") < density) & causal
mask |= ref.dense_blocks(n, n, 64, 32, 128, "cuda") & causal
for _ in range(3):
    sale_ops.block_sparse_attention(q, k, v, mask)
torch.cuda.synchronize()
