"""A loopback stand-in for the Hugging Face hub, for tests that must never touch the network.

It answers the few endpoints ``huggingface_hub``'s download functions call, as the hub does
(huggingface_hub 2.x: ``HfApi.repo_info``/``resolve_revision``, ``list_repo_tree``,
``snapshot_download``/``hf_hub_download``):

- ``GET /api/{models|datasets}/<org>/<name>[/revision/<rev>]``: ``{"id", "sha", "siblings"}``;
- ``GET /api/{models|datasets}/<org>/<name>/tree/<rev>[/<path>]?recursive=...``: the files
  (``type``, ``path``, ``size``, ``oid``; ``lfs`` for safetensors, like the hub's LFS files) and folders;
- ``HEAD``/``GET /[datasets/]<org>/<name>/resolve/<rev>/<path>``: the file with ``X-Repo-Commit``,
  ``ETag`` (git sha1, or ``X-Linked-Etag`` = sha256 for LFS files), ``Content-Length`` and
  ``X-Linked-Size``; ``Range: bytes=N-`` is honoured.

Failures carry the hub's ``X-Error-Code``: ``RepoNotFound`` (401 without a token, 404 with one;
also a private repository without a token that has access), ``RevisionNotFound`` (404), ``EntryNotFound``
(404), ``GatedRepo`` (401 without a token, 403 with one that has no access; a gated
repository's metadata and tree stay public, as on the hub). Every request is logged in
:attr:`HubServer.log` as ``(method, kind, repo_id, detail)`` with kind ``info``, ``tree`` or
``file`` (detail: the file's path in the repository).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith((".safetensors", ".bin", ".parquet", ".pth"))


@dataclass
class Repo:
    repo_id: str
    repo_type: str = "model"  # model | dataset
    gated: bool = False
    private: bool = False
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: content}

    def commit(self, files: dict[str, bytes], *refs: str) -> str:
        """Add a commit holding ``files``; point ``refs`` (default ``main``) at it; its hash."""
        h = hashlib.sha1(self.repo_id.encode())
        for path in sorted(files):
            h.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        sha = h.hexdigest()
        self.commits[sha] = dict(files)
        for ref in refs or ("main",):
            self.refs[ref] = sha
        return sha

    def files_at(self, rev: str) -> tuple[str, dict[str, bytes]] | None:
        sha = self.refs.get(rev, rev if rev in self.commits else None)
        return (sha, self.commits[sha]) if sha else None


class HubServer:
    """``with HubServer() as hub: hub.add(Repo(...)); hub.url``: a hub on 127.0.0.1 (port 0)."""

    def __init__(self, tokens: tuple[str, ...] = ()):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.tokens = set(tokens)  # tokens with access to every repository; other hf_... tokens are valid
        # without access (403 on a gated repository); anything else is refused (401, invalid credentials)
        self.log: list[tuple[str, str, str, str]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def add(self, repo: Repo) -> Repo:
        self.repos[(repo.repo_type, repo.repo_id)] = repo
        return repo

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def mark(self) -> int:
        """The log's length now: ``requests(since=mark)`` shows what came after."""
        return len(self.log)

    def requests(self, since: int = 0, kind: str | None = None) -> list[tuple[str, str, str, str]]:
        with self._lock:
            return [r for r in self.log[since:] if kind is None or r[1] == kind]

    def fetched(self, since: int = 0) -> set[str]:
        """``repo_id:path`` of every file requested (HEAD or GET) since ``since``."""
        return {f"{r[2]}:{r[3]}" for r in self.requests(since, "file")}

    def _record(self, *entry) -> None:
        with self._lock:
            self.log.append(entry)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                self._serve(body=True)

            def do_HEAD(self):
                self._serve(body=False)

            def _reply(self, status: int, headers: dict, body: bytes = b"", send: bool = True):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, str(v))
                self.send_header("Content-Length", str(headers.get("Content-Length", len(body))))
                self.end_headers()
                if send and body:
                    self.wfile.write(body)

            def _error(self, status: int, code: str, message: str, send: bool, extra: dict | None = None):
                body = json.dumps({"error": message}).encode()
                self._reply(status, {"X-Error-Code": code, "X-Error-Message": message,
                                     "Content-Type": "application/json", **(extra or {})}, body, send)

            def _serve(self, body: bool):
                url = urlsplit(self.path)
                parts = [unquote(p) for p in url.path.split("/")[1:]]
                query = parse_qs(url.query)
                auth = self.headers.get("Authorization", "")
                token = auth[7:] if auth.startswith("Bearer ") else None
                authed = token in server.tokens
                if token and not authed and not token.startswith("hf_"):  # the hub's answer to a revoked token
                    server._record(self.command, "?", "", url.path)
                    return self._error(401, "", "Invalid credentials in Authorization header", body)
                if parts[:1] == ["api"] and parts[1:2] in (["models"], ["datasets"]) and (
                        len(parts) in (4, 6) or len(parts) > 6 and parts[4] == "tree"):
                    repo_type, repo_id = parts[1][:-1], "/".join(parts[2:4])
                    route, rev, rest = (parts[4], parts[5], "/".join(parts[6:])) if len(parts) > 4 else ("revision", "main", "")
                    kind = {"revision": "info", "tree": "tree"}.get(route)
                elif "resolve" in parts[:4]:
                    i = parts.index("resolve")
                    repo_type = "dataset" if parts[0] == "datasets" else "model"
                    repo_id = "/".join(parts[i - 2:i])
                    rev, rest, kind = parts[i + 1], "/".join(parts[i + 2:]), "file"
                else:
                    server._record(self.command, "?", "", url.path)
                    return self._error(404, "NotFound", "Not found", body)
                server._record(self.command, kind or "?", repo_id, rest)
                repo = server.repos.get((repo_type, repo_id))
                if repo is None or (repo.private and not authed):
                    return self._error(404 if token else 401, "RepoNotFound", "Repository not found", body)
                at = repo.files_at(rev)
                if at is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", body)
                sha, files = at
                if kind == "info":
                    info = {"id": repo.repo_id, "sha": sha, "private": repo.private, "gated": repo.gated and "manual",
                            "siblings": [{"rfilename": p} for p in sorted(files)]}
                    return self._reply(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body)
                if kind == "tree":
                    recursive = query.get("recursive", ["false"])[0].lower() == "true"
                    entries = _tree(files, rest, recursive)
                    return self._reply(200, {"Content-Type": "application/json"}, json.dumps(entries).encode(), body)
                if kind != "file":
                    return self._error(404, "NotFound", "Not found", body)
                if repo.gated and not authed:
                    msg = f"Access to {repo_type} {repo_id} is restricted. You must have access to it and be authenticated."
                    return self._error(403 if token else 401, "GatedRepo", msg, body)
                if rest not in files:
                    return self._error(404, "EntryNotFound", f"{rest} does not exist on {rev}", body,
                                       {"X-Repo-Commit": sha})
                data = files[rest]
                headers = {"X-Repo-Commit": sha, "ETag": f'"{git_sha1(data)}"', "Accept-Ranges": "bytes",
                           "Content-Type": "application/octet-stream"}
                if is_lfs(rest):
                    headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
                                    "X-Linked-Size": len(data)})
                rng = self.headers.get("Range", "")
                if rng.startswith("bytes=") and rng[6:].rstrip("-").isdigit() and body:
                    start = int(rng[6:].rstrip("-"))
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                    return self._reply(206, headers, data[start:], body)
                headers["Content-Length"] = len(data)
                return self._reply(200, headers, data, body)

        return Handler


def _tree(files: dict[str, bytes], under: str, recursive: bool) -> list[dict]:
    """The hub's tree listing of ``under`` (``""``: the root)."""
    prefix = under.strip("/") + "/" if under.strip("/") else ""
    out, folders = [], set()
    for path in sorted(files):
        if not path.startswith(prefix):
            continue
        rel = path[len(prefix):]
        *dirs, _ = rel.split("/")
        for i in range(len(dirs) if recursive else min(1, len(dirs))):
            folders.add(prefix + "/".join(dirs[: i + 1]))
        if dirs and not recursive:
            continue
        data = files[path]
        entry = {"type": "file", "oid": git_sha1(data), "size": len(data), "path": path}
        if is_lfs(path):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        out.append(entry)
    out += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
            for f in sorted(folders)]
    return out


def folder_files(root, prefix: str = "") -> dict[str, bytes]:
    """``{prefix + relative path: bytes}`` of every file under a local folder (a repository's content)."""
    from pathlib import Path

    root = Path(root)
    return {prefix + p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
