"""Why a selection came out as it did: the prototype's latents and each selected row's.

For a MoNA run (SAE codes, mean pooling, generalized Jaccard) this writes, into the run
folder, ``explain.json`` and ``explain.md``:

* **Prototype**: its ``top_latents`` largest latents p_k, each with the target tokens that
  activate it most (row, position, token, activation, a few tokens of context). Token
  codes are recomputed for the target rows only (a few hundred rows: seconds).
* **Selected rows**: for each, the latents it shares with the prototype that contribute
  most to its score. The Jaccard numerator is ``sum_k min(z_k, p_k)``, so latent k
  contributes ``min(z_k, p_k)``; its ``share`` is that over the row's numerator. The
  row's score ``sum min / (|z|_1 + |p|_1 - sum min)`` is recomputed and reported.

The pipeline explains the prototype in one Ray task (:func:`explain_prototype`) and each
selected row from the store (:func:`explain_row`), then calls :func:`write_explain`.
"""

from __future__ import annotations

import heapq
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..core.io import atomic_path, write_text

TOP_LATENTS = 20  # the prototype latents explained (and marked in each selected row's shared latents)


def _token_text(tokenizer, tid: int) -> str:
    return tokenizer.decode([int(tid)])


def _context(tokenizer, ids: Sequence[int], pos: int, width: int) -> str:
    left = tokenizer.decode(list(ids[max(0, pos - width):pos]))
    right = tokenizer.decode(list(ids[pos + 1:pos + 1 + width]))
    return f"{left}[[{_token_text(tokenizer, ids[pos])}]]{right}".replace("\n", "\\n")


def top_activating_tokens(engine, readout, target_ids: list[list[int]], target_masks: list[list[int]],
                          groups: list[tuple[list[int], np.ndarray]], per_latent: int) -> list[dict[int, list]]:
    """For each group ``(rows, latents)`` (``rows`` index ``target_ids``) and each of its latents:
    the ``per_latent`` (activation, row, position) with the highest activation over that
    group's pooled tokens, its rows numbered by their position in ``rows``.

    One model pass over the rows serves every group (the overall prototype's and each
    cluster's): a row's token codes never depend on its batch neighbours, so each group gets
    exactly what a pass over its rows alone would. The codes are the feature engine's own
    (``readout``: the run's SAE readout), seen through its ``token_hook``: the same
    micro-batches, the same per-row chunks of at most ``sae_chunk_tokens`` tokens, the same TopK."""
    wants, heaps, rel = [], [], []
    for rows, latents in groups:
        wants.append(torch.as_tensor(np.asarray(latents, dtype=np.int64)))
        heaps.append({int(j): [] for j in latents})
        r = np.full(len(target_ids), -1, dtype=np.int64)
        r[np.asarray(rows, dtype=np.int64)] = np.arange(len(rows))
        rel.append(r)
    used = np.asarray(sorted({i for rows, _ in groups for i in rows}), dtype=np.int64)

    def hook(r, rows, positions, vals, idx):
        if r != readout:
            return
        vals, idx = vals.float().cpu(), idx.cpu()
        glob = used[np.asarray(rows, dtype=np.int64)]
        for want, hp, rr in zip(wants, heaps, rel):
            at = rr[glob]
            keep = np.flatnonzero(at >= 0)
            if len(keep) == len(at):
                _push_top(hp, want, vals, idx, at.tolist(), positions, per_latent)
            elif len(keep):
                k = torch.as_tensor(keep)
                _push_top(hp, want, vals[k], idx[k], at[keep].tolist(), [positions[i] for i in keep.tolist()], per_latent)

    prev, engine.token_hook = engine.token_hook, hook
    try:
        engine.run([target_ids[i] for i in used.tolist()], {e: [target_masks[i] for i in used.tolist()] for e in engine.excludes})
    finally:
        engine.token_hook = prev
    return [{j: sorted(h, key=lambda x: (-x[0], x[1], x[2])) for j, h in hp.items()} for hp in heaps]


def _push_top(heaps, want: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, rows: list[int], positions: list[int],
              per_latent: int) -> None:
    """Offer one chunk's token codes to the per-latent heaps of (activation, row, position)."""
    hit = idx.unsqueeze(-1) == want  # [n_tok, K, n_latents]
    act = (vals.unsqueeze(-1) * hit).sum(1)  # [n_tok, n_latents]
    for c, j in enumerate(want.tolist()):
        col = act[:, c]
        nz = col.nonzero().flatten()
        if len(nz) == 0:
            continue
        top = nz[col[nz].argsort(descending=True)[:per_latent]]
        for t in top.tolist():
            item = (float(col[t]), rows[t], positions[t])
            if len(heaps[j]) < per_latent:
                heapq.heappush(heaps[j], item)
            else:
                heapq.heappushpop(heaps[j], item)


def _largest(c: np.ndarray, idx: np.ndarray, top: int | None = None) -> np.ndarray:
    """Positions of the positive terms ``c``, largest first (ties by latent ``idx``); only the
    ``top`` largest if given, found without sorting them all (a row shares tens of thousands
    of latents at 131k)."""
    keep = np.flatnonzero(c > 0)
    if top is not None and len(keep) > top:
        cut = np.partition(c[keep], len(keep) - top)[len(keep) - top]  # the top-th largest
        keep = keep[c[keep] >= cut]
    return keep[np.lexsort((idx[keep], -c[keep]))][:top]


def strongest_latents(prototype: np.ndarray, n: int = TOP_LATENTS) -> np.ndarray:
    """The prototype's ``n`` largest non-zero latents, largest first (ties by latent)."""
    proto = np.asarray(prototype, dtype=np.float64)
    top = np.argsort(-proto, kind="stable")[:n]
    return top[proto[top] > 0]


def explain_prototype(engine, readout, tokenizer, target_ids: list[list[int]], target_masks: list[list[int]],
                      prototype: np.ndarray, *, top_latents: int = TOP_LATENTS, tokens_per_latent: int = 8,
                      context: int = 6) -> dict:
    """The prototype's part of the explanation: its top latents with the target tokens that
    fire them (needs the model and the SAE, through the feature engine; reads the target rows only)."""
    return explain_prototypes(engine, readout, tokenizer, target_ids, target_masks, [prototype],
                              [list(range(len(target_ids)))], top_latents=top_latents,
                              tokens_per_latent=tokens_per_latent, context=context)[0]


def explain_prototypes(engine, readout, tokenizer, target_ids: list[list[int]], target_masks: list[list[int]],
                       prototypes, groups: list[list[int]], *, top_latents: int = TOP_LATENTS,
                       tokens_per_latent: int = 8, context: int = 6, weights=None) -> list[dict]:
    """:func:`explain_prototype` for each prototype on its group of target rows (the overall
    prototype on all rows, each cluster's on its own), with one model pass over the rows.
    ``weights``: per prototype, how much each latent counts in the score (``select.background``:
    ``Background.latent_weights``); the top latents are then the heaviest by it, not by mass."""
    protos = [np.asarray(p, dtype=np.float64) for p in prototypes]
    ranks = protos if weights is None else [np.asarray(w, dtype=np.float64) for w in weights]
    tops = [strongest_latents(w, top_latents) for w in ranks]
    acts = top_activating_tokens(engine, readout, target_ids, target_masks, list(zip(groups, tops)), tokens_per_latent)
    docs = []
    for proto, rank, top, act, rows in zip(protos, ranks, tops, acts, groups):
        ids = [target_ids[i] for i in rows]
        p_l1, w_l1 = float(proto.sum()), float(np.maximum(rank, 0).sum())
        latents = [{"latent": j, "value": float(proto[j]), "share_of_prototype": float(proto[j]) / p_l1 if p_l1 else 0.0,
                    **({"weight": float(rank[j]), "share_of_weight": float(rank[j]) / w_l1 if w_l1 else 0.0}
                       if weights is not None else {}),
                    "top_tokens": [{"row": r, "position": pos, "token": _token_text(tokenizer, ids[r][pos]),
                                    "activation": a, "context": _context(tokenizer, ids[r], pos, context)}
                                   for a, r, pos in act[j]]}
                   for j in top.tolist()]
        docs.append({"l1": p_l1, "nonzero": int((proto > 0).sum()), "num_latents": int(len(proto)),
                     "target_rows": len(rows), "top_latents": latents})
    return docs


def explain_row(rid: str, idx: np.ndarray, val: np.ndarray, proto: np.ndarray, top_set: set[int],
                shared_per_row: int = 10, linear: str | None = None) -> dict:
    """One selected row: its score recomputed and the shared latents that contribute most.
    ``val`` and ``proto`` as the score compares them (weighted by ``select.background``);
    ``linear``: ``lr`` / ``lda``, scores linear in the row (``proto`` holds each latent's weight:
    a latent contributes ``z_j w_j``, ``lr`` divides the sum by ``|z|_1``), else generalized Jaccard."""
    idx = np.asarray(idx, dtype=np.int64)
    z = np.asarray(val, dtype=np.float64)
    if linear:
        c = z * proto[idx]
        s_min = float(c.sum())
        denom = float(z.sum()) if linear == "lr" else 1.0
    else:
        c = np.minimum(z, proto[idx])
        s_min = float(c.sum())
        denom = float(z.sum()) + float(proto.sum()) - s_min
    keep = _largest(c, idx, shared_per_row)
    return {"id": str(rid), "score": s_min / denom if denom > 0 else 0.0, "sum_min": s_min,
            "shared_latents": int(np.count_nonzero(c > 0)),
            "top_shared": [{"latent": int(a), "contribution": float(b), "share": float(b) / s_min if s_min else 0.0,
                            "z": float(zz), "p": float(proto[a]), "prototype_top": int(a) in top_set}
                           for a, b, zz in zip(idx[keep], c[keep], z[keep])]}


def explain(engine, readout, tokenizer, target_ids: list[list[int]], target_masks: list[list[int]],
            prototype: np.ndarray, selected: list[tuple[str, np.ndarray, np.ndarray]], *, top_latents: int = TOP_LATENTS,
            tokens_per_latent: int = 8, shared_per_row: int = 10, context: int = 6) -> dict:
    """The explanation of a selection, as a JSON-ready dict.

    ``engine``: a ``FeatureEngine`` holding the run's model and SAE; ``readout``: the run's SAE
    readout; ``target_ids``/``target_masks``: the target rows' token ids and pool masks as the
    run tokenized them; ``prototype``: the dense prototype the run scored with; ``selected``:
    ``(id, latent indices, mean-pooled values)`` of each selected row, best first.
    """
    proto = np.asarray(prototype, dtype=np.float64)
    doc = explain_prototype(engine, readout, tokenizer, target_ids, target_masks, proto, top_latents=top_latents,
                            tokens_per_latent=tokens_per_latent, context=context)
    top_set = {x["latent"] for x in doc["top_latents"]}
    return {"prototype": doc, "selected": [explain_row(rid, idx, val, proto, top_set, shared_per_row)
                                           for rid, idx, val in selected]}


def write_explain(doc: dict, out_dir: str | Path, selected_lines: list[str] | None = None,
                  max_rows_md: int = 50) -> tuple[Path, Path]:
    """``explain.json`` (everything) and ``explain.md`` (readable; the first ``max_rows_md`` rows).

    The selected rows come as ``doc["selected"]`` (dicts) or, for a large selection, as
    ``selected_lines`` (each row already JSON text): explain.json is then written row by row,
    one row per line, never as one string."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head = {k: v for k, v in doc.items() if k != "selected"}
    if selected_lines is None:
        selected_lines = [json.dumps(r, ensure_ascii=False) for r in doc.get("selected", [])]
    with atomic_path(out / "explain.json") as tmp, open(tmp, "w", encoding="utf-8") as fh:
        text = json.dumps(head, indent=2, ensure_ascii=False, default=str)  # "{...}" without its closing brace:
        fh.write(text[:-1].rstrip() + (",\n" if head else "\n") + '  "selected": [\n')
        for i, line in enumerate(selected_lines):
            fh.write(("    " if i == 0 else ",\n    ") + line)
        fh.write("\n  ]\n}\n")
    shown = [json.loads(x) for x in selected_lines[:max_rows_md]]
    p = doc["prototype"]
    bg = doc.get("background")  # select.background: latents ranked by the weight the score gives them
    weighted = bool(p["top_latents"]) and "weight" in p["top_latents"][0]
    md = ["# Why these rows were selected", "",
          f"Prototype: mean of {p['target_rows']} target rows; {p['nonzero']} of {p['num_latents']} latents active, "
          f"L1 = {p['l1']:.4g}." + (f" Scored with select.background={bg}: latents are ranked by the weight the "
                                    "score gives them, not by their mass." if bg else ""),
          "", "## The prototype's top latents", ""]

    def latent_table(lats, n_tokens):
        head = "| latent | p_k | share of L1 |" + (" weight | share of weight |" if weighted else "")
        rows = [head + " target tokens that activate it most (token in [[ ]], activation) |",
                "|" + "---|" * (head.count("|"))]
        for lat in lats:
            toks = "<br>".join(f"`{t['context'].replace('|', '/').replace('`', '')}` ({t['activation']:.3g})"
                               for t in lat["top_tokens"][:n_tokens])
            w = f" {lat['weight']:.4g} | {lat['share_of_weight']:.1%} |" if weighted else ""
            rows.append(f"| {lat['latent']} | {lat['value']:.4g} | {lat['share_of_prototype']:.1%} |{w} {toks} |")
        return rows

    md += latent_table(p["top_latents"], 4)
    for c in doc.get("clusters", []):
        md += ["", f"## Cluster {c['cluster']}: {c['size']} target rows (e.g. {', '.join(map(str, c['target_ids'][:5]))})", ""]
        md += latent_table(c["top_latents"][:10], 3)
    md += ["", "## Selected rows: the shared latents that contribute most", "",
           ("Contribution of latent k = its term in the score's numerator as the score weighs it "
            f"(select.background={bg}); " if bg else "Contribution of latent k = min(z_k, p_k); ")
           + "share = its part of the row's numerator. Latents marked * are among the prototype's top latents above.", "",
           "| rank | id | score | shared latents | top contributions (latent: contribution, share) |", "|---|---|---|---|---|"]
    for i, r in enumerate(shown, 1):
        tops = ", ".join(f"{s['latent']}{'*' if s['prototype_top'] else ''}: {s['contribution']:.3g} ({s['share']:.0%})"
                         for s in r["top_shared"][:5])
        md.append(f"| {i} | `{r['id']}` | {r['score']:.4f} | {r['shared_latents']} | {tops} |")
    if len(selected_lines) > max_rows_md:
        md.append(f"\n({len(selected_lines) - max_rows_md} more rows in explain.json)")
    write_text("\n".join(md) + "\n", out / "explain.md")
    return out / "explain.json", out / "explain.md"
