"""Variable-length (packed) batches on the CUDA kernels: each sequence of a packed batch must give
what sale_ops.attention gives on it alone (masks exactly; outputs within SPEC §7 of the reference
and within one input-dtype rounding of the batched run), plus opcheck, compile and graphs."""

import pytest
import torch

import sale_ops
from sale_ops import reference as ref
from sale_ops.testing import assert_attention_close, assert_block_mask_agrees
from test_varlen import make_batch, seq_part, varlen_op_samples

import os

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(os.environ.get("SALE_OPS_FORCE_SM8X") == "1",
                       reason="packed batches have Hopper kernels only (test_varlen_refused_on_sm8x)"),
]

LENGTHS = [
    # (q lengths, k lengths or None for the same)
    ([1, 63, 1025, 4097], None),
    ([257, 64, 3000], None),
    ([1, 100, 700, 64], [40, 1500, 700, 2000]),  # chunked prefill: the queries are the last rows
]
HEADS = [(4, 4, 64), (9, 3, 128), (8, 2, 64), (12, 3, 128)]  # GQA groups 1, 3, 4, 4


def run_both(seqs, packed, tau, max_q, max_k, **kw):
    q, k, v, cu_q, cu_k = packed
    res = sale_ops.attention_varlen(
        q, k, v, cu_q, cu_k, max_q, max_k, tau, return_lse=True, return_block_mask=True, **kw
    )
    alone = [sale_ops.attention(*s, tau, return_lse=True, return_block_mask=True, **kw) for s in seqs]
    return res, alone


def check_against_alone(res, alone, cu_q, bits_exact=True):
    for b, a in enumerate(alone):
        mq, mk = a.block_mask.shape[-2:]
        assert torch.equal(res.block_mask[b, :, :mq, :mk], a.block_mask[0]), f"sequence {b}: masks differ"
        assert not res.block_mask[b, :, mq:].any() and not res.block_mask[b, :, :, mk:].any(), f"sequence {b}"
        got = seq_part(res.out, cu_q, b)
        # Same kernels on the same rows: equal up to (at most) one rounding of the input dtype.
        torch.testing.assert_close(got.float(), a.out.float(), rtol=1e-2, atol=8e-3)
        q0, q1 = int(cu_q[b]), int(cu_q[b + 1])
        torch.testing.assert_close(res.lse[:, q0:q1], a.lse[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(res.density[b], a.density[0])


@pytest.mark.parametrize("q_lens,k_lens", LENGTHS)
@pytest.mark.parametrize("hq,hkv,d", HEADS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_varlen_equals_each_sequence_alone(q_lens, k_lens, hq, hkv, d, dtype):
    seqs, packed = make_batch(q_lens, k_lens, hq, hkv, d, dtype=dtype, device="cuda", seed=hq + d)
    packed = (*packed[:3], packed[3].cuda(), packed[4].cuda())
    tau = torch.logspace(-4, -1.5, hq, device="cuda")
    res, alone = run_both(seqs, packed, tau, max(q_lens), max(k_lens or q_lens))
    assert res.out.shape == packed[0].shape and res.lse.shape == (hq, packed[0].shape[0])
    check_against_alone(res, alone, packed[3])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_varlen_agrees_with_cpu_reference(dtype):
    """SPEC §7 directly against the reference, sequence by sequence."""
    q_lens, k_lens = [300, 1, 1100], [300, 64, 1500]
    seqs, packed = make_batch(q_lens, k_lens, 6, 2, 128, dtype=dtype, device="cuda", seed=1)
    q, k, v, cu_q, cu_k = packed
    tau = torch.linspace(0, 2e-2, 6)
    res = sale_ops.attention_varlen(
        q, k, v, cu_q.cuda(), cu_k.cuda(), 1100, 1500, tau, return_lse=True, return_block_mask=True
    )
    for b, (qs, ks, vs) in enumerate(seqs):
        qc, kc, vc = qs.cpu(), ks.cpu(), vs.cpu()
        mask = res.block_mask[b : b + 1, :, : -(-q_lens[b] // 64), : -(-k_lens[b] // 32)].cpu()
        assert_block_mask_agrees(mask, qc, kc, ref.quantize(qc, kc), tau)
        lse = res.lse[:, int(cu_q[b]) : int(cu_q[b + 1])].unsqueeze(0).cpu()
        assert_attention_close(seq_part(res.out, cu_q, b).cpu(), lse, qc, kc, vc, mask)


@pytest.mark.parametrize(
    "estimator,attention", [("mma", "mma"), ("wgmma", "fast"), ("mma", "wgmma")]
)
def test_cuda_varlen_kernel_variants(monkeypatch, estimator, attention):
    """The mma.sync scorer / attention kernel and the fast-P mode take the varlen path too."""
    monkeypatch.setenv("SALE_OPS_ESTIMATOR", estimator)
    monkeypatch.setenv("SALE_OPS_ATTENTION", attention)
    seqs, packed = make_batch([1, 63, 1025, 2000], [1, 500, 1025, 2000], 8, 2, 128, device="cuda", seed=4)
    packed = (*packed[:3], packed[3].cuda(), packed[4].cuda())
    tau = torch.logspace(-4, -1.5, 8, device="cuda")
    res, alone = run_both(seqs, packed, tau, 2000, 2000, bk=64 if estimator == "mma" else 32)
    check_against_alone(res, alone, packed[3])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("packed_mask", [True, False])
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 128), (torch.float16, 64), (torch.float16, 128)])
def test_cuda_block_sparse_varlen_random_masks(causal, packed_mask, dtype, d):
    q_lens, k_lens = [700, 1, 130], [900, 1, 130]
    seqs, (q, k, v, cu_q, cu_k) = make_batch(q_lens, k_lens, 4, 2, d, dtype=dtype, device="cuda", seed=9)
    cu_q, cu_k = cu_q.cuda(), cu_k.cuda()
    mask = torch.rand(3, 4, 11, 29, device="cuda") < 0.3
    mask[..., 0] = True
    arg = sale_ops.pack_block_mask(mask) if packed_mask else mask
    out, lse = torch.ops.sale.block_sparse_attention_varlen(q, k, v, cu_q, cu_k, 700, 900, arg, 64, 32, 0.1, causal)
    for b, (qs, ks, vs) in enumerate(seqs):
        mb = mask[b : b + 1, :, : -(-q_lens[b] // 64), : -(-k_lens[b] // 32)].contiguous()
        o, l = sale_ops.block_sparse_attention(qs, ks, vs, mb, scale=0.1, causal=causal, return_lse=True)
        torch.testing.assert_close(seq_part(out, cu_q, b), o, rtol=0, atol=0)
        torch.testing.assert_close(lse[:, int(cu_q[b]) : int(cu_q[b + 1])], l[0], rtol=0, atol=0)


def test_cuda_varlen_empty_sequence_and_dense_below():
    seqs, packed = make_batch([100, 0, 150, 1400], [130, 0, 150, 1400], 4, 2, 64, device="cuda", seed=11)
    q, k, v, cu_q, cu_k = packed
    cu_q, cu_k = cu_q.cuda(), cu_k.cuda()
    tau = torch.full((4,), 2e-2, device="cuda")
    res = sale_ops.attention_varlen(
        q, k, v, cu_q, cu_k, 1400, 1400, tau, dense_below=200, return_lse=True, return_block_mask=True
    )
    assert not res.block_mask[1].any()
    causal = ref.varlen_causal_blocks(cu_q, cu_k, 1400, 1400, 64, 32)
    assert torch.equal(res.block_mask[0], causal[0].expand(4, -1, -1))
    present = [0, 2, 3]
    alone = [sale_ops.attention(*seqs[b], tau, dense_below=200, return_lse=True, return_block_mask=True) for b in present]
    sub = res._replace(block_mask=res.block_mask[present], density=res.density[present])
    check_against_alone(sub, alone, torch.tensor([0, 100, 250, 1650], dtype=torch.int32))


@pytest.mark.parametrize("share", [0.0, 0.05])
def test_cuda_varlen_selection_in_head_steps(monkeypatch, share):
    """Head steps hand the kernels strided views of the packed tensors; the mask must not change."""
    from sale_ops import _pipeline

    _, (q, k, v, cu_q, cu_k) = make_batch([300, 1500, 64], hq=8, hkv=2, d=128, device="cuda", seed=5)
    cu_q, cu_k = cu_q.cuda(), cu_k.cuda()
    tau = torch.logspace(-4, -1, 8, device="cuda")
    want = _pipeline.select_blocks_varlen(q, k, v, cu_q, cu_k, 1500, 1500, tau, 64, 32, 128, 0.125, 0)
    monkeypatch.setattr(_pipeline, "SELECTION_MEMORY_SHARE", share)
    assert _pipeline.selection_steps_varlen(q, k, v, 3, 1500, 1500, 64, 32) != (2, 4)
    got = _pipeline.select_blocks_varlen(q, k, v, cu_q, cu_k, 1500, 1500, tau, 64, 32, 128, 0.125, 0)
    assert torch.equal(got, want)


def test_cuda_varlen_opcheck():
    for name, args in varlen_op_samples("cuda"):
        torch.library.opcheck(getattr(torch.ops.sale, name).default, args)


def test_cuda_varlen_compile_fullgraph_and_graph_replay():
    torch._dynamo.reset()

    def f(q, k, v, cu_q, cu_k, tau):
        # The packed mask: with the bool view and density, inductor in torch 2.11 hits an internal
        # assertion while tiling the dynamic-shape reduction (tiling_utils.get_pw_red_splits; torch
        # 2.14 compiles it, tests/test_varlen.py on CPU); the ops themselves trace either way.
        res = sale_ops.attention_varlen(q, k, v, cu_q, cu_k, 1500, 1500, tau, return_lse=True, return_block_mask=True,
                                        packed_mask=True)
        return res.out, res.lse, res.block_mask

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    tau = torch.full((8,), 1e-3, device="cuda")
    for q_lens in ([1000, 1500], [1, 700, 1500, 33]):
        _, (q, k, v, cu_q, cu_k) = make_batch(q_lens, hq=8, hkv=2, d=128, device="cuda", seed=len(q_lens))
        args = (q, k, v, cu_q.cuda(), cu_k.cuda(), tau)
        for got, want in zip(compiled(*args), f(*args)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)

    # CUDA graph: captured once, replayed on new values of the same shapes (new lengths too)
    _, (q, k, v, cu_q, cu_k) = make_batch([500, 1000], hq=8, hkv=2, d=128, device="cuda", seed=1)
    cu_q, cu_k = cu_q.cuda(), cu_k.cuda()
    run = lambda: sale_ops.attention_varlen(q, k, v, cu_q, cu_k, 1500, 1500, tau)  # noqa: E731
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    _, (q2, k2, v2, cu_q2, cu_k2) = make_batch([1200, 300], hq=8, hkv=2, d=128, device="cuda", seed=2)
    q.copy_(q2), k.copy_(k2), v.copy_(v2), cu_q.copy_(cu_q2), cu_k.copy_(cu_k2)
    graph.replay()
    torch.testing.assert_close(out, sale_ops.attention_varlen(q2, k2, v2, cu_q2.cuda(), cu_k2.cuda(), 1500, 1500, tau))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_block_sparse_varlen_equal_chunks(dtype, d):
    # The ctest case where the packed wgmma path differed from the batched one (fp16, D 64, bk 32,
    # three chunks of 100 queries after 30 cached keys): bitwise equal to each sequence alone.
    q_lens, k_lens = [100, 100, 100], [130, 130, 130]
    seqs, (q, k, v, cu_q, cu_k) = make_batch(q_lens, k_lens, 1, 1, d, dtype=dtype, device="cuda", seed=5)
    cu_q, cu_k = cu_q.cuda(), cu_k.cuda()
    mask = torch.ones(3, 1, 2, 5, dtype=torch.bool, device="cuda")
    sparse = torch.rand(3, 1, 2, 5, generator=torch.Generator().manual_seed(1)).cuda() < 0.4
    sparse[..., 0] = True
    for mask in (mask, sparse):
        out, lse = torch.ops.sale.block_sparse_attention_varlen(q, k, v, cu_q, cu_k, 100, 130, mask, 64, 32, 0.125, True)
        for b, (qs, ks, vs) in enumerate(seqs):
            o, l = sale_ops.block_sparse_attention(qs, ks, vs, mask[b : b + 1], scale=0.125, return_lse=True)
            torch.testing.assert_close(seq_part(out, cu_q, b), o, rtol=0, atol=0)
            torch.testing.assert_close(lse[:, int(cu_q[b]) : int(cu_q[b + 1])], l[0], rtol=0, atol=0)
