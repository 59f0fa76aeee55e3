"""Trainer-ready output: a LLaMA-Factory dataset registry and a chat-messages file for TRL.

:func:`write_trainer_files` writes, next to ``selected.jsonl``:

* ``selected.messages.jsonl``: every selected record as ``{"messages": [{"role", "content"}...],
  "id", "score", "rank"}``, the messages exactly as :func:`records.normalize_record` gives them
  (roles ``system``/``user``/``assistant``/``tool``). Always written: it is the file TRL's
  ``SFTTrainer`` reads (conversational ``messages`` format), whatever the source formats.
* ``dataset_info.json``: a LLaMA-Factory registry with one entry, so that
  ``dataset_dir=<run folder>`` + ``dataset=<name>`` trains on the selection. Its ``file_name``
  is ``selected.jsonl`` itself (``report.trainer_format=auto``, when LLaMA-Factory reads every
  record in its own format exactly) or ``selected.messages.jsonl`` (otherwise, and always with
  ``report.trainer_format=messages``).

``auto`` points at ``selected.jsonl`` only when all of these hold, and says which one failed:

1. every record is in one format (alpaca, ShareGPT ``conversations`` or chat ``messages``);
2. every record has the same fields with the same JSON types, nested ones included (nulls
   count as a type): ``datasets`` reads a JSON-lines file in blocks and fails when blocks
   disagree on the schema, e.g. a field that is null in the whole first block;
3. ShareGPT/messages: each role is written one way in every record (LLaMA-Factory's tags are
   exact strings: ``human`` and ``user`` cannot both be the user), and every conversation has
   the shape LLaMA-Factory's ShareGPT converter accepts (``converter.py``): an optional
   system turn first, then user/tool turns at the 1st, 3rd, ... position and assistant turns
   at the 2nd, 4th, ..., an even number of them, at least two. A record that breaks this is
   skipped by LLaMA-Factory (with a warning) in the messages file too: it is listed under
   ``not_trainable`` in the result; TRL still gets it.
4. alpaca: ``history``, when present, is a list of ``[prompt, response]`` string pairs.

In ``selected.jsonl`` LLaMA-Factory reads an alpaca record as the user turn
``instruction + "\\n" + input`` (either may be empty) with the response ``output``, plus the
``system`` and ``history`` columns when the records have them; :func:`normalize_record` (and so
the messages file) joins with ``"\\n\\n"`` and ignores ``system`` and ``history``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..core.io import write_jsonl, write_text
from ..core.records import ROLE_ALIASES, RecordError, record_format, normalize_record
from ..config.schema import TRAINER_FORMATS

SETTING = "report.trainer_format"
SELECTED = "selected.jsonl"
MESSAGES = "selected.messages.jsonl"
DATASET_INFO = "dataset_info.json"
ADDED_KEYS = ("id", "score", "rank")
MAX_LISTED = 20  # records named in the result's not_trainable (the count is always exact)

# LLaMA-Factory's ShareGPT tags, by our normalised role (function_tag, an assistant's tool
# call, has no counterpart: normalize_record rejects such roles, so no record carries one).
_TAG_OF_ROLE = {"user": "user_tag", "assistant": "assistant_tag", "system": "system_tag", "tool": "observation_tag"}
_DEFAULT_TAGS = {"sharegpt": {"user_tag": "human", "assistant_tag": "gpt", "system_tag": "system"},
                 "messages": {"user_tag": "user", "assistant_tag": "assistant", "system_tag": "system"}}
_TURNS = {"sharegpt": ("conversations", "from", "value"), "messages": ("messages", "role", "content")}

MESSAGES_ENTRY = {
    "file_name": MESSAGES,
    "formatting": "sharegpt",
    "columns": {"messages": "messages"},
    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
             "system_tag": "system", "observation_tag": "tool"},
}


def write_trainer_files(selected: list[dict], out: Path, fmt: str = "auto",
                        dataset_name: str = "mona_selected") -> dict:
    """Write ``selected.messages.jsonl`` and ``dataset_info.json`` into ``out``; say what was written.

    ``selected``: the records of ``selected.jsonl``, best first (originals plus id, score, rank).
    ``fmt``: ``auto`` or ``messages`` (the ``report.trainer_format`` setting).
    Returns ``{"dataset_info", "dataset", "file", "formatting", "source_format", "reason",
    "messages_file", "rows", "not_trainable_count", "not_trainable"}`` for the run manifest;
    ``file`` is the file the registry entry trains on, relative to ``out``.
    """
    if fmt not in TRAINER_FORMATS:
        raise ValueError(f"{SETTING}={fmt!r}: use one of {', '.join(TRAINER_FORMATS)}")
    if not isinstance(dataset_name, str) or not dataset_name.strip():
        raise ValueError(f"dataset name {dataset_name!r}: use a non-empty string")
    out = Path(out)

    roles, bad = [], []  # roles: (id, the roles of its messages); bad: (id, reason) of refused records

    def messages_rows():  # streamed to the file: no second copy of the selection in memory
        for rec in selected:
            try:
                msgs = normalize_record(rec)  # ignores id/score/rank; a non-dict kept as {"record": ...} fails here
            except RecordError as e:
                bad.append((rec.get("id"), f"cannot be converted to chat messages: {e}"))
                continue
            roles.append((rec.get("id"), [m["role"] for m in msgs]))
            yield {"messages": msgs, **{k: rec.get(k) for k in ADDED_KEYS}}

    write_jsonl(messages_rows(), out / MESSAGES)

    formats = Counter(_format(r) for r in selected)
    source_format = next(iter(formats)) if len(formats) == 1 else ("mixed" if formats else "none")
    entry, reason = None, None
    if fmt == "messages":
        reason = f"{SETTING}=messages"
    elif bad:
        reason = f"{len(bad)} record(s) are in no known format"
    elif not selected:
        reason = "no records selected"
    elif len(formats) > 1:
        reason = "mixed formats (" + ", ".join(f"{k} {v}" for k, v in sorted(formats.items())) + ")"
    elif not (out / SELECTED).is_file():
        reason = f"{SELECTED} is not in {out}"
    else:
        entry, reason = _native_entry(selected, source_format)

    if entry is None:
        entry = dict(MESSAGES_ENTRY)
        tags = MESSAGES_ENTRY["tags"]
        skips = [(i, p) for i, r in roles if (p := _lf_shape_problem(r, tags))]
        reason = f"{reason}: training on {MESSAGES}"
    else:
        skips = []
        reason = f"{reason}: training on {SELECTED} as it is"
    not_trainable = [{"id": i, "reason": why} for i, why in bad + skips]

    # the registry last, so that it never names a file that is not there yet
    write_text(json.dumps({dataset_name: entry}, indent=2, ensure_ascii=False) + "\n", out / DATASET_INFO)
    return {"dataset_info": DATASET_INFO, "dataset": dataset_name, "file": entry["file_name"],
            "formatting": entry["formatting"], "source_format": source_format, "reason": reason,
            "messages_file": MESSAGES, "rows": len(roles), "not_trainable_count": len(not_trainable),
            "not_trainable": not_trainable[:MAX_LISTED]}


# ----------------------------------------------------------------------------- deciding


def _format(rec: dict) -> str:
    try:
        return record_format(rec)
    except RecordError:
        return "unknown"


def _native_entry(selected: list[dict], fmt: str) -> tuple[dict | None, str]:
    """The registry entry that reads ``selected.jsonl`` as it is, or ``(None, why not)``."""
    n = len(selected)
    sig0 = _signature(selected[0])
    for rec in selected[1:]:
        if _signature(rec) != sig0:
            return None, (f"the records' fields or their types differ (e.g. {rec.get('id')!r} vs "
                          f"{selected[0].get('id')!r}), which datasets may fail to load as one table")
    if fmt == "alpaca":
        return _alpaca_entry(selected, n)
    key, rk, ck = _TURNS[fmt]
    spelled: dict[str, set[str]] = {}
    for rec in selected:
        for t in rec[key]:
            spelled.setdefault(ROLE_ALIASES[t[rk].lower()], set()).add(t[rk])
    varied = {r: s for r, s in spelled.items() if len(s) > 1}
    if varied:
        return None, "role names vary between records (" + "; ".join(
            f"{r} written as {', '.join(sorted(map(repr, s)))}" for r, s in sorted(varied.items())) + ")"
    tags = {"role_tag": rk, "content_tag": ck, **_DEFAULT_TAGS[fmt]}
    tags.update({_TAG_OF_ROLE[r]: next(iter(s)) for r, s in spelled.items()})
    for rec in selected:
        problem = _lf_shape_problem([t[rk] for t in rec[key]], tags)
        if problem:
            return None, f"record {rec.get('id')!r} would be skipped by LLaMA-Factory: {problem}"
    return {"file_name": SELECTED, "formatting": "sharegpt", "columns": {"messages": key}, "tags": tags}, \
        f"all {n} records are {fmt} records that LLaMA-Factory reads exactly"


def _alpaca_entry(selected: list[dict], n: int) -> tuple[dict | None, str]:
    first = selected[0]  # every record has the same fields (checked)
    columns = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
               "history": "history"}
    columns = {k: v for k, v in columns.items() if v in first}
    if "history" in columns:
        for rec in selected:
            h = rec["history"]
            if h is not None and not (isinstance(h, list) and all(
                    isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in h)):
                return None, f"record {rec.get('id')!r} has a 'history' that is not a list of [prompt, response] pairs"
    if "system" in columns:
        if all(r["system"] is None for r in selected):
            del columns["system"]
        elif any(not isinstance(r["system"], str) for r in selected):
            return None, "the 'system' field is not a string in every record"
    return {"file_name": SELECTED, "formatting": "alpaca", "columns": columns}, \
        f"all {n} records are alpaca records that LLaMA-Factory reads exactly"


def _lf_shape_problem(roles: list[str], tags: dict) -> str | None:
    """Why LLaMA-Factory's ShareGPT converter (and its supervised processor) would skip these turns."""
    start = 1 if roles and roles[0] == tags.get("system_tag") else 0
    turns = roles[start:]
    accept = ((tags.get("user_tag"), tags.get("observation_tag")), (tags.get("assistant_tag"), tags.get("function_tag")))
    for i, role in enumerate(turns):
        if role not in accept[i % 2]:
            want = "/".join(t for t in accept[i % 2] if t)
            return (f"turn {start + i + 1} is {role!r} where {want} is expected (turns must alternate "
                    "user/assistant after an optional leading system turn)")
    if len(turns) < 2 or len(turns) % 2:
        return f"{len(turns)} turn(s) after the system turn; LLaMA-Factory needs an even number, at least 2, ending with the assistant"
    return None


def _signature(v):
    """JSON shape of a value: types, dict keys and the set of element shapes of lists."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return type(v).__name__
    if isinstance(v, dict):
        return ("dict", tuple(sorted((str(k), _signature(x)) for k, x in v.items())))
    if isinstance(v, (list, tuple)):
        return ("list", frozenset(_signature(x) for x in v))
    return type(v).__name__


# ----------------------------------------------------------------------------- writing


