"""Which CUDA kernels serve the ops on a GPU (issue 7).

The decision lives once, in C++ (``cpp/torch_bindings/arch_dispatch.cpp``): the op entries call it
on every call, and ``_C.so`` exports it as a C function that this module reads with ctypes, so
``backend_summary`` and the tests see exactly what the ops will do (and the tests can ask about
GPUs that are not there). Paths:

- ``"sm90"``: the Hopper kernels (wgmma; sm_90a SASS), on compute capability 9.0;
- ``"sm8x"``: mma.sync kernels with an int4 tensor-core estimator, built as sm_80/86/89 SASS plus
  compute_80 PTX; they serve 8.x GPUs, and later ones (10.0+, untested) by JIT-compiling the PTX.
  ``SALE_OPS_FORCE_SM8X=1`` sends a 9.0 GPU here too (the driver JIT-compiles the PTX): the
  switch that tests the sm8x kernels on an H100 (``pytest --sm8x``).

Capabilities below 8.0 are refused with an error naming the op, the capability and what is supported.
"""

from __future__ import annotations

import ctypes
import os

from . import _library

FORCE_SM8X_ENV = "SALE_OPS_FORCE_SM8X"
SM90 = "sm90"
SM8X = "sm8x"

_lib = None


def _c():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(_library.load_library())
        f = lib.sale_ops_choose_kernel_path
        f.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
        f.restype = ctypes.c_int
        lib.sale_ops_cuda_archs.argtypes = []
        lib.sale_ops_cuda_archs.restype = ctypes.c_char_p
        _lib = lib
    return _lib


def choose_kernel_path(capability: tuple[int, int], force_sm8x: str | None = None, op: str = "sale.attention") -> str:
    """The path (``"sm90"`` or ``"sm8x"``) for a GPU of compute capability ``capability`` with
    ``SALE_OPS_FORCE_SM8X`` set to ``force_sm8x`` (``None``: unset). Raises ``RuntimeError`` with
    the message ``op`` would raise when no path serves. Needs no GPU."""
    major, minor = capability
    message = ctypes.create_string_buffer(1024)
    force = None if force_sm8x is None else str(force_sm8x).encode()
    got = _c().sale_ops_choose_kernel_path(op.encode(), int(major), int(minor), force, message, len(message))
    if got == 90:
        return SM90
    if got == 80:
        return SM8X
    raise RuntimeError(message.value.decode())


def kernel_path(device=None, op: str = "sale.attention") -> str:
    """The path the ops take on CUDA ``device`` now (its capability and ``SALE_OPS_FORCE_SM8X``)."""
    import torch

    return choose_kernel_path(torch.cuda.get_device_capability(device), os.environ.get(FORCE_SM8X_ENV), op)


def built_archs() -> list[str]:
    """``SALE_CUDA_ARCHS`` of the loaded ``_C.so``, e.g. ``["80", "86", "89", "90a"]``."""
    return _c().sale_ops_cuda_archs().decode().split(",")
