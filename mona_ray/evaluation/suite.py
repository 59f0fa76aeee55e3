"""A leave-task-out target suite (issue 23): ``python -m mona_ray.evaluation.suite --out DIR --seed 0``.

From a labelled source pool (``id, instruction, input, output, source, category, domain``) and the
scoring pool drawn from it (``pool_5k``), it writes ``DIR/suite.json`` and ``DIR/targets/*.parquet``:

* **task targets**: for every category with at least ``n_rows`` rows outside the scoring pool whose
  domain has another category in the scoring pool, ``n_rows`` of its rows that are NOT in the
  scoring pool (by id and by text) are the target; the target's pool is the scoring pool with the
  WHOLE category removed; relevant = the scoring pool's rows of the same domain (all from other
  categories, since the category is gone). That is the user's situation: their task is not in the
  pool, related data is.
* **mixtures** (built like BBH): ``rows_per_task`` rows from each of 3-27 task targets' rows; every
  category in the mixture is removed from its pool; relevant = the mixture's domains.
* **public targets** (GSM8K, MBPP, MMLU, BBH with ``relevance.json``): the whole scoring pool.

Each target records its rows file, excluded categories, relevant domains, notes on weak domain
labels, and its half (``selection`` / ``confirmation``): the task targets and the mixtures are split
stratified by domain with the seed, before any selector has scored them; the public four all go to
the confirmation half (the old default was chosen on them, so they cannot be selection evidence).

``python -m mona_ray.evaluate data.suite=DIR/suite.json`` runs the suite: each target is scored on
its own pool (see ``mona_ray/evaluation/evaluate.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SUITE_VERSION = 1
COLUMNS = ["id", "instruction", "input", "output", "source", "category", "domain"]
DEFAULT_MIXTURE_SIZES = (3, 5, 7, 9, 12, 15, 20, 27)

# Categories that are not one task: never a target, still pool rows (relevant to their domain).
NOT_A_TASK = {
    "seed_generation": "Self-Instruct seed tasks: 149 different tasks under one label",
    "seed_classification": "Self-Instruct seed tasks: 26 different tasks under one label",
    "lima_multiturn": "29 rows",
}
# Where a domain label is weak (written once per domain; every target of the domain carries it).
DOMAIN_NOTES = {
    "closed_qa": "two categories only (KILT HotpotQA, WikiQA); T0's WikiQA prompts are mostly answer-validation "
                 "(yes/no) or question generation, not closed-book answering",
    "code": "two categories (CodeAlpaca, GPTeacher codegen), both instruction -> code; the cleanest label",
    "cot_reasoning": "FLAN CoT subsets; cot_ecqa and cot_qasc are multiple-choice questions with a rationale "
                     "(mc_qa-like), and share their questions with mc_qa's t0/commonsense_qa and t0/qasc",
    "data_to_text": "two categories that differ in kind: common_gen (concepts -> sentence) and wiki_bio (T0 "
                    "prompts run both ways: infobox -> bio and bio -> facts)",
    "extractive_qa": "adversarial_qa_{dbert,dbidaf,droberta} are one dataset split by adversary model and duorc "
                     "ParaphraseRC/SelfRC share their plots (siblings stay relevant); ropes and wiki_hop need "
                     "reasoning rather than extraction; T0 templates include question generation",
    "general_chat": "a catch-all: Alpaca-GPT4 (general), LIMA, OASST1 and Self-Instruct user-oriented/seed rows; "
                    "its rows ask for code, math, writing, anything; oasst1_first_turn and oasst1_followup_turn "
                    "are one source",
    "math": "two categories (FLAN CoT GSM8K, AQuA); AQuA is multiple-choice algebra",
    "mc_qa": "T0 templates of these datasets include non-multiple-choice prompts (answer without options, "
             "generate a question); commonsense_qa and qasc share questions with cot_reasoning's cot_ecqa and "
             "cot_qasc, which are labelled cot_reasoning",
    "paraphrase": "paraphrase identification (MRPC, QQP, PAWS); T0 templates also generate paraphrases",
    "sentiment": "four polarity datasets with near-identical prompts: the easiest domain",
    "summarization": "gigaword is headline generation; T0 templates include title generation",
    "topic_classification": "two categories (AG News, DBpedia-14)",
    "mixture": "relevant = every domain of the mixture's tasks: a broad label (a large share of the pool)",
}
SINGLE_CATEGORY = "leave-task-out gives no relevant rows (the domain has one category)"


def _read(path) -> pa.Table:
    t = pq.read_table(str(path))
    missing = [c for c in COLUMNS if c not in t.column_names]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; a suite pool needs {COLUMNS}")
    return t.select(COLUMNS)


def _text_key(instruction: str, inp: str, output: str) -> str:
    return hashlib.blake2b("\x1f".join((instruction or "", inp or "", output or "")).encode(), digest_size=16).hexdigest()


def _slug(category: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in category.replace("t0/", "t0_"))


def _rng(seed: int, *what: str) -> np.random.Generator:
    """One generator per purpose, so adding a target never moves another target's rows."""
    h = hashlib.blake2b("/".join((str(seed),) + what).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(h, "little"))


def split_halves(strata: dict[str, str], seed: int) -> dict[str, str]:
    """``{target: stratum}`` -> ``{target: "selection" | "confirmation"}``: within each stratum the targets,
    in a seeded order, alternate halves from a seeded start, so each stratum splits as evenly as it can and
    odd strata do not all favour one half."""
    out = {}
    for stratum in sorted(set(strata.values())):
        names = sorted(t for t, s in strata.items() if s == stratum)
        rng = _rng(seed, "split", stratum)
        order = [names[i] for i in rng.permutation(len(names))]
        start = int(rng.integers(2))
        for i, t in enumerate(order):
            out[t] = ("selection", "confirmation")[(i + start) % 2]
    return out


def build_suite(source_pool, scoring_pool, out_dir, seed: int = 0, n_rows: int = 32,
                mixture_sizes=DEFAULT_MIXTURE_SIZES, rows_per_task: int = 3,
                public: dict[str, str] | None = None, relevance=None, avoid=(), one_half: str | None = None,
                round_of: str | None = None) -> dict:
    """Write ``out_dir/suite.json`` and ``out_dir/targets/*.parquet``; returns the suite document.
    ``public``: ``{name: target file}`` scored on the whole scoring pool with ``relevance`` (a JSON map).
    ``avoid``: Parquet files whose rows (by id and by text) are never target rows (an earlier round's
    pool and targets). ``one_half``: every target goes to that half instead of the split (a fresh
    round that only confirms). ``round_of``: the earlier suite this one is a fresh round of (recorded)."""
    out = Path(out_dir)
    (out / "targets").mkdir(parents=True, exist_ok=True)
    src, sp = _read(source_pool), _read(scoring_pool)
    sp_ids, sp_text = _keys([sp] + [_read(a) for a in avoid])
    cols = {c: src.column(c).to_pylist() for c in COLUMNS}
    sp_dom = sp.column("domain").to_pylist()
    sp_cat = sp.column("category").to_pylist()
    cats_in_pool: dict[str, set[str]] = {}
    for d, c in zip(sp_dom, sp_cat):
        cats_in_pool.setdefault(d, set()).add(c)
    # candidate rows: outside the scoring pool by id and by text
    outside: dict[tuple[str, str], list[int]] = {}
    for i, (rid, d, c) in enumerate(zip(cols["id"], cols["domain"], cols["category"])):
        if rid in sp_ids or _text_key(cols["instruction"][i], cols["input"][i], cols["output"][i]) in sp_text:
            continue
        outside.setdefault((d, c), []).append(i)
    all_cats = sorted({(d, c) for d, c in zip(cols["domain"], cols["category"])})
    targets, skipped, held = {}, {}, {}
    for d, c in all_cats:
        if c in NOT_A_TASK:
            skipped[c] = {"domain": d, "reason": NOT_A_TASK[c]}
            continue
        rows = outside.get((d, c), [])
        if len(cats_in_pool.get(d, set()) - {c}) == 0:
            skipped[c] = {"domain": d, "reason": SINGLE_CATEGORY}
            continue
        if len(rows) < n_rows:
            skipped[c] = {"domain": d, "reason": f"{len(rows)} rows outside the scoring pool (< {n_rows})"}
            continue
        rng = _rng(seed, "rows", c)
        pick = sorted(rows[i] for i in rng.choice(len(rows), n_rows, replace=False))
        pick = [pick[i] for i in rng.permutation(len(pick))]  # seeded order: mixtures take the first rows
        held[c] = pick
        name = f"task:{_slug(c)}"
        others = sorted(cats_in_pool[d] - {c})
        targets[name] = {"kind": "task", "file": f"targets/{_slug(c)}.parquet", "rows": n_rows,
                         "categories": [c], "exclude_categories": [c], "relevant_domains": [d], "domain": d,
                         "relevant_categories_in_pool": others, "notes": [DOMAIN_NOTES.get(d, "")]}
        _write_rows(cols, sorted(pick), out / targets[name]["file"])
    task_cats = sorted(held)
    domain_of = {t["categories"][0]: t["domain"] for t in targets.values()}
    for j, size in enumerate(mixture_sizes):
        size = min(int(size), len(task_cats))
        rng = _rng(seed, "mixture", str(j), str(size))
        cats = sorted(task_cats[i] for i in rng.choice(len(task_cats), size, replace=False))
        rows = [i for c in cats for i in held[c][:rows_per_task]]
        doms = sorted({domain_of[c] for c in cats})
        name = f"mix:{j:02d}:{size}tasks"
        targets[name] = {"kind": "mixture", "file": f"targets/mix_{j:02d}_{size}tasks.parquet",
                         "rows": len(rows), "categories": cats, "exclude_categories": cats,
                         "relevant_domains": doms, "domain": "mixture", "notes": [DOMAIN_NOTES["mixture"]]}
        _write_rows(cols, sorted(rows), out / targets[name]["file"])
    halves = ({t: one_half for t in targets} if one_half
              else split_halves({t: v["domain"] for t, v in targets.items()}, seed))
    for t, h in halves.items():
        targets[t]["half"] = h
    rel = json.loads(Path(relevance).read_text()) if relevance else {}
    for name, path in (public or {}).items():
        dest = out / "targets" / f"public_{name}.parquet"
        shutil.copyfile(path, dest)
        n = pq.read_metadata(str(dest)).num_rows
        doms = rel[name] if isinstance(rel[name], list) else [rel[name]]
        weak = {"mmlu": "weak label: MMLU questions look like several pool domains (cot_reasoning's multiple-choice rows too)",
                "bbh": "weak label: 27 BBH tasks, relevant = cot_reasoning"}.get(name, "")
        targets[name] = {"kind": "public", "file": f"targets/public_{name}.parquet", "rows": n, "categories": [],
                         "exclude_categories": [], "relevant_domains": sorted(doms), "domain": f"public:{name}",
                         "notes": [weak] if weak else [], "half": "confirmation"}
    for t in targets.values():
        t["notes"] = [n for n in t["notes"] if n]
    doc = {"version": SUITE_VERSION, "seed": int(seed), "n_rows": int(n_rows), "rows_per_task": int(rows_per_task),
           "mixture_sizes": [int(s) for s in mixture_sizes],
           "source_pool": str(Path(source_pool).resolve()), "pool": str(Path(scoring_pool).resolve()),
           "split": (f"every target in the {one_half} half" if one_half else
                     "task targets and mixtures: stratified by domain (mixtures one stratum), seeded, alternating "
                     "halves within each stratum; public targets: all confirmation"),
           **({"round_of": round_of, "avoid": [str(Path(a).resolve()) for a in avoid]} if round_of else {}),
           "targets": dict(sorted(targets.items())), "skipped": skipped, "domain_notes": DOMAIN_NOTES}
    (out / "suite.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def _keys(tables) -> tuple[set, set]:
    """The ids and the text keys of every row of ``tables``."""
    ids, texts = set(), set()
    for t in tables:
        ids.update(t.column("id").to_pylist())
        texts.update(_text_key(*r) for r in zip(*(t.column(c).to_pylist() for c in ("instruction", "input", "output"))))
    return ids, texts


def draw_pool(source_pool, like_pool, out_path, seed: int, avoid=()) -> dict[str, int]:
    """A fresh scoring pool: from ``source_pool``, per category as many rows as ``like_pool`` has of it,
    seeded, none of them in ``like_pool`` or ``avoid`` (by id and by text); a category with fewer such
    rows gives what it has. Writes ``out_path``; returns ``{category: rows short}`` for the short ones."""
    src, like = _read(source_pool), _read(like_pool)
    ids, texts = _keys([like] + [_read(a) for a in avoid])
    cols = {c: src.column(c).to_pylist() for c in COLUMNS}
    want: dict[str, int] = {}
    for c in like.column("category").to_pylist():
        want[c] = want.get(c, 0) + 1
    free: dict[str, list[int]] = {}
    seen: set[str] = set()
    for i, (rid, c) in enumerate(zip(cols["id"], cols["category"])):
        k = _text_key(cols["instruction"][i], cols["input"][i], cols["output"][i])
        if c in want and rid not in ids and k not in texts and k not in seen:
            seen.add(k)
            free.setdefault(c, []).append(i)
    rows, short = [], {}
    for c in sorted(want):
        cand = free.get(c, [])
        n = min(want[c], len(cand))
        if n < want[c]:
            short[c] = want[c] - n
        rng = _rng(seed, "pool", c)
        rows += [cand[i] for i in rng.choice(len(cand), n, replace=False)] if n else []
    _write_rows(cols, sorted(rows), Path(out_path))
    return short


def fresh_round(earlier_suite, out_dir, seed: int, source_pool=None, **kw) -> dict:
    """A fresh held-out round of ``earlier_suite``: a new scoring pool drawn like the earlier one's and
    disjoint from it and from the earlier targets (``draw_pool``), task targets and mixtures built as
    before from rows in none of them, every target in the confirmation half, no public targets (they
    were in the earlier round). What the earlier round chose is judged here on rows nobody has seen. A fresh
    round of a fresh round avoids every round of the chain (the earlier suite's ``avoid`` list too)."""
    earlier = load_suite(earlier_suite)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source_pool = source_pool or earlier["source_pool"]
    # every round before: the earlier round's own pool and targets, and what it avoided (its rounds before)
    before = list(earlier.get("avoid", [])) + [v["path"] for v in earlier["targets"].values() if v["kind"] != "public"]
    short = draw_pool(source_pool, earlier["pool"], out / "pool.parquet", seed, avoid=before)
    doc = build_suite(source_pool, out / "pool.parquet", out, seed, avoid=[earlier["pool"]] + before,
                      one_half="confirmation", round_of=str(Path(earlier_suite).resolve()), **kw)
    doc["pool_short"] = short
    (out / "suite.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def _write_rows(cols: dict, rows: list[int], path: Path) -> None:
    pq.write_table(pa.table({c: pa.array([cols[c][i] for i in rows], pa.string()) for c in COLUMNS}), str(path),
                   compression="zstd")


def load_suite(path) -> dict:
    """The suite document with every target's ``file`` resolved against the suite's folder."""
    p = Path(str(path)).expanduser()
    doc = json.loads(p.read_text())
    if doc.get("version") != SUITE_VERSION:
        raise ValueError(f"{p}: suite version {doc.get('version')!r}, this code reads {SUITE_VERSION}")
    for t in doc["targets"].values():
        t["path"] = str((p.parent / t["file"]).resolve())
    return doc


def suite_relevance(suite: dict, pool_domains: set[str]) -> dict[str, set[str]]:
    """``{target: relevant domains}`` from the suite, each domain checked against the pool's."""
    out = {}
    for t, v in suite["targets"].items():
        unknown = sorted(set(v["relevant_domains"]) - pool_domains)
        if unknown:
            raise ValueError(f"suite target {t!r}: relevant domain(s) {unknown} that no pool row has")
        out[t] = set(v["relevant_domains"])
    return out


def pool_masks(suite: dict, pool, id_column: str = "id") -> dict[str, np.ndarray | None]:
    """Per target, which rows of ``pool`` (a ``RowSet`` of the suite's pool) it is ranked over: the
    rows whose category it does not exclude (``None``: all of them)."""
    t = pq.read_table(suite["pool"], columns=[id_column, "category"])
    cat = dict(zip(t.column(id_column).to_pylist(), t.column("category").to_pylist()))
    cats = np.asarray([cat.get(i, "") for i in pool.ids], dtype=object)
    out = {}
    for name, v in suite["targets"].items():
        ex = list(v["exclude_categories"])
        out[name] = ~np.isin(cats, ex) if ex else None
    return out


def _mean(xs) -> float:
    xs = list(xs)
    return float(np.mean(xs)) if xs else float("nan")


def half_table(results: dict, targets: list[str], selectors: list[str]) -> list[str]:
    """Markdown rows: per selector, mean AP over ``targets`` (sorted best first), per domain (task
    targets), mixtures, public targets, and the targets whose AP is below the base rate."""
    kinds = {t: results[t]["suite"] for t in targets}
    domains = sorted({k["domain"] for k in kinds.values() if k["kind"] == "task"})
    public = [t for t in targets if kinds[t]["kind"] == "public"]
    mixes = [t for t in targets if kinds[t]["kind"] == "mixture"]
    tasks = [t for t in targets if kinds[t]["kind"] == "task"]
    head = (["selector", "mean AP", "tasks", "mixtures"] + [f"{d} ({sum(kinds[t]['domain'] == d for t in tasks)})"
                                                            for d in domains]
            + public + ["< base rate"])
    rows = []
    for s in selectors:
        if not all(s in results[t]["selectors"] for t in targets):
            continue
        ap = {t: results[t]["selectors"][s]["ap"] for t in targets}
        below = [t for t in targets if ap[t] < results[t]["base_rate"]]
        mean = _mean(ap.values())
        rows.append((mean, s, [mean, _mean(ap[t] for t in tasks), _mean(ap[t] for t in mixes)]
                     + [_mean(ap[t] for t in tasks if kinds[t]["domain"] == d) for d in domains]
                     + [ap[t] for t in public], len(below)))
    rows.sort(key=lambda r: -r[0])
    best = [max(r[2][j] for r in rows) for j in range(len(head) - 2)] if rows else []  # the best of each column
    out = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for _, s, cells, nb in rows:
        out.append(f"| {s} | " + " | ".join(("**%.3f**" if c == b else "%.3f") % c for c, b in zip(cells, best))
                   + f" | {nb} |")
    return out


def block_of(selector: str, hookpoint: str) -> str | None:
    """The block a MoNA selector reads (``@layers.N`` in its name, else the evaluation's ``sae.hookpoint``);
    None for a baseline."""
    if not selector.startswith("mona:"):
        return None
    tail = selector.split("@", 1)[1] if "@layers." in selector else ""
    return tail.split("/", 1)[0] if tail else hookpoint


def paper_formula(block: str, hookpoint: str) -> str:
    """The name of the paper's MoNA (one prototype, Jaccard, mass 1.0, the SAE's K) at ``block``."""
    return "mona:sae/mean/jaccard" + ("" if block == hookpoint else f"@{block}") + "/prototype"


def paired(results: dict, a: str, b: str, targets=None, n_boot: int = 10000, seed: int = 0) -> dict:
    """Selector ``a`` against ``b`` over ``targets`` (default: all), each target weighing the same: the
    mean AP difference, wins / losses / ties, and a 95% bootstrap interval of the mean difference
    (targets resampled with replacement, seeded)."""
    ts = list(targets or results)
    d = np.array([results[t]["selectors"][a]["ap"] - results[t]["selectors"][b]["ap"] for t in ts])
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(axis=1)
    return {"a": a, "b": b, "targets": len(ts), "mean_a": _mean(results[t]["selectors"][a]["ap"] for t in ts),
            "mean_b": _mean(results[t]["selectors"][b]["ap"] for t in ts), "diff": float(d.mean()),
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "ties": int((d == 0).sum()),
            "ci95": (float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975)))}


def choose_default(results: dict, hookpoint: str) -> dict:
    """The rule that picks the default, fixed before any result was seen: among the MoNA settings
    (SAE codes, ``mona:sae/...``), the best mean AP over the SELECTION half's targets (every target
    weighs the same); then, on the CONFIRMATION half, issue 23's checks: its mean AP against every
    other selector at the same block (baselines included), per domain against the paper's formula at
    that block (within 0.03 AP), targets below random (AP under the base rate), and BBH's P@5%."""
    half = {h: [t for t in results if results[t]["suite"]["half"] == h] for h in ("selection", "confirmation")}
    every = [s for s in dict.fromkeys(s for r in results.values() for s in r["selectors"])
             if all(s in results[t]["selectors"] for t in results)]
    mean = {h: {s: _mean(results[t]["selectors"][s]["ap"] for t in ts) for s in every} for h, ts in half.items()}
    cands = [s for s in every if s.startswith("mona:sae/")]
    if not cands or not half["selection"] or not half["confirmation"]:
        return {}
    chosen = max(cands, key=lambda s: (mean["selection"][s], s))
    blk = block_of(chosen, hookpoint)
    conf = half["confirmation"]
    rivals = [s for s in every if s != chosen and block_of(s, hookpoint) in (None, blk)]
    beaten_by = {s: mean["confirmation"][s] - mean["confirmation"][chosen] for s in rivals
                 if mean["confirmation"][s] > mean["confirmation"][chosen]}
    paper = paper_formula(blk, hookpoint)
    domains = sorted({results[t]["suite"]["domain"] for t in conf})
    per_domain = {}
    if paper in every:
        for d in domains:
            ts = [t for t in conf if results[t]["suite"]["domain"] == d]
            per_domain[d] = _mean(results[t]["selectors"][chosen]["ap"] - results[t]["selectors"][paper]["ap"] for t in ts)
    below = [t for t in conf if results[t]["selectors"][chosen]["ap"] < results[t]["base_rate"]]
    below_random = [t for t in conf if "random" in results[t]["selectors"]
                    and results[t]["selectors"][chosen]["ap"] < results[t]["selectors"]["random"]["ap"]]
    bbh = results.get("bbh", {}).get("selectors", {}).get(chosen, {}).get("precision", {}).get("5%")
    return {"chosen": chosen, "block": blk, "selection_mean_ap": mean["selection"][chosen],
            "selection_ranking": sorted(cands, key=lambda s: -mean["selection"][s])[:10],
            "confirmation_mean_ap": mean["confirmation"][chosen], "paper": paper,
            "confirmation_beaten_by": dict(sorted(beaten_by.items(), key=lambda kv: -kv[1])),
            "per_domain_vs_paper": per_domain, "below_base_rate": below, "below_random_selector": below_random,
            "bbh_p_at_5pct": bbh, "means": mean}


def choice_lines(choice: dict) -> list[str]:
    if not choice:
        return []
    c = choice
    worst = min(c["per_domain_vs_paper"].items(), key=lambda kv: kv[1]) if c["per_domain_vs_paper"] else None
    out = ["## The default chosen on the selection half", "",
           f"- rule: among the MoNA settings, the best mean AP over the selection half's targets -> `{c['chosen']}` "
           f"(selection {c['selection_mean_ap']:.3f}); runners-up: "
           + ", ".join(f"`{s}` {c['means']['selection'][s]:.3f}" for s in c["selection_ranking"][1:5]),
           f"- confirmation half: mean AP {c['confirmation_mean_ap']:.3f}; the paper's formula at {c['block']} "
           f"(`{c['paper']}`) {c['means']['confirmation'].get(c['paper'], float('nan')):.3f}",
           "- selectors at the same block (or baselines) above it on the confirmation half: "
           + (", ".join(f"`{s}` +{d:.3f}" for s, d in c["confirmation_beaten_by"].items()) or "none"),
           "- per domain against the paper's formula (confirmation half; issue: >= -0.03): "
           + ", ".join(f"{d} {v:+.3f}" for d, v in c["per_domain_vs_paper"].items())
           + (f" (worst: {worst[0]} {worst[1]:+.3f})" if worst else ""),
           f"- confirmation targets below the base rate: {len(c['below_base_rate'])} {c['below_base_rate']}; "
           f"below the random selector's AP: {len(c['below_random_selector'])} {c['below_random_selector']}",
           f"- BBH P@5%: {c['bbh_p_at_5pct']}" if c["bbh_p_at_5pct"] is not None else "- BBH: not in the suite", ""]
    return out


def suite_report(doc: dict, suite: dict) -> str:
    """``suite.md``: the default's choice, each half's table (every selector), the per-target APs and the
    suite's notes."""
    results = doc["results"]
    selectors = list(dict.fromkeys(s for r in results.values() for s in r["selectors"]))
    halves = {h: [t for t in results if results[t]["suite"]["half"] == h] for h in ("selection", "confirmation")}
    out = [f"# Leave-task-out suite (seed {suite['seed']}): {len(results)} targets", "",
           f"Pool: `{doc['inputs']['pool']}` ({doc['inputs']['pool_rows']} rows); each target is ranked over the pool "
           "without its excluded categories. AP = average precision over the target's pool; `< base rate` = targets "
           "whose AP is below the share of relevant rows in their pool (a random ranking's expected AP). Split: "
           + suite["split"] + ".", ""]
    out += choice_lines(choose_default(results, str(doc["settings"]["sae"]["hookpoint"])))
    for h, ts in halves.items():
        if not ts:
            continue
        out += [f"## {h} half: {len(ts)} targets (sorted by mean AP over all of them)", ""]
        out += half_table(results, ts, selectors) + [""]
        fresh = [t for t in ts if results[t]["suite"]["kind"] != "public"]
        if len(fresh) != len(ts):
            out += [f"### {h} half without the public targets ({len(fresh)} targets)", ""]
            out += half_table(results, fresh, selectors) + [""]
    out += ["## AP per target", "", "| target | half | pool rows | base rate | "
            + " | ".join(selectors) + " |", "|---" * (len(selectors) + 4) + "|"]
    for t, r in results.items():
        out.append(f"| {t} | {r['suite']['half']} | {r['pool_rows']} | {r['base_rate']:.3f} | "
                   + " | ".join(f"{r['selectors'][s]['ap']:.3f}" if s in r["selectors"] else "" for s in selectors) + " |")
    out += ["", "## Domain labels", ""] + [f"- {d}: {n}" for d, n in suite["domain_notes"].items()]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    data = Path("/work/shared/data")
    ap = argparse.ArgumentParser(prog="python -m mona_ray.evaluation.suite", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for suite.json and targets/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--source-pool", default=str(data / "pool.parquet"))
    ap.add_argument("--pool", default=str(data / "pool_5k.parquet"), help="the scoring pool")
    ap.add_argument("--rows", type=int, default=32, help="target rows per task")
    ap.add_argument("--mixtures", default=",".join(map(str, DEFAULT_MIXTURE_SIZES)),
                    help="tasks per mixture, comma-separated ('' for none)")
    ap.add_argument("--public", default=str(data / "targets"), help="folder of gsm8k/mbpp/mmlu/bbh.parquet ('' for none)")
    ap.add_argument("--relevance", default=str(data / "relevance.json"))
    ap.add_argument("--fresh-from", default="", help="an earlier suite.json: build a fresh round of it (a new "
                    "scoring pool drawn like its pool and disjoint from it and its targets, new target rows, all "
                    "confirmation, no public targets); --pool, --public and --relevance are then not used")
    a = ap.parse_args(argv)
    sizes = [int(s) for s in a.mixtures.split(",") if s.strip()]
    if a.fresh_from:
        doc = fresh_round(a.fresh_from, a.out, a.seed, a.source_pool, n_rows=a.rows, mixture_sizes=sizes)
        _summary(doc, a.out)
        if doc["pool_short"]:
            print(f"  pool: categories short of rows: {doc['pool_short']}")
        return
    public = {}
    if a.public:
        public = {n: str(Path(a.public) / f"{n}.parquet") for n in ("gsm8k", "mbpp", "mmlu", "bbh")
                  if (Path(a.public) / f"{n}.parquet").exists()}
    doc = build_suite(a.source_pool, a.pool, a.out, a.seed, a.rows, sizes, public=public,
                      relevance=a.relevance if public else None)
    _summary(doc, a.out)


def _summary(doc: dict, out) -> None:
    by = {}
    for t in doc["targets"].values():
        by.setdefault(t["half"], []).append(t)
    print(f"suite: {len(doc['targets'])} targets -> {Path(out) / 'suite.json'}")
    for h, ts in sorted(by.items()):
        print(f"  {h}: {len(ts)} targets ({sum(t['kind'] == 'task' for t in ts)} tasks, "
              f"{sum(t['kind'] == 'mixture' for t in ts)} mixtures, {sum(t['kind'] == 'public' for t in ts)} public)")
    for c, s in doc["skipped"].items():
        if "outside" not in s["reason"]:
            print(f"  skipped {c} ({s['domain']}): {s['reason']}")


if __name__ == "__main__":
    main()
