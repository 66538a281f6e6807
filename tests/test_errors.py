"""Every bad input gets a clear error naming the op, the argument, what it got and what is allowed."""

import math

import pytest
import torch

import sale_ops
from sale_ops.testing import make_qkv


@pytest.fixture
def qkv():
    return make_qkv(1, 4, 2, 100, 64)


def raises(exc, *fragments):
    class _Ctx:
        def __enter__(self):
            self.ctx = pytest.raises(exc)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *a):
            handled = self.ctx.__exit__(*a)
            msg = str(self.info.value)
            for f in fragments:
                assert f in msg, f"{f!r} not in error message {msg!r}"
            return handled

    return _Ctx()


def test_wrong_rank(qkv):
    q, k, v = qkv
    with raises(ValueError, "sale_ops.attention", "'q'", "4 dimensions", "(100, 64)"):
        sale_ops.attention(q[0, 0], k, v, 0.01)


def test_not_a_tensor(qkv):
    q, k, v = qkv
    with raises(TypeError, "'k'", "torch.Tensor", "list"):
        sale_ops.attention(q, [1, 2], v, 0.01)


def test_mismatched_heads(qkv):
    q, k, v = qkv
    q3 = q[:, :3]
    with raises(ValueError, "multiple of kv heads", "Hq=3", "Hkv=2"):
        sale_ops.attention(q3, k, v, 0.01)


def test_mismatched_batch_and_head_dim(qkv):
    q, k, v = qkv
    with raises(ValueError, "batch sizes differ"):
        sale_ops.attention(torch.cat([q, q]), k, v, 0.01)
    q128 = make_qkv(1, 4, 2, 100, 128)[0]
    with raises(ValueError, "head dims differ"):
        sale_ops.attention(q128, k, v, 0.01)


def test_v_shape(qkv):
    q, k, v = qkv
    with raises(ValueError, "'v' must have the shape of 'k'"):
        sale_ops.attention(q, k, v[:, :, :50], 0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int8])
def test_unsupported_dtype(qkv, dtype):
    q, k, v = qkv
    with raises(TypeError, "'q'", str(dtype), "torch.float16, torch.bfloat16"):
        sale_ops.attention(q.to(dtype), k.to(dtype), v.to(dtype), 0.01)


def test_mixed_dtypes(qkv):
    q, k, v = qkv
    with raises(TypeError, "'k'", "torch.float16", "must match"):
        sale_ops.attention(q, k.half(), v, 0.01)


def test_unsupported_head_dim():
    q, k, v = make_qkv(1, 2, 2, 64, 96)
    with raises(ValueError, "head dim 96", "64, 128"):
        sale_ops.attention(q, k, v, 0.01)


@pytest.mark.parametrize(
    "kwargs,fragments",
    [
        (dict(bq=32), ("'bq' is 32", "supported: 64")),
        (dict(bk=16), ("'bk' is 16", "32, 64")),
        (dict(window=100), ("'window' is 100", "multiple of bk=32")),
        (dict(window=32), ("'window' is 32", "at least bq=64")),
        (dict(scale=-1.0), ("'scale' is -1.0",)),
        (dict(scale=math.nan), ("'scale' is nan",)),
    ],
)
def test_unsupported_blocks_and_scale(qkv, kwargs, fragments):
    q, k, v = qkv
    with raises(ValueError, *fragments):
        sale_ops.attention(q, k, v, 0.01, **kwargs)


@pytest.mark.parametrize("bad", [math.nan, -0.1, math.inf])
def test_bad_threshold_values(qkv, bad):
    q, k, v = qkv
    tau = torch.tensor([0.01, bad, 0.01, 0.01])
    with raises(ValueError, "'thresholds'", "finite and >= 0", "heads [1]"):
        sale_ops.attention(q, k, v, tau)
    # the op itself checks too, before anything runs
    with raises(ValueError, "sale.attention", "'tau'", "heads [1]"):
        torch.ops.sale.attention(q, k, v, tau, 64, 32, 128, 0.125, True, 0)


def test_threshold_shapes_and_types(qkv):
    q, k, v = qkv
    with raises(ValueError, "one value per query head (4)", "(3,)"):
        sale_ops.attention(q, k, v, [0.1, 0.1, 0.1])
    with raises(TypeError, "'thresholds'", "str"):
        sale_ops.attention(q, k, v, "0.1")
    with raises(TypeError, "'thresholds'", "torch.int64"):
        sale_ops.attention(q, k, v, torch.zeros(4, dtype=torch.long))


def test_non_contiguous_last_dim(qkv):
    q, k, v = qkv
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    with raises(ValueError, "'q'", "contiguous last dimension", ".contiguous()"):
        sale_ops.attention(qt, k, v, 0.01)


def test_device_mix(qkv):
    q, k, v = qkv
    with raises(RuntimeError, "one device", "'q' is on cpu", "'k' is on meta"):
        sale_ops.attention(q, k.to("meta"), v, 0.01)


@pytest.mark.gpu
def test_cpu_gpu_mix(qkv):
    q, k, v = qkv
    with raises(RuntimeError, "one device", "'k' is on cuda"):
        sale_ops.attention(q, k.cuda(), v, 0.01)


def test_more_queries_than_keys(qkv):
    q, k, v = qkv
    with raises(ValueError, "Nq <= Nk", "Nq=100", "Nk=50"):
        sale_ops.attention(q, k[:, :, :50], v[:, :, :50], 0.01)


def test_empty_sequence():
    q, k, v = make_qkv(1, 2, 2, 0, 64)
    with raises(ValueError, "empty sequence"):
        sale_ops.attention(q, k, v, 0.01)


def test_non_causal_pipeline_refused(qkv):
    q, k, v = qkv
    with raises(ValueError, "'causal' is False", "causal prefill only"):
        sale_ops.attention(q, k, v, 0.01, causal=False)
    with raises(ValueError, "sale.attention", "'causal' is False"):
        torch.ops.sale.attention(q, k, v, torch.zeros(4), 64, 32, 128, 0.125, False, 0)


def test_block_mask_shape_dtype_and_empty_rows(qkv):
    q, k, v = qkv
    good = torch.ones(1, 4, 2, 4, dtype=torch.bool)
    with raises(ValueError, "'block_mask'", "(1, 4, 2, 4)", "(1, 4, 2, 3)"):
        sale_ops.block_sparse_attention(q, k, v, good[..., :3])
    with raises(TypeError, "'block_mask'", "torch.uint8"):
        sale_ops.block_sparse_attention(q, k, v, good.to(torch.uint8))
    with raises(ValueError, "'block_mask'", "ceil(ceil(Nk/bk)/32)", "(1, 4, 2, 1)", "(1, 4, 2, 2)"):
        sale_ops.block_sparse_attention(q, k, v, torch.zeros(1, 4, 2, 2, dtype=torch.int32))
    no_sink = good.clone()
    no_sink[0, 2, 1, :] = False
    no_sink[0, 2, 1, 3] = True  # query block 1 keeps only keys 96..99, which its first row (64) cannot see
    with raises(ValueError, "without any visible key", "head 2, query block 1"):
        sale_ops.block_sparse_attention(q, k, v, no_sink)


def test_quantized_tensors_checked(qkv):
    q, k, v = qkv
    qz = list(torch.ops.sale.quantize(q, k, 32))
    qz[1] = qz[1].double()
    with raises(TypeError, "sale.block_mask", "'q_scale'", "torch.float64"):
        torch.ops.sale.block_mask(q, k, *qz, torch.zeros(4), 64, 32, 128, 0.125)
