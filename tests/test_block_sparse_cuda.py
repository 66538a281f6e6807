"""The CUDA block-sparse attention kernel (sale.block_sparse_attention) against the CPU reference
under SPEC §7, plus empty rows, determinism, graphs, opcheck and argument errors.

Every output is compared with the reference at every element, and each call runs on memory that
held NaN just before (the caching allocator hands the freed block back), so an element the kernel
forgot to write shows up as a mismatch.
"""

import math

import pytest
import torch

import sale_ops
from sale_ops import reference as ref
from sale_ops.testing import assert_attention_close, make_qkv

gpu = pytest.mark.gpu

OP = torch.ops.sale.block_sparse_attention


def test_cuda_key_is_served_by_the_cpp_kernel():
    """A Python registration for CUDA would silently shadow the C++ kernel; runs without a GPU."""
    dump = torch._C._dispatch_dump("sale::block_sparse_attention")
    cuda = [line for line in dump.splitlines() if line.startswith("CUDA:")]
    assert len(cuda) == 1 and "block_sparse_attention_cuda.cu" in cuda[0], dump
    assert "block_sparse_attention" not in sale_ops._reference_backend.REFERENCE_ON_CUDA


def poison_allocator(*like):
    """Fill the caching allocator's free blocks of the outputs' sizes with NaN."""
    for shape, dtype in like:
        torch.empty(shape, dtype=dtype, device="cuda").fill_(float("nan"))
    # freed, not released: the next allocations of these sizes reuse the NaN-filled blocks


def run(q, k, v, mask, bk, causal, scale=None):
    B, Hq, Nq, D = q.shape
    scale = D**-0.5 if scale is None else scale
    poison_allocator(((B, Hq, Nq, D), q.dtype), ((B, Hq, Nq), torch.float32))
    out, lse = OP(q, k, v, mask, 64, bk, scale, causal)
    torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (B, Hq, Nq) and lse.dtype == torch.float32
    assert not bool(out.isnan().any()) and not bool(lse.isnan().any())
    return out, lse


def check(q, k, v, mask, bk, causal, scale=None):
    """Kernel vs the CPU reference (fp64 and input-dtype) everywhere; returns the outputs."""
    out, lse = run(q, k, v, mask, bk, causal, scale)
    assert_attention_close(
        out.cpu(), lse.cpu(), q.cpu(), k.cpu(), v.cpu(), mask.cpu(), 64, bk, scale, causal
    )
    return out, lse


def random_mask(b, hq, nq, nk, bk, density, seed=0, device="cuda"):
    """Random kept blocks at `density`, plus key block 0 in every row (no empty row)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, hq, math.ceil(nq / 64), math.ceil(nk / bk), generator=g) < density
    mask[..., 0] = True
    return mask.to(device)


CASES = [
    # (batch, hq, hkv, nq, nk, d, bk): N in {1, 63, 1025}, GQA groups 1/3/4/7, chunked Nq < Nk
    (2, 4, 4, 1, 1, 64, 32),
    (2, 3, 1, 63, 63, 128, 64),
    (2, 8, 2, 1025, 1025, 64, 32),
    (2, 7, 1, 1025, 1025, 128, 64),
    (2, 4, 2, 777, 3001, 128, 32),
    (2, 2, 2, 63, 1025, 64, 64),
    (2, 3, 1, 1, 700, 128, 32),
]


@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,bk", CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@gpu
def test_random_masks(b, hq, hkv, nq, nk, d, bk, causal, dtype):
    q, k, v = make_qkv(b, hq, hkv, nq, d, kv_len=nk, dtype=dtype, device="cuda", seed=nq + hq + d)
    for i, density in enumerate((0.05, 0.3, 1.0)):
        check(q, k, v, random_mask(b, hq, nq, nk, bk, density, seed=i), bk, causal)


@pytest.mark.parametrize(
    "b,hq,hkv,n,d,bk,dtype,causal,density",
    [
        (2, 4, 1, 4097, 128, 32, torch.bfloat16, True, 0.3),
        (2, 3, 3, 4097, 64, 64, torch.float16, True, 1.0),
        (2, 4, 2, 4097, 128, 64, torch.bfloat16, False, 0.05),
        (2, 2, 2, 4097, 64, 32, torch.float16, False, 1.0),
    ],
)
@gpu
def test_long_sequences(b, hq, hkv, n, d, bk, dtype, causal, density):
    q, k, v = make_qkv(b, hq, hkv, n, d, dtype=dtype, device="cuda", seed=n + d)
    check(q, k, v, random_mask(b, hq, n, n, bk, density, seed=d), bk, causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@gpu
def test_density_skewed_across_heads_and_query_blocks(dtype):
    """The persistent kernel hands out work items (pairs of query blocks of a head) whose cost
    differs by orders of magnitude: a head that keeps every block, heads with the sink only, query
    blocks alternately dense and sink-only, a sparse random head; 640 items, more than the SMs."""
    b, hq, hkv, n, bk = 2, 8, 2, 5000, 32
    q, k, v = make_qkv(b, hq, hkv, n, 128, dtype=dtype, device="cuda", seed=5)
    mask = random_mask(b, hq, n, n, bk, 0.0).cpu()  # sink only
    mask[:, 0] = True
    mask[:, 2, ::2] = True
    mask[:, 5, 1::2] = True
    mask[:, 3] = random_mask(b, 1, n, n, bk, 0.02, seed=3)[:, 0].cpu()
    check(q, k, v, mask.cuda(), bk, True)


@gpu
def test_non_causal_more_queries_than_keys():
    q, k, v = make_qkv(2, 4, 2, 1025, 64, kv_len=300, dtype=torch.bfloat16, device="cuda")
    for density in (0.3, 1.0):
        check(q, k, v, random_mask(2, 4, 1025, 300, 64, density), 64, False)


@pytest.mark.parametrize("bk", [32, 64])
@pytest.mark.parametrize("nq,nk", [(2000, 2000), (1000, 2100)])
@gpu
def test_diagonal_and_sink_only(bk, nq, nk):
    """Only the sink and the blocks crossing the causal diagonal: every tile is masked."""
    q, k, v = make_qkv(2, 4, 2, nq, 128, kv_len=nk, dtype=torch.bfloat16, device="cuda")
    causal = ref.causal_blocks(nq, nk, 64, bk)
    diag = ref.dense_blocks(nq, nk, 64, bk, 64) & causal  # blocks touching the last 64 keys of e_m
    mask = diag.expand(2, 4, -1, -1).clone()
    mask[..., 0] = True
    check(q, k, v, mask.cuda(), bk, True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bk", [32, 64])
@gpu
def test_masks_from_block_mask_kernel(dtype, bk):
    q, k, v = make_qkv(2, 8, 2, 2500, 128, dtype=dtype, device="cuda", seed=3)
    tau = torch.tensor([0.0, 1e-3, 1e-2, 0.1, 1e30, 3e-3, 3e-2, 1e-4], device="cuda")
    mask = sale_ops.block_mask(q, k, tau, bk=bk)
    density = ref.block_density(mask.cpu(), 2500, 2500, 64, bk)
    assert float(density.min()) < 0.5  # the selection is really sparse for some heads
    check(q, k, v, mask, bk, True)
    # and through the public API, with the bool mask and with the estimator's bit-packed words
    out = sale_ops.block_sparse_attention(q, k, v, mask, bk=bk)
    assert torch.equal(out, OP(q, k, v, mask, 64, bk, 128**-0.5, True)[0])
    bits = sale_ops.block_mask(q, k, tau, bk=bk, packed=True)
    assert torch.equal(sale_ops.block_sparse_attention(q, k, v, bits, bk=bk), out)


@pytest.mark.parametrize("d", [64, 128])
@gpu
def test_large_magnitude_fp16(d):
    """Logits of a few hundred (exp overflows fp32 past 88): the online softmax must rescale
    without overflow or NaN. Not larger: fp32 accumulation of q.k must stay within the 1e-3
    lse tolerance (its rounding error grows with |q.k|)."""
    q, k, v = make_qkv(1, 4, 2, 1500, d, dtype=torch.float32, device="cuda", seed=5, heavy_strength=1.0)
    q, k, v = (q * 30).half(), k.half(), (v * 30).half()
    for causal in (True, False):
        check(q, k, v, random_mask(1, 4, 1500, 1500, 32, 0.3), 32, causal)


@gpu
def test_empty_rows_give_zero_and_minus_inf():
    """Masks the public API refuses: rows with no visible key get out = 0 and lse = -inf."""
    n = 300
    q, k, v = make_qkv(1, 2, 1, n, 64, dtype=torch.float16, device="cuda")
    mask = random_mask(1, 2, n, n, 32, 0.5)
    mask[0, 0, 2] = False  # query block 2 of head 0 keeps nothing
    mask[0, 1, 1] = False
    mask[0, 1, 1, 3] = True  # rows 64..95 see none of keys 96..127 (causal), rows 96..127 do
    for causal in (True, False):
        out, lse = check(q, k, v, mask, 32, causal)
        assert bool((out[0, 0, 128:192] == 0).all()) and bool((lse[0, 0, 128:192] == -math.inf).all())
        if causal:
            assert bool((out[0, 1, 64:96] == 0).all()) and bool((lse[0, 1, 64:96] == -math.inf).all())
            assert bool(torch.isfinite(lse[0, 1, 96:128]).all())
    # a mask with nothing kept at all
    out, lse = run(q, k, v, torch.zeros_like(mask), 32, True)
    assert bool((out == 0).all()) and bool((lse == -math.inf).all())


@gpu
def test_deterministic_and_layout_independent():
    q, k, v = make_qkv(2, 8, 2, 3000, 128, dtype=torch.bfloat16, device="cuda")
    mask = random_mask(2, 8, 3000, 3000, 32, 0.3)
    a = OP(q, k, v, mask, 64, 32, 0.1, True)
    b = OP(q, k, v, mask, 64, 32, 0.1, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # [B, N, H, D] storage seen as [B, H, N, D], and an expanded (stride-0) mask: same bits
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    c = OP(qt, kt, vt, mask, 64, 32, 0.1, True)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    row = mask[:1, :1].expand(2, 8, -1, -1)
    d = OP(q, k, v, row, 64, 32, 0.1, True)
    e = OP(q, k, v, row.contiguous(), 64, 32, 0.1, True)
    assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])


@gpu
def test_cuda_graph_capture_and_replay():
    q, k, v = make_qkv(1, 8, 2, 1500, 128, dtype=torch.bfloat16, device="cuda")
    mask = random_mask(1, 8, 1500, 1500, 32, 0.3)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        OP(q, k, v, mask, 64, 32, 0.125, True)  # warm-up (sets the kernel's smem attribute)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = OP(q, k, v, mask, 64, 32, 0.125, True)
    q2, k2, v2 = make_qkv(1, 8, 2, 1500, 128, dtype=torch.bfloat16, device="cuda", seed=7)
    mask2 = random_mask(1, 8, 1500, 1500, 32, 0.1, seed=9)
    q.copy_(q2), k.copy_(k2), v.copy_(v2), mask.copy_(mask2)
    graph.replay()
    want = OP(q2, k2, v2, mask2, 64, 32, 0.125, True)
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])


@gpu
def test_side_stream():
    q, k, v = make_qkv(1, 4, 2, 800, 64, dtype=torch.float16, device="cuda")
    mask = random_mask(1, 4, 800, 800, 32, 0.3)
    want = OP(q, k, v, mask, 64, 32, 0.125, True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = OP(q, k, v, mask, 64, 32, 0.125, True)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@gpu
def test_opcheck_cuda():
    for dtype, n, nk, bk, causal in [
        (torch.bfloat16, 130, 130, 32, True),
        (torch.float16, 63, 200, 64, True),
        (torch.bfloat16, 200, 63, 32, False),
    ]:
        q, k, v = make_qkv(2, 4, 2, n, 64, kv_len=nk, dtype=dtype, device="cuda")
        mask = random_mask(2, 4, n, nk, bk, 0.5)
        torch.library.opcheck(OP.default, (q, k, v, mask, 64, bk, 0.125, causal))


@gpu
def test_kernel_argument_errors():
    q, k, v = make_qkv(1, 2, 1, 100, 64, device="cuda")
    mask = random_mask(1, 2, 100, 100, 32, 0.5)
    base = torch.empty(1, 2, 100, 68, dtype=q.dtype, device="cuda")[..., :64]
    base.copy_(q)  # row stride 68: rows are not 16-byte aligned
    with pytest.raises(RuntimeError, match="sale.block_sparse_attention.*16-byte boundary"):
        OP(base, k, v, mask, 64, 32, 0.125, True)
    with pytest.raises(RuntimeError, match="argument 'bk' is 16; supported: 32, 64"):
        OP(q, k, v, random_mask(1, 2, 100, 100, 16, 0.5), 64, 16, 0.125, True)
    with pytest.raises(RuntimeError, match="argument 'bq' is 128; supported: 64"):
        OP(q, k, v, mask, 128, 32, 0.125, True)
    with pytest.raises(RuntimeError, match="argument 'block_mask' has dtype"):
        OP(q, k, v, mask.to(torch.uint8), 64, 32, 0.125, True)
    with pytest.raises(RuntimeError, match="argument 'block_mask' must have shape"):
        OP(q, k, v, mask[..., :2], 64, 32, 0.125, True)
    with pytest.raises(RuntimeError, match="argument 'scale'"):
        OP(q, k, v, mask, 64, 32, float("nan"), True)
    with pytest.raises(RuntimeError, match="Nq <= Nk"):
        OP(q, k[:, :, :50], v[:, :, :50], random_mask(1, 2, 100, 50, 32, 0.5), 64, 32, 0.125, True)
    with pytest.raises(RuntimeError, match="'v' must have the shape of 'k'"):
        OP(q, k, v[:, :, :50], mask, 64, 32, 0.125, True)
    with pytest.raises(RuntimeError, match="dtype"):
        OP(q, k.half(), v, mask, 64, 32, 0.125, True)
    with pytest.raises(RuntimeError, match="head dim 32; supported: 64, 128"):
        OP(q[..., :32].contiguous(), k[..., :32].contiguous(), v[..., :32].contiguous(), mask, 64, 32, 0.125, True)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        OP(q, k, v, mask.cpu(), 64, 32, 0.125, True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@gpu
def test_both_kernels_meet_the_rule(dtype, monkeypatch):
    """The wgmma kernel (default) and the mma.sync kernel (SALE_OPS_ATTENTION=mma) on the same
    inputs, GQA 7:1, odd lengths, both key blocks: each within SPEC §7 of the reference."""
    q, k, v = make_qkv(1, 7, 1, 1025, 128, kv_len=1100, dtype=dtype, device="cuda", seed=11)
    for bk in (32, 64):
        mask = random_mask(1, 7, 1025, 1100, bk, 0.3, seed=bk)
        for kernel in ("mma", "wgmma"):
            monkeypatch.setenv("SALE_OPS_ATTENTION", kernel)
            check(q, k, v, mask, bk, True)


@gpu
def test_bf16_values_past_fp16_range():
    """bf16 V far beyond fp16's range: the wgmma kernel's fp16 P.V scales V by an exact power of
    two and undoes it, so nothing overflows and the SPEC §7 rule holds."""
    q, k, v = make_qkv(1, 4, 2, 700, 64, dtype=torch.float32, device="cuda", seed=12)
    v = (v * 3e5).bfloat16()
    q, k = q.bfloat16(), k.bfloat16()
    out, _ = check(q, k, v, random_mask(1, 4, 700, 700, 32, 0.5), 32, True)
    assert bool(torch.isfinite(out).all()) and float(out.abs().max()) > 65504


@gpu
def test_fast_p_mode_is_close(monkeypatch):
    """SALE_OPS_ATTENTION=fast (bf16: P rounded once to fp16) stays close to the exact result
    (it may leave SPEC §7's elementwise bound in rare elements when |V| is large, so only the
    relative error is asserted here)."""
    q, k, v = make_qkv(1, 8, 2, 1500, 128, dtype=torch.bfloat16, device="cuda", seed=13)
    mask = random_mask(1, 8, 1500, 1500, 32, 0.4)
    exact = ref.block_sparse_attention(*(t.double() for t in (q, k, v)), mask, 64, 32, None, True, torch.float64)[0]
    monkeypatch.setenv("SALE_OPS_ATTENTION", "fast")
    fast, _ = run(q, k, v, mask, 32, True)
    rel = float((fast.double() - exact).norm() / exact.norm())
    assert rel < 4e-3, rel
