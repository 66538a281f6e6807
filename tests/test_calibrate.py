"""sale_ops.calibrate: the halving search, the file format and the CLI (CPU, tiny models)."""

import math
import subprocess
import sys

import pytest
import torch

from sale_ops import calibrate as cal


def curve_errors(curves):
    """An error_fn whose head h has error curves[h](tau_h); records every tau vector it is given."""
    seen = []

    def error_fn(tau):
        seen.append(tau.clone())
        return torch.tensor([c(float(t)) for c, t in zip(curves, tau)])

    return error_fn, seen


def test_search_halves_until_below_theta():
    # head 0 passes at once, head 1 below 1e-3 (three halvings: 0.008 -> 0.001), head 2 never
    curves = [lambda t: 0.001, lambda t: 10.0 * t, lambda t: 0.0 if t == 0 else 5.0]
    error_fn, seen = curve_errors(curves)
    tau, err = cal.search_thresholds(error_fn, 3, theta=0.011, start=0.008, max_halvings=4)
    assert torch.allclose(tau, torch.tensor([0.008, 0.001, 0.0]))
    assert torch.allclose(err, torch.tensor([0.001, 0.01, 0.0]))
    # 5 ladder steps (0.008 .. 0.0005) for the head that never passes, then one check at tau = 0
    assert len(seen) == 6
    assert torch.allclose(torch.stack(seen)[:, 2], torch.tensor([0.008, 0.004, 0.002, 0.001, 0.0005, 0.0]))
    assert all(math.isclose(t[0], 0.008, rel_tol=1e-6) for t in seen)  # a head that passed keeps its threshold


def test_search_stops_when_all_heads_pass():
    error_fn, seen = curve_errors([lambda t: t, lambda t: 2 * t])
    tau, _ = cal.search_thresholds(error_fn, 2, theta=0.005, start=0.008)
    assert torch.allclose(tau, torch.tensor([0.004, 0.002])) and len(seen) == 3


@pytest.mark.parametrize(
    "kw, match",
    [({"theta": 0.0}, "'theta'"), ({"start": -1.0}, "'start'"), ({"max_halvings": -1}, "'max_halvings'")],
)
def test_search_argument_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        cal.search_thresholds(lambda t: t, 2, **kw)


def test_head_errors_is_mean_per_token_l1():
    ref = torch.zeros(2, 3, 4, 64)
    out = ref.clone()
    out[:, 1, :, :] = 0.5  # head 1: every token off by 0.5 in each of 64 dims
    out[0, 2, 0, 0] = 8.0  # head 2: one token of eight off by 8
    assert torch.allclose(cal.head_errors(out, ref), torch.tensor([0.0, 32.0, 1.0]))


def test_exact_attention_chunk_is_bottom_right():
    q = torch.randn(1, 4, 64, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 96, 64, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    full_q = torch.cat([torch.randn(1, 4, 32, 64, dtype=torch.bfloat16), q], dim=2)
    assert torch.equal(cal.exact_attention(q, k, v, None), cal.exact_attention(full_q, k, v, None)[:, :, 32:])


def fake_config(layers=2, heads=4):
    from types import SimpleNamespace

    return SimpleNamespace(num_hidden_layers=layers, num_attention_heads=heads)


@pytest.mark.parametrize("suffix", [".safetensors", ".json"])
def test_file_round_trip_and_shape_check(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    table = torch.tensor([[0.008, 0.004, 0.0, 0.001], [0.002, 0.008, 0.008, 0.0005]])
    c = cal.Calibration(table, torch.rand(2, 4), {"model": "tiny", "theta": "0.4"})
    path = tmp_path / ("t" + suffix)
    cal.save_thresholds(path, c)
    back = cal.read_calibration(path)
    assert torch.equal(back.thresholds, table) and torch.equal(back.errors, c.errors)
    assert back.metadata == {"model": "tiny", "theta": "0.4"}
    assert torch.equal(cal.load_thresholds(path, fake_config()), table)
    with pytest.raises(ValueError, match=r"shape \(2, 4\) \(model 'tiny'\) but the model has 3 layers x 4 query heads"):
        cal.load_thresholds(path, fake_config(layers=3))
    with pytest.raises(ValueError, match="2 layers x 8 query heads"):
        cal.load_thresholds(path, fake_config(heads=8))


def test_not_a_calibration_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"something": [1]}')
    with pytest.raises(ValueError, match="no 'thresholds' tensor"):
        cal.read_calibration(path)


def test_calibrate_tiny_llama_and_enable_from_file(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    import sale_ops.hf as sale_hf
    from test_hf import HEADS, LAYERS, VOCAB, tiny_llama

    model = tiny_llama()
    prompts = cal.random_prompts(VOCAB, 2, 192, seed=1)
    theta = 0.05
    result = cal.calibrate(model, prompts, theta=theta, max_halvings=3, model_name="tiny", progress=False)
    assert model.config._attn_implementation == "sdpa"  # restored after capturing
    assert result.thresholds.shape == (LAYERS, HEADS) and result.errors.shape == (LAYERS, HEADS)
    ladder = [0.0] + [0.008 / 2**i for i in range(4)]
    assert all(any(math.isclose(t, x, rel_tol=1e-6) for x in ladder) for t in result.thresholds.flatten().tolist())
    assert bool((result.errors < theta).all())  # every head meets theta (tau = 0 is exact)
    assert result.metadata["model"] == "tiny" and result.metadata["seq_len"] == "192"
    assert result.metadata["exact_heads"] == str(int((result.thresholds == 0).sum()))

    # the reported error is what SALE really gives on the captured inputs of a layer
    captured = cal.capture_layers(model, prompts[:1])
    q, k, v, s = captured[1][0]
    out = sale_hf.attention(q, k, v, result.thresholds[1], scale=s)
    single = cal.head_errors(out, cal.exact_attention(q, k, v, s))
    assert bool((single < 4 * theta).all())

    path = tmp_path / "tiny.safetensors"
    cal.save_thresholds(path, result)
    sale_hf.enable(model, thresholds=str(path), dense_below=0)
    assert torch.equal(sale_hf.settings_for(model).thresholds, result.thresholds)
    with pytest.raises(ValueError, match="2 layers x 4 query heads"):
        cal.save_thresholds(path, cal.Calibration(torch.zeros(3, HEADS), torch.zeros(3, HEADS)))
        sale_hf.enable(model, thresholds=path)


def test_retrieval_prompts_fit_the_length():
    class CharTokenizer:  # one token per character
        def __call__(self, text):
            return {"input_ids": [ord(c) % 256 for c in text]}

    prompts = cal.retrieval_prompts(CharTokenizer(), 2, 1000, seed=3)
    assert len(prompts) == 2 and all(850 <= len(p) <= 1000 for p in prompts)
    assert not torch.equal(prompts[0][:300], prompts[1][:300])  # different keys per prompt
    text = "".join(chr(int(c)) for c in prompts[0])
    assert text.startswith("Extract the value") and text.endswith('is: "')


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "sale_ops.calibrate", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for option in ("--model", "--theta", "--out", "--seq-len", "--max-halvings"):
        assert option in r.stdout
