"""The ops on a CUDA GPU against the CPU reference (SPEC §7), opcheck, compile, graphs, streams.

Whatever serves an op on CUDA (the reference stand-in today, the kernels later) must pass these.
"""

import pytest
import torch

import sale_ops
from sale_ops.testing import (
    assert_attention_close,
    assert_block_mask_agrees,
    assert_quantization_agrees,
    make_qkv,
)

pytestmark = pytest.mark.gpu

GRID = [
    # (n, hq, hkv, d)
    (1, 4, 4, 64),
    (63, 3, 1, 128),
    (1025, 8, 2, 64),
    (1025, 7, 1, 128),
    (4097, 12, 4, 128),
    (4097, 9, 3, 64),
]


@pytest.mark.parametrize("n,hq,hkv,d", GRID)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_pipeline_agrees_with_cpu_reference(n, hq, hkv, d, dtype):
    q, k, v = make_qkv(1, hq, hkv, n, d, dtype=dtype, device="cuda", seed=n + hq)
    tau = torch.linspace(0, 3e-2, hq, device="cuda")
    qz = sale_ops.quantize(q, k)
    assert_quantization_agrees(qz, q, k)
    res = sale_ops.attention(q, k, v, tau, return_lse=True, return_block_mask=True)
    qc, kc, vc = q.cpu(), k.cpu(), v.cpu()
    qz_cpu = sale_ops.reference.quantize(qc, kc)
    assert_block_mask_agrees(res.block_mask.cpu(), qc, kc, qz_cpu, tau.cpu())
    assert_attention_close(res.out.cpu(), res.lse.cpu(), qc, kc, vc, res.block_mask.cpu())


@pytest.mark.parametrize("causal", [True, False])
def test_cuda_block_sparse_random_masks(causal):
    q, k, v = make_qkv(2, 4, 2, 700, 128, kv_len=900, dtype=torch.bfloat16, device="cuda")
    for density in (0.05, 0.3, 1.0):
        mask = torch.rand(2, 4, 11, 29, device="cuda") < density
        mask[..., 0] = True
        out, lse = sale_ops.block_sparse_attention(q, k, v, mask, causal=causal, return_lse=True)
        assert_attention_close(out.cpu(), lse.cpu(), q.cpu(), k.cpu(), v.cpu(), mask.cpu(), causal=causal)


def test_cuda_opcheck():
    from test_ops import op_samples

    for name, args in op_samples("cuda"):
        torch.library.opcheck(getattr(torch.ops.sale, name).default, args)


def test_cuda_compile_fullgraph_dynamic():
    torch._dynamo.reset()

    def f(q, k, v, tau):
        res = sale_ops.attention(q, k, v, tau, return_lse=True, return_block_mask=True)
        return res.out, res.lse, res.density

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for n in (1000, 2100):
        q, k, v = make_qkv(1, 8, 2, n, 128, device="cuda", seed=n)
        tau = torch.full((8,), 1e-3, device="cuda")
        for got, want in zip(compiled(q, k, v, tau), f(q, k, v, tau)):
            torch.testing.assert_close(got, want)


def test_cuda_graph_capture_and_replay():
    q, k, v = make_qkv(1, 8, 2, 1500, 128, device="cuda")
    tau = torch.full((8,), 1e-3, device="cuda")
    sale_ops.attention(q, k, v, tau)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        sale_ops.attention(q, k, v, tau)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        out = sale_ops.attention(q, k, v, tau)
    q2, k2, v2 = make_qkv(1, 8, 2, 1500, 128, device="cuda", seed=7)
    q.copy_(q2), k.copy_(k2), v.copy_(v2)
    graph.replay()
    torch.testing.assert_close(out, sale_ops.attention(q2, k2, v2, tau))


def test_cuda_side_stream():
    q, k, v = make_qkv(1, 4, 2, 800, 64, device="cuda")
    want = sale_ops.attention(q, k, v, 1e-3)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = sale_ops.attention(q, k, v, 1e-3)
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_cuda_bad_thresholds_checked_in_eager():
    q, k, v = make_qkv(1, 4, 2, 100, 64, device="cuda")
    with pytest.raises(ValueError, match="finite and >= 0"):
        sale_ops.attention(q, k, v, torch.tensor([0.1, float("nan"), 0.1, 0.1], device="cuda"))


def test_cuda_compile_reduce_overhead_matches_eager():
    # mode="reduce-overhead" records CUDA graphs: the whole pipeline must be capturable (no host
    # sync, no data-dependent allocation), across lengths on both sides of dense_below.
    torch._dynamo.reset()

    def f(q, k, v, tau):
        res = sale_ops.attention(q, k, v, tau, dense_below=1800, return_lse=True, return_block_mask=True)
        return res.out * 1, res.lse, res.density

    compiled = torch.compile(f, mode="reduce-overhead", fullgraph=True, dynamic=False)
    for n in (1500, 2100, 2100):  # 1500: dense path; 2100 twice: the second call replays the graph
        q, k, v = make_qkv(1, 8, 2, n, 128, device="cuda", seed=n)
        tau = torch.full((8,), 1e-2, device="cuda")
        want = f(q, k, v, tau)
        for _ in range(3):
            got = [t.clone() for t in compiled(q, k, v, tau)]
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
        torch.testing.assert_close(got[2], want[2])  # density: a float reduction inductor may reorder


def test_cuda_export_matches_eager():
    from test_compile import SaleAttention

    q, k, v = make_qkv(1, 4, 2, 1100, 128, device="cuda")
    tau = torch.full((4,), 1e-3, device="cuda")
    n = torch.export.Dim("n", min=1025, max=1 << 20)
    ep = torch.export.export(SaleAttention(), (q, k, v, tau), dynamic_shapes=({2: n}, {2: n}, {2: n}, None))
    q2, k2, v2 = make_qkv(1, 4, 2, 3000, 128, device="cuda", seed=3)
    for got, want in zip(ep.module()(q2, k2, v2, tau), SaleAttention()(q2, k2, v2, tau)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
