"""The ops under torch.compile, make_fx with symbolic shapes, meta tensors and export."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import sale_ops
from sale_ops.testing import make_qkv


class SaleAttention(torch.nn.Module):
    def forward(self, q, k, v, tau):
        out, lse, mask = torch.ops.sale.attention(q, k, v, tau, 64, 32, 128, 0.125, True, 0)
        return out * 2, lse, mask


class SaleApi(torch.nn.Module):
    def forward(self, q, k, v, tau):
        res = sale_ops.attention(q, k, v, tau, return_lse=True, return_block_mask=True)
        return res.out + 1, res.lse, res.density


@pytest.mark.parametrize("module", [SaleAttention, SaleApi])
def test_compile_fullgraph_dynamic_matches_eager(module):
    torch._dynamo.reset()
    m = module()
    compiled = torch.compile(m, fullgraph=True, dynamic=True)
    for n in (130, 257):  # two lengths: one graph with a symbolic length
        q, k, v = make_qkv(1, 4, 2, n, 64, seed=n)
        tau = torch.full((4,), 1e-3)
        for got, want in zip(compiled(q, k, v, tau), m(q, k, v, tau)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fake_functions_with_symbolic_shapes():
    q, k, v = make_qkv(1, 4, 2, 200, 64)
    tau = torch.full((4,), 1e-3)

    def f(q, k, v, tau):
        qz = torch.ops.sale.quantize(q, k, 32)
        mask = torch.ops.sale.block_mask(q, k, *qz, tau, 64, 32, 128, 0.125)
        out, lse = torch.ops.sale.block_sparse_attention(q, k, v, mask, 64, 32, 0.125, True)
        return out, lse, mask, qz

    gm = make_fx(f, tracing_mode="symbolic")(q, k, v, tau)
    shapes = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and "sale" in str(node.target):
            shapes[str(node.target)] = node.meta["val"]
    mask_val = shapes["sale.block_mask.default"]
    # sequence lengths are symbols, not the traced 200
    assert any(isinstance(s, torch.SymInt) and not s.node.is_constant() for s in mask_val.shape[2:])
    out_val = shapes["sale.block_sparse_attention.default"][0]
    assert out_val.dtype == q.dtype and out_val.dim() == 4


def test_meta_tensors():
    q = torch.empty(2, 8, 1000, 128, dtype=torch.bfloat16, device="meta")
    k = torch.empty(2, 2, 1000, 128, dtype=torch.bfloat16, device="meta")
    tau = torch.empty(8, device="meta")
    out, lse, mask = torch.ops.sale.attention(q, k, k, tau, 64, 32, 128, 0.1, True, 0)
    # the mask comes bit-packed: 32 key blocks -> one int32 word per query block
    assert out.shape == q.shape and lse.shape == (2, 8, 1000) and mask.shape == (2, 8, 16, 1)
    assert mask.dtype == torch.int32
    qz = torch.ops.sale.quantize(q, k, 64)
    assert [tuple(t.shape) for t in qz] == [(2, 8, 1000, 128), (2, 8, 1000), (2, 2, 1000, 128), (2, 2, 1000), (2, 8, 1000), (2, 2, 128)]
    assert qz[0].dtype == torch.int8 and qz[1].dtype == torch.float32


def test_export():
    q, k, v = make_qkv(1, 4, 2, 1100, 64)
    tau = torch.full((4,), 1e-3)
    # a size of 1 specialises (0/1 rule), so export for at least two of everything: query
    # blocks, key blocks and 32-block mask words (n > 1024)
    n = torch.export.Dim("n", min=1025, max=1 << 20)
    ep = torch.export.export(
        SaleAttention(), (q, k, v, tau), dynamic_shapes=({2: n}, {2: n}, {2: n}, None)
    )
    q2, k2, v2 = make_qkv(1, 4, 2, 1300, 64, seed=3)
    for got, want in zip(ep.module()(q2, k2, v2, tau), SaleAttention()(q2, k2, v2, tau)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
