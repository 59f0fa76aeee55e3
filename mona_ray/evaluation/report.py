"""Writing an evaluation: results.json, results.csv (long format), results.md."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def csv_rows(results: dict):
    for t, res in results.items():
        for s, m in res["selectors"].items():
            for k, v in m["precision"].items():
                yield {"target": t, "selector": s, "metric": "precision", "k": k, "value": v}
            for k, v in m["recall"].items():
                yield {"target": t, "selector": s, "metric": "recall", "k": k, "value": v}
            yield {"target": t, "selector": s, "metric": "average_precision", "k": "", "value": m["ap"]}


def write_csv(results: dict, path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["target", "selector", "metric", "k", "value"])
        w.writeheader()
        for r in csv_rows(results):
            w.writerow(r)


def target_table(res: dict, ks: list, share_top: int = 3) -> list[str]:
    cols = [f"P@{k}" for k in ks] + [f"R@{ks[-1]}", "AP", f"top domains @{next(iter(res['selectors'].values()))['share_k']}"]
    lines = ["| selector | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    best = {str(k): max(m["precision"][str(k)] for m in res["selectors"].values()) for k in ks}
    best_ap = max(m["ap"] for m in res["selectors"].values())
    for s, m in res["selectors"].items():
        cells = []
        for k in ks:
            v = m["precision"][str(k)]
            cells.append(f"**{_fmt(v)}**" if v == best[str(k)] else _fmt(v))
        cells.append(_fmt(m["recall"][str(ks[-1])]))
        cells.append(f"**{_fmt(m['ap'])}**" if m["ap"] == best_ap else _fmt(m["ap"]))
        cells.append(", ".join(f"{d} {v:.0%}" for d, v in list(m["share"].items())[:share_top]))
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def summary_table(results: dict, ks: list, selectors: list[str] | None = None, sort: bool = True) -> list[str]:
    """Per selector: AP per target, mean AP and mean precision at the last k over targets."""
    sels = selectors or list(next(iter(results.values()))["selectors"])
    last = str(ks[-1])
    head = ["selector"] + [f"AP {t}" for t in results] + ["mean AP", f"mean P@{last}"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    rows = []
    for s in sels:
        have = [t for t in results if s in results[t]["selectors"]]
        if len(have) != len(results):
            continue
        aps = [results[t]["selectors"][s]["ap"] for t in have]
        ps = [results[t]["selectors"][s]["precision"][last] for t in have]
        rows.append((sum(aps) / len(aps), s, aps, sum(ps) / len(ps)))
    for mean_ap, s, aps, mean_p in (sorted(rows, key=lambda r: -r[0]) if sort else rows):
        lines.append(f"| {s} | " + " | ".join(_fmt(a) for a in aps) + f" | **{_fmt(mean_ap)}** | {_fmt(mean_p)} |")
    return lines


DEFAULT = "mona:sae/mean/jaccard"


def ablation_groups(names: list[str]) -> dict[str, list[str]]:
    """The comparisons the MoNA paper makes, from the evaluated selectors' names."""
    from ..config.schema import POOLINGS, REPRESENTATIONS, SIMILARITIES as sims

    reps = [r for r in REPRESENTATIONS if f"mona:{r}/mean/jaccard" in names]
    groups = {
        "methods (MoNA default vs baselines)": [n for n in names if not n.startswith("mona:")] + [DEFAULT],
        "representation x similarity (mean pooling)": [f"mona:{r}/mean/{s}" for r in reps for s in sims],
        "pooling (mean vs sum)": [f"mona:{r}/{p}/{s}" for r in reps for s in sims for p in POOLINGS],
        "layer": [DEFAULT] + [n for n in names if n.startswith(DEFAULT + "@")],
        "K": [DEFAULT] + [n for n in names if n.startswith(DEFAULT + "/k=")],
        "token exclusion (pool.exclude)": [DEFAULT] + [n for n in names if n.startswith(DEFAULT + "/exclude=")],
    }
    return {g: [n for n in v if n in names] for g, v in groups.items() if len([n for n in v if n in names]) > 1}


def write_markdown(doc: dict, path: Path) -> None:
    results, ks = doc["results"], doc["settings"]["k"]
    out = [f"# Selection quality on `{doc['inputs']['pool']}`", "",
           f"{doc['inputs']['pool_rows']} pool rows; targets: "
           + ", ".join(f"{t} ({r['n_target']} rows, {r['n_relevant']} relevant pool rows, base rate {r['base_rate']:.3f})"
                       for t, r in results.items()) + ".", ""]
    for note in doc.get("notes", []):
        out.append(f"- note: {note}")
    out += ["", "## Summary (sorted by mean average precision)", ""] + summary_table(results, ks)
    names = list(next(iter(results.values()))["selectors"])
    for group, sels in ablation_groups(names).items():
        out += ["", f"### Ablation: {group}", ""] + summary_table(results, ks, sels, sort=False)
    for t, res in results.items():
        out += ["", f"## {t} (relevant domains: {', '.join(sorted(res['relevant']))})", ""] + target_table(res, ks)
    if doc.get("figure4"):
        f4 = doc["figure4"]
        out += ["", f"## Figure 4: {f4['pair'][0]} vs {f4['pair'][1]}", "",
                "Cosine similarity of the two targets' prototypes (lower = the representation tells the tasks apart):", ""]
        out += [f"- {rep}: {v:.3f}" for rep, v in f4["cosine"].items()]
    out += ["", "## Timings (seconds)", ""] + [f"- {k}: {v:.1f}" for k, v in doc["timings"].items()]
    path.write_text("\n".join(out) + "\n")


def write_json(doc: dict, path: Path) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=False, default=str))
