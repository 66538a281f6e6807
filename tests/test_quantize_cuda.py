"""torch.ops.sale.quantize's CUDA kernel (cpp/sale/quantize.cuh) against the CPU reference (SPEC §2, §7)."""

import pytest
import torch

import sale_ops
from sale_ops import reference as ref
from sale_ops.testing import assert_quantization_agrees, make_qkv

gpu = pytest.mark.gpu
FIELDS = ref.Quantized._fields


def quantize(q, k, bk=32):
    return ref.Quantized(*torch.ops.sale.quantize(q, k, bk))


def assert_identical(a, b):
    for name, x, y in zip(FIELDS, a, b):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), f"{name} differs"


def test_cuda_key_is_served_by_the_cpp_kernel():
    """A Python registration for CUDA would silently shadow the C++ kernel; runs without a GPU."""
    dump = torch._C._dispatch_dump("sale::quantize")
    cuda = [line for line in dump.splitlines() if line.startswith("CUDA:")]
    assert len(cuda) == 1 and "quantize_cuda.cu" in cuda[0], dump
    assert "quantize" not in sale_ops._reference_backend.REFERENCE_ON_CUDA


@gpu
@pytest.mark.parametrize("d,bk", [(64, 32), (64, 64), (128, 32), (128, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("g", [1, 3, 4, 7])
@pytest.mark.parametrize("n", [1, 63, 1025, 4097])
def test_agrees_with_cpu_reference(n, g, dtype, d, bk):
    hkv = 2
    q, k, _ = make_qkv(2, g * hkv, hkv, n, d, dtype=dtype, device="cuda", seed=n + 10 * g + d)
    assert_quantization_agrees(quantize(q, k, bk), q, k, bk)


@gpu
@pytest.mark.parametrize(
    "b,hq,hkv,nq,nk,d",
    [
        (1, 16, 16, 32768, 32768, 128),  # many heads: the mean pass sums 512-row chunks
        (1, 2, 1, 100_003, 100_003, 64),  # few heads: many small chunks, a long fixed-order sum
        (2, 6, 2, 63, 1025, 128),  # Nq < Nk
        (1, 4, 1, 2049, 100, 64),  # Nq > Nk (quantize does not need causal shapes)
    ],
)
def test_long_and_unequal_sequences(b, hq, hkv, nq, nk, d):
    q, k, _ = make_qkv(b, hq, hkv, nq, d, kv_len=nk, dtype=torch.bfloat16, device="cuda", seed=nq)
    assert_quantization_agrees(quantize(q, k), q, k)


def _strided(x, kind):
    """The values of ``x`` in another memory layout (last dim contiguous)."""
    B, H, N, D = x.shape
    if kind == "head-major":  # [B, N, H, D] memory, as a fused QKV projection leaves it
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "padded-rows":  # row stride D + 8: still 16-byte aligned
        return torch.cat([x, x[..., :8]], dim=-1)[..., :D]
    if kind == "odd-rows":  # row stride D + 1: element-wise loads
        return torch.cat([x, x[..., :1]], dim=-1)[..., :D]
    if kind == "offset":  # base not 16-byte aligned
        flat = torch.cat([x.new_zeros(1), x.flatten()])
        return flat[1:].view(B, H, N, D)
    raise ValueError(kind)


@gpu
@pytest.mark.parametrize("kind", ["head-major", "padded-rows", "odd-rows", "offset"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
def test_strided_inputs(kind, dtype, d):
    q, k, _ = make_qkv(2, 6, 2, 1025, d, dtype=dtype, device="cuda", seed=3)
    qs, ks = _strided(q, kind), _strided(k, kind)
    assert torch.equal(qs, q) and torch.equal(ks, k)
    if kind != "head-major":
        assert not qs.is_contiguous() or kind == "offset"
    got = quantize(qs, ks)
    assert_quantization_agrees(got, q, k)
    assert_identical(got, quantize(q, k))  # the summation order does not depend on the layout


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bk", [32, 64])
def test_all_keys_equal(dtype, bk):
    q, k, _ = make_qkv(1, 6, 2, 1025, 128, dtype=dtype, device="cuda")
    k = k[:, :, :1].expand_as(k).contiguous()  # centred keys are exactly 0
    got = quantize(q, k, bk)
    assert_quantization_agrees(got, q, k, bk)
    assert torch.equal(got.k_codes, torch.zeros_like(got.k_codes))
    assert torch.equal(got.k_scale, torch.ones_like(got.k_scale))
    assert torch.equal(got.qk_bias, torch.zeros_like(got.qk_bias))
    assert torch.equal(got.k_mean, k[:, :, 0].float())


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_one_huge_key(dtype):
    q, k, _ = make_qkv(2, 4, 2, 1025, 64, dtype=dtype, device="cuda", seed=5)
    k[:, :, 37] *= 1000  # owns its group's scale; every other group must be unaffected
    got = quantize(q, k)
    assert_quantization_agrees(got, q, k)
    assert bool((got.k_scale[:, :, 37] > 20 * got.k_scale[:, :, 64:].amax()).all())


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_zero_rows_and_heads(dtype):
    q, k, _ = make_qkv(1, 6, 2, 200, 128, dtype=dtype, device="cuda", seed=6)
    q[:, 0] = 0  # a whole head: mean 0, centred 0 -> scale 1, codes 0
    q[:, 1:, 16:32] = 0
    q[:, 1:, 5] = 0
    k[:, :, 40:80] = 0
    got = quantize(q, k)
    assert_quantization_agrees(got, q, k)
    assert torch.equal(got.q_codes[:, 0], torch.zeros_like(got.q_codes[:, 0]))
    assert torch.equal(got.q_scale[:, 0], torch.ones_like(got.q_scale[:, 0]))


def _tie_inputs(b, h, half_n, d, dtype, seed):
    """Every value is (j + 0.5) * 0.75 except column 0, which is ±5.25: every group's amax is 5.25,
    its scale exactly 0.75 and x / scale exactly a half-integer (a true rounding tie). Rows come in
    ± pairs, so every mean is exactly 0 in any summation order."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(-7, 7, (b, h, half_n, d), generator=g) + 0.5) * 0.75
    x[..., 0] = 5.25
    return torch.cat([x, -x], dim=2).to(device="cuda", dtype=dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,bk", [(64, 64), (128, 32)])
def test_exact_ties_round_half_to_even(dtype, d, bk):
    q = _tie_inputs(2, 6, 517, d, dtype, 1)
    k = _tie_inputs(2, 2, 517, d, dtype, 2)
    got, want = quantize(q, k, bk), ref.quantize(q.cpu(), k.cpu(), bk)
    assert bool((want.q_scale == 0.75).all()) and bool((want.k_scale == 0.75).all())
    for name in FIELDS:  # no tolerance: the inputs leave no room for rounding differences
        assert torch.equal(getattr(got, name).cpu(), getattr(want, name)), name


@gpu
@pytest.mark.parametrize("d", [64, 128])
def test_large_fp16_magnitudes_are_exactly_scaled(d):
    """Values ~1e4 in fp16. Scaling the input by 2^12 is exact and every step of SPEC §2 commutes
    with it, so codes must be identical and scales, means and bias exactly 2^12, 2^12, 2^24 times
    the unscaled ones (checked against the reference)."""
    q, k, _ = make_qkv(2, 6, 2, 1025, d, dtype=torch.float16, device="cuda", seed=8)
    q, k = q.clamp(-15, 15), k.clamp(-15, 15)
    base = quantize(q, k)
    assert_quantization_agrees(base, q, k)
    big = quantize(q * 4096, k * 4096)
    assert float(q.abs().max()) * 4096 > 1e4
    assert torch.equal(big.q_codes, base.q_codes) and torch.equal(big.k_codes, base.k_codes)
    for name, factor in (("q_scale", 2**12), ("k_scale", 2**12), ("k_mean", 2**12), ("qk_bias", 2**24)):
        assert torch.equal(getattr(big, name), getattr(base, name) * factor), name


@gpu
@pytest.mark.parametrize("shape", [(2, 7, 1, 4097, 128), (1, 32, 8, 16384, 128), (1, 16, 2, 3000, 64)])
def test_deterministic(shape):
    b, hq, hkv, n, d = shape
    q, k, _ = make_qkv(b, hq, hkv, n, d, device="cuda", seed=9)
    first = quantize(q, k)
    for _ in range(3):
        assert_identical(quantize(q, k), first)


@gpu
def test_cuda_graph_capture_and_replay():
    q, k, _ = make_qkv(1, 8, 2, 1500, 128, device="cuda")
    quantize(q, k)  # warm-up outside capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        quantize(q, k)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = quantize(q, k)
    q2, k2, _ = make_qkv(1, 8, 2, 1500, 128, device="cuda", seed=7)
    q.copy_(q2), k.copy_(k2)
    graph.replay()
    torch.cuda.synchronize()
    assert_identical(out, quantize(q2, k2))


@gpu
def test_side_stream():
    q, k, _ = make_qkv(2, 4, 2, 777, 64, device="cuda")
    want = quantize(q, k)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = quantize(q, k)
    torch.cuda.current_stream().wait_stream(s)
    assert_identical(got, want)


@gpu
def test_empty_batch():
    q = torch.zeros(0, 4, 10, 64, dtype=torch.bfloat16, device="cuda")
    k = torch.zeros(0, 2, 12, 64, dtype=torch.bfloat16, device="cuda")
    got = quantize(q, k)
    assert [tuple(t.shape) for t in got] == [(0, 4, 10, 64), (0, 4, 10), (0, 2, 12, 64), (0, 2, 12), (0, 4, 12), (0, 2, 64)]


@gpu
def test_opcheck_cuda():
    for dtype, n, nk, bk in [(torch.bfloat16, 130, 130, 32), (torch.float16, 63, 200, 64)]:
        q, k, _ = make_qkv(2, 4, 2, n, 64, kv_len=nk, dtype=dtype, device="cuda")
        torch.library.opcheck(torch.ops.sale.quantize.default, (q, k, bk))
        torch.library.opcheck(torch.ops.sale.quantize.default, (_strided(q, "head-major"), _strided(k, "odd-rows"), bk))


@gpu
@pytest.mark.parametrize(
    "change,fragments",
    [
        (lambda q, k: (q.float(), k.float(), 32), ["argument 'q'", "dtype", "torch.float32"]),
        (lambda q, k: (q, k.half(), 32), ["argument 'k'", "torch.float16"]),
        (lambda q, k: (q, k, 48), ["argument 'bk'", "48", "32, 64"]),
        (lambda q, k: (q[..., :32], k[..., :32], 32), ["head dim", "32"]),
        (lambda q, k: (q[:, :3], k, 32), ["multiple of kv heads", "Hq=3"]),
        (lambda q, k: (q.transpose(2, 3), k.transpose(2, 3), 32), ["contiguous last dimension"]),
        (lambda q, k: (q[0], k[0], 32), ["4 dimensions"]),
    ],
)
def test_bad_arguments_name_the_op(change, fragments):
    q, k, _ = make_qkv(1, 4, 2, 64, 64, device="cuda")
    with pytest.raises(Exception) as info:
        torch.ops.sale.quantize(*change(q, k))
    msg = str(info.value)
    for f in ["sale.quantize", *fragments]:
        assert f in msg, f"{f!r} not in {msg!r}"


@gpu
def test_public_api_uses_the_kernel():
    q, k, _ = make_qkv(1, 4, 2, 300, 128, device="cuda")
    assert_identical(sale_ops.quantize(q, k, bk=64), quantize(q, k, 64))
    assert "CUDA kernels: quantize" in sale_ops.backend_summary("cuda")

