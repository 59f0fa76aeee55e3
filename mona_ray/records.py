"""Reading and rendering: source files -> validated conversations -> model input text.

Three record formats are accepted, also mixed within one file:

* alpaca: ``instruction``, optional ``input``, ``output``
* ShareGPT (OpenHermes-2.5): ``conversations: [{from, value}, ...]``, multi-turn
* chat messages: ``messages: [{role, content}, ...]``

Each is normalised to a list of ``{"role", "content"}`` messages. A record that cannot be
used raises :class:`RecordError` with the reason; readers turn that into a rejected row
that names the file and row, so nothing is dropped silently.

Rendering (``chat_template`` | ``plain``) returns the text and the character spans that
hold message content, so that pooling can optionally ignore template tokens (role
markers, the default system prompt SmolLM2's template inserts into every sample).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

ROLE_ALIASES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
    "model": "assistant", "chatgpt": "assistant", "system": "system", "tool": "tool", "function": "tool",
    "function_response": "tool", "observation": "tool",
}
FORMATS = ("alpaca", "sharegpt", "messages")


class RecordError(ValueError):
    """Why one record cannot be used (becomes the ``reason`` of a rejected row)."""


class InputError(RuntimeError):
    """A whole input (file, target set) cannot be used; the message names it and the fix."""


def detect_format(rec: dict) -> str:
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
    fmt = detect_format(rec)
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


def record_id(rec: dict, file: str, row: int) -> str:
    """The record's own ``id`` when it has one, else ``<folder>/<file>:<row>`` (stable, and findable)."""
    rid = rec.get("id")
    if rid is not None and not isinstance(rid, (dict, list)) and str(rid).strip():
        return str(rid)
    p = Path(file)
    return f"{p.parent.name}/{p.name}:{row}"


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: tuple[tuple[int, int], ...]  # [start, end) character spans of message content


def render(messages: list[dict], tokenizer=None, mode: str = "chat_template",
           system_prompt: str | None = None) -> Rendered:
    """Render a conversation as the model sees it, with the spans of its content.

    ``system_prompt``: when set (even to ""), added as a system message to conversations
    that have none, replacing a template's default one.
    """
    if system_prompt is not None and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + list(messages)
    if mode == "plain":
        parts, spans, pos = [], [], 0
        for m in messages:
            if parts:
                parts.append("\n\n")
                pos += 2
            parts.append(m["content"])
            spans.append((pos, pos + len(m["content"])))
            pos += len(m["content"])
        return Rendered("".join(parts), tuple(spans))
    if mode != "chat_template":
        raise ValueError(f"render.mode={mode!r}: use chat_template or plain")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise InputError("render.mode=chat_template but the tokenizer has no chat template; set render.mode=plain")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, pos = [], 0
    for m in messages:  # contents appear in order; find each after the previous one
        c = m["content"]
        if not c:
            continue
        at = text.find(c, pos)
        if at < 0:  # a template that rewrites content (strip, etc.): fall back to a stripped match
            at = text.find(c.strip(), pos)
            c = c.strip()
        if at >= 0:
            spans.append((at, at + len(c)))
            pos = at + len(c)
    return Rendered(text, tuple(spans))


def tokenize(rendered: Rendered, tokenizer, max_length: int, exclude: str = "none") -> tuple[list[int], list[int]]:
    """Token ids (truncated to ``max_length``) and a 0/1 pooling mask.

    ``exclude``: ``none`` pools every real token; ``special`` drops special tokens (BOS,
    ``<|im_start|>``...), including the attention-sink first token; ``template`` keeps only
    tokens inside message content (drops role markers and template-inserted text too).
    """
    enc = tokenizer(rendered.text, add_special_tokens=False, truncation=True, max_length=max_length,
                    return_offsets_mapping=exclude == "template")
    ids = enc["input_ids"]
    special = set(tokenizer.all_special_ids)
    if exclude == "none":
        mask = [1] * len(ids)
    elif exclude == "special":
        mask = [0 if t in special else 1 for t in ids]
    elif exclude == "template":
        spans = rendered.spans
        mask = []
        for (a, b), t in zip(enc["offset_mapping"], ids):
            inside = t not in special and b > a and any(a < e and b > st for st, e in spans)
            mask.append(1 if inside else 0)
    else:
        raise ValueError(f"pool.exclude={exclude!r}: use none, special or template")
    if ids and not any(mask):
        mask = [1] * len(ids)  # nothing left to pool: fall back to every token rather than an empty mean
    return ids, mask


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ReadUnit:
    """A slice ``[start, stop)`` of one input file: the unit of reading, embedding and resume."""

    path: str
    start: int
    stop: int

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.path}:{self.start}:{self.stop}".encode()).hexdigest()[:16]


def input_files(paths) -> list[Path]:
    """Expand files, folders and globs into a sorted list of .parquet / .jsonl / .json files."""
    out: list[Path] = []
    for p in [paths] if isinstance(paths, (str, Path)) else list(paths):
        p = Path(str(p)).expanduser()
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix in (".parquet", ".jsonl", ".json") and f.is_file())
        elif any(ch in str(p) for ch in "*?["):
            out += sorted(Path(q) for q in __import__("glob").glob(str(p), recursive=True))
        elif p.exists():
            out.append(p)
        else:
            raise InputError(f"input {str(p)!r} does not exist")
    return [f.resolve() for f in out]


def _count_rows(path: Path) -> int:
    if path.suffix == ".parquet":
        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception as e:  # corrupt or not Parquet: one unit whose reading reports the error
            return -1
    if path.suffix == ".json":
        return -1  # a JSON array is read whole
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)


def plan_units(paths, rows_per_unit: int) -> list[ReadUnit]:
    """Split inputs into fixed row ranges. Depends only on the files, never on the cluster."""
    units = []
    for f in input_files(paths):
        n = _count_rows(f)
        if n < 0:
            units.append(ReadUnit(str(f), 0, -1))
            continue
        for s in range(0, n, rows_per_unit):
            units.append(ReadUnit(str(f), s, min(n, s + rows_per_unit)))
    return units


def read_unit(unit: ReadUnit) -> Iterator[tuple[int, dict | RecordError]]:
    """Yield ``(row, record)`` or ``(row, RecordError)`` for the unit's rows (0-based rows).

    A file that cannot be read at all yields a single ``(-1, RecordError)``.
    """
    path = Path(unit.path)
    try:
        if path.suffix == ".parquet":
            yield from _read_parquet(path, unit)
        elif path.suffix == ".json":
            yield from _read_json_array(path)
        else:
            yield from _read_jsonl(path, unit)
    except (OSError, pa.ArrowException, ValueError) as e:
        yield -1, RecordError(f"cannot read file: {type(e).__name__}: {e}")


def _read_parquet(path: Path, unit: ReadUnit):
    pf = pq.ParquetFile(path)
    row = 0
    for rg in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        if row + n <= unit.start or (unit.stop >= 0 and row >= unit.stop):
            row += n
            continue
        table = pf.read_row_group(rg)
        for i, rec in enumerate(table.to_pylist()):
            r = row + i
            if unit.start <= r and (unit.stop < 0 or r < unit.stop):
                yield r, rec
        row += n


def _read_jsonl(path: Path, unit: ReadUnit):
    with open(path, "rb") as fh:
        for r, raw in enumerate(fh):
            if r < unit.start:
                continue
            if unit.stop >= 0 and r >= unit.stop:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield r, RecordError(f"not valid UTF-8 at byte {e.start}")
                continue
            if not line.strip():
                yield r, RecordError("empty line")
                continue
            try:
                yield r, json.loads(line)
            except json.JSONDecodeError as e:
                yield r, RecordError(f"malformed JSON: {e.msg} at column {e.colno}")


def _read_json_array(path: Path):
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError("a .json input must hold a list of records")
    yield from enumerate(data)
