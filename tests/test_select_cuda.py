"""sale.select on the GPU: sale.quantize + sale.block_mask_bits in one op. On the Hopper wgmma
scorer it never stores the query codes (each scorer CTA makes its rows' codes from q); the mask
must be bit-identical to the two-op path, which test_block_mask_cuda.py holds to the reference."""

import os

import pytest
import torch

import sale_ops
from sale_ops import _pipeline
from sale_ops.testing import make_qkv
from test_block_mask_cuda import CASES  # odd sizes, GQA groups 1/3/4/7, Nq < Nk, batch > 1

pytestmark = pytest.mark.gpu

# The sm8x path (pytest --sm8x) stores the query codes and has no packed-batch kernels: the tests of
# what only the Hopper scorer does skip there (test_attention_selection_matches_two_op_selection and
# test_sm8x_cuda.py::test_varlen_refused_on_sm8x cover that path).
ON_SM8X = os.environ.get("SALE_OPS_FORCE_SM8X") == "1"
hopper_only = pytest.mark.skipif(ON_SM8X, reason="the Hopper wgmma scorer's behaviour (sm8x stores the codes)")


def two_op_bits(q, k, tau, bk=32, window=128, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qz = torch.ops.sale.quantize(q, k, bk)
    return torch.ops.sale.block_mask_bits(q, k, *qz, tau, 64, bk, window, scale)


def select_bits(q, k, tau, bk=32, window=128, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.sale.select(q, k, tau, 64, bk, window, scale)


@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,bk,window", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_select_equals_quantize_then_block_mask(b, hq, hkv, nq, nk, d, bk, window, dtype):
    q, k, _ = make_qkv(b, hq, hkv, nq, d, kv_len=nk, dtype=dtype, device="cuda", seed=nq + hq + d)
    tau = torch.tensor(([0.0, 1e30, 1e-3, 1.0, 1e-2, 0.1, 1e-4, 3e-2] * 2)[:hq], device="cuda")
    got, want = select_bits(q, k, tau, bk, window), two_op_bits(q, k, tau, bk, window)
    assert got.shape == want.shape and got.dtype == torch.int32
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["equal_keys", "huge_query", "zero_rows", "large_fp16", "tiny_bf16", "mean_heavy"])
def test_select_adversarial(kind):
    """Inputs where the query codes are delicate: ties of x / scale, zero groups (scale 1), huge and
    subnormal scales, a query mean far larger than the centred values."""
    dtype = torch.bfloat16 if kind in ("tiny_bf16", "mean_heavy") else torch.float16
    q, k, _ = make_qkv(1, 8, 2, 1500, 128, dtype=torch.float32, device="cuda", seed=13)
    if kind == "equal_keys":
        k = k[:, :, :1].expand_as(k).contiguous()
        q = torch.round(q * 4) / 4  # many values on exact multiples: ties of x / scale
    elif kind == "huge_query":
        q[:, :, 700] *= 300
    elif kind == "zero_rows":
        q[:, :, 100:400] = 0
        k[:, :, 64:640] = 0
    elif kind == "large_fp16":
        q, k = q * 60, k * 60
    elif kind == "tiny_bf16":
        q, k = q * 1e-19, k * 1e-19
    elif kind == "mean_heavy":
        q = q + 40.0 * torch.randn(1, 8, 1, 128, device="cuda")
    tau = torch.tensor([0.0, 1e-3, 1e-2, 0.2] * 2, device="cuda")
    q, k = q.to(dtype), k.to(dtype)
    assert torch.equal(select_bits(q, k, tau), two_op_bits(q, k, tau))


def test_select_strided_views_and_head_slices():
    """The pipeline passes head slices of q and k (strided views for batch > 1)."""
    q, k, _ = make_qkv(3, 16, 4, 999, 128, device="cuda", seed=3)
    tau = torch.logspace(-5, -1, 16, device="cuda")
    qs, ks, ts = q[:, 4:12], k[:, 1:3], tau[4:12]
    assert not qs.is_contiguous()
    assert torch.equal(select_bits(qs, ks, ts), two_op_bits(qs.contiguous(), ks.contiguous(), ts))
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, H, D] storage: the transformers layout
    assert torch.equal(select_bits(qt, k, tau), two_op_bits(q, k, tau))


def test_select_with_stored_codes(monkeypatch):
    """SALE_OPS_ESTIMATOR=mma (the mma.sync scorer) makes sale.select store the query codes: same mask."""
    q, k, _ = make_qkv(2, 8, 2, 2100, 64, device="cuda", seed=8)
    tau = torch.logspace(-5, 0, 8, device="cuda")
    fused = select_bits(q, k, tau)
    monkeypatch.setenv("SALE_OPS_ESTIMATOR", "mma")
    assert _pipeline.select_stores_q_codes(q)
    assert torch.equal(select_bits(q, k, tau), fused)


def test_select_under_cuda_graph_and_side_stream():
    q, k, _ = make_qkv(1, 8, 2, 2500, 128, device="cuda", seed=4)
    tau = torch.full((8,), 1e-3, device="cuda")
    want = two_op_bits(q, k, tau)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        side = select_bits(q, k, tau)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(side, want)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        got = select_bits(q, k, tau)
    g.replay()
    assert torch.equal(got, want)


@pytest.fixture
def fused_pipeline(monkeypatch):
    monkeypatch.setattr(_pipeline, "FUSED_SELECTION", True)


@hopper_only
def test_select_memory_is_below_the_two_op_path(fused_pipeline):
    """Without stored query codes the selection holds the key side and per-row buffers only."""
    q, k, v = make_qkv(1, 32, 8, 8192, 128, device="cuda", seed=1)
    tau = torch.full((32,), 1e-3, device="cuda")
    qkv = sum(t.numel() * t.element_size() for t in (q, k, v))

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / qkv, out

    fused, a = peak(lambda: select_bits(q, k, tau))
    two_op, b = peak(lambda: two_op_bits(q, k, tau))
    assert torch.equal(a, b)
    assert not _pipeline.select_stores_q_codes(q)
    assert fused < 0.15 and two_op - fused > 0.3, (fused, two_op)
    assert _pipeline.selection_steps(q, k, v, 64, 32) == (8, 4)  # every head in one step


def test_select_argument_errors():
    q, k, _ = make_qkv(1, 2, 1, 100, 64, device="cuda")
    tau = torch.zeros(2, device="cuda")
    base = torch.empty(1, 2, 100, 68, dtype=q.dtype, device="cuda")[..., :64]
    base.copy_(q)  # row stride 68: rows are not 16-byte aligned
    with pytest.raises(RuntimeError, match="sale.select.*16-byte boundary"):
        torch.ops.sale.select(base, k, tau, 64, 32, 128, 0.125)
    with pytest.raises(RuntimeError, match="sale.select: argument 'bk' is 16; supported: 32, 64"):
        torch.ops.sale.select(q, k, tau, 64, 16, 128, 0.125)
    with pytest.raises(RuntimeError, match="sale.select: argument 'tau'"):
        torch.ops.sale.select(q, k, torch.zeros(3, device="cuda"), 64, 32, 128, 0.125)


def test_opcheck_cuda():
    for dtype, n, nk, bk in [(torch.bfloat16, 130, 130, 32), (torch.float16, 63, 200, 64)]:
        q, k, _ = make_qkv(2, 4, 2, n, 64, kv_len=nk, dtype=dtype, device="cuda")
        tau = torch.linspace(0, 0.05, 4, device="cuda")
        torch.library.opcheck(torch.ops.sale.select.default, (q, k, tau, 64, bk, 128, 0.125))


def test_attention_selection_matches_two_op_selection(fused_pipeline):
    """sale.attention's selection through sale.select gives the two-op path's masks: in one step on
    the Hopper scorer; on the sm8x path, whose int4 scorer reads packed stored codes, with the query
    codes stored."""
    q, k, v = make_qkv(1, 8, 2, 4500, 128, device="cuda", seed=6)
    tau = torch.logspace(-4, -1, 8, device="cuda")
    want = two_op_bits(q, k, tau)
    if ON_SM8X:
        assert _pipeline.select_stores_q_codes(q)
        assert torch.equal(select_bits(q, k, tau), want)
    else:
        assert _pipeline.selection_steps(q, k, v, 64, 32) == (2, 4)
    res = sale_ops.attention(q, k, v, tau, return_block_mask=True, dense_below=0)
    assert torch.equal(sale_ops.pack_block_mask(res.block_mask), want)


@hopper_only
@pytest.mark.parametrize("d,bk,hq,hkv,dtype", [(128, 32, 8, 2, torch.bfloat16), (64, 64, 7, 1, torch.float16),
                                              (128, 32, 3, 3, torch.float16)])
def test_select_varlen_equals_quantize_then_block_mask(d, bk, hq, hkv, dtype):
    """Packed batches: per-sequence means, scales and causal alignment, including sequences shorter
    than dense_below, one of 1 row and head slices as the pipeline passes them."""
    from test_varlen import make_batch

    _, (q, k, v, cu_q, cu_k) = make_batch([300, 1500, 1, 777], hq=hq, hkv=hkv, d=d, device="cuda", seed=d + bk)
    q, k = q.to(dtype), k.to(dtype)
    cu_q, cu_k = cu_q.cuda(), cu_k.cuda()
    tau = torch.logspace(-5, -1, hq, device="cuda")
    for dense_below in (0, 500):
        qz = torch.ops.sale.quantize_varlen(q, k, cu_q, cu_k, 1500, 1500, bk)
        want = torch.ops.sale.block_mask_bits_varlen(q, k, cu_q, cu_k, 1500, 1500, *qz, tau, 64, bk, 128, d**-0.5,
                                                     dense_below)
        got = torch.ops.sale.select_varlen(q, k, cu_q, cu_k, 1500, 1500, tau, 64, bk, 128, d**-0.5, dense_below)
        assert torch.equal(got, want)
    qh, kh = q[:, hq - hq // hkv :], k[:, hkv - 1 :]  # the last kv head and its query heads: strided views
    qz = torch.ops.sale.quantize_varlen(qh, kh, cu_q, cu_k, 1500, 1500, bk)
    want = torch.ops.sale.block_mask_bits_varlen(qh, kh, cu_q, cu_k, 1500, 1500, *qz, tau[hq - hq // hkv :], 64, bk,
                                                 128, d**-0.5, 0)
    got = torch.ops.sale.select_varlen(qh, kh, cu_q, cu_k, 1500, 1500, tau[hq - hq // hkv :], 64, bk, 128, d**-0.5, 0)
    assert torch.equal(got, want)


@hopper_only
def test_select_varlen_opcheck_cuda():
    from test_varlen import make_batch

    _, (q, k, v, cu_q, cu_k) = make_batch([130, 63, 200], hq=4, hkv=2, d=64, device="cuda", seed=2)
    tau = torch.linspace(0, 0.05, 4, device="cuda")
    torch.library.opcheck(torch.ops.sale.select_varlen.default,
                          (q, k, cu_q.cuda(), cu_k.cuda(), 200, 200, tau, 64, 32, 128, 0.125, 0))
