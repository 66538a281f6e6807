import os

import pytest
import torch

import sale_ops  # noqa: F401  (loads the ops)


def pytest_addoption(parser):
    parser.addoption(
        "--sm8x",
        action="store_true",
        help="run the CUDA ops on the sm8x kernels (sets SALE_OPS_FORCE_SM8X=1: on an H100 the driver "
        "JIT-compiles their compute_80 PTX); the whole GPU suite then checks that path",
    )


def pytest_configure(config):
    # Before any test runs: the op entries read the variable at every call.
    if config.getoption("--sm8x"):
        os.environ["SALE_OPS_FORCE_SM8X"] = "1"


def pytest_report_header(config):
    if torch.cuda.is_available():
        return f"sale_ops on {torch.cuda.get_device_name()}: {sale_ops.backend_summary('cuda')}"
    return None


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _sale_at_every_length(monkeypatch):
    """The tests exercise the SALE kernels on short sequences, which sale_ops.attention would send
    to its dense path by default (below the measured break-even length); tests of that path pass
    dense_below themselves."""
    import sale_ops.functional

    monkeypatch.setattr(sale_ops.functional, "DEFAULT_DENSE_BELOW", 0)
