"""CPU checks of the tools around the GPU evaluation (issue 6): the SmolLM2 path override, the
needle criterion and report, the fidelity CLI's length list, the carry split, and bench_ttft's
masks and model on a tiny Llama (all fast)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sale_ops import eval as ev
from sale_ops import models
from sale_ops import reference as ref

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- SALE_OPS_SMOLLM2_GGUF


def test_smollm2_env_var_overrides_and_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv(models.ENV_VAR, str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match=models.ENV_VAR):
        models.smollm2_path()
    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setenv(models.ENV_VAR, str(wrong))
    with pytest.raises(RuntimeError, match=f"64 bytes, expected {models.SMOLLM2_SIZE}"):
        models.smollm2_path()
    assert models.smollm2_path(verify=False) == wrong  # the override wins over the package lookup
    with pytest.raises(RuntimeError, match="bytes"):
        models.verify_smollm2(wrong)


# ---------------------------------------------------------------- needle criterion


def _row(length, task, dense, sale):
    return {"task": task, "seed": 0, "target_tokens": length, "tokens": length - 5, "answers": ["1"],
            "dense": "a" if dense else "b", "sale": "a" if sale else "b",
            "dense_score": float(dense), "sale_score": float(sale)}


def test_needle_criterion_allows_one_miss_per_20_prompts():
    # 2048: 20 prompts, dense 15 right, SALE 14 (one fewer: allowed); 4096: 20 prompts, SALE two fewer: fails
    rows = [_row(2048, "single", i < 15, i < 14) for i in range(20)]
    rows += [_row(4096, "kv", i < 10, i < 8) for i in range(20)]
    rows += [_row(8192, "vt", True, True) for _ in range(3)]
    rows[-1]["sale_score"] = 0.8  # a partial vt answer is not a correct one
    c = {x["length"]: x for x in ev.needle_criterion(rows)}
    assert (c[2048]["dense_correct"], c[2048]["sale_correct"], c[2048]["passes"]) == (15, 14, True)
    assert (c[4096]["dense_correct"], c[4096]["sale_correct"], c[4096]["passes"]) == (10, 8, False)
    assert c[8192]["sale_correct"] == 2 and not c[8192]["enough_prompts"] and not c[8192]["passes"]
    assert c[2048]["agree"] == 19
    md = ev.needle_markdown(rows)
    assert "| 2048 | 20 | 15 | 14 | 1.00 | pass | 19/20 |" in md
    assert "| 4096 | 20 | 10 | 8 | 1.00 | FAIL |" in md and "(< 20 prompts)" in md
    assert "| single | 2048 | 20 | 2043 | 0.75 | 0.70 | 19/20 |" in md


def test_needle_rows_without_target_tokens_group_by_rounded_tokens():
    row = _row(0, "single", True, True)
    del row["target_tokens"]
    row["tokens"] = 2040
    assert ev.needle_criterion([row])[0]["length"] == 1984


def test_fidelity_cli_checks_length_list(capsys):
    for bad in ("2048,abc", "64"):
        with pytest.raises(SystemExit) as e:
            ev.main(["fidelity", "--seq-len", bad])  # refused before any model is loaded
        assert e.value.code == 2 and "--seq-len" in capsys.readouterr().err


# ---------------------------------------------------------------- carry split


def test_carry_split_reassembles(tmp_path):
    src = tmp_path / "blob.bin"
    data = os.urandom(10_001)
    src.write_bytes(data)
    out = subprocess.run(["bash", str(ROOT / "scripts/make_eval_carry.sh"), "--split", str(src), str(tmp_path / "b")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    p0, p1 = (tmp_path / "b.part0").read_bytes(), (tmp_path / "b.part1").read_bytes()
    assert (len(p0), len(p1)) == (5001, 5000) and p0 + p1 == data


# ---------------------------------------------------------------- bench_ttft


@pytest.fixture(scope="module")
def ttft():
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_ttft
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return bench_ttft


def test_ttft_config_is_llama_31_8b(ttft):
    c = ttft.llama_config()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        4096, 32, 32, 8, 128)
    assert (c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == (14336, 128256, False)
    assert c.rope_parameters["rope_theta"] == 500000.0


@pytest.mark.parametrize("density", [0.05, 0.3, 0.6, 1.0])
def test_ttft_masks_density_and_forced_blocks(ttft, density):
    from common import random_block_mask  # benchmarks/ is on sys.path once bench_ttft is imported

    n, hq = 2048, 4
    causal = ref.causal_blocks(n, n, 64, 32)
    forced = ref.dense_blocks(n, n, 64, 32, 128) & causal
    m = random_block_mask(hq, n, 32, density, seed=1, window=128, device="cpu")
    assert m.shape == (1, hq, 32, 64) and not bool((m & ~causal).any()) and bool((m | ~forced).all())
    d = float(ref.block_density(m, n, n, 64, 32).mean())
    floor = float(forced.sum() / causal.sum())
    assert abs(d - max(density, floor)) < 0.03
    masks, measured = ttft.synthetic_masks(2, hq, n, density, seed=3, device="cpu")
    assert len(masks) == 2 and masks[0].dtype == torch.int32 and masks[0].shape == (1, hq, 32, 2)
    if floor < density < 1.0:  # below the forced share or at 1 every layer keeps the same blocks
        assert not torch.equal(masks[0], masks[1])  # a different mask per layer
    assert abs(measured - max(density, floor)) < 0.03


def test_ttft_tiny_model_variants(ttft):
    from torch.nn.attention import SDPBackend

    config = ttft.llama_config(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=64, intermediate_size=512, vocab_size=1000)
    torch.manual_seed(0)
    model = ttft.build_model(config, device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = torch.randint(0, 1000, (1, 320))
    ttft.State.dense_backend = SDPBackend.MATH  # cuDNN is CUDA-only
    logits = {}
    try:
        with torch.inference_mode():
            for name, density in (("dense", None), ("sale", 1.0), ("sale_sparse", 0.2), ("none", None)):
                impl = {"dense": ttft.DENSE, "none": ttft.NONE}.get(name, ttft.SALE)
                if density is not None:
                    ttft.State.masks, _ = ttft.synthetic_masks(2, 4, 320, density, seed=0, device="cpu")
                model.set_attn_implementation(impl)
                logits[name] = ttft.prefill(model, ids).float()
    finally:
        ttft.State.dense_backend = SDPBackend.CUDNN_ATTENTION
        ttft.State.masks = []
    assert logits["dense"].shape == (1, 1, 1000)  # last token only

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert rel(logits["sale"], logits["dense"]) < 0.02  # every causal block kept: exact attention
    assert rel(logits["sale_sparse"], logits["dense"]) > 5 * rel(logits["sale"], logits["dense"])
    assert rel(logits["none"], logits["dense"]) > 0.05


def test_ttft_main_smoke_on_cpu(ttft, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ttft.State, "dense_backend", ttft.State.dense_backend)  # main sets MATH on CPU
    out = tmp_path / "ttft.json"
    assert ttft.main(["--device", "cpu", "--tiny", "--layers", "1", "--lengths", "256", "--densities", "1.0", "0.5",
                      "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dense", "none", "sale", "sale"]
    assert all(r["ttft_ms"] > 0 for r in rows) and rows[0]["attention_ms"] > 0 and rows[1]["attention_ms"] == 0
    sale = rows[2]
    assert sale["density"] == 1.0 and sale["select_ms"] > 0 and sale["sparse_ms"] > 0
    assert sale["attention_ms"] == sale["select_ms"] + sale["sparse_ms"] and rows[3]["density"] < 1.0
    assert "| 256 | sale | 1.000 |" in capsys.readouterr().out


# ---------------------------------------------------------------- plot_eval


def test_plot_eval_summary_and_plots(tmp_path):
    from sale_ops import calibrate as cal

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import plot_eval
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    res_dir = tmp_path / "res"
    (res_dir / "needle").mkdir(parents=True)
    rows = [_row(n, t, True, i > 0) for n in (2048, 4096) for t in ("single", "kv") for i in range(10)]
    (res_dir / "needle" / "needle.json").write_text(json.dumps({"meta": {"thresholds": "x"}, "rows": rows}))
    per = {r: {m: [[0.5, 0.6], [0.7, float("nan")]] for m in ("density", "recall", "error")} for r in ev.RULES}
    for n in (2048, 4096):
        summ = {r: {"density": 0.5, "recall": 0.99, "min_recall": 0.9, "error": 0.01 * n / 2048} for r in ev.RULES}
        data = {"meta": {"seq_len": n, "tokens": [n - 3], "thresholds": "x"}, "summary": summ, "per_layer_head": per}
        (res_dir / f"fidelity_{n}.json").write_text(json.dumps(data))
    thr = torch.tensor([[8e-3, 0.0], [4e-3, 8e-3]])
    cal.save_thresholds(res_dir / "smollm2_thresholds.json",
                        cal.Calibration(thr, torch.tensor([[0.1, 0.5], [0.2, 0.3]]), {"theta": "0.4"}))
    res = plot_eval.load(str(res_dir))
    assert sorted(res["fidelity"]) == [2048, 4096] and len(res["needle"]) == 40
    md = plot_eval.summary_markdown(res)
    assert "exact heads (tau 0): 1" in md
    assert "| 2048 | 20 | 20 | 18 | 1.00 | FAIL | 18/20 |" in md  # SALE misses 2 of 20
    assert "| 4096 | 4093 | sale | 0.5000 | 0.9900 | 0.9000 | 0.0200 |" in md
    pytest.importorskip("matplotlib")
    paths = plot_eval.plots(res, str(tmp_path / "png"), per_layer=True)
    names = {os.path.basename(p) for p in paths}
    assert {"eval_needle_accuracy.png", "eval_fidelity_vs_length.png", "eval_density_per_layer.png",
            "eval_thresholds.png", "eval_fidelity_2048_recall.png"} <= names
    assert all(os.path.getsize(p) > 0 for p in paths)
