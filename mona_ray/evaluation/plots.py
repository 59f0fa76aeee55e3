"""Figures: precision@k curves per selector, and the MoNA paper's Figure 4 (activation
profiles of two target tasks over the most variant latents, per representation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def precision_curves(results: dict, selectors: list[str], path: Path, title: str = "") -> Path:
    """One panel per target: precision@k (k = 1..curve_max) for each selector, base rate dashed."""
    plt = _plt()
    targets = list(results)
    cols = min(2, len(targets))
    rows = -(-len(targets) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.2 * rows), squeeze=False)
    for ax, t in zip(axes.flat, targets):
        res = results[t]
        for s in selectors:
            if s in res["selectors"]:
                c = res["selectors"][s]["curve"]
                ax.plot(np.arange(1, len(c) + 1), c, label=s, lw=1.6 if s.startswith("mona") else 1.1,
                        ls="-" if not s.startswith("random") else ":")
        ax.axhline(res["base_rate"], color="grey", ls="--", lw=0.8, label="base rate")
        ax.set_title(f"{t} (relevant: {', '.join(sorted(res['relevant']))})", fontsize=10)
        ax.set_xlabel("k (rows selected)")
        ax.set_ylabel("precision@k")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(targets):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.08 if len(labels) > 5 else 0.05, 1, 0.97 if title else 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def most_variant(protos: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` dimensions whose (max-normalised) prototype values vary most across targets."""
    P = protos / np.maximum(np.abs(protos).max(1, keepdims=True), 1e-12)
    return np.argsort(-P.var(0), kind="stable")[:n]


def figure4(profiles: dict[str, dict[str, np.ndarray]], pair: tuple[str, str], n_latents: int, path: Path) -> dict:
    """``profiles[representation][target]`` = that target's prototype (mean pooled vector).

    Per representation: the ``n_latents`` latents (or dimensions) that vary most across all
    targets' prototypes, each target's value on them (max-normalised per target), for the
    two targets in ``pair``. Returns the cosine similarity of the two prototypes per
    representation (lower = the representation separates the tasks more).
    """
    plt = _plt()
    reps = list(profiles)
    fig, axes = plt.subplots(len(reps), 1, figsize=(10, 2.6 * len(reps)), squeeze=False)
    sims = {}
    a, b = pair
    for ax, rep in zip(axes[:, 0], reps):
        names = list(profiles[rep])
        P = np.stack([profiles[rep][t] for t in names]).astype(np.float64)
        idx = most_variant(P, n_latents)
        pa, pb = profiles[rep][a].astype(np.float64), profiles[rep][b].astype(np.float64)
        sims[rep] = float(pa @ pb / max(np.linalg.norm(pa) * np.linalg.norm(pb), 1e-12))
        x = np.arange(len(idx))
        for t, v, c in ((a, pa, "tab:blue"), (b, pb, "tab:orange")):
            ax.bar(x + (-0.2 if t == a else 0.2), v[idx] / max(np.abs(v).max(), 1e-12), width=0.4, color=c, label=t)
        ax.set_title(f"{rep}: {len(idx)} most variant of {P.shape[1]} dims; cos({a}, {b}) = {sims[rep]:.3f}", fontsize=10)
        ax.set_xticks([])
        ax.set_ylabel("activation / max")
        ax.axhline(0, color="black", lw=0.5)
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return sims
