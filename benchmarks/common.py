"""Timing and the dense baseline shared by the benchmark scripts (run from any directory as
`python benchmarks/<script>.py`: the script's folder is on sys.path)."""

from __future__ import annotations

import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from sale_ops import reference as ref


def time_ms(fn, input_sets=((),), repeats=10):
    """Median CUDA-event time of one call of fn(*x). Each timing covers one call per input set
    (rotating sets keeps inputs out of L2) and is divided by their number; all sets run once first
    as warm-up."""
    for x in input_sets:
        fn(*x)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for x in input_sets:
            fn(*x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(input_sets))
    return statistics.median(times)


def cudnn_causal(q, k, v):
    """The bar to beat: dense causal attention forced onto cuDNN (GQA through enable_gqa)."""
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def random_block_mask(hq, n, bk, density, seed, *, bq=64, window=64, device="cuda"):
    """[1, hq, nQ, nK] bool: the forced blocks (sink block 0 and every key block touching the last
    `window` keys of each query block's causal end, SPEC §4.1; `window` = bq gives just the diagonal
    blocks) plus other causal blocks kept at random with probability p, p chosen so the kept share
    of causal blocks is about `density` (never below the forced share)."""
    causal = ref.causal_blocks(n, n, bq, bk, device)
    forced = ref.dense_blocks(n, n, bq, bk, window, device) & causal
    n_causal, n_forced = int(causal.sum()), int(forced.sum())
    p = max(0.0, (density * n_causal - n_forced) / max(n_causal - n_forced, 1))
    g = torch.Generator(device=device).manual_seed(seed)
    keep = torch.rand(1, hq, *causal.shape, device=device, generator=g) < p
    return (keep & causal) | forced


def smollm2_attention_inputs(tokens: int):
    """SmolLM2-135M-Instruct's attention inputs on one prompt of `tokens` tokens (synthetic haystack),
    captured with exact attention on the CPU: ``{layer: (q, k, v, scale)}``, tensors [1, H, N, D] bf16."""
    from sale_ops.calibrate import capture_layers
    from sale_ops.eval import haystack_sentences
    from sale_ops.models import load_smollm2

    model, tok = load_smollm2(dtype=torch.bfloat16)
    ids = tok(" ".join(haystack_sentences("synthetic")), return_tensors="pt").input_ids[:, :tokens]
    return {layer: calls[0] for layer, calls in capture_layers(model, [ids]).items()}
