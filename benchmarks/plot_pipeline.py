"""Plots of bench_pipeline.py's rows (needs matplotlib; runs anywhere, no GPU):

    python benchmarks/plot_pipeline.py pipeline.json docs/

writes pipeline_time_vs_n.png (time per call against N, per shape) and
pipeline_speedup_vs_density.png (cuDNN time / SALE time against the density SALE kept).
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    rows = json.load(open(sys.argv[1]))
    out = sys.argv[2] if len(sys.argv) > 2 else "docs"
    os.makedirs(out, exist_ok=True)
    shapes = sorted({(r["hq"], r["hkv"], r["d"]) for r in rows}, reverse=True)
    taus = sorted({r["tau"] for r in rows})

    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sel = [r for r in rows if (r["hq"], r["hkv"], r["d"]) == shape]
        ns = sorted({r["n"] for r in sel})
        first = {n: next(r for r in sel if r["n"] == n) for n in ns}
        ax.plot(ns, [first[n]["cudnn_ms"] for n in ns], "k-o", label="cuDNN dense")
        ax.plot(ns, [first[n]["flash_ms"] for n in ns], "k--s", label="FLASH SDPA dense")
        ax.plot(ns, [first[n]["exact_ms"] for n in ns], "-^", color="gray", label="SALE, tau = 0 (all blocks)")
        for tau in taus:
            pts = sorted((r["n"], r["sale_ms"], r["density"]) for r in sel if r["tau"] == tau)
            mean_d = sum(p[2] for p in pts) / len(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=f"SALE, tau = {tau:g} (density ~{mean_d:.2f})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("ms per call (median)")
        ax.set_title(f"causal prefill, bf16, Hq {shape[0]} / Hkv {shape[1]} / D {shape[2]}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "pipeline_time_vs_n.png"), dpi=120)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for shape, marker in zip(shapes, "os^"):
        sel = [r for r in rows if (r["hq"], r["hkv"], r["d"]) == shape]
        for n in sorted({r["n"] for r in sel}):
            pts = sorted((r["density"], r["cudnn_ms"] / r["sale_ms"]) for r in sel if r["n"] == n)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle="-",
                    label=f"{shape[0]}/{shape[1]}/{shape[2]}, N {n // 1024}K")
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_xlabel("density (kept share of causal blocks)")
    ax.set_ylabel("speed-up over cuDNN dense (>1: SALE faster)")
    ax.set_title("SALE end to end (quantize + select + compute)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "pipeline_speedup_vs_density.png"), dpi=120)


if __name__ == "__main__":
    main()
