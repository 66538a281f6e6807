import pytest
import torch

import sale_ops  # noqa: F401  (loads the ops)


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
