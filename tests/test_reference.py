"""Properties of the executable spec (sale_ops.reference), on the CPU, mostly in fp64."""

import math

import pytest
import torch

from sale_ops import reference as ref
from sale_ops.testing import make_qkv

F64 = torch.float64


def qkv64(hq, hkv, n, d=64, nk=None, seed=0, b=1):
    return make_qkv(b, hq, hkv, n, d, kv_len=nk, dtype=F64, seed=seed)


def dense_causal(q, k, v, scale=None):
    """Exact causal attention (bottom-right aligned) with KV repeated to every query head."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    nq, nk = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    visible = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
    s = s.masked_fill(~visible, -math.inf)
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


# -- naive, loop-based restatements of SPEC §2 and §4, independent of the vectorised reference --


def naive_quantize_rows(x, groups):
    """``groups``: list of index lists sharing one scale."""
    codes = torch.empty_like(x, dtype=torch.int8)
    scales = torch.empty(x.shape[0], dtype=torch.float32)
    for idx in groups:
        amax = x[idx].abs().max().float()
        s = torch.tensor(1.0) if amax == 0 else amax / 7
        scales[idx] = s
        codes[idx] = torch.round(x[idx].float() / s).clamp(-7, 7).to(torch.int8)
    return codes, scales


def q_groups(n):
    out = []
    for a in range(0, n, 16):
        for r in range(8):
            out.append([i for i in (a + r, a + 8 + r) if i < n])
    return [g for g in out if g]


def k_groups(n, bk):
    out = []
    for blk in range(0, n, bk):
        for grp in range(4):
            out.append([blk + o for o in range(bk) if (o % 8) // 2 == grp and blk + o < n])
    return [g for g in out if g]


@pytest.mark.parametrize("n", [1, 20, 63, 100])
@pytest.mark.parametrize("bk", [32, 64])
def test_quantization_matches_naive_groups(n, bk):
    q, k, _ = make_qkv(1, 2, 1, n, 64, dtype=torch.float32, seed=n)
    qz = ref.quantize(q, k, bk)
    for h in range(2):
        xc = q[0, h] - q[0, h].mean(0)
        codes, scales = naive_quantize_rows(xc, q_groups(n))
        assert torch.equal(qz.q_codes[0, h], codes)
        assert torch.equal(qz.q_scale[0, h], scales)
    kc = k[0, 0] - k[0, 0].mean(0)
    codes, scales = naive_quantize_rows(kc, k_groups(n, bk))
    assert torch.equal(qz.k_codes[0, 0], codes)
    assert torch.equal(qz.k_scale[0, 0], scales)


def test_dequantized_within_half_a_scale():
    q, k, _ = make_qkv(2, 4, 2, 200, 128, dtype=torch.float32)
    qz = ref.quantize(q, k)
    for x, codes, scale in ((q, qz.q_codes, qz.q_scale), (k, qz.k_codes, qz.k_scale)):
        xc = x - x.mean(2, keepdim=True)
        assert int(codes.abs().max()) == 7  # every group's amax maps to ±7
        err = (codes.float() * scale.unsqueeze(-1) - xc).abs()
        assert bool((err <= scale.unsqueeze(-1) * (0.5 + 1e-5)).all())


def test_zero_group_has_unit_scale():
    q = torch.zeros(1, 1, 16, 64)
    k = torch.zeros(1, 1, 32, 64)
    qz = ref.quantize(q, k)
    assert bool((qz.q_scale == 1).all()) and bool((qz.k_scale == 1).all())
    assert bool((qz.q_codes == 0).all()) and bool((qz.k_codes == 0).all())


def test_bias_identity_and_error_bound():
    """(E + b)·sq·sk ≈ q·k̃ within the worst case of rounding each code and the bias."""
    q, k, _ = make_qkv(1, 4, 2, 257, 64, dtype=torch.float32)
    qz = ref.quantize(q, k)
    s_hat = ref.estimate_logits(qz, dtype=F64)
    k_smooth = (k - qz.k_mean.unsqueeze(2)).double().repeat_interleave(2, 1)
    exact = q.double() @ k_smooth.transpose(-1, -2)
    D = q.shape[-1]
    sq_sk = qz.q_scale.double().unsqueeze(-1) * qz.k_scale.double().repeat_interleave(2, 1).unsqueeze(-2)
    bound = sq_sk * (7.25 * D + 0.5) + 1e-9
    assert bool(((s_hat - exact).abs() <= bound).all())
    rel = (s_hat - exact).norm() / exact.norm()
    assert rel < 0.25, rel
    # without the bias the estimate misses q̄ · k̃ entirely
    no_bias = qz._replace(qk_bias=torch.zeros_like(qz.qk_bias))
    rel_nb = (ref.estimate_logits(no_bias, dtype=F64) - exact).norm() / exact.norm()
    assert rel < rel_nb


def naive_block_mask(q, k, qz, tau, bq, bk, window, scale):
    """SPEC §4 with loops over blocks and rows."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    s_hat = ref.estimate_logits(qz, dtype=F64)
    nQ, nK = -(-Nq // bq), -(-Nk // bk)
    mask = torch.zeros(B, Hq, nQ, nK, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            ks = (k[b, h // g] - qz.k_mean[b, h // g]).double()
            s = q[b, h].double() @ ks.T
            for m in range(nQ):
                r0, r1 = m * bq, min((m + 1) * bq, Nq)
                e = r1 + (Nk - Nq)
                dense = {0} | {n for n in range(nK) if n * bk < e and (n + 1) * bk > max(0, e - window)}
                dense_keys = [j for n in dense for j in range(n * bk, min((n + 1) * bk, Nk))]
                for n in dense:
                    mask[b, h, m, n] = True
                T = []
                for i in range(r0, r1):
                    vis = [j for j in dense_keys if j <= i + Nk - Nq]
                    row = s[i, vis]
                    mi = row.max()
                    li = torch.exp(scale * (row - mi)).sum()
                    T.append(mi + math.log(tau[h] * li) / scale if tau[h] > 0 else -math.inf)
                for n in range(nK):
                    if n in dense or n * bk >= e:
                        continue
                    for i in range(r0, r1):
                        js = [j for j in range(n * bk, min((n + 1) * bk, Nk)) if j <= i + Nk - Nq]
                        if js and bool((s_hat[b, h, i, js] > T[i - r0]).any()):
                            mask[b, h, m, n] = True
                            break
    return mask


@pytest.mark.parametrize("nq,nk", [(300, 300), (129, 300), (1, 77)])
def test_block_mask_matches_naive_loops(nq, nk):
    q, k, _ = qkv64(4, 2, nq, nk=nk, seed=nq)
    tau = torch.tensor([0.0, 1e-3, 3e-2, 1.0], dtype=F64)
    qz = ref.quantize(q, k, 32, dtype=F64)
    scale = 64 ** -0.5
    got = ref.block_mask(q, k, qz, tau, 64, 32, 128, scale, dtype=F64)
    assert torch.equal(got, naive_block_mask(q, k, qz, tau, 64, 32, 128, scale))


@pytest.mark.parametrize("n", [1, 63, 1025])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (3, 1), (8, 2), (7, 1)])
def test_tau_zero_is_exact_causal_attention(n, hq, hkv):
    q, k, v = qkv64(hq, hkv, n)
    out, lse, mask = ref.attention(q, k, v, torch.zeros(hq), dtype=F64)
    want, want_lse = dense_causal(q, k, v)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=1e-5)
    assert torch.equal(mask, ref.causal_blocks(n, n, 64, 32).expand_as(mask))


@pytest.mark.parametrize("n", [63, 1025])
def test_huge_tau_keeps_exactly_sink_and_window(n):
    q, k, v = qkv64(4, 2, n)
    _, _, mask = ref.attention(q, k, v, torch.full((4,), 1e30), dtype=F64)
    want = ref.dense_blocks(n, n, 64, 32, 128) & ref.causal_blocks(n, n, 64, 32)
    assert torch.equal(mask, want.expand_as(mask))


def test_density_never_rises_with_tau():
    q, k, v = qkv64(4, 2, 1025)
    qz = ref.quantize(q, k, dtype=F64)
    previous, densities = None, []
    for t in [0.0, 1e-6, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0]:
        mask = ref.block_mask(q, k, qz, torch.full((4,), t), dtype=F64)
        if previous is not None:
            assert not bool((mask & ~previous).any()), f"tau={t} keeps a block a smaller tau dropped"
        previous = mask
        densities.append(float(ref.block_density(mask, 1025, 1025, 64, 32).mean()))
    assert densities[0] == 1.0 and densities[-1] < 0.5, densities  # the data really is sparse


def test_adding_a_vector_to_every_key_changes_nothing():
    q, k, v = qkv64(4, 2, 700)
    shift = torch.randn(64, dtype=F64) * 3
    tau = torch.tensor([1e-4, 1e-3, 1e-2, 1e-1])
    out0, lse0, mask0 = ref.attention(q, k, v, tau, dtype=F64)
    out1, lse1, mask1 = ref.attention(q, k + shift, v, tau, dtype=F64)
    assert torch.equal(mask0, mask1)
    torch.testing.assert_close(out0, out1, rtol=1e-9, atol=1e-9)
    # lse lives in the unsmoothed frame, so it moves by scale · q·shift
    torch.testing.assert_close(lse1.double() - lse0.double(), (q @ shift) * 64**-0.5, rtol=0, atol=1e-4)


@pytest.mark.parametrize("offset", [64, 320])
def test_chunked_prefill_equals_last_rows_of_full_prefill(offset):
    n = 1000
    q, k, v = qkv64(4, 2, n)
    tau = torch.full((4,), 1e-2)
    out, lse, mask = ref.attention(q, k, v, tau, dtype=F64)
    chunk = q[:, :, offset:]
    rows = mask[:, :, offset // 64:]  # offset is a multiple of bq: the blocks line up
    out_c, lse_c = ref.block_sparse_attention(chunk, k, v, rows, dtype=F64)
    torch.testing.assert_close(out_c, out[:, :, offset:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse_c, lse[:, :, offset:], rtol=0, atol=1e-6)
    # the chunk's own selection runs with bottom-right alignment and stays causal
    _, _, mask_c = ref.attention(chunk, k, v, tau, dtype=F64)
    assert not bool((mask_c & ~ref.causal_blocks(n - offset, n, 64, 32)).any())


@pytest.mark.parametrize("hq,hkv", [(3, 1), (8, 2), (7, 1), (4, 4)])
def test_gqa_equals_repeated_kv(hq, hkv):
    q, k, v = qkv64(hq, hkv, 333)
    tau = torch.linspace(0, 0.05, hq)
    g = hq // hkv
    out0, lse0, mask0 = ref.attention(q, k, v, tau, dtype=F64)
    out1, lse1, mask1 = ref.attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), tau, dtype=F64)
    assert torch.equal(mask0, mask1)
    torch.testing.assert_close(out0, out1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse0, lse1)


def test_dense_below_gives_tau_zero_result():
    q, k, v = qkv64(4, 2, 500)
    tau = torch.full((4,), 0.1)
    out, lse, mask = ref.attention(q, k, v, tau, dense_below=501, dtype=F64)
    out0, lse0, mask0 = ref.attention(q, k, v, torch.zeros(4), dtype=F64)
    assert torch.equal(mask, mask0)
    torch.testing.assert_close(out, out0, rtol=0, atol=0)
    _, _, sparse = ref.attention(q, k, v, tau, dense_below=500, dtype=F64)
    assert not torch.equal(sparse, mask0)


def test_non_causal_block_sparse_matches_masked_softmax():
    q, k, v = qkv64(2, 1, 100, nk=170)
    mask = torch.rand(1, 2, 2, 6) < 0.5
    mask[..., 0] = True
    out, lse = ref.block_sparse_attention(q, k, v, mask, causal=False, dtype=F64)
    el = ref.expand_block_mask(mask, 100, 170, 64, 32, causal=False)
    s = (q @ k.transpose(-1, -2)) * 64**-0.5
    s = s.masked_fill(~el, -math.inf)
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=0, atol=1e-5)


def test_reference_runs_n4096_on_cpu_in_fp32():
    q, k, v = make_qkv(1, 4, 1, 4096, 128, dtype=torch.bfloat16)
    out, lse, mask = ref.attention(q, k, v, torch.full((4,), 1e-3))
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
    d = ref.block_density(mask, 4096, 4096, 64, 32)
    assert bool((d > 0).all()) and bool((d < 1).all())
