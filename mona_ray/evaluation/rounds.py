"""A default chosen on earlier rounds of the suite and decided on a fresh one (issue 30, round 3):
``python -m mona_ray.evaluation.rounds --choose R1/results.json R2/results.json --default NAME
[--confirm R3/results.json] [--out decision.md]``.

The rule, fixed in this file before round 3 was scored (docs/evaluation.md, "Round 3"):

* **The pick**: among the candidates (every MoNA setting scored on all the choosing rounds'
  targets), the best mean AP over the choosing rounds' targets together, each target weighing the
  same (ties: the name's order).
* **The decision**: the pick replaces ``--default`` if, over the confirming round's targets, its mean
  AP is above the default's AND the paired 95% bootstrap interval of the difference lies above zero
  (``suite.paired``: targets resampled, seeded). Otherwise the default stays.

Reported beside it, not deciding: every candidate's mean AP on every round, the paired difference of
each candidate with the default on the confirming round, each domain's mean AP against BM25's,
sentiment against dense, the targets below the base rate, and the mixtures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .suite import _mean, half_table, paired


def _results(paths) -> dict:
    """One round's results from one or more ``results.json`` of the same suite (e.g. the baselines
    and the MoNA settings evaluated apart): each target's selectors merged."""
    out: dict = {}
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        for t, r in json.loads(Path(path).read_text())["results"].items():
            if t in out:
                out[t]["selectors"].update(r["selectors"])
            else:
                out[t] = r
    return out


def _renamed(results: dict, tag: str) -> dict:
    return {f"{tag}:{t}": r for t, r in results.items()}


def candidates(rounds: list[dict]) -> list[str]:
    """The MoNA settings scored on every target of every round given."""
    every = None
    for res in rounds:
        for r in res.values():
            names = {s for s in r["selectors"] if s.startswith("mona:sae/")}
            every = names if every is None else every & names
    return sorted(every or ())


def choose(rounds: list[dict]) -> dict:
    """The pick: the best mean AP over the rounds' targets together."""
    pooled = {k: v for i, res in enumerate(rounds) for k, v in _renamed(res, f"r{i}").items()}
    cands = candidates(rounds)
    mean = {s: _mean(r["selectors"][s]["ap"] for r in pooled.values()) for s in cands}
    per_round = {s: [_mean(r["selectors"][s]["ap"] for r in res.values()) for res in rounds] for s in cands}
    ranking = sorted(cands, key=lambda s: (-mean[s], s))
    return {"pick": ranking[0], "ranking": ranking, "mean": mean, "per_round": per_round, "targets": len(pooled)}


def decide(pick: str, default: str, confirm: dict) -> dict:
    """The decision on the confirming round (module docstring)."""
    p = paired(confirm, pick, default)
    adopt = pick != default and p["diff"] > 0 and p["ci95"][0] > 0
    return {"pick": pick, "default": default, "paired": p, "adopt": bool(adopt)}


def domain_checks(confirm: dict, selector: str) -> dict:
    """Each task domain's (and the mixtures') mean AP against BM25's, sentiment against dense, and the
    targets below the base rate."""
    kinds = {t: r["suite"] for t, r in confirm.items()}
    doms = sorted({k["domain"] for k in kinds.values()})
    out = {}
    for d in doms:
        ts = [t for t in confirm if kinds[t]["domain"] == d]
        row = {s: _mean(confirm[t]["selectors"][s]["ap"] for t in ts)
               for s in (selector, "bm25", "dense") if all(s in confirm[t]["selectors"] for t in ts)}
        out[d] = row
    below = [t for t, r in confirm.items() if r["selectors"][selector]["ap"] < r["base_rate"]]
    return {"domains": out, "below_base_rate": below}


def report(choice: dict, default: str, confirm: dict | None) -> str:
    lines = ["# Round 3: the pick and the decision", "",
             f"Choosing rounds: {choice['targets']} targets. The pick: `{choice['pick']}` "
             f"(mean AP {choice['mean'][choice['pick']]:.4f}).", "",
             "| candidate | choosing rounds (pooled) | " + " | ".join(f"round {i + 1}" for i in range(
                 len(next(iter(choice['per_round'].values()))))) + " |",
             "|---|---|" + "---|" * len(next(iter(choice["per_round"].values())))]
    for s in choice["ranking"]:
        lines.append(f"| `{s}`{' (default)' if s == default else ''} | {choice['mean'][s]:.4f} | "
                     + " | ".join(f"{x:.4f}" for x in choice["per_round"][s]) + " |")
    if confirm is None:
        return "\n".join(lines) + "\n"
    d = decide(choice["pick"], default, confirm)
    p = d["paired"]
    lines += ["", f"## The decision on the confirming round ({p['targets']} targets)", "",
              f"- pick `{d['pick']}` {p['mean_a']:.4f} against the default `{default}` {p['mean_b']:.4f}: "
              f"{p['diff']:+.4f} (wins {p['wins']}, losses {p['losses']}, ties {p['ties']}; 95% interval "
              f"{p['ci95'][0]:+.4f} to {p['ci95'][1]:+.4f}) -> **{'adopted' if d['adopt'] else 'not adopted'}**", "",
              "Every candidate against the default on the confirming round (paired):", "",
              "| candidate | mean AP | vs default | wins / losses | 95% interval |", "|---|---|---|---|---|"]
    for s in sorted(candidates([confirm]), key=lambda s: -_mean(r["selectors"][s]["ap"] for r in confirm.values())):
        q = paired(confirm, s, default)
        lines.append(f"| `{s}` | {q['mean_a']:.4f} | {q['diff']:+.4f} | {q['wins']} / {q['losses']} | "
                     f"{q['ci95'][0]:+.4f} .. {q['ci95'][1]:+.4f} |")
    for s in dict.fromkeys([d["pick"], default]):
        c = domain_checks(confirm, s)
        lines += ["", f"### `{s}` per domain on the confirming round", "", "| domain | it | BM25 | dense |", "|---|---|---|---|"]
        for dom, row in c["domains"].items():
            lines.append(f"| {dom} | {row.get(s, float('nan')):.3f} | {row.get('bm25', float('nan')):.3f} | "
                         f"{row.get('dense', float('nan')):.3f} |")
        lines.append(f"\nBelow the base rate: {len(c['below_base_rate'])} {c['below_base_rate']}")
    sel = list(dict.fromkeys(s for r in confirm.values() for s in r["selectors"]))
    lines += ["", "## Every selector on the confirming round", ""] + half_table(confirm, list(confirm), sel)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mona_ray.evaluation.rounds", description=__doc__.split("\n\n")[0])
    ap.add_argument("--choose", nargs="+", required=True, help="results.json of the rounds the pick is chosen on")
    ap.add_argument("--default", required=True, help="the default's selector name in the results")
    ap.add_argument("--confirm", nargs="+", default=None, help="results.json of the fresh round that decides (several "
                    "files of one round are merged)")
    ap.add_argument("--out", default=None, help="write the report here (Markdown) as well")
    a = ap.parse_args(argv)
    choice = choose([_results(p) for p in a.choose])
    text = report(choice, a.default, _results(a.confirm) if a.confirm else None)
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
