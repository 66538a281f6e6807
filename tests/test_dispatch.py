"""Runtime dispatch by compute capability (issue 7), through the decision the op entries use
(cpp/torch_bindings/arch_dispatch.cpp, read from _C.so): no GPU needed."""

import pytest

import sale_ops
from sale_ops import _dispatch

BUILT = _dispatch.built_archs()
needs_sm8x = pytest.mark.skipif(not any(a.startswith("8") for a in BUILT), reason="built without sm8x archs")


def test_built_archs_name_hopper():
    assert "90a" in BUILT, BUILT


def test_hopper_gets_the_hopper_kernels():
    assert _dispatch.choose_kernel_path((9, 0)) == "sm90"
    assert _dispatch.choose_kernel_path((9, 0), "0") == "sm90"
    assert _dispatch.choose_kernel_path((9, 0), "") == "sm90"


@needs_sm8x
@pytest.mark.parametrize("cap", [(8, 0), (8, 6), (8, 7), (8, 9)])
def test_ampere_and_ada_get_the_sm8x_kernels(cap):
    assert _dispatch.choose_kernel_path(cap) == "sm8x"
    assert _dispatch.choose_kernel_path(cap, "1") == "sm8x"


@needs_sm8x
def test_force_switch_sends_hopper_to_sm8x():
    assert _dispatch.choose_kernel_path((9, 0), "1") == "sm8x"


@needs_sm8x
@pytest.mark.parametrize("cap", [(10, 0), (12, 0)])
def test_later_gpus_jit_the_sm8x_ptx(cap):
    # sm_90a SASS runs on 9.0 only; the compute_80 PTX runs anywhere later.
    assert _dispatch.choose_kernel_path(cap) == "sm8x"


@pytest.mark.parametrize("cap", [(7, 5), (7, 0), (6, 1)])
@pytest.mark.parametrize("op", ["sale.quantize", "sale.block_mask", "sale.block_sparse_attention"])
def test_old_gpus_are_refused_by_name(cap, op):
    with pytest.raises(RuntimeError) as info:
        _dispatch.choose_kernel_path(cap, op=op)
    msg = str(info.value)
    assert msg.startswith(f"{op}: ")
    assert f"compute capability {cap[0]}.{cap[1]} is not supported" in msg
    assert "supported: " in msg and "9.0 (Hopper kernels)" in msg
    if any(a.startswith("8") for a in BUILT):
        assert "8.x (sm8x kernels, built for 8.0, 8.6, 8.9)" in msg
    assert "SALE_CUDA_ARCHS=" in msg


@pytest.mark.parametrize("value", ["yes", "2", "true"])
def test_bad_force_value_is_an_error(value):
    with pytest.raises(RuntimeError) as info:
        _dispatch.choose_kernel_path((9, 0), value, op="sale.block_mask")
    msg = str(info.value)
    assert msg.startswith("sale.block_mask: ") and "SALE_OPS_FORCE_SM8X" in msg and f"'{value}'" in msg
    assert "supported: 0, 1 or unset" in msg


def test_cpu_summary_is_the_reference():
    assert sale_ops.backend_summary("cpu") == "PyTorch reference (sale_ops.reference) for every op"
