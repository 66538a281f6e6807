"""Variable-length (packed) batches: sale.attention_varlen and its step ops on the CPU.

The contract: every sequence of a packed batch gives what sale_ops.attention gives on that sequence
alone (its own means, masks and bottom-right causal alignment). GPU tests: test_varlen_cuda.py.
"""

import pytest
import torch

import sale_ops
from sale_ops import reference as ref
from sale_ops.testing import make_qkv


def pack(seqs):
    """[(q, k, v)] of batched [1, H, n, D] tensors -> packed q, k, v [total, H, D] and int32 offsets."""
    q = torch.cat([s[0][0].transpose(0, 1) for s in seqs])
    k = torch.cat([s[1][0].transpose(0, 1) for s in seqs])
    v = torch.cat([s[2][0].transpose(0, 1) for s in seqs])

    def offsets(lengths):
        return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)

    cu_q = offsets([s[0].shape[2] for s in seqs])
    cu_k = offsets([s[1].shape[2] for s in seqs])
    return q, k, v, cu_q, cu_k


def make_batch(q_lens, k_lens=None, hq=4, hkv=2, d=64, dtype=torch.bfloat16, device="cpu", seed=0):
    k_lens = q_lens if k_lens is None else k_lens
    seqs = [
        make_qkv(1, hq, hkv, nq, d, kv_len=nk, dtype=dtype, device=device, seed=seed + i)
        for i, (nq, nk) in enumerate(zip(q_lens, k_lens))
    ]
    return seqs, pack(seqs)


def seq_part(x, cu, b):
    """Rows of sequence b of a packed [total, H, D] tensor as batched [1, H, n, D]."""
    return x[int(cu[b]) : int(cu[b + 1])].transpose(0, 1).unsqueeze(0)


def assert_equals_each_sequence_alone(res, seqs, tau, cu_q, max_q, max_k, bq=64, bk=32, **kw):
    nQ, nK = -(-max_q // bq), -(-max_k // bk)
    assert res.block_mask.shape == (len(seqs), tau.shape[0], nQ, nK)
    for b, (q, k, v) in enumerate(seqs):
        alone = sale_ops.attention(q, k, v, tau, bq=bq, bk=bk, return_lse=True, return_block_mask=True, **kw)
        mq, mk = alone.block_mask.shape[-2:]
        assert torch.equal(res.block_mask[b, :, :mq, :mk], alone.block_mask[0]), f"sequence {b}"
        assert not res.block_mask[b, :, mq:].any() and not res.block_mask[b, :, :, mk:].any()
        assert torch.equal(seq_part(res.out, cu_q, b), alone.out), f"sequence {b}"
        q0, q1 = int(cu_q[b]), int(cu_q[b + 1])
        assert torch.equal(res.lse[:, q0:q1], alone.lse[0]), f"sequence {b}"
        torch.testing.assert_close(res.density[b], alone.density[0])


@pytest.mark.parametrize(
    "q_lens,k_lens",
    [
        ([1, 63, 130, 257], None),
        ([257, 64, 300], None),
        ([1, 40, 100], [1, 170, 300]),  # chunked prefill: the queries are each sequence's last rows
    ],
)
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (6, 2, 128), (8, 2, 64)])
def test_varlen_equals_each_sequence_alone(q_lens, k_lens, hq, hkv, d):
    seqs, (q, k, v, cu_q, cu_k) = make_batch(q_lens, k_lens, hq, hkv, d, seed=len(q_lens) + hq)
    max_q, max_k = max(q_lens), max(k_lens or q_lens)
    tau = torch.logspace(-4, -1, hq)
    res = sale_ops.attention_varlen(
        q, k, v, cu_q, cu_k, max_q, max_k, tau, return_lse=True, return_block_mask=True
    )
    assert res.out.shape == q.shape and res.lse.shape == (hq, q.shape[0]) and res.lse.dtype == torch.float32
    assert_equals_each_sequence_alone(res, seqs, tau, cu_q, max_q, max_k)


def test_reference_varlen_equals_reference_per_sequence():
    seqs, (q, k, v, cu_q, cu_k) = make_batch([70, 1, 200], [90, 33, 200], hq=4, hkv=1, seed=3)
    tau = torch.full((4,), 3e-3)
    out, lse, mask = ref.attention_varlen(q, k, v, cu_q, cu_k, 200, 200, tau, bk=64)
    for b, (qs, ks, vs) in enumerate(seqs):
        o, l, m = ref.attention(qs, ks, vs, tau, bk=64)
        assert torch.equal(seq_part(out, cu_q, b), o)
        assert torch.equal(lse[:, int(cu_q[b]) : int(cu_q[b + 1])], l[0])
        assert torch.equal(mask[b, :, : m.shape[2], : m.shape[3]], m[0])
        assert not mask[b, :, m.shape[2] :].any() and not mask[b, :, :, m.shape[3] :].any()


def test_varlen_causal_blocks_per_sequence():
    cu_q = torch.tensor([0, 1, 65, 65, 300], dtype=torch.int32)
    cu_k = torch.tensor([0, 40, 104, 110, 600], dtype=torch.int32)
    got = ref.varlen_causal_blocks(cu_q, cu_k, 235, 490, 64, 32)
    assert got.shape == (4, 4, 16)
    for b in range(4):
        nq, nk = int(cu_q[b + 1] - cu_q[b]), int(cu_k[b + 1] - cu_k[b])
        want = ref.causal_blocks(nq, nk, 64, 32)
        assert torch.equal(got[b, : want.shape[0], : want.shape[1]], want)
        assert got[b].sum() == want.sum()


def test_empty_sequence_and_dense_below_per_sequence():
    # the second sequence is empty; dense_below 200 sends the first and third (< 200 keys) to the
    # dense path and selects blocks for the fourth
    seqs, (q, k, v, cu_q, cu_k) = make_batch([100, 0, 150, 400], [130, 0, 150, 400], hq=4, hkv=2, seed=11)
    tau = torch.full((4,), 5e-2)
    res = sale_ops.attention_varlen(
        q, k, v, cu_q, cu_k, 400, 400, tau, dense_below=200, return_lse=True, return_block_mask=True
    )
    assert not res.block_mask[1].any()
    causal = ref.varlen_causal_blocks(cu_q, cu_k, 400, 400, 64, 32)
    assert torch.equal(res.block_mask[0], causal[0].expand(4, -1, -1))
    assert torch.equal(res.block_mask[2], causal[2].expand(4, -1, -1))
    assert (res.density[3] < 1).all()  # a real selection happened there
    present = [s for s in seqs if s[0].shape[2] > 0]
    cu_present = torch.tensor([0, 100, 250, 650], dtype=torch.int32)
    sub = res._replace(block_mask=res.block_mask[[0, 2, 3]], density=res.density[[0, 2, 3]])
    assert_equals_each_sequence_alone(sub, present, tau, cu_present, 400, 400, dense_below=200)
    # all sequences shorter than dense_below: no selection at all, exact attention everywhere
    res = sale_ops.attention_varlen(q, k, v, cu_q, cu_k, 400, 400, tau, dense_below=401, return_block_mask=True)
    assert torch.equal(res.block_mask, causal.unsqueeze(1).expand(-1, 4, -1, -1))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("share", [1.0, 0.0])
def test_varlen_selection_in_head_steps(monkeypatch, share, fused):
    from sale_ops import _pipeline

    seqs, (q, k, v, cu_q, cu_k) = make_batch([300, 70], hq=8, hkv=2, seed=5)
    tau = torch.logspace(-4, -1, 8)
    want = ref.block_mask_varlen(q, k, cu_q, cu_k, 300, 300, ref.quantize_varlen(q, k, cu_q, cu_k), tau, scale=0.125)
    monkeypatch.setattr(_pipeline, "SELECTION_MEMORY_SHARE", share)
    monkeypatch.setattr(_pipeline, "FUSED_SELECTION", fused)
    steps = _pipeline.selection_steps_varlen(q, k, v, 2, 300, 300, 64, 32)
    got = _pipeline.select_blocks_varlen(q, k, v, cu_q, cu_k, 300, 300, tau, 64, 32, 128, 0.125, 0)
    assert torch.equal(sale_ops.unpack_block_mask(got, want.shape[-1]), want), steps
    assert steps == ((2, 4) if share == 1.0 else (1, 1))


def test_packed_mask_return_and_flags():
    _, (q, k, v, cu_q, cu_k) = make_batch([70, 130])
    res = sale_ops.attention_varlen(q, k, v, cu_q, cu_k, 130, 130, 1e-3, return_block_mask=True, packed_mask=True)
    assert res.lse is None and res.block_mask.dtype == torch.int32 and res.block_mask.shape == (2, 4, 3, 1)
    out = sale_ops.attention_varlen(q, k, v, cu_q, cu_k, 130, 130, 1e-3)
    assert torch.equal(out, res.out)
    # a larger max_seqlen only pads the mask
    res2 = sale_ops.attention_varlen(q, k, v, cu_q, cu_k, 200, 1100, 1e-3, return_block_mask=True, packed_mask=True)
    assert res2.block_mask.shape == (2, 4, 4, 2)
    assert torch.equal(res2.out, out) and torch.equal(res2.block_mask[:, :, :3, :1], res.block_mask)


def varlen_op_samples(device="cpu"):
    out = []
    for dtype, q_lens, k_lens in [(torch.bfloat16, [63, 130], [63, 130]), (torch.float16, [1, 0, 70], [40, 5, 200])]:
        _, (q, k, v, cu_q, cu_k) = make_batch(q_lens, k_lens, dtype=dtype, device=device)
        cu_q, cu_k = cu_q.to(device), cu_k.to(device)
        mq, mk = max(q_lens), max(k_lens)
        tau = torch.linspace(0, 0.05, 4, device=device)
        qz = torch.ops.sale.quantize_varlen(q, k, cu_q, cu_k, mq, mk, 32)
        bits = torch.ops.sale.block_mask_bits_varlen(q, k, cu_q, cu_k, mq, mk, *qz, tau, 64, 32, 128, 0.125, 0)
        dense = sale_ops.unpack_block_mask(bits, -(-mk // 32))
        out.append(("quantize_varlen", (q, k, cu_q, cu_k, mq, mk, 32)))
        out.append(("quantize_varlen", (q, k, cu_q, cu_k, mq + 5, mk + 70, 64)))
        out.append(("block_mask_bits_varlen", (q, k, cu_q, cu_k, mq, mk, *qz, tau, 64, 32, 128, 0.125, 0)))
        out.append(("block_mask_bits_varlen", (q, k, cu_q, cu_k, mq, mk, *qz, tau, 64, 32, 128, 0.125, 100)))
        out.append(("select_varlen", (q, k, cu_q, cu_k, mq, mk, tau, 64, 32, 128, 0.125, 0)))
        out.append(("block_sparse_attention_varlen", (q, k, v, cu_q, cu_k, mq, mk, bits, 64, 32, 0.125, True)))
        out.append(("block_sparse_attention_varlen", (q, k, v, cu_q, cu_k, mq, mk, dense, 64, 32, 0.125, True)))
        out.append(("attention_varlen", (q, k, v, cu_q, cu_k, mq, mk, tau, 64, 32, 128, 0.125, True, 0)))
        out.append(("attention_varlen", (q, k, v, cu_q, cu_k, mq, mk, tau, 64, 64, 128, 0.1, True, 10_000)))
    return out


@pytest.mark.parametrize("index", range(18))
def test_varlen_opcheck(index):
    name, args = varlen_op_samples()[index]
    torch.library.opcheck(getattr(torch.ops.sale, name).default, args)


def test_varlen_schemas():
    for name in ("quantize_varlen", "block_mask_bits_varlen", "block_sparse_attention_varlen", "attention_varlen"):
        schema = str(getattr(torch.ops.sale, name).default._schema)
        assert schema.startswith(f"sale::{name}(Tensor q, Tensor k, "), schema
        assert "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k" in schema
        assert "!" not in schema and "(a" not in schema


def test_varlen_meta_shapes():
    q = torch.empty(5000, 8, 128, dtype=torch.bfloat16, device="meta")
    k = torch.empty(7000, 2, 128, dtype=torch.bfloat16, device="meta")
    cu = torch.empty(4, dtype=torch.int32, device="meta")
    tau = torch.empty(8, device="meta")
    out, lse, bits = torch.ops.sale.attention_varlen(q, k, k, cu, cu, 3000, 4097, tau, 64, 32, 128, 0.1, True, 0)
    assert out.shape == q.shape and lse.shape == (8, 5000) and bits.shape == (3, 8, 47, 5)
    qz = torch.ops.sale.quantize_varlen(q, k, cu, cu, 3000, 4097, 32)
    assert [tuple(t.shape) for t in qz] == [(8, 5000, 128), (8, 5000), (2, 7000, 128), (2, 7000), (8, 7000), (3, 2, 128)]


@pytest.mark.parametrize("dynamic", [False, True])
def test_varlen_compile_fullgraph(dynamic):
    torch._dynamo.reset()

    def f(q, k, v, cu_q, cu_k, tau):
        res = sale_ops.attention_varlen(q, k, v, cu_q, cu_k, 260, 300, tau, return_lse=True, return_block_mask=True)
        return res.out, res.lse, res.block_mask, res.density

    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)
    for q_lens, k_lens in [([60, 200], [100, 300]), ([260, 1, 3], [260, 2, 3])]:
        _, (q, k, v, cu_q, cu_k) = make_batch(q_lens, k_lens, seed=sum(q_lens))
        tau = torch.full((4,), 1e-3)
        for got, want in zip(compiled(q, k, v, cu_q, cu_k, tau), f(q, k, v, cu_q, cu_k, tau)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Errors: op, argument, what it got, what is supported.
# ------------------------------------------------------------------------------------------------


def raises(exc, *fragments):
    from test_errors import raises as _raises

    return _raises(exc, *fragments)


@pytest.fixture
def packed():
    _, batch = make_batch([70, 130])
    return batch


def test_cu_seqlens_dtype_rank_and_length(packed):
    q, k, v, cu_q, cu_k = packed
    with raises(TypeError, "sale_ops.attention_varlen", "'cu_seqlens_q'", "torch.int64", "torch.int32"):
        sale_ops.attention_varlen(q, k, v, cu_q.long(), cu_k, 130, 130, 0.01)
    with raises(ValueError, "'cu_seqlens_k'", "1 dimensions", "(1, 3)"):
        sale_ops.attention_varlen(q, k, v, cu_q, cu_k[None], 130, 130, 0.01)
    with raises(ValueError, "'cu_seqlens_q' has 2 offsets", "'cu_seqlens_k' has 3", "B + 1"):
        sale_ops.attention_varlen(q, k, v, cu_q[:2], cu_k, 130, 130, 0.01)
    with raises(ValueError, "'cu_seqlens_q'", "B + 1 >= 2", "(1,)"):
        sale_ops.attention_varlen(q, k, v, cu_q[:1], cu_k[:1], 130, 130, 0.01)


def test_cu_seqlens_values(packed):
    q, k, v, cu_q, cu_k = packed
    bad = torch.tensor([0, 80, 190], dtype=torch.int32)
    with raises(ValueError, "'cu_seqlens_q'", "end at the packed length 200", "[0, 80, 190]"):
        sale_ops.attention_varlen(q, k, v, bad, cu_k, 130, 130, 0.01)
    with raises(ValueError, "'cu_seqlens_k'", "never decrease", "[0, 150, 140]"):
        sale_ops.attention_varlen(q, k, v, cu_q, torch.tensor([0, 150, 140], dtype=torch.int32), 130, 130, 0.01)
    with raises(ValueError, "sequence 1 has 130 rows", "'max_seqlen_q' is 100", "at least the longest"):
        sale_ops.attention_varlen(q, k, v, cu_q, cu_k, 100, 130, 0.01)
    # the op itself checks values on the CPU
    tau = torch.zeros(4)
    with raises(ValueError, "sale.attention_varlen", "'max_seqlen_k' is 100"):
        torch.ops.sale.attention_varlen(q, k, v, cu_q, cu_k, 130, 100, tau, 64, 32, 128, 0.125, True, 0)


def test_more_queries_than_keys_in_one_sequence():
    _, (q, k, v, cu_q, cu_k) = make_batch([70, 130], [70, 100])
    with raises(ValueError, "Nq <= Nk in every sequence", "Nq=130, Nk=100 in sequence 1"):
        sale_ops.attention_varlen(q, k, v, cu_q, cu_k, 130, 130, 0.01)


def test_max_seqlen_types_and_range(packed):
    q, k, v, cu_q, cu_k = packed
    with raises(TypeError, "'max_seqlen_q'", "Python int", "float"):
        sale_ops.attention_varlen(q, k, v, cu_q, cu_k, 130.0, 130, 0.01)
    with raises(ValueError, "'max_seqlen_k' is 0", "1 .. 2^30"):
        sale_ops.attention_varlen(q, k, v, cu_q, cu_k, 130, 0, 0.01)


def test_packed_layout_errors(packed):
    q, k, v, cu_q, cu_k = packed
    with raises(ValueError, "sale_ops.attention_varlen", "'q'", "3 dimensions", "(1, 200, 4, 64)"):
        sale_ops.attention_varlen(q[None], k, v, cu_q, cu_k, 130, 130, 0.01)
    with raises(ValueError, "query heads must be a multiple of kv heads", "Hq=3", "Hkv=2"):
        sale_ops.attention_varlen(q[:, :3], k, v, cu_q, cu_k, 130, 130, 0.01)
    with raises(ValueError, "'v' must have the shape of 'k'"):
        sale_ops.attention_varlen(q, k, v[:100], cu_q, cu_k, 130, 130, 0.01)
    with raises(TypeError, "'q'", "torch.float32", "torch.float16, torch.bfloat16"):
        sale_ops.attention_varlen(q.float(), k.float(), v.float(), cu_q, cu_k, 130, 130, 0.01)
    with raises(RuntimeError, "one device", "'cu_seqlens_k' is on meta"):
        sale_ops.attention_varlen(q, k, v, cu_q, cu_k.to("meta"), 130, 130, 0.01)
    with raises(ValueError, "'causal' is False", "causal prefill only"):
        sale_ops.attention_varlen(q, k, v, cu_q, cu_k, 130, 130, 0.01, causal=False)
    with raises(ValueError, "one value per query head (4)"):
        sale_ops.attention_varlen(q, k, v, cu_q, cu_k, 130, 130, [0.1, 0.1])


def test_step_op_errors(packed):
    q, k, v, cu_q, cu_k = packed
    qz = list(torch.ops.sale.quantize_varlen(q, k, cu_q, cu_k, 130, 130, 32))
    tau = torch.zeros(4)
    with raises(ValueError, "sale.block_mask_bits_varlen", "'k_mean'", "(2, 2, 64)", "(3, 2, 64)"):
        bad = qz[:5] + [torch.zeros(3, 2, 64)]
        torch.ops.sale.block_mask_bits_varlen(q, k, cu_q, cu_k, 130, 130, *bad, tau, 64, 32, 128, 0.125, 0)
    bits = torch.ops.sale.block_mask_bits_varlen(q, k, cu_q, cu_k, 130, 130, *qz, tau, 64, 32, 128, 0.125, 0)
    with raises(ValueError, "sale.block_sparse_attention_varlen", "'block_mask'", "(2, 4, 3, 1)", "(2, 4, 2, 1)"):
        torch.ops.sale.block_sparse_attention_varlen(q, k, v, cu_q, cu_k, 130, 130, bits[:, :, :2], 64, 32, 0.1, True)
    with raises(TypeError, "'block_mask'", "torch.uint8"):
        torch.ops.sale.block_sparse_attention_varlen(q, k, v, cu_q, cu_k, 130, 130, bits.to(torch.uint8), 64, 32, 0.1, True)
