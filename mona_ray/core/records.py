"""Records: one input row -> a validated conversation, its id and its content key.

Three record formats are accepted, also mixed within one file:

* alpaca: ``instruction``, optional ``input``, ``output``
* ShareGPT (OpenHermes-2.5): ``conversations: [{from, value}, ...]``, multi-turn
* chat messages: ``messages: [{role, content}, ...]``

Each is normalised to a list of ``{"role", "content"}`` messages. A record that cannot be
used raises :class:`RecordError` with the reason; readers (:mod:`mona_ray.core.readers`)
turn that into a rejected row that names the file and row, so nothing is dropped silently.
Rendering and tokenizing a conversation: :mod:`mona_ray.core.render`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

ROLE_ALIASES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
    "model": "assistant", "chatgpt": "assistant", "system": "system", "tool": "tool", "function": "tool",
    "function_response": "tool", "observation": "tool",
}


class RecordError(ValueError):
    """Why one record cannot be used (becomes the ``reason`` of a rejected row)."""


class InputError(RuntimeError):
    """A whole input (file, target set) cannot be used; the message names it and the fix."""


def record_format(rec: dict) -> str:
    if "conversations" in rec and rec["conversations"] is not None:
        return "sharegpt"
    if "messages" in rec and rec["messages"] is not None:
        return "messages"
    if "instruction" in rec or "output" in rec:
        return "alpaca"
    keys = ", ".join(sorted(map(str, rec))) or "none"
    raise RecordError(f"unknown record format (fields: {keys}); expected alpaca (instruction/input/output), "
                      "ShareGPT (conversations) or chat messages (messages)")


def _text(value, field: str) -> str:
    if value is None:
        raise RecordError(f"field {field!r} is null")
    if not isinstance(value, str):
        raise RecordError(f"field {field!r} has type {type(value).__name__}, expected a string")
    return value


def normalize_record(rec) -> list[dict]:
    """Return the record as ``[{"role", "content"}, ...]`` or raise :class:`RecordError`."""
    if not isinstance(rec, dict):
        raise RecordError(f"record is a {type(rec).__name__}, expected an object")
    fmt = record_format(rec)
    if fmt == "alpaca":
        instr = _text(rec.get("instruction", ""), "instruction") if rec.get("instruction") is not None else ""
        inp = rec.get("input")
        inp = _text(inp, "input") if inp is not None else ""
        if "output" not in rec:
            raise RecordError("field 'output' is missing")
        out = _text(rec.get("output"), "output")
        prompt = instr.strip() + ("\n\n" + inp.strip() if inp.strip() else "")
        if not prompt.strip():
            raise RecordError("empty prompt: 'instruction' and 'input' are both empty")
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": out}]
    else:
        key, rk, ck = ("conversations", "from", "value") if fmt == "sharegpt" else ("messages", "role", "content")
        turns = rec[key]
        if not isinstance(turns, (list, tuple)):
            raise RecordError(f"field {key!r} has type {type(turns).__name__}, expected a list")
        msgs = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise RecordError(f"{key}[{i}] is a {type(t).__name__}, expected an object")
            role = t.get(rk)
            if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
                raise RecordError(f"{key}[{i}] has unknown role {role!r}")
            msgs.append({"role": ROLE_ALIASES[role.lower()], "content": _text(t.get(ck), f"{key}[{i}].{ck}")})
        if not msgs:
            raise RecordError(f"field {key!r} is empty")
    if not any(m["content"].strip() for m in msgs):
        raise RecordError("all text fields are empty")
    return msgs


def content_hash(messages: list[dict]) -> str:
    """Stable key of a sample's content (ids excluded): sha256 of canonical JSON, 32 hex chars."""
    blob = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def record_id(rec: dict, file: str, row: int, id_column: str = "id") -> str:
    """The record's own id (``id_column``) when it has one, else ``<folder>/<file>:<row>`` (stable,
    and findable): the one rule for every row id in mona_ray."""
    rid = rec.get(id_column)
    if rid is not None and not isinstance(rid, (dict, list)) and str(rid).strip():
        return str(rid)
    p = Path(file)
    return f"{p.parent.name}/{p.name}:{row}"
