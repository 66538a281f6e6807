"""torch.ops.sale.* and the public API on the CPU: against the reference (SPEC §7), opcheck."""

import pytest
import torch

import sale_ops
from sale_ops import reference as ref
from sale_ops.testing import assert_attention_close, assert_block_mask_agrees, make_qkv

OPS = ["quantize", "block_mask", "block_mask_bits", "select", "block_sparse_attention", "attention"]


def test_every_op_is_registered_with_its_schema():
    for name in OPS:
        schema = str(getattr(torch.ops.sale, name).default._schema)
        assert schema.startswith(f"sale::{name}("), schema
        assert "!" not in schema and "(a" not in schema  # no op mutates or aliases its inputs


def sample_args(device="cpu", dtype=torch.bfloat16, n=130, nk=None, hq=4, hkv=2, d=64):
    q, k, v = make_qkv(2, hq, hkv, n, d, kv_len=nk, dtype=dtype, device=device)
    tau = torch.linspace(0, 0.05, hq, device=device)
    return q, k, v, tau


def op_samples(device="cpu"):
    """One argument tuple per op, with odd sizes, GQA and both dtypes."""
    out = []
    for dtype, n, nk in [(torch.bfloat16, 130, 130), (torch.float16, 63, 200)]:
        q, k, v, tau = sample_args(device, dtype, n, nk)
        qz = torch.ops.sale.quantize(q, k, 32)
        mask = torch.ops.sale.block_mask(q, k, *qz, tau, 64, 32, 128, 0.125)
        out.append(("quantize", (q, k, 32)))
        out.append(("block_mask", (q, k, *qz, tau, 64, 32, 128, 0.125)))
        out.append(("block_mask_bits", (q, k, *qz, tau, 64, 32, 128, 0.125)))
        out.append(("select", (q, k, tau, 64, 32, 128, 0.125)))
        out.append(("block_sparse_attention", (q, k, v, mask, 64, 32, 0.125, True)))
        out.append(("block_sparse_attention", (q, k, v, sale_ops.pack_block_mask(mask), 64, 32, 0.125, True)))
        out.append(("block_sparse_attention", (q, k, v, torch.ones_like(mask), 64, 32, 0.125, False)))
        out.append(("attention", (q, k, v, tau, 64, 32, 128, 0.125, True, 0)))
        out.append(("attention", (q, k, v, tau, 64, 64, 128, 0.1, True, 10_000)))
    return out


@pytest.mark.parametrize("index", range(18))
def test_opcheck(index):
    name, args = op_samples()[index]
    torch.library.opcheck(getattr(torch.ops.sale, name).default, args)


def test_ops_equal_reference_on_cpu():
    q, k, v, tau = sample_args()
    qz = sale_ops.quantize(q, k)
    want = ref.quantize(q, k)
    for got, exp in zip(qz, want):
        assert torch.equal(got, exp)
    mask = sale_ops.block_mask(q, k, tau, quantized=qz)
    assert torch.equal(mask, ref.block_mask(q, k, want, tau))
    assert torch.equal(torch.ops.sale.select(q, k, tau, 64, 32, 128, 64**-0.5), sale_ops.pack_block_mask(mask))
    res = sale_ops.attention(q, k, v, tau, return_lse=True, return_block_mask=True)
    out, lse, rmask = ref.attention(q, k, v, tau)
    assert torch.equal(res.block_mask, rmask) and torch.equal(res.out, out) and torch.equal(res.lse, lse)
    torch.testing.assert_close(res.density, ref.block_density(rmask, 130, 130, 64, 32))


@pytest.mark.parametrize("n", [1, 63, 1025])
@pytest.mark.parametrize("hq,hkv", [(3, 1), (8, 2), (7, 1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_agrees_with_reference_spec7(n, hq, hkv, dtype):
    d = 128 if hq == 8 else 64
    q, k, v = make_qkv(1, hq, hkv, n, d, dtype=dtype, seed=n + hq)
    tau = torch.full((hq,), 1e-3)
    res = sale_ops.attention(q, k, v, tau, return_lse=True, return_block_mask=True)
    qz = sale_ops.quantize(q, k)
    assert_block_mask_agrees(res.block_mask, q, k, qz, tau)
    assert_attention_close(res.out, res.lse, q, k, v, res.block_mask)


@pytest.mark.parametrize("nk_blocks", [1, 31, 32, 33, 64, 100])
def test_pack_unpack_block_mask_round_trip(nk_blocks):
    g = torch.Generator().manual_seed(nk_blocks)
    mask = torch.rand(2, 3, 5, nk_blocks, generator=g) < 0.5
    mask[..., -1] = True  # the top bit of a full word makes a negative int32
    words = sale_ops.pack_block_mask(mask)
    assert words.dtype == torch.int32 and words.shape == (2, 3, 5, -(-nk_blocks // 32))
    assert torch.equal(sale_ops.unpack_block_mask(words, nk_blocks), mask)
    # bit n % 32 of word n // 32 is block n
    n = nk_blocks - 1
    assert bool(((words[..., n // 32] >> (n % 32)) & 1).bool().all())


def test_packed_mask_paths_equal_bool_paths():
    q, k, v, tau = sample_args(n=1100)  # 35 key blocks: two words per query block
    qz = sale_ops.quantize(q, k)
    mask = sale_ops.block_mask(q, k, tau, quantized=qz)
    bits = sale_ops.block_mask(q, k, tau, quantized=qz, packed=True)
    assert bits.dtype == torch.int32 and bits.shape[-1] == 2
    assert torch.equal(sale_ops.unpack_block_mask(bits, mask.shape[-1]), mask)
    out, lse = sale_ops.block_sparse_attention(q, k, v, mask, return_lse=True)
    out2, lse2 = sale_ops.block_sparse_attention(q, k, v, bits, return_lse=True)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_thresholds_accept_float_list_and_tensor():
    q, k, v, _ = sample_args()
    a = sale_ops.attention(q, k, v, 0.01)
    b = sale_ops.attention(q, k, v, [0.01] * 4)
    c = sale_ops.attention(q, k, v, torch.full((4,), 0.01, dtype=torch.float64))
    d = sale_ops.attention(q, k, v, torch.tensor(0.01))
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


def test_outputs_are_new_tensors_and_inputs_untouched():
    q, k, v, tau = sample_args()
    before = [t.clone() for t in (q, k, v, tau)]
    out = sale_ops.attention(q, k, v, tau)
    for t, b in zip((q, k, v, tau), before):
        assert torch.equal(t, b)
    assert out.data_ptr() not in {t.data_ptr() for t in (q, k, v)}
    assert out.is_contiguous() and out.dtype == q.dtype and out.shape == q.shape


def test_attention_output_fields_follow_flags():
    q, k, v, tau = sample_args()
    res = sale_ops.attention(q, k, v, tau, return_lse=True)
    assert res.lse is not None and res.block_mask is None and res.density is None
    res = sale_ops.attention(q, k, v, tau, return_block_mask=True)
    assert res.lse is None and res.block_mask.dtype == torch.bool and res.density.shape == (2, 4)


def test_block_sparse_attention_non_causal_and_strided_inputs():
    q, k, v = make_qkv(1, 4, 2, 100, 64, kv_len=300)
    mask = torch.rand(1, 4, 2, 10) < 0.4
    mask[..., 3] = True
    out, lse = sale_ops.block_sparse_attention(q, k, v, mask, causal=False, return_lse=True)
    assert_attention_close(out, lse, q, k, v, mask, causal=False)
    # a head-major view (last dim contiguous, other strides not) is accepted
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous()
    torch.testing.assert_close(sale_ops.block_sparse_attention(qt, k, v, mask, causal=False), out)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("share", [1.0, 0.2, 0.05, 0.0])
def test_selection_in_head_steps_equals_all_heads_at_once(monkeypatch, share, fused):
    """sale.attention selects a few heads at a time to bound memory, through quantize +
    block_mask_bits or sale.select; the mask must not change."""
    from sale_ops import _pipeline

    q, k, v = make_qkv(2, 8, 2, 300, 64, seed=5)
    tau = torch.logspace(-4, -1, 8)
    qz = torch.ops.sale.quantize(q, k, 32)
    want = torch.ops.sale.block_mask_bits(q, k, *qz, tau, 64, 32, 128, 0.125)
    monkeypatch.setattr(_pipeline, "SELECTION_MEMORY_SHARE", share)
    monkeypatch.setattr(_pipeline, "FUSED_SELECTION", fused)
    steps = _pipeline.selection_steps(q, k, v, 64, 32)
    got = _pipeline.select_blocks(q, k, v, tau, 64, 32, 128, 0.125)
    assert torch.equal(got, want), steps
    if share == 0.0:
        assert steps == (1, 1)  # one query head at a time
    if share == 1.0:
        assert steps == (2, 4)  # everything at once
