"""Reading an evaluation's inputs: a labelled pool, target sets and a relevance map.

Every problem is reported as an :class:`~mona_ray.core.records.InputError` that names the file
(and row) and says what to change; rows that cannot be read as a conversation are kept
out of the ranking and listed with their reason, never dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..core.readers import input_files, plan_units, read_unit
from ..core.records import InputError, RecordError, normalize_record, record_id


@dataclass
class RowSet:
    """Usable rows of one input file: conversations, ids, domains (pool only), rejections."""

    path: str
    messages: list[list[dict]] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # {"row", "reason"}

    def __len__(self) -> int:
        return len(self.messages)

    def subset(self, keep) -> "RowSet":
        """The rows where the boolean mask ``keep`` is true, in order (rejections kept as they are)."""
        idx = [i for i, k in enumerate(keep) if k]
        return RowSet(self.path, [self.messages[i] for i in idx], [self.ids[i] for i in idx],
                      [self.domains[i] for i in idx] if self.domains else [], list(self.rejected))


def read_rows(path: str | Path, role: str, id_column: str = "id", domain_column: str | None = None) -> RowSet:
    """Rows of ``path`` (.parquet / .arrow / .jsonl / .json, a folder of them, or a ``datasets``
    save_to_disk folder) as conversations. ``role`` names the input in errors."""
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise InputError(f"{role}={str(path)!r} does not exist")
    files = input_files(p)
    if not files:
        raise InputError(f"{role}={str(path)!r}: no .parquet, .arrow, .jsonl or .json file there")
    out = RowSet(str(p))
    seen_domain_field = False
    for unit in plan_units(files, rows_per_unit=1 << 40):
        for row, rec in read_unit(unit):
            where = f"{unit.path} row {row}" if row >= 0 else unit.path
            if isinstance(rec, RecordError):
                out.rejected.append({"row": where, "reason": str(rec)})
                continue
            if domain_column is not None:
                if domain_column not in rec:
                    cols = ", ".join(sorted(map(str, rec)))
                    raise InputError(f"{role}={unit.path}: no {domain_column!r} column (columns: {cols}); "
                                     "the pool needs one domain label per row (set data.domain_column to its name)")
                seen_domain_field = True
            try:
                msgs = normalize_record(rec)
            except RecordError as e:
                out.rejected.append({"row": where, "reason": str(e)})
                continue
            out.messages.append(msgs)
            out.ids.append(record_id(rec, unit.path, row, id_column))
            if domain_column is not None:
                d = rec.get(domain_column)
                out.domains.append("" if d is None else str(d))
    if not out.messages:
        reasons = "; ".join(f"{r['row']}: {r['reason']}" for r in out.rejected[:3])
        raise InputError(f"{role}={str(path)!r} has no usable rows" + (f" ({reasons})" if reasons else " (it is empty)"))
    if domain_column is not None and not seen_domain_field:
        raise InputError(f"{role}={str(path)!r}: no {domain_column!r} column")
    if len(set(out.ids)) != len(out.ids):
        dup = next(i for i in out.ids if out.ids.count(i) > 1)
        raise InputError(f"{role}={str(path)!r}: id {dup!r} appears more than once; ids must be unique")
    return out


def target_paths(targets) -> dict[str, str]:
    """``{name: path}`` from a mapping, or from a list of paths (named by file stem)."""
    if targets is None:
        raise InputError("data.targets is not set: give {name: path} or a list of target files")
    if hasattr(targets, "items"):
        out = {str(k): str(v) for k, v in targets.items()}
    elif isinstance(targets, (str, Path)):
        out = {Path(str(targets)).stem: str(targets)}
    else:
        out = {}
        for t in targets:
            name = Path(str(t)).stem
            if name in out:
                raise InputError(f"two target files are both named {name!r}; give data.targets as {{name: path}}")
            out[name] = str(t)
    if not out:
        raise InputError("data.targets is empty: give at least one target set")
    return out


def read_relevance(path: str | Path, targets: list[str], pool_domains: set[str]) -> tuple[dict[str, set[str]], list[str]]:
    """``{target: relevant domains}`` for the given targets, and notes about ignored entries."""
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise InputError(f"data.relevance={str(path)!r} does not exist")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"data.relevance={str(p)!r} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise InputError(f"data.relevance={str(p)!r} must be a JSON object: target name -> list of domains")
    rel, notes = {}, []
    for t in targets:
        if t not in raw:
            raise InputError(f"target {t!r} has no entry in the relevance map {p} (entries: {', '.join(sorted(raw))}); "
                             "add one, or name the target like its entry in data.targets")
        doms = raw[t]
        doms = [doms] if isinstance(doms, str) else doms
        if not isinstance(doms, list) or not doms or not all(isinstance(d, str) for d in doms):
            raise InputError(f"relevance map {p}: entry {t!r} must be a non-empty list of domain names")
        unknown = sorted(set(doms) - pool_domains)
        if unknown:
            raise InputError(f"relevance map {p}: target {t!r} lists domain(s) {unknown} that no pool row has "
                             f"(pool domains: {', '.join(sorted(pool_domains))})")
        rel[t] = set(doms)
    extra = sorted(set(raw) - set(targets))
    if extra:
        notes.append(f"relevance entries without a target set were ignored: {', '.join(extra)}")
    return rel, notes
