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

import gzip
import hashlib
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .io import recorded_path, reusable

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
    return tokenize_many([rendered], tokenizer, max_length, exclude)[0]


def tokenize_many(rendered: list[Rendered], tokenizer, max_length: int, exclude: str = "none"
                  ) -> list[tuple[list[int], list[int]]]:
    """:func:`tokenize` for many rows in one tokenizer call (a fast tokenizer encodes the batch
    in Rust, in parallel); each row's ids are the same as when it is tokenized alone."""
    if exclude not in ("none", "special", "template"):
        raise ValueError(f"pool.exclude={exclude!r}: use none, special or template")
    if not rendered:
        return []
    enc = tokenizer([r.text for r in rendered], add_special_tokens=False, truncation=True, max_length=max_length,
                    return_offsets_mapping=exclude == "template")
    special = set(tokenizer.all_special_ids)
    out = []
    for j, r in enumerate(rendered):
        ids = enc["input_ids"][j]
        if exclude == "none":
            mask = [1] * len(ids)
        elif exclude == "special":
            mask = [0 if t in special else 1 for t in ids]
        else:
            spans = r.spans
            mask = [1 if t not in special and b > a and any(a < e and b > st for st, e in spans) else 0
                    for (a, b), t in zip(enc["offset_mapping"][j], ids)]
        if ids and not any(mask):
            mask = [1] * len(ids)  # nothing left to pool: fall back to every token rather than an empty mean
        out.append((ids, mask))
    return out


# ----------------------------------------------------------------------------- reading
#
# Planning splits every input into units of ``rows_per_unit`` rows in one streaming pass
# whose cost is O(file size) and whose memory is bounded (a few MiB); reading one unit
# costs O(unit size). JSONL and JSON-array units carry the byte range of their rows;
# gzip inputs and Parquet files with row groups too large to split are staged once, at
# plan time, into ``staging_dir`` (a plain copy, or a copy re-chunked into row groups of
# ``rows_per_unit`` rows) and the units read that copy (``read_path``).

_CHUNK = 4 << 20  # bytes read per I/O call when scanning
_AHEAD = 1 << 20  # a JSON element shorter than this is always whole in the scan buffer
_BOM = b"\xef\xbb\xbf"
_BOM_L1 = _BOM.decode("latin-1")
_KINDS = ((".jsonl.gz", "jsonl.gz"), (".json.gz", "json.gz"), (".parquet", "parquet"), (".jsonl", "jsonl"),
          (".json", "json"))
_WS = re.compile(r"[ \t\n\r]*")
_STRUCT = re.compile(r'["\[\]{}]')
_STR_SPECIAL = re.compile(r'["\\]')
_RAW_DECODE = json.JSONDecoder().raw_decode
_NO_OBJ = object()  # "the element's value is not known yet" (None is a JSON value)


@dataclass(frozen=True)
class ReadUnit:
    """Rows ``[start, stop)`` of one input file: the unit of reading, embedding and resume.

    ``path`` is always the user's file (it is what rejected/scores files report); rows are
    numbered in it from 0. ``offset``/``end`` are the byte range of the unit's rows in the
    file actually read (JSONL and JSON arrays; -1 = unknown: the reader scans from the start),
    ``read_path`` that file when it is a staged copy (decompressed gzip, re-chunked Parquet).
    ``stop == -1``: the number of rows is unknown (an unreadable file, or the rest of a JSON
    array after the point where it is malformed); reading it yields a single ``(-1, RecordError)``
    after any rows it can read. ``key`` depends on path/start/stop only.
    """

    path: str
    start: int
    stop: int
    offset: int = -1
    end: int = -1
    read_path: str | None = None

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.path}:{self.start}:{self.stop}".encode()).hexdigest()[:16]


def _kind(path, strict: bool = False) -> str | None:
    """``parquet | jsonl | json | jsonl.gz | json.gz`` from the file name; unknown names are
    JSONL (gzip'd JSONL for ``*.gz``) unless ``strict``, then None."""
    name = str(path)
    for suffix, kind in _KINDS:
        if name.endswith(suffix):
            return kind
    if strict:
        return None
    return "jsonl.gz" if name.endswith(".gz") else "jsonl"


def input_files(paths) -> list[Path]:
    """Expand files, folders and globs into a sorted list of input files.

    Folders contribute their ``.parquet``, ``.jsonl``, ``.json``, ``.jsonl.gz`` and ``.json.gz``
    files (anything else in them is ignored); globs and named files are taken as they are.
    """
    import glob

    out: list[Path] = []
    for p in [paths] if isinstance(paths, (str, Path)) else list(paths):
        p = Path(str(p)).expanduser()
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if _kind(f.name, strict=True) and f.is_file())
        elif any(ch in str(p) for ch in "*?["):
            out += sorted(Path(q) for q in glob.glob(str(p), recursive=True))
        elif p.exists():
            out.append(p)
        else:
            raise InputError(f"input {str(p)!r} does not exist")
    return [f.resolve() for f in out]


def plan_units(paths, rows_per_unit: int, staging_dir: str | Path | None = None) -> list[ReadUnit]:
    """Split inputs into units of ``rows_per_unit`` rows (the last unit of a file may be shorter).

    A pure function of the files: the same files give the same units, whatever the cluster.
    One streaming pass per file, memory bounded. ``staging_dir`` receives the staged copies
    (gzip inputs; Parquet files with a row group over ``4 * rows_per_unit`` rows), reused
    when already there; without it such a file raises :class:`InputError`.
    """
    if int(rows_per_unit) < 1:
        raise ValueError(f"rows_per_unit={rows_per_unit!r}: must be at least 1")
    rows_per_unit = int(rows_per_unit)
    staging = None if staging_dir is None else Path(str(staging_dir)).expanduser()
    units: list[ReadUnit] = []
    for f in input_files(paths):
        kind = _kind(f)
        if kind == "parquet":
            units += _plan_parquet(f, rows_per_unit, staging)
            continue
        read_path = None
        if kind.endswith(".gz"):
            kind = kind[:-3]
            try:
                read_path = str(_stage_gzip(f, kind, _need_staging(staging, f, "gzip cannot seek")))
            except _CorruptInput:  # reading it again reports the rows it can and then the error
                units.append(ReadUnit(str(f), 0, -1))
                continue
        units += (_plan_json if kind == "json" else _plan_jsonl)(f, read_path, rows_per_unit)
    return units


class _CorruptInput(Exception):
    """An input that cannot be staged because it cannot be read."""


def _need_staging(staging: Path | None, f: Path, why: str) -> Path:
    if staging is None:
        raise InputError(f"input {str(f)!r} must be staged before it can be split into units ({why}), but no "
                         "staging_dir was given: pass plan_units(..., staging_dir=<a writable folder>)")
    staging.mkdir(parents=True, exist_ok=True)
    return staging


def _staged_name(f: Path, *extra) -> str:
    st = f.stat()
    return hashlib.sha256(":".join(map(str, (f, st.st_size, st.st_mtime_ns, *extra))).encode()).hexdigest()[:32]


def _stage_once(dest: Path, write) -> Path:
    """``write(tmp)`` once into ``dest`` via a temporary file and an atomic rename, recorded
    (``io.record``); an existing ``dest`` is reused when it checks (it is named after its input,
    so it is never stale), and a damaged one is moved to ``quarantine/`` and written again."""
    if dest.exists() and dest.suffix != ".parquet" and not dest.with_name(dest.name + ".ok").exists():
        dest.unlink()  # staged by an older version, which kept no record: staged again, not quarantined
    if reusable(dest, "staged copy"):
        return dest
    with recorded_path(dest) as tmp:
        write(tmp)
    return dest


def _stage_gzip(f: Path, kind: str, staging: Path) -> Path:
    """Decompress ``f`` once (streaming) into ``staging/<sha>.<kind>``; reuse an existing copy."""
    def write(tmp: Path) -> None:
        with gzip.open(f, "rb") as src, open(tmp, "wb") as out:
            while True:
                try:
                    block = src.read(_CHUNK)
                except (OSError, EOFError, zlib.error) as e:  # not gzip, truncated, corrupt
                    raise _CorruptInput(f"{type(e).__name__}: {e}") from e
                if not block:
                    break
                out.write(block)

    return _stage_once(staging / f"{_staged_name(f)}.{kind}", write)


# -- JSONL


def _plan_jsonl(f: Path, read_path: str | None, rpu: int) -> list[ReadUnit]:
    src = read_path or str(f)
    starts, n_nl, pos, last = [0], 0, 0, 10
    buf = bytearray(_CHUNK)
    with open(src, "rb", buffering=0) as fh:
        while True:
            k = fh.readinto(buf)
            if not k:
                break
            nl = np.flatnonzero(np.frombuffer(buf, np.uint8, k) == 10)
            if len(nl):
                # newline number g (0-based, whole file) ends row g; row g+1 starts a unit when (g+1) % rpu == 0
                starts += (nl[(-(n_nl + 1)) % rpu::rpu] + (pos + 1)).tolist()
                n_nl += len(nl)
            last = buf[k - 1]
            pos += k
    n = n_nl + (last != 10)  # a last line without a trailing newline is a row
    units = []
    for j, s in enumerate(range(0, n, rpu)):
        e = min(n, s + rpu)
        units.append(ReadUnit(str(f), s, e, starts[j], starts[j + 1] if e < n else pos, read_path))
    return units


def _read_jsonl(src: str, kind: str, unit: ReadUnit):
    if unit.offset >= 0 and unit.stop >= 0:
        with open(src, "rb") as fh:
            fh.seek(unit.offset)
            data = fh.read(unit.end - unit.offset) if unit.end >= 0 else b"".join(
                fh.readline() for _ in range(unit.stop - unit.start))
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        for r, raw in zip(range(unit.start, unit.stop), lines):
            yield r, _parse_line(raw[3:] if r == 0 and raw.startswith(_BOM) else raw)
        return  # rows missing (the file changed since planning) are reported by read_unit
    with (gzip.open if kind == "jsonl.gz" else open)(src, "rb") as fh:  # no byte range: scan from the start
        for r, raw in enumerate(fh):
            if r < unit.start:
                continue
            if unit.stop >= 0 and r >= unit.stop:
                break
            yield r, _parse_line(raw[3:] if r == 0 and raw.startswith(_BOM) else raw)


def _parse_line(raw: bytes):
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RecordError(f"not valid UTF-8 at byte {e.start}")
    if not line.strip():
        return RecordError("empty line")
    return _loads(line, lambda e: f"at column {e.colno}")


def _loads(text: str, where):
    """``json.loads(text)``, or the row's RecordError (``where(e)`` places a syntax error)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return RecordError(f"malformed JSON: {e.msg} {where(e)}")
    except Exception as e:  # RecursionError (deep nesting) and anything else the decoder raises
        return RecordError(f"malformed JSON: {type(e).__name__}: {e}")


# -- JSON arrays


class _Malformed(Exception):
    """No element boundary can be found at byte ``offset``."""

    def __init__(self, offset: int):
        super().__init__(offset)
        self.offset = offset


class _JsonScan:
    """Finds the byte boundaries of a JSON array's elements in one streaming pass.

    The bytes are decoded as latin-1 (1 byte = 1 char), so char offsets are byte offsets;
    JSON's structural characters are ASCII, and ASCII bytes never occur inside UTF-8
    multi-byte sequences, so boundaries found this way are those of the UTF-8 text. Each
    element is delimited by the C ``raw_decode``; one it cannot handle (malformed, too deeply
    nested, or longer than the buffer) by a string-aware bracket scanner, so that a bad
    element is one bad row. ``keep``: keep each element's text until the next (for readers);
    otherwise a long element is scanned without being held in memory (for the plan).
    """

    def __init__(self, fh=None, data: bytes | None = None, base: int = 0, keep: bool = False):
        self.fh, self.keep = fh, keep
        self.buf = data.decode("latin-1") if data is not None else ""
        self.base = base  # absolute offset of buf[0]
        self.eof = fh is None

    def _more(self, keep_from: int) -> bool:
        """Append one chunk, dropping the text before absolute offset ``keep_from``."""
        if self.eof:
            return False
        block = self.fh.read(_CHUNK)
        if not block:
            self.eof = True
            return False
        cut = min(keep_from - self.base, len(self.buf))
        if cut > 0:
            self.buf = self.buf[cut:]
            self.base += cut
        self.buf += block.decode("latin-1")
        return True

    def char(self, p: int) -> str:
        """The character at absolute offset ``p``, '' at the end of the input."""
        while p - self.base >= len(self.buf):
            if not self._more(p):
                return ""
        return self.buf[p - self.base]

    def skip_ws(self, p: int) -> int:
        while True:
            i = _WS.match(self.buf, p - self.base).end()
            p = self.base + i
            if i < len(self.buf) or not self._more(p):
                return p

    def text(self, a: int, b: int) -> str:
        return self.buf[a - self.base:b - self.base]

    def snippet(self, p: int, n: int = 40) -> str:
        while len(self.buf) - (p - self.base) < n and self._more(p):
            pass
        return self.text(p, p + n).encode("latin-1").decode("utf-8", "replace")

    def element(self, p: int):
        """``(end, value)`` of the element starting at absolute offset ``p`` (value ``_NO_OBJ``
        when only its boundary is known); raises :class:`_Malformed` when it has none."""
        while len(self.buf) - (p - self.base) < _AHEAD and self._more(p):
            pass
        while True:
            i = p - self.base
            try:
                obj, j = _RAW_DECODE(self.buf, i)
            except (ValueError, RecursionError):
                if self.buf[i:i + 1] in ("{", "[", '"'):
                    return self._bracket_end(p), _NO_OBJ
                obj = j = None
            # near the end of the buffer a number or word may go on in the next chunk: read on
            if len(self.buf) - (i if j is None else j) > 64 or not self._more(p):
                if j is None:
                    raise _Malformed(p)  # a bare word, a broken scalar, or the end of the input
                return self.base + j, obj

    def _bracket_end(self, p: int) -> int:
        depth, in_str, q = 0, False, p
        while True:
            i = q - self.base
            if in_str:
                m = _STR_SPECIAL.search(self.buf, i)
                if m is not None:
                    k = m.start()
                    if self.buf[k] == '"':
                        in_str, q = False, self.base + k + 1
                        if depth <= 0:
                            return q
                        continue
                    if k + 1 < len(self.buf):  # a backslash escapes the next character
                        q = self.base + k + 2
                        continue
                    q = self.base + k
                else:
                    q = self.base + len(self.buf)
            else:
                m = _STRUCT.search(self.buf, i)
                if m is not None:
                    k = m.start()
                    ch, q = self.buf[k], self.base + k + 1
                    if ch == '"':
                        in_str = True
                    elif ch in "[{":
                        depth += 1
                    else:
                        depth -= 1
                        if depth <= 0:
                            return q
                    continue
                q = self.base + len(self.buf)
            if not self._more(p if self.keep else q):
                raise _Malformed(p)

    def _one_row(self, p: int):
        """Yield the element at ``p`` as a row (or ``bad``); return its end, None when malformed."""
        try:
            end, obj = self.element(p)
        except _Malformed:
            yield "bad", p
            return None
        yield "row", p, end, obj
        return end

    def events(self):
        """Yield ``("row", start, end, value)`` for each top-level element (a top-level object
        is one row), then ``("bad", offset)`` where the structure breaks, or ``("notlist", offset)``."""
        p = self.base
        if self.char(p) == _BOM_L1[0] and self.snippet(p, 3) == "\ufeff":
            p += 3
        p = self.skip_ws(p)
        c = self.char(p)
        if c == "":
            return  # an empty file: no rows
        if c == "{":
            end = yield from self._one_row(p)
            if end is None:
                return
        elif c != "[":
            yield "notlist", p
            return
        else:
            p = self.skip_ws(p + 1)
            if self.char(p) != "]":
                while True:
                    end = yield from self._one_row(p)
                    if end is None:
                        return
                    p = self.skip_ws(end)
                    c = self.char(p)
                    if c == ",":
                        p = self.skip_ws(p + 1)
                    elif c == "]":
                        break
                    else:
                        yield "bad", p
                        return
            end = p + 1  # after the closing bracket
        p = self.skip_ws(end)
        if self.char(p) != "":
            yield "bad", p  # data after the array (or object)


def _bad_array(offset: int, near: str) -> RecordError:
    found = f"near {near!r}" if near else "unexpected end of file"
    return RecordError(f"malformed JSON array at byte {offset} ({found}): the rows from there on cannot be "
                       "delimited and are not read")


def _plan_json(f: Path, read_path: str | None, rpu: int) -> list[ReadUnit]:
    src = read_path or str(f)
    units: list[ReadUnit] = []
    n, first, last = 0, 0, 0
    with open(src, "rb", buffering=0) as fh:
        for ev in _JsonScan(fh).events():
            if ev[0] == "row":
                if n % rpu == 0:
                    first = ev[1]
                n += 1
                last = ev[2]
                if n % rpu == 0:
                    units.append(ReadUnit(str(f), n - rpu, n, first, last, read_path))
                continue
            if n % rpu:
                units.append(ReadUnit(str(f), n - n % rpu, n, first, last, read_path))
            if ev[0] == "bad":  # the rest is one unit whose reading reports where the array breaks
                units.append(ReadUnit(str(f), n, -1, ev[1], os.path.getsize(src), read_path))
            else:  # not an array or object: reading reports it
                units.append(ReadUnit(str(f), 0, -1, read_path=read_path))
            return units
    if n % rpu:
        units.append(ReadUnit(str(f), n - n % rpu, n, first, last, read_path))
    return units


def _element_record(text: str, obj, at: int):
    """The record in one element's latin-1 ``text`` (starting at byte ``at``), or why not."""
    if obj is not _NO_OBJ and text.isascii():
        return obj  # ASCII: the latin-1 parse is the UTF-8 parse
    raw = text.encode("latin-1")
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RecordError(f"not valid UTF-8 at byte {at + e.start}")
    return _loads(s, lambda e: f"at byte {at + len(s[:e.pos].encode('utf-8', 'surrogatepass'))}")


def _read_json(src: str, kind: str, unit: ReadUnit):
    if unit.offset >= 0:
        with open(src, "rb") as fh:
            fh.seek(unit.offset)
            if unit.stop < 0:  # the rest of a malformed array
                yield -1, _bad_array(unit.offset, fh.read(40).decode("utf-8", "replace"))
                return
            data = fh.read(unit.end - unit.offset)
        sc = _JsonScan(data=data, base=unit.offset, keep=True)
        p = unit.offset
        for r in range(unit.start, unit.stop):
            if r > unit.start:
                p = sc.skip_ws(p)
                if sc.char(p) != ",":
                    return  # the file changed since planning: read_unit reports the missing rows
                p = sc.skip_ws(p + 1)
            try:
                end, obj = sc.element(p)
            except _Malformed:
                return
            yield r, _element_record(sc.text(p, end), obj, p)
            p = end
        return
    with (gzip.open if kind == "json.gz" else open)(src, "rb") as fh:  # no byte range: scan from the start
        sc = _JsonScan(fh, keep=True)
        r = 0
        for ev in sc.events():
            if ev[0] == "row":
                if r >= unit.start:
                    yield r, _element_record(sc.text(ev[1], ev[2]), ev[3], ev[1])
                r += 1
                if 0 <= unit.stop <= r:
                    return
            elif ev[0] == "bad":
                err = _bad_array(ev[1], sc.snippet(ev[1]))
                if unit.stop < 0:
                    yield -1, err
                for rr in range(max(r, unit.start), unit.stop):
                    yield rr, err
            else:
                raise ValueError(f"a .json input must hold a list of records or one record object "
                                 f"(found {sc.snippet(ev[1], 20)!r} at byte {ev[1]})")


# -- Parquet


def _parquet_file(src) -> pq.ParquetFile:
    # buffered, not pre-buffered reads: a column chunk is streamed page by page instead of
    # being read whole, so one huge row group does not mean the whole file in memory
    return pq.ParquetFile(src, pre_buffer=False, buffer_size=1 << 20)


def _plan_parquet(f: Path, rpu: int, staging: Path | None) -> list[ReadUnit]:
    try:
        md = pq.read_metadata(f)
    except Exception:  # corrupt or not Parquet: one unit whose reading reports the error
        return [ReadUnit(str(f), 0, -1)]
    n = md.num_rows
    read_path = None
    if max((md.row_group(i).num_rows for i in range(md.num_row_groups)), default=0) > 4 * rpu:
        try:
            read_path = str(_stage_parquet(f, rpu, _need_staging(staging, f, f"a row group holds more than "
                                                                 f"4 x rows_per_unit = {4 * rpu} rows")))
        except _CorruptInput:
            return [ReadUnit(str(f), 0, -1)]
    return [ReadUnit(str(f), s, min(n, s + rpu), read_path=read_path) for s in range(0, n, rpu)]


def _stage_parquet(f: Path, rpu: int, staging: Path) -> Path:
    """Copy ``f`` once into ``staging/<sha>.parquet`` with row groups of ``rpu`` rows, streaming."""
    def write(tmp: Path) -> None:
        with _parquet_file(f) as pf, pq.ParquetWriter(tmp, schema := pf.schema_arrow) as w:
            pending, have = [], 0
            batches = pf.iter_batches(batch_size=rpu, use_threads=False)
            while True:
                try:
                    batch = next(batches, None)
                except (OSError, pa.ArrowException) as e:  # a corrupt page: reading reports it
                    raise _CorruptInput(f"{type(e).__name__}: {e}") from e
                if batch is None:
                    break
                pending.append(batch)
                have += len(batch)
                while have >= rpu:
                    t = pa.Table.from_batches(pending, schema)
                    w.write_table(t.slice(0, rpu), row_group_size=rpu)
                    rest = t.slice(rpu)
                    pending, have = rest.to_batches(), len(rest)
            if have:
                w.write_table(pa.Table.from_batches(pending, schema), row_group_size=rpu)

    return _stage_once(staging / f"{_staged_name(f, rpu)}.parquet", write)


def _read_parquet(src: str, unit: ReadUnit):
    with _parquet_file(src) as pf:
        md = pf.metadata
        stop = md.num_rows if unit.stop < 0 else unit.stop
        rgs, first, row = [], None, 0
        for rg in range(md.num_row_groups):  # only the row groups that overlap the unit are decoded
            n = md.row_group(rg).num_rows
            if row < stop and row + n > unit.start:
                rgs.append(rg)
                first = row if first is None else first
            row += n
        if not rgs:
            return
        r = first
        for batch in pf.iter_batches(batch_size=max(1, min(stop - unit.start, 4096)), row_groups=rgs,
                                     use_threads=False):
            lo, hi = max(unit.start - r, 0), min(stop - r, len(batch))
            if hi > lo:  # slice before converting: only the unit's rows become Python objects
                yield from enumerate(batch.slice(lo, hi - lo).to_pylist(), r + lo)
            r += len(batch)
            if r >= stop:
                return


# -- reading


def read_unit(unit: ReadUnit) -> Iterator[tuple[int, dict | RecordError]]:
    """Yield ``(row, record)`` or ``(row, RecordError)`` for each of the unit's rows, in order.

    Rows are 0-based in the original file; every row in ``[start, stop)`` yields exactly one
    item. A file that fails part-way yields a RecordError for each remaining row, or, when the
    unit's size is unknown (``stop == -1``), a single ``(-1, RecordError)``.
    """
    if unit.read_path and not os.path.exists(unit.read_path):  # staged copy gone: scan the original
        unit = ReadUnit(unit.path, unit.start, unit.stop)
    src = unit.read_path or unit.path
    kind = _kind(src)
    if kind == "parquet":
        rows = _read_parquet(src, unit)
    elif kind in ("json", "json.gz"):
        rows = _read_json(src, kind, unit)
    else:
        rows = _read_jsonl(src, kind, unit)
    nxt = unit.start
    try:
        for r, rec in rows:
            yield r, rec
            nxt = max(nxt, r + 1)
    except Exception as e:  # I/O error, truncated gzip, Arrow error, not a list...
        err = RecordError(f"cannot read file: {type(e).__name__}: {e}")
        if unit.stop < 0:
            yield -1, err
        for r in range(nxt, unit.stop):
            yield r, err
        return
    if nxt < unit.stop:
        err = RecordError(f"cannot read file: row missing, {src} has fewer rows than when it was planned "
                          "(did it change?)")
        for r in range(nxt, unit.stop):
            yield r, err
