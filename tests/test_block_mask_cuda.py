"""The CUDA block-selection kernel (sale.block_mask) against the reference under SPEC §7."""

import pytest
import torch

import sale_ops
from sale_ops import reference as ref
from sale_ops.testing import compare_block_mask, make_qkv

pytestmark = pytest.mark.gpu

CASES = [
    # (batch, hq, hkv, nq, nk, d, bk, window)
    (1, 4, 4, 1, 1, 64, 32, 128),
    (1, 3, 1, 63, 63, 128, 32, 128),
    (2, 8, 2, 1025, 1025, 64, 32, 128),
    (1, 7, 1, 1025, 1025, 128, 64, 128),
    (1, 12, 4, 4097, 4097, 128, 32, 128),
    (1, 9, 3, 4097, 4097, 64, 64, 256),
    (1, 4, 2, 777, 3001, 128, 32, 192),  # chunked prefill, Nq < Nk
    (2, 6, 2, 2048, 2048, 64, 32, 64),   # window == bq
]


def check(q, k, tau, bk=32, window=128, max_near=0.001):
    qz = sale_ops.quantize(q, k, bk=bk)
    mask = sale_ops.block_mask(q, k, tau, quantized=qz, bk=bk, window=window)
    torch.cuda.synchronize()
    cpu = [t.cpu() for t in (q, k)]
    qz_cpu = ref.Quantized(*[t.cpu() for t in qz])
    c = compare_block_mask(mask.cpu(), *cpu, qz_cpu, tau.cpu(), 64, bk, window)
    assert c.mismatched == c.near_ties, f"blocks differ beyond the SPEC §7 tolerance: {c}"
    assert c.near_ties <= max_near * max(c.candidates, 1), c
    # structure: never a non-causal block, always the dense set
    nq, nk = q.shape[2], k.shape[2]
    causal = ref.causal_blocks(nq, nk, 64, bk)
    dense = ref.dense_blocks(nq, nk, 64, bk, window) & causal
    m = mask.cpu()
    assert not bool((m & ~causal).any()) and bool(m[..., dense].all())
    return c, m


@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,bk,window", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_mask_agrees_with_reference(b, hq, hkv, nq, nk, d, bk, window, dtype):
    q, k, _ = make_qkv(b, hq, hkv, nq, d, kv_len=nk, dtype=dtype, device="cuda", seed=nq + hq + d)
    # tau = 0 (all causal blocks), 1e30 (dense set only) and values in between
    tau = torch.tensor(([0.0, 1e30, 1e-3, 1.0, 1e-2, 0.1, 1e-4, 3e-2] * 2)[:hq], device="cuda")
    c, mask = check(q, k, tau, bk, window)
    if nq > 1000 and hq > 2:
        density = ref.block_density(mask, nq, nk, 64, bk)[:, 2:]  # the heads with 0 < tau < 1e30
        assert float(density.min()) < 0.9, "the inputs should make selection non-trivial"


@pytest.mark.parametrize("kind", ["equal_keys", "huge_key", "zero_rows", "large_fp16", "gaussian", "tiny_bf16"])
def test_kernel_mask_adversarial(kind):
    dtype = torch.bfloat16 if kind == "tiny_bf16" else torch.float16
    q, k, _ = make_qkv(1, 4, 2, 1500, 128, dtype=torch.float32, device="cuda", seed=11)
    if kind == "equal_keys":
        k = k[:, :, :1].expand_as(k).contiguous()
    elif kind == "huge_key":
        k[:, :, 700] *= 200
    elif kind == "zero_rows":
        q[:, :, 100:400] = 0
        k[:, :, 64:640] = 0
    elif kind == "large_fp16":
        q, k = q * 60, k * 60  # logits ~1e5: stresses fp32 statistics
    elif kind == "gaussian":
        q, k = torch.randn_like(q), torch.randn_like(k)
    elif kind == "tiny_bf16":
        # scales ~1e-20, so d = sq * sk is subnormal in fp32: the scorers must take the exact path
        q, k = q * 1e-19, k * 1e-19
    tau = torch.tensor([0.0, 1e-3, 1e-2, 0.2], device="cuda")
    check(q.to(dtype), k.to(dtype), tau)


def test_kernel_tau_extremes():
    q, k, _ = make_qkv(1, 4, 2, 2000, 64, device="cuda")
    _, m0 = check(q, k, torch.zeros(4, device="cuda"))
    assert torch.equal(m0, ref.causal_blocks(2000, 2000, 64, 32).expand_as(m0))
    _, m1 = check(q, k, torch.full((4,), 1e30, device="cuda"))
    want = ref.dense_blocks(2000, 2000, 64, 32, 128) & ref.causal_blocks(2000, 2000, 64, 32)
    assert torch.equal(m1, want.expand_as(m1))


def test_kernel_deterministic_and_strided():
    q, k, _ = make_qkv(2, 8, 2, 3000, 128, device="cuda")
    tau = torch.full((8,), 3e-3, device="cuda")
    a = sale_ops.block_mask(q, k, tau)
    b = sale_ops.block_mask(q, k, tau)
    assert torch.equal(a, b)
    # head-major storage ([B, N, H, D] transposed): same mask
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(sale_ops.block_mask(qt, kt, tau), a)


def _at_offset(t, elements):
    """A contiguous copy of t whose data starts `elements` elements into a fresh buffer."""
    buf = torch.zeros(t.numel() + elements, dtype=t.dtype, device=t.device)
    view = buf[elements:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("nk", [1025, 4096])
def test_kernel_scales_and_biases_at_any_offset(nk):
    # The wgmma scorer reads k_scale and qk_bias through 1D TMA boxes that must start on 16 bytes:
    # buffers that start 1-3 floats past a boundary (and Nk not a multiple of 4) give the same mask.
    q, k, _ = make_qkv(1, 8, 2, nk, 128, device="cuda", seed=5)
    tau = torch.full((8,), 1e-3, device="cuda")
    qz = sale_ops.quantize(q, k, bk=32)
    want = torch.ops.sale.block_mask_bits(q, k, *qz, tau, 64, 32, 128, 128**-0.5)
    for off in (1, 2, 3):
        moved = list(qz)
        moved[3], moved[4] = _at_offset(qz[3], off), _at_offset(qz[4], off)  # k_scale, qk_bias
        got = torch.ops.sale.block_mask_bits(q, k, *moved, tau, 64, 32, 128, 128**-0.5)
        assert torch.equal(got, want), off


def test_kernel_rejects_misaligned_codes():
    q, k, _ = make_qkv(1, 2, 2, 100, 64, device="cuda")
    qz = list(sale_ops.quantize(q, k, bk=32))
    qz[2] = _at_offset(qz[2], 8)  # k_codes 8 bytes past a 16-byte boundary
    with pytest.raises(RuntimeError, match="'k_codes' must start on a 16-byte boundary"):
        torch.ops.sale.block_mask_bits(q, k, *qz, torch.zeros(2, device="cuda"), 64, 32, 128, 0.125)


def test_kernel_rejects_misaligned_rows():
    q, k, _ = make_qkv(1, 2, 2, 100, 64, device="cuda")
    qz = torch.ops.sale.quantize(q, k, 32)
    base = torch.empty(1, 2, 100, 64 + 4, dtype=q.dtype, device="cuda")[..., :64]
    base.copy_(q)  # row stride 68: rows are not 16-byte aligned
    with pytest.raises(RuntimeError, match="16-byte boundary"):
        torch.ops.sale.block_mask(base, k, *qz, torch.zeros(2, device="cuda"), 64, 32, 128, 0.125)


def test_kernel_under_cuda_graph():
    q, k, _ = make_qkv(1, 8, 2, 2500, 128, device="cuda")
    tau = torch.full((8,), 1e-3, device="cuda")
    qz = sale_ops.quantize(q, k)
    want = sale_ops.block_mask(q, k, tau, quantized=qz)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.ops.sale.block_mask(q, k, *qz, tau, 64, 32, 128, 128**-0.5)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        got = torch.ops.sale.block_mask(q, k, *qz, tau, 64, 32, 128, 128**-0.5)
    g.replay()
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "d,bk,hq,hkv,n", [(128, 32, 8, 2, 3333), (64, 64, 6, 2, 3333), (128, 64, 3, 3, 3333), (64, 32, 7, 1, 3333),
                      (128, 32, 4, 1, 9000)]
)
def test_wgmma_and_mma_scorers_agree_exactly(monkeypatch, d, bk, hq, hkv, n):
    """Both candidate scorers decide exactly from the same thresholds: identical masks (9000 keys:
    the wgmma scorer's ring of stages wraps many times)."""
    q, k, _ = make_qkv(2, hq, hkv, n, d, device="cuda", seed=d + bk)
    tau = torch.logspace(-5, 0, hq, device="cuda")
    qz = sale_ops.quantize(q, k, bk=bk)
    wgmma = sale_ops.block_mask(q, k, tau, quantized=qz, bk=bk)  # the default scorer
    monkeypatch.setenv("SALE_OPS_ESTIMATOR", "mma")
    mma = sale_ops.block_mask(q, k, tau, quantized=qz, bk=bk)
    assert torch.equal(wgmma, mma)
    assert torch.equal(sale_ops.block_mask(q, k, tau, quantized=qz, bk=bk, packed=True), sale_ops.pack_block_mask(mma))


@pytest.mark.parametrize("n", [1, 63, 1025, 4097])
def test_bits_are_the_packed_bool_mask(n):
    q, k, _ = make_qkv(1, 8, 2, n, 128, device="cuda", seed=n)
    tau = torch.logspace(-4, -1, 8, device="cuda")
    qz = sale_ops.quantize(q, k)
    mask = sale_ops.block_mask(q, k, tau, quantized=qz)
    bits = sale_ops.block_mask(q, k, tau, quantized=qz, packed=True)
    assert bits.dtype == torch.int32 and bits.shape == (1, 8, mask.shape[2], -(-mask.shape[3] // 32))
    assert torch.equal(sale_ops.unpack_block_mask(bits, mask.shape[3]), mask)
