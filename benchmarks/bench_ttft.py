"""Time to first token (prefill) of a Llama-3.1-8B-shaped model: dense cuDNN attention vs SALE.

    python benchmarks/bench_ttft.py                                   # N = 32K, 64K, 128K
    python benchmarks/bench_ttft.py --lengths 32768 --densities 1.0 0.3 --repeats 2 --out ttft.json

The model is transformers' ``LlamaForCausalLM`` built from a ``LlamaConfig`` with Llama-3.1-8B's
shapes (hidden 4096, 32 layers, 32 query / 8 kv heads, head dim 128, MLP 14336, vocab 128256,
RoPE theta 500000 (default RoPE type: Llama 3.1's frequency scaling does not change the cost), untied
embeddings) with **random weights** created directly on the GPU in bf16
(~16 GB). One prefill = ``model(ids, use_cache=False, logits_to_keep=1)`` under inference mode:
the logits of the last token only (no ``[N, vocab]`` tensor). Attention is plugged in through
transformers' ``AttentionInterface``, one implementation per variant:

- ``dense``: causal SDPA forced onto cuDNN (``sdpa_kernel(SDPBackend.CUDNN_ATTENTION)``, GQA
  through ``enable_gqa``), the baseline;
- ``none``: attention skipped (the layer passes its queries on): the time of everything else;
- ``sale d``: SALE with a **synthesised** block mask of density ``d``. Random weights do not give
  a real model's attention pattern, so the mask SALE would select here says nothing about a real
  model. Each layer therefore runs (1) the real selection pass, quantize + block_mask_bits at
  ``--tau`` over all heads, exactly as ``sale.attention`` runs it (``sale_ops._pipeline.select_blocks``:
  same head grouping, same kernels, so its cost is real; its mask is discarded), then (2)
  ``sale.block_sparse_attention`` on a packed mask made of the sink block, the local window of
  ``--window`` keys (which holds the diagonal blocks) and random other causal blocks, so that the
  kept share of causal blocks is about ``d`` (``common.random_block_mask``; a different mask per
  layer). The densities to use are those that calibrated thresholds give on real prompts (see the
  fidelity results); the measured density of the synthesised masks is reported.

Reported per N and variant: TTFT (median over ``--repeats`` prefills after ``--warmup``, CUDA
events around the whole forward), attention ms (the sum of CUDA-event times around every layer's
attention call in the same prefills; for SALE also split into selection and sparse attention),
non-attention ms (TTFT − attention), attention share of TTFT, speed-up of TTFT and of attention
over dense. Prints a markdown table and writes JSON rows to ``--out`` after every row.

Time on an H100 (estimate from benchmarks/RESULTS.md's per-layer numbers): one prefill at 128K
is ~11 s dense and ~8-21 s with SALE depending on density; the default run (3 lengths, dense,
none and 4 densities, 1 warm-up + 2 repeats) takes about 6-7 minutes, 128K being ~70% of it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import sale_ops  # noqa: E402
from common import random_block_mask  # noqa: E402
from sale_ops import _pipeline  # noqa: E402
from sale_ops import reference as ref  # noqa: E402

BQ, BK, WINDOW = sale_ops.DEFAULT_BQ, sale_ops.DEFAULT_BK, sale_ops.DEFAULT_WINDOW

LLAMA_31_8B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=14336,
    vocab_size=128256,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    hidden_act="silu",
)

# a small model with the same structure, for smoke runs (--tiny) and tests
TINY = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512,
            vocab_size=1000)

# names under which the variants are registered with transformers' AttentionInterface
DENSE, NONE, SALE = "ttft_dense", "ttft_none", "ttft_sale"


def _mark(cuda: bool):
    """A point in time: a recorded CUDA event, or (CPU smoke runs) the host clock."""
    if not cuda:
        return time.perf_counter()
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


def _elapsed_ms(a, b) -> float:
    return a.elapsed_time(b) if isinstance(a, torch.cuda.Event) else (b - a) * 1e3


class _Timer:
    """Marks around attention calls (recorded only while ``on``); ``ms(part)`` sums them."""

    def __init__(self):
        self.on, self.cuda, self.events = False, True, {}

    def reset(self, on: bool):
        self.on, self.events = on, {}

    def start(self, part):
        return _mark(self.cuda) if self.on else None

    def stop(self, part, start):
        if start is not None:
            self.events.setdefault(part, []).append((start, _mark(self.cuda)))

    def ms(self, part) -> float:
        return sum(_elapsed_ms(a, b) for a, b in self.events.get(part, []))


class State:
    """What the attention functions read: the timer, SALE's tau, masks per layer, the dense backend."""

    timer = _Timer()
    tau: float = 1e-3
    masks: list = []
    dense_backend = SDPBackend.CUDNN_ATTENTION
    notes: set = set()


def dense_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    t = State.timer.start("attention")
    with sdpa_kernel(State.dense_backend):
        try:
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, is_causal=True, scale=scaling, enable_gqa=True
            )
        except RuntimeError as e:  # the backend refused these strides: retry on contiguous copies (timed too)
            State.notes.add(f"dense attention needed contiguous q/k/v (copies inside the attention time): {e}"[:300])
            out = torch.nn.functional.scaled_dot_product_attention(
                query.contiguous(), key.contiguous(), value.contiguous(), is_causal=True, scale=scaling,
                enable_gqa=True,
            )
    State.timer.stop("attention", t)
    return out.transpose(1, 2), None


def no_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    return query.transpose(1, 2), None


def sale_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    """Real selection (its mask discarded), then the sparse pass on this layer's synthesised mask."""
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    tau = torch.full((query.shape[1],), State.tau, dtype=torch.float32, device=query.device)
    t = State.timer.start("select")
    _pipeline.select_blocks(query, key, value, tau, BQ, BK, WINDOW, scale)
    State.timer.stop("select", t)
    t = State.timer.start("sparse")
    out, _ = torch.ops.sale.block_sparse_attention(query, key, value, State.masks[module.layer_idx], BQ, BK, scale, True)
    State.timer.stop("sparse", t)
    return out.transpose(1, 2), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(DENSE, dense_attention)
    AttentionInterface.register(NONE, no_attention)
    AttentionInterface.register(SALE, sale_attention)


def llama_config(**overrides):
    """A ``LlamaConfig`` with Llama-3.1-8B's shapes (``overrides`` for smaller test models)."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**LLAMA_31_8B, **overrides})


def build_model(config, device="cuda", dtype=torch.bfloat16):
    """``LlamaForCausalLM`` with random weights made directly on ``device`` in ``dtype``, eval mode."""
    from transformers import LlamaForCausalLM

    register()
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation=DENSE)
    return model.eval()


def synthetic_masks(layers, hq, n, density, seed, *, window=WINDOW, device="cuda"):
    """One bit-packed mask per layer (``common.random_block_mask``: sink + local window + random
    causal blocks at about ``density``) and their mean measured density."""
    masks, dens = [], []
    for layer in range(layers):
        m = random_block_mask(hq, n, BK, density, seed * 1000 + layer, bq=BQ, window=window, device=device)
        dens.append(float(ref.block_density(m, n, n, BQ, BK).mean()))
        masks.append(sale_ops.pack_block_mask(m))
        del m
    return masks, sum(dens) / len(dens)


def prefill(model, ids):
    return model(ids, use_cache=False, logits_to_keep=1).logits


def time_prefill(model, ids, warmup: int, repeats: int) -> dict:
    """Median TTFT and attention times (ms) over ``repeats`` prefills after ``warmup`` ones."""
    cuda = ids.device.type == "cuda"
    State.timer.cuda = cuda
    for _ in range(warmup):
        prefill(model, ids)
    if cuda:
        torch.cuda.synchronize()
    rows = []
    for _ in range(repeats):
        State.timer.reset(True)
        start = _mark(cuda)
        prefill(model, ids)
        end = _mark(cuda)
        if cuda:
            end.synchronize()
        parts = {p: State.timer.ms(p) for p in ("attention", "select", "sparse")}
        rows.append(dict(ttft=_elapsed_ms(start, end), **parts))
        State.timer.reset(False)
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1],
                   help="densities of the synthesised SALE masks (kept share of causal blocks)")
    p.add_argument("--tau", type=float, default=1e-3, help="threshold of the (real) selection pass")
    p.add_argument("--window", type=int, default=WINDOW, help="local window of the synthesised masks, keys")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layers", type=int, default=LLAMA_31_8B["num_hidden_layers"], help="fewer for a quick check")
    p.add_argument("--no-none", action="store_true", help="skip the attention-free run")
    p.add_argument("--out", help="JSON rows (rewritten after every row)")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself (use with --tiny)")
    p.add_argument("--tiny", action="store_true", help="a tiny model instead of Llama-3.1-8B's shapes (tests)")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (or --device cpu --tiny for a smoke run)")
    import transformers

    t0 = time.time()
    config = llama_config(num_hidden_layers=a.layers, **(TINY if a.tiny else {}))
    model = build_model(config, device=dev)
    State.dense_backend = SDPBackend.CUDNN_ATTENTION if dev.type == "cuda" else SDPBackend.MATH
    State.tau = a.tau
    hq = config.num_attention_heads
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    info = (f"{name}, torch {torch.__version__}, transformers {transformers.__version__}; "
            f"{sale_ops.backend_summary(dev.type)}")
    print(info)
    print(f"{'TINY model' if a.tiny else 'Llama-3.1-8B shapes'} ({a.layers} layers, random bf16 weights, "
          f"{sum(x.numel() for x in model.parameters()) / 1e9:.2f} B parameters, built in {time.time() - t0:.0f} s); "
          f"B 1; prefill with logits of the last token only; median of {a.repeats} after {a.warmup} warm-up.")
    print("SALE: real selection (quantize + block_mask_bits, tau "
          f"{a.tau:g}, mask discarded) + block_sparse_attention on a synthesised mask (sink + {a.window}-key "
          "window + random causal blocks) of the given density.\n")
    print("| N | attention | density | TTFT ms | attention ms | (select + sparse) | non-attention ms | "
          "attention share | TTFT speed-up | attention speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []

    def emit(row):
        rows.append(row)
        sel = f"{row['select_ms']:.0f} + {row['sparse_ms']:.0f}" if row["variant"] == "sale" else ""
        share = row["attention_ms"] / row["ttft_ms"]
        dens = "" if row["density"] is None else f"{row['density']:.3f}"
        att_up = "" if row["attention_speedup"] is None else f"{row['attention_speedup']:.2f}"
        print(f"| {row['n']} | {row['variant']} | {dens} | {row['ttft_ms']:.0f} | {row['attention_ms']:.0f} | {sel} | "
              f"{row['ttft_ms'] - row['attention_ms']:.0f} | {share:.1%} | {row['ttft_speedup']:.2f} | {att_up} |",
              flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"info": info, "args": vars(a), "rows": rows, "notes": sorted(State.notes)}, f, indent=1)

    with torch.inference_mode():
        for n in a.lengths:
            g = torch.Generator(device=dev).manual_seed(n)
            ids = torch.randint(0, config.vocab_size, (1, n), device=dev, generator=g)
            model.set_attn_implementation(DENSE)
            d = time_prefill(model, ids, a.warmup, a.repeats)
            base = dict(n=n, layers=a.layers, dense_ttft_ms=d["ttft"], dense_attention_ms=d["attention"])
            emit(dict(base, variant="dense", density=1.0, ttft_ms=d["ttft"], attention_ms=d["attention"],
                      select_ms=0.0, sparse_ms=0.0, ttft_speedup=1.0, attention_speedup=1.0))
            if not a.no_none:
                model.set_attn_implementation(NONE)
                z = time_prefill(model, ids, a.warmup, a.repeats)
                emit(dict(base, variant="none", density=None, ttft_ms=z["ttft"], attention_ms=0.0, select_ms=0.0,
                          sparse_ms=0.0, ttft_speedup=d["ttft"] / z["ttft"], attention_speedup=None))
            model.set_attn_implementation(SALE)
            for density in a.densities:
                State.masks, measured = synthetic_masks(a.layers, hq, n, density, seed=n, window=a.window, device=dev)
                s = time_prefill(model, ids, a.warmup, a.repeats)
                att = s["select"] + s["sparse"]
                emit(dict(base, variant="sale", density=measured, target_density=density, tau=a.tau,
                          ttft_ms=s["ttft"], attention_ms=att, select_ms=s["select"], sparse_ms=s["sparse"],
                          ttft_speedup=d["ttft"] / s["ttft"], attention_speedup=d["attention"] / att))
                State.masks = []
            del ids
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    for note in sorted(State.notes):
        print("NOTE:", note)
    peak = f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; " if dev.type == "cuda" else ""
    print(f"\n{peak}total {time.time() - t0:.0f} s")
    print("non-attention = TTFT - attention (CUDA events around each layer's attention call); the 'none' row "
          "skips attention entirely (its TTFT is the rest of the model measured directly).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
