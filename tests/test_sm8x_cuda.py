"""The two CUDA paths against each other on one GPU (issue 7). On an H100 the sm8x kernels run
through the driver's JIT of their compute_80 PTX (SALE_OPS_FORCE_SM8X=1); on 8.x GPUs only the
sm8x path exists and the comparisons skip. `pytest --sm8x` runs the whole GPU suite on that path."""

import pytest
import torch

import sale_ops
from sale_ops import _dispatch
from sale_ops import reference as ref
from sale_ops.testing import assert_attention_close, compare_block_mask, make_qkv

pytestmark = pytest.mark.gpu


def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


both_paths = pytest.mark.skipif(not _hopper(), reason="needs a 9.0 GPU (it has both paths)")


def test_summary_names_the_path(monkeypatch):
    monkeypatch.setenv("SALE_OPS_FORCE_SM8X", "1")
    s = sale_ops.backend_summary("cuda")
    assert "sm8x kernels" in s and "int4 mma.sync scorer" in s, s
    assert _dispatch.kernel_path() == "sm8x"
    monkeypatch.setenv("SALE_OPS_FORCE_SM8X", "0")
    expected = "sm90" if _hopper() else "sm8x"
    assert _dispatch.kernel_path() == expected
    assert ("Hopper kernels" in sale_ops.backend_summary("cuda")) == (expected == "sm90")


@pytest.mark.parametrize("op", ["quantize", "block_mask", "block_sparse_attention"])
def test_bad_force_value_fails_every_op(monkeypatch, op):
    q, k, v = make_qkv(1, 2, 1, 64, 64, device="cuda")
    qz = sale_ops.quantize(q, k)
    mask = torch.ones(1, 2, 1, 2, dtype=torch.bool, device="cuda")
    monkeypatch.setenv("SALE_OPS_FORCE_SM8X", "yes")
    with pytest.raises(RuntimeError, match=f"sale.{op}: environment variable SALE_OPS_FORCE_SM8X is 'yes'"):
        if op == "quantize":
            sale_ops.quantize(q, k)
        elif op == "block_mask":
            sale_ops.block_mask(q, k, torch.full((2,), 1e-3, device="cuda"), quantized=qz)
        else:
            sale_ops.block_sparse_attention(q, k, v, mask)


@both_paths
@pytest.mark.parametrize("d,bk,hq,hkv,n,dtype", [
    (128, 32, 8, 2, 3333, torch.bfloat16), (64, 64, 6, 2, 2049, torch.float16),
    (128, 64, 3, 3, 2500, torch.float16), (64, 32, 7, 1, 4097, torch.bfloat16),
])
def test_sm8x_and_hopper_masks_agree(monkeypatch, d, bk, hq, hkv, n, dtype):
    """Same codes, same SPEC: the int4 scorer (sm8x) and the wgmma scorer (Hopper) keep the same
    blocks. Their row thresholds come from the same source compiled for two targets, so a block
    at a near tie (SPEC §7) may differ; the rest must not."""
    q, k, _ = make_qkv(1, hq, hkv, n, d, dtype=dtype, device="cuda", seed=d + bk + n)
    tau = torch.logspace(-5, -1, hq, device="cuda")
    qz = sale_ops.quantize(q, k, bk=bk)
    monkeypatch.setenv("SALE_OPS_FORCE_SM8X", "0")
    hopper = sale_ops.block_mask(q, k, tau, quantized=qz, bk=bk)
    monkeypatch.setenv("SALE_OPS_FORCE_SM8X", "1")
    sm8x = sale_ops.block_mask(q, k, tau, quantized=qz, bk=bk)
    bits = sale_ops.block_mask(q, k, tau, quantized=qz, bk=bk, packed=True)
    assert torch.equal(sale_ops.unpack_block_mask(bits, sm8x.shape[-1]), sm8x)
    differ = int((hopper != sm8x).sum())
    c = compare_block_mask(sm8x.cpu(), q.cpu(), k.cpu(), ref.Quantized(*[t.cpu() for t in qz]), tau.cpu(), 64, bk, 128)
    assert c.mismatched == c.near_ties and c.near_ties <= 0.001 * max(c.candidates, 1), c
    assert differ <= c.near_ties + max(1, c.candidates // 1000), (differ, c)


@both_paths
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_sm8x_and_hopper_attention_agree(monkeypatch, dtype, causal):
    q, k, v = make_qkv(2, 8, 2, 1000, 128, kv_len=1300, dtype=dtype, device="cuda", seed=3)
    mask = torch.rand(2, 8, 16, 41, device="cuda") < 0.4
    mask[..., 0] = True
    monkeypatch.setenv("SALE_OPS_FORCE_SM8X", "0")
    out_h, lse_h = sale_ops.block_sparse_attention(q, k, v, mask, causal=causal, return_lse=True)
    monkeypatch.setenv("SALE_OPS_FORCE_SM8X", "1")
    out_8, lse_8 = sale_ops.block_sparse_attention(q, k, v, mask, causal=causal, return_lse=True)
    assert_attention_close(out_8.cpu(), lse_8.cpu(), q.cpu(), k.cpu(), v.cpu(), mask.cpu(), causal=causal)
    assert torch.allclose(lse_8, lse_h, atol=1e-3, rtol=0)
    ref_err = (out_h.float() - out_8.float()).abs().max().item()
    assert ref_err <= 2e-2, ref_err


def test_varlen_refused_on_sm8x(monkeypatch):
    # Packed batches have no sm8x kernels yet: a clear error, not a launch failure.
    monkeypatch.setenv("SALE_OPS_FORCE_SM8X", "1")
    q = torch.randn(300, 4, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(300, 2, 64, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 100, 300], device="cuda", dtype=torch.int32)
    with pytest.raises(RuntimeError, match="variable-length batches run on the Hopper kernels only"):
        sale_ops.attention_varlen(q, k, k, cu, cu, 200, 200, 1e-3, dense_below=0)
    with pytest.raises(RuntimeError, match="variable-length batches run on the Hopper kernels only"):
        torch.ops.sale.select_varlen(q, k, cu, cu, 200, 200, torch.zeros(4, device="cuda"), 64, 32, 128, 0.125, 0)
