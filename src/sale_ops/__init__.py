"""sale_ops: SALE sparse attention for long-context prefill (arXiv 2505.24179).

``import sale_ops`` loads the compiled library that defines the ``torch.ops.sale`` schemas, then
registers their fake functions and backends. See :mod:`sale_ops.functional` for the API and
:mod:`sale_ops.reference` for the executable specification.
"""

from ._library import load_library as _load_library

_load_library()

from . import _fake, _pipeline, _reference_backend  # noqa: E402,F401  (registrations)
from . import reference  # noqa: E402
from .functional import (  # noqa: E402
    DEFAULT_BK,
    DEFAULT_BQ,
    DEFAULT_DENSE_BELOW,
    DEFAULT_WINDOW,
    AttentionOutput,
    attention,
    attention_varlen,
    block_density,
    block_mask,
    block_sparse_attention,
    merge_attention,
    quantize,
)
from ._reference_backend import backend_summary  # noqa: E402
from .mask_bits import pack_block_mask, unpack_block_mask  # noqa: E402
from .reference import Quantized  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attention_varlen",
    "quantize",
    "block_mask",
    "block_sparse_attention",
    "block_density",
    "merge_attention",
    "pack_block_mask",
    "unpack_block_mask",
    "AttentionOutput",
    "Quantized",
    "reference",
    "backend_summary",
    "DEFAULT_BQ",
    "DEFAULT_BK",
    "DEFAULT_WINDOW",
    "DEFAULT_DENSE_BELOW",
    "__version__",
]
