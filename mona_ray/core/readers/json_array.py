"""JSON arrays (and single-object .json files): streaming boundaries, then byte-range reads.

Built for files too large to load (the 1.9 GB OpenHermes-2.5 array): the plan finds every
element's byte range in one streaming pass (:class:`_JsonScan`, bounded memory), a unit is
the byte range of its elements, and reading a unit parses only those bytes. A malformed
element is one bad row; where the array's structure itself breaks, the rest of the file is
one unit whose reading reports the byte where it broke.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .. import storage
from ..records import RecordError
from .common import _BOM, _CHUNK, ReadUnit, _loads, _open_lines

_AHEAD = 1 << 20  # a JSON element shorter than this is always whole in the scan buffer
_BOM_L1 = _BOM.decode("latin-1")
_WS = re.compile(r"[ \t\n\r]*")
_STRUCT = re.compile(r'["\[\]{}]')
_STR_SPECIAL = re.compile(r'["\\]')
_RAW_DECODE = json.JSONDecoder().raw_decode
_NO_OBJ = object()  # "the element's value is not known yet" (None is a JSON value)


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


def _plan_json(f: Path | str, read_path: str | None, rpu: int) -> list[ReadUnit]:
    src = read_path or str(f)
    units: list[ReadUnit] = []
    n, first, last = 0, 0, 0
    with storage.open_stream(src) as fh:
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
                units.append(ReadUnit(str(f), n, -1, ev[1], storage.stat(src).size, read_path))
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
        with storage.open_input(src) as fh:
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
    with _open_lines(src, kind == "json.gz") as fh:  # no byte range: scan from the start
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
