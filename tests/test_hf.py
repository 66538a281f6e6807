"""sale_ops.hf: the "sale" attention inside transformers models (tiny random Llama, CPU)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sale_ops.hf as sale_hf  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2, 4, 2, 64, 256


def tiny_llama(dtype=torch.bfloat16, attn="sdpa"):
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=256,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=1024,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture
def models():
    """(dense sdpa model, the same weights on "sale" with tau = 0 and no dense_below)."""
    dense = tiny_llama()
    sale = sale_hf.enable(copy.deepcopy(dense), thresholds=0.0, dense_below=0)
    sale_hf.stats.clear()
    return dense, sale


@pytest.fixture
def spy(monkeypatch):
    """Records (q shape, k shape, thresholds) of every sale_ops.attention call made by sale_ops.hf."""
    calls = []
    real = sale_hf.attention

    def recording(q, k, v, tau, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), tau))
        return real(q, k, v, tau, **kw)

    monkeypatch.setattr(sale_hf, "attention", recording)
    return calls


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits.float()


def assert_close_logits(a, b):
    # Attention outputs are rounded to bf16 on both sides; a few ulps of the logits' scale.
    tol = 0.02 * b.abs().max().item()
    assert (a - b).abs().max().item() <= tol


def test_register_is_idempotent_and_visible():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    sale_hf.register()
    sale_hf.register()
    assert AttentionInterface._global_mapping["sale"] is sale_hf.sale_attention_forward
    assert "sale" in AttentionMaskInterface._global_mapping


def test_from_pretrained_with_sale(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    sale_hf.register()
    model = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sale", dtype=torch.bfloat16)
    assert model.config._attn_implementation == "sale"
    assert sale_hf.settings_for(model) == sale_hf.SaleSettings()  # the process-wide default


def test_tau_zero_matches_sdpa(models, spy):
    dense, sale = models
    ids = torch.randint(0, VOCAB, (2, 160))
    assert_close_logits(logits(sale, ids), logits(dense, ids))
    assert len(spy) == LAYERS and sale_hf.stats["sale"] == LAYERS
    # GQA: k/v reach SALE with their own heads, never repeated
    assert spy[0][:2] == ((2, HEADS, 160, HEAD_DIM), (2, KV_HEADS, 160, HEAD_DIM))


def test_scaling_argument_is_used(models, spy):
    dense, sale = models
    for model in (dense, sale):
        for layer in model.model.layers:
            layer.self_attn.scaling = 0.3  # not D ** -0.5: SALE must take the module's value
    ids = torch.randint(0, VOCAB, (1, 128))
    assert_close_logits(logits(sale, ids), logits(dense, ids))
    assert len(spy) == LAYERS


def test_prefill_uses_sale_and_decode_exact(models, spy):
    dense, sale = models
    table = torch.tensor([[0.01, 0.02, 0.03, 0.04], [0.05, 0.0, 0.06, 0.07]])
    sale_hf.enable(sale, thresholds=table, dense_below=0)
    ids = torch.randint(0, VOCAB, (1, 200))
    cache = DynamicCache(config=sale.config)
    with torch.no_grad():
        sale(ids, past_key_values=cache, use_cache=True)
    assert [torch.equal(torch.as_tensor(tau), table[i]) for i, (_, _, tau) in enumerate(spy)] == [True, True]
    with torch.no_grad():
        sale(ids[:, -1:], past_key_values=cache, use_cache=True)
    assert len(spy) == LAYERS  # no new SALE call for the one-token step
    assert sale_hf.stats["exact:decode"] == LAYERS


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate(models, spy, cache):
    # a static cache hands attention all its slots with no mask on the first step: SALE gets the prompt's keys only
    dense, sale = models
    ids = torch.randint(0, VOCAB, (1, 130))
    out = sale.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation=cache)
    ref = dense.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation=cache)
    assert out.shape == (1, 134)
    assert torch.equal(out[:, :130], ids)
    assert len(spy) == LAYERS and sale_hf.stats["exact:decode"] == 3 * LAYERS
    assert spy[0][1] == (1, KV_HEADS, 130, HEAD_DIM)
    # tau = 0 is exact attention: greedy tokens agree with sdpa's except after a near tie
    assert (out == ref).float().mean().item() > 0.95


def test_chunked_prefill_is_bottom_right_aligned(models, spy):
    dense, sale = models
    ids = torch.randint(0, VOCAB, (1, 192))
    cache = DynamicCache(config=sale.config)
    with torch.no_grad():
        sale(ids[:, :128], past_key_values=cache, use_cache=True)
        second = sale(ids[:, 128:], past_key_values=cache, use_cache=True).logits.float()
    assert spy[-1][:2] == ((1, HEADS, 64, HEAD_DIM), (1, KV_HEADS, 192, HEAD_DIM))
    assert sale_hf.stats["sale"] == 2 * LAYERS
    assert_close_logits(second, logits(dense, ids)[:, 128:])


def test_padded_batch_goes_exact(models, spy):
    dense, sale = models
    ids = torch.randint(0, VOCAB, (2, 96))
    mask = torch.ones_like(ids)
    mask[1, :10] = 0  # left padding
    assert_close_logits(logits(sale, ids, attention_mask=mask), logits(dense, ids, attention_mask=mask))
    assert spy == [] and sale_hf.stats["exact:mask"] == LAYERS


def test_short_prompt_and_fp32_go_exact(spy):
    model = sale_hf.enable(tiny_llama(), thresholds=0.01, dense_below=100)
    sale_hf.stats.clear()
    logits(model, torch.randint(0, VOCAB, (1, 99)))
    assert sale_hf.stats["exact:short"] == LAYERS
    logits(model, torch.randint(0, VOCAB, (1, 100)))
    assert sale_hf.stats["sale"] == LAYERS

    fp32 = tiny_llama(torch.float32)
    dense = copy.deepcopy(fp32)
    sale_hf.enable(fp32, thresholds=0.01, dense_below=0)
    ids = torch.randint(0, VOCAB, (1, 64))
    assert torch.allclose(logits(fp32, ids), logits(dense, ids), atol=1e-5)
    assert sale_hf.stats["exact:dtype"] == LAYERS and len(spy) == LAYERS


def test_tau_positive_changes_output_and_disable_restores(models, spy):
    dense, sale = models
    ids = torch.randint(0, VOCAB, (1, 256))
    sale_hf.enable(sale, thresholds=0.5, dense_below=0)
    sparse = logits(sale, ids)
    assert len(spy) == LAYERS
    assert not torch.equal(sparse, logits(dense, ids))  # blocks were really skipped
    sale_hf.disable(sale)
    assert sale.config._attn_implementation == "sdpa"
    assert torch.equal(logits(sale, ids), logits(dense, ids))


def test_settings_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="'thresholds' has shape \\(3, 4\\).*2 layers x 4 query heads"):
        sale_hf.enable(model, thresholds=torch.zeros(3, HEADS))
    with pytest.raises(ValueError, match="'thresholds' must be finite and >= 0"):
        sale_hf.enable(model, thresholds=-1.0)
    with pytest.raises(TypeError, match="'thresholds' must be a float"):
        sale_hf.enable(model, thresholds=[0.1, 0.2])
    with pytest.raises(ValueError, match="'dense_below' must be an int >= 0"):
        sale_hf.enable(model, dense_below=-5)
    with pytest.raises(ValueError, match="'window'"):
        sale_hf.enable(model, window=100)
    with pytest.raises(ValueError, match="calibration file"):
        sale_hf.register("thresholds.safetensors")
    assert model.config._attn_implementation == "sdpa"  # nothing was switched by a failed call


def test_bottom_right_mask_check():
    rows = torch.arange(3)[:, None] + 2
    causal = (torch.arange(5)[None, :] <= rows).expand(2, 1, 3, 5)
    assert sale_hf._is_bottom_right_causal(causal, 3, 5)
    padded = causal.clone()
    padded[1, 0, :, 0] = False
    assert not sale_hf._is_bottom_right_causal(padded, 3, 5)
    assert not sale_hf._is_bottom_right_causal(causal.float(), 3, 5)
    assert not sale_hf._is_bottom_right_causal(torch.ones(2, 1, 3, 5, dtype=torch.bool), 3, 5)
