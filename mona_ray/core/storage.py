"""Input files behind a URL (``s3://``, ``gs://``, ``abfs://``, anything fsspec knows), read in place.

The one seam between the readers and where an input lives. A local path is opened as a file,
as always; a URL with a scheme is opened through ``pyarrow.fs`` (``s3``, ``gs``/``gcs``,
``abfs``/``abfss``: built into pyarrow) or, for any other scheme, through ``fsspec`` (its
package for that scheme installed, e.g. ``ossfs`` for ``oss://``), wrapped so that both look
like a ``pyarrow.fs`` filesystem. Credentials, endpoints and regions come from where each
library reads them (for S3: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
``AWS_PROFILE`` and ``~/.aws/``, ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``;
for GCS: ``GOOGLE_APPLICATION_CREDENTIALS``); URL query options
(``?region=...``) are passed to ``pyarrow.fs.FileSystem.from_uri``. Nothing is ever copied whole: the plan streams
an object once, a task reads its byte range (or row groups) with ranged GETs.

Keys are taken literally (no percent-decoding), as S3 stores them; ``?`` starts the URL's options, so a
glob matches one character with ``[...]``, not ``?``. Every failure is an
:class:`~mona_ray.core.records.InputError` with one line naming the URL.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from functools import lru_cache

from .hub import one_line as _one_line
from .records import InputError

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_ARROW_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss")  # pyarrow.fs reads these itself, no extra package
_GLOB = re.compile(r"[*?\[]")
_STREAM_BUFFER = 8 << 20  # bytes per request when an object is read front to back


def is_url(s) -> bool:
    """Whether ``s`` (a string as the user wrote it; a ``Path`` never is) names an object by URL."""
    return isinstance(s, str) and _SCHEME.match(s.strip()) is not None


@dataclass(frozen=True)
class FileVersion:
    """What identifies one version of an input: its size and ``version`` (a local file's
    modification time in ns; an object's ETag, else its modification time). A changed file
    or object gets a new version, and with it new prepared parts and staged copies."""

    size: int
    version: int | str
    etag: str | None = None
    modified: str | None = None

    def manifest(self, url: str) -> dict:
        return {"url": url, "bytes": self.size, "etag": self.etag, "modified": self.modified}


# ----------------------------------------------------------------------------- filesystems


@dataclass(frozen=True)
class _Store:
    """One bucket (``scheme://netloc``) as a ``pyarrow.fs`` filesystem; ``root``: the bucket's
    path in it, ``spec``: the fsspec filesystem behind it (None for pyarrow's own)."""

    fs: object
    root: str
    base: str  # scheme://netloc
    query: str
    spec: object = None

    def path(self, url_path: str) -> str:
        return f"{self.root.rstrip('/')}/{url_path.lstrip('/')}".rstrip("/") or "/"

    def url(self, path: str) -> str:
        rel = path[len(self.root.rstrip("/")):].lstrip("/")
        return f"{self.base}/{rel}" + (f"?{self.query}" if self.query else "")


def _split(url: str) -> tuple[str, str, str, str]:
    """``scheme, netloc, path, query`` of a URL, the path kept as written (no percent-decoding)."""
    url = url.strip()
    scheme = _SCHEME.match(url).group(1).lower()
    rest = url[len(scheme) + 3:]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    return scheme, netloc, path, query


_lock = threading.Lock()


@lru_cache(maxsize=64)
def _store(scheme: str, netloc: str, query: str) -> _Store:
    base = f"{scheme}://{netloc}"
    root_url = f"{base}/" + (f"?{query}" if query else "")
    if scheme in _ARROW_SCHEMES:
        import pyarrow.fs as pafs

        try:
            fs, root = pafs.FileSystem.from_uri(root_url)
        except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid / OSError for a bad URI or option
            raise InputError(f"cannot open its filesystem ({_one_line(e)})") from None
        return _Store(fs, root, base, query)
    import fsspec
    from fsspec.registry import known_implementations
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    if scheme not in fsspec.available_protocols():
        raise InputError(f"no filesystem reads {scheme}:// URLs (pyarrow.fs reads "
                         f"{', '.join(s + '://' for s in _ARROW_SCHEMES)}; fsspec knows no {scheme!r}); use one of "
                         "those, another fsspec protocol, or a local path")
    try:
        spec, root = fsspec.core.url_to_fs(root_url)
    except ImportError as e:
        hint = (known_implementations.get(scheme) or {}).get("err") or str(e)
        pkg = re.search(r"[Ii]nstall (\S+)", hint)
        need = (f"needs the {pkg.group(1)} package: pip install {pkg.group(1)}" if pkg
                else f"cannot start its filesystem: {_one_line(hint, 160)}")
        raise InputError(f"reading {scheme}:// URLs {need}") from None
    except Exception as e:  # noqa: BLE001 - a filesystem that cannot start (missing credentials, bad options)
        raise InputError(f"cannot open its filesystem ({_one_line(e)})") from None
    return _Store(PyFileSystem(FSSpecHandler(spec)), root or "/", base, query, spec)


def _resolve(url: str, shown: str | None = None) -> tuple[_Store, str]:
    """The store of ``url`` and the object's path in it (errors name ``shown``, else ``url``)."""
    scheme, netloc, path, query = _split(url)
    try:
        with _lock:
            st = _store(scheme, netloc, query)
    except InputError as e:
        raise InputError(f"input {(shown or url).strip()!r}: {e}") from None
    return st, st.path(path)


def _failure(url: str, e: BaseException) -> InputError:
    if isinstance(e, InputError):
        return e
    if isinstance(e, FileNotFoundError):
        return InputError(f"input {url!r} does not exist")
    return InputError(f"input {url!r} cannot be read ({type(e).__name__}: {_one_line(e)}); check the URL, the "
                      "credentials and the endpoint (e.g. AWS_ENDPOINT_URL, AWS_PROFILE)")


# ----------------------------------------------------------------------------- listing


def _pattern(glob: str) -> re.Pattern:
    """A path glob as ``glob.glob(recursive=True)`` reads it: ``*``, ``?`` and ``[...]`` within one
    segment, ``**`` across segments."""
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and glob.find("]", i + 2) > 0:
            j = glob.find("]", i + 2)
            body = glob[i + 1:j]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = j + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def list_files(url: str, keep) -> list[str]:
    """The objects a URL names, as URLs, sorted: the object itself; for a prefix ("folder"), every
    object under it whose name ``keep(name)`` accepts; for a glob, every object that matches it.
    :class:`InputError` (one line, naming the URL) when there is none or it cannot be listed."""
    from pyarrow.fs import FileSelector, FileType

    scheme, netloc, path, query = _split(url)
    m = _GLOB.search(path)
    head = path if m is None else path[: path.rfind("/", 0, m.start()) + 1]
    try:
        st, top = _resolve(f"{scheme}://{netloc}/{head}" + (f"?{query}" if query else ""), url)
        if m is None:
            info = st.fs.get_file_info(top)
            if info.type == FileType.File:
                return [url.strip()]
            if info.type != FileType.Directory:
                raise FileNotFoundError(url)
        infos = st.fs.get_file_info(FileSelector(top, recursive=True, allow_not_found=m is not None))
    except Exception as e:  # noqa: BLE001 - network, credentials, a missing bucket
        raise _failure(url.strip(), e) from None
    files = sorted(st.url(i.path) for i in infos if i.type == FileType.File)
    if m is not None:
        rx = _pattern(path[len(head):])
        return [u for u in files if rx.fullmatch(_split(u)[2][len(head):])]
    listed = [_split(u)[2] for u in files]
    saved = next((p for p in listed if p.rpartition("/")[2] in ("state.json", "dataset_dict.json")), None)
    if saved is not None:
        raise InputError(f"input {url.strip()!r} holds a datasets save_to_disk folder ({saved}): those are read from "
                         "a local path only; name its .arrow files (or a glob of them) instead")
    return [u for u in files if keep(u.rpartition("/")[2])]


# ----------------------------------------------------------------------------- reading


def stat(src) -> FileVersion:
    """The size and version of a local file or an object (one ``stat`` or one HEAD request)."""
    if not is_url(src):
        st = os.stat(src)
        return FileVersion(st.st_size, st.st_mtime_ns)
    try:
        store, path = _resolve(src)
        if store.spec is not None:
            return _fsspec_version(store.spec.info(path))
        with store.fs.open_input_file(path) as fh:  # one HEAD: size, ETag and Last-Modified
            meta = {k.lower(): (v.decode() if isinstance(v, bytes) else str(v)) for k, v in fh.metadata().items()}
            size = fh.size()
        etag = meta.get("etag")
        modified = meta.get("last-modified")
        if etag is None and modified is None:
            info = store.fs.get_file_info(path)
            modified = info.mtime.isoformat() if info.mtime else None
        return FileVersion(size, f"etag:{etag}" if etag else f"modified:{modified}", etag, modified)
    except Exception as e:  # noqa: BLE001
        raise _failure(str(src), e) from None


def _fsspec_version(info: dict) -> FileVersion:
    etag = next((str(info[k]) for k in ("ETag", "etag", "md5Hash", "generation", "version_id") if info.get(k)), None)
    modified = next((str(info[k]) for k in ("LastModified", "last_modified", "mtime", "updated", "modified", "created")
                     if info.get(k) is not None), None)
    return FileVersion(int(info.get("size") or 0), f"etag:{etag}" if etag else f"modified:{modified}", etag, modified)


def versions(files) -> dict[str, FileVersion]:
    """:func:`stat` of every file, keyed by ``str(file)``; objects asked in parallel (one HEAD each)."""
    from concurrent.futures import ThreadPoolExecutor

    files = [str(f) for f in files]
    remote = [f for f in files if is_url(f)]
    out = {f: stat(f) for f in files if not is_url(f)}
    if remote:
        with ThreadPoolExecutor(min(16, len(remote))) as pool:
            out.update(zip(remote, pool.map(stat, remote)))
    return {f: out[f] for f in files}


def open_input(src):
    """A seekable binary file: ``open(src, "rb")``, or the object with ranged reads."""
    if not is_url(src):
        return open(src, "rb")
    store, path = _resolve(src)
    return store.fs.open_input_file(path)


def open_stream(src):
    """A binary stream read front to back in large blocks (unbuffered; never decompressed)."""
    if not is_url(src):
        return open(src, "rb", buffering=0)
    store, path = _resolve(src)
    # buffered: a reader asking for small blocks (gzip reads 128 KiB) still makes one GET per 8 MiB
    return store.fs.open_input_stream(path, compression=None, buffer_size=_STREAM_BUFFER)


def arrow_source(src):
    """What pyarrow's readers take: the local path itself, or the object as a random-access file."""
    return open_input(src) if is_url(src) else src
