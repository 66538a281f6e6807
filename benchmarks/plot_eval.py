"""Summary table and plots for docs/ from the results of benchmarks/gpu_eval_smollm2.sh (or of the
``python -m sale_ops.eval`` / ``python -m sale_ops.calibrate`` commands it runs).

    python benchmarks/plot_eval.py RESULTS_DIR --summary summary.md --out-dir docs

RESULTS_DIR is searched recursively for ``needle.json`` (``sale_ops.eval needle``), ``fidelity*.json``
(``sale_ops.eval fidelity``, one file per prompt length) and a calibration file
(``*thresholds*.safetensors`` or ``.json``). Writes a markdown summary (calibration, the needle
criterion per length, fidelity per length and rule) and, with matplotlib, these PNGs:

- ``eval_needle_accuracy.png``: prompts answered correctly, dense vs SALE, per length (and per task);
- ``eval_fidelity_vs_length.png``: mean recall and mean per-token L1 error per rule vs prompt length;
- ``eval_density_per_layer.png``: SALE's density per layer (mean over heads), one line per length;
- ``eval_thresholds.png``: the calibrated thresholds per layer and head (log10).

With ``--per-layer``, also eval.py's own per-layer plots (recall, error, density per layer and
rule) for every length: ``eval_fidelity_<N>_<metric>.png``.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))  # sale_ops from this checkout when not installed

from sale_ops import eval as ev  # noqa: E402


def find(results: str, pattern: str) -> list[str]:
    return sorted(glob.glob(os.path.join(results, "**", pattern), recursive=True))


def load(results: str) -> dict:
    """``{"needle": rows or None, "needle_meta", "fidelity": {length: data}, "calibration": Calibration or None}``."""
    out = {"needle": None, "needle_meta": {}, "fidelity": {}, "calibration": None, "calibration_path": None}
    needle = find(results, "needle.json")
    if needle:
        with open(needle[0]) as f:
            data = json.load(f)
        out["needle"], out["needle_meta"] = data["rows"], dict(data.get("meta", {}), complete=data.get("complete"))
    for path in find(results, "fidelity*.json"):
        with open(path) as f:
            data = json.load(f)
        meta = data["meta"]
        length = int(meta.get("seq_len") or max(meta.get("tokens") or [0]))
        out["fidelity"][length] = data
    cal = [p for p in find(results, "*thresholds*") if p.endswith((".safetensors", ".json"))]
    if cal:
        from sale_ops.calibrate import read_calibration

        out["calibration"], out["calibration_path"] = read_calibration(cal[0]), cal[0]
    return out


def summary_markdown(res: dict) -> str:
    lines = ["# SmolLM2-135M-Instruct: SALE evaluation", ""]
    cal = res["calibration"]
    if cal is not None:
        t, e, m = cal.thresholds, cal.errors, cal.metadata
        pos = t[t > 0]
        lines += [
            "## Calibration (SPEC §8)", "",
            f"File `{os.path.basename(res['calibration_path'])}`: {tuple(t.shape)} thresholds, theta {m.get('theta')}, "
            f"{m.get('prompts')} prompts of {m.get('seq_len')} tokens; exact heads (tau 0): {int((t == 0).sum())}; "
            f"tau median {float(t.median()):.2e}, min over tau > 0 {float(pos.min()) if pos.numel() else math.nan:.2e}, "
            f"max {float(t.max()):.2e}; error at the chosen tau: mean {float(e.nanmean()):.3f}, max {float(e.max()):.3f}.",
            "", "| layer | tau min | tau median | tau max | exact heads | max error |", "|---|---|---|---|---|---|",
        ]
        for li in range(t.shape[0]):
            lines.append(f"| {li} | {float(t[li].min()):.2e} | {float(t[li].median()):.2e} | {float(t[li].max()):.2e} | "
                         f"{int((t[li] == 0).sum())} | {float(e[li].max()):.3f} |")
        lines.append("")
    if res["needle"]:
        meta = res["needle_meta"]
        lines += ["## Needle / RULER-style tasks, dense vs SALE", "",
                  f"thresholds: {meta.get('thresholds')}; haystack {meta.get('haystack')}; "
                  f"run complete: {meta.get('complete')}", "", ev.needle_markdown(res["needle"])]
    if res["fidelity"]:
        lines += ["## Attention fidelity (equal density per head for every rule)", "",
                  "| length | tokens | rule | density | recall | min recall | error |", "|---|---|---|---|---|---|---|"]
        for length, data in sorted(res["fidelity"].items()):
            toks = ",".join(str(x) for x in data["meta"].get("tokens", []))
            for rule, s in data["summary"].items():
                lines.append(f"| {length} | {toks} | {rule} | {s['density']:.4f} | {s['recall']:.4f} | "
                             f"{s['min_recall']:.4f} | {s['error']:.4f} |")
        lines += ["", "recall: share of the exact softmax mass in kept blocks (mean over layers and heads); "
                  "error: mean per-token L1 of the head output vs exact attention. Thresholds: "
                  + ", ".join(sorted({str(d['meta'].get('thresholds')) for d in res['fidelity'].values()})), ""]
    if len(lines) == 2:
        lines.append("(no results found)")
    return "\n".join(lines) + "\n"


def _mean(values) -> float:
    flat = [x for row in values for x in (row if isinstance(row, list) else [row])
            if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(flat) / len(flat) if flat else math.nan


def plots(res: dict, out_dir: str, per_layer: bool = False) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    os.makedirs(out_dir, exist_ok=True)
    paths = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)

    rows = res["needle"]
    if rows:
        crit = ev.needle_criterion(rows)
        tasks = sorted({r["task"] for r in rows})
        fig, axes = plt.subplots(1, 1 + len(tasks), figsize=(3.2 * (1 + len(tasks)), 3.4), sharey=True)
        groups = [("all tasks", rows)] + [(t, [r for r in rows if r["task"] == t]) for t in tasks]
        for ax, (name, rs) in zip(axes, groups):
            c = ev.needle_criterion(rs) if name != "all tasks" else crit
            x = [str(g["length"]) for g in c]
            ax.plot(x, [g["dense_correct"] / g["prompts"] for g in c], marker="o", label="dense (sdpa)")
            ax.plot(x, [g["sale_correct"] / g["prompts"] for g in c], marker="s", ls="--", label="SALE")
            ax.set_title(f"{name} (n={min(g['prompts'] for g in c)}-{max(g['prompts'] for g in c)} per length)",
                         fontsize=9)
            ax.set_xlabel("prompt tokens")
            ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("share answered correctly")
        axes[0].legend(fontsize=8)
        fig.suptitle("SmolLM2-135M: needle tasks, dense vs SALE (calibrated thresholds)", fontsize=10)
        save(fig, "eval_needle_accuracy.png")
    fid = res["fidelity"]
    if fid:
        lengths = sorted(fid)
        rules = list(fid[lengths[0]]["summary"])
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
        for rule in rules:
            a1.plot(lengths, [fid[n]["summary"][rule]["recall"] for n in lengths], marker="o", label=rule)
            a2.plot(lengths, [fid[n]["summary"][rule]["error"] for n in lengths], marker="o", label=rule)
        dens = [fid[n]["summary"]["sale"]["density"] for n in lengths]
        a1.set_title("recall (mean over layers and heads)\nSALE density: " + ", ".join(f"{d:.2f}" for d in dens),
                     fontsize=9)
        a2.set_title("mean per-token L1 error of the head output", fontsize=9)
        for ax in (a1, a2):
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.set_xlabel("prompt tokens")
            ax.grid(alpha=0.3)
        a1.legend(fontsize=8)
        fig.suptitle("SmolLM2-135M: block selection rules at SALE's density per head", fontsize=10)
        save(fig, "eval_fidelity_vs_length.png")
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for n in lengths:
            d = fid[n]["per_layer_head"]["sale"]["density"]
            ax.plot(range(len(d)), [_mean(row) for row in d], marker="o", ms=3, label=f"{n} tokens")
        ax.set_xlabel("layer")
        ax.set_ylabel("SALE density (mean over heads)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("SmolLM2-135M: kept share of causal blocks per layer", fontsize=10)
        save(fig, "eval_density_per_layer.png")
    if per_layer:
        import torch

        for n, data in sorted(fid.items()):
            result = {r: {m: torch.tensor(v, dtype=torch.float32) for m, v in ms.items()}
                      for r, ms in data["per_layer_head"].items()}
            paths += ev.fidelity_plots(result, out_dir, prefix=f"eval_fidelity_{n}")
    cal = res["calibration"]
    if cal is not None:
        t = cal.thresholds
        shown = t.clamp(min=1e-7).log10()
        fig, ax = plt.subplots(figsize=(4 + 0.3 * t.shape[1], 6))
        im = ax.imshow(shown.numpy(), aspect="auto", cmap="viridis")
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_title(f"calibrated log10(tau), theta {cal.metadata.get('theta')}\n(tau 0 = exact head shown at -7)",
                     fontsize=9)
        fig.colorbar(im, ax=ax)
        save(fig, "eval_thresholds.png")
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="folder with the results (searched recursively)")
    p.add_argument("--summary", help="write the markdown summary here (default: print it)")
    p.add_argument("--out-dir", default="docs", help="PNG plots go here (default %(default)s)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--per-layer", action="store_true", help="also per-layer fidelity plots for every length")
    a = p.parse_args(argv)
    res = load(a.results)
    md = summary_markdown(res)
    if a.summary:
        with open(a.summary, "w") as f:
            f.write(md)
    print(md)
    if not a.no_plots:
        for path in plots(res, a.out_dir, per_layer=a.per_layer):
            print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
