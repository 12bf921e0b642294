"""A stand-in for the Hugging Face Hub on 127.0.0.1, for tests that run the hub code path offline.

It serves folders as model and dataset repositories through the part of the hub's HTTP API that
huggingface_hub and datasets use to read (repo info, tree listing, paths-info, resolve with HTTP
ranges), answers unknown repos and files the way the hub does (404 with X-Error-Code), and logs
every request with the bytes it sent, so tests can assert what a run downloaded.

    with HubServer({("dataset", "lirus18/deepfashion"): folder}) as hub:
        os.environ["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class Request:
    method: str
    path: str  # the URL path, unquoted
    range: str  # the Range header, "" when absent
    status: int
    sent: int  # body bytes sent


@dataclass
class Repo:
    kind: str  # "model" | "dataset"
    repo_id: str
    root: Path

    @property
    def sha(self) -> str:
        h = hashlib.sha1(self.repo_id.encode())
        for p in self.files():
            h.update(p.encode())
            h.update(str((self.root / p).stat().st_size).encode())
        return h.hexdigest()

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())


def _file_oid(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class HubServer:
    """Threaded HTTP server over {(kind, repo_id): folder}; use as a context manager."""

    def __init__(self, repos: dict[tuple[str, str], Path]) -> None:
        self.repos = {(k, r): Repo(k, r, Path(p)) for (k, r), p in repos.items()}
        self.log: list[Request] = []
        self.failing: set[str] = set()  # files whose ranged reads fail (a file gone between listing and reading)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                server._handle(self, head=True)

            def do_GET(self) -> None:
                server._handle(self, head=False)

            def do_POST(self) -> None:
                server._handle(self, head=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="hub-stand-in", daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    # ------------------------------------------------------------------ accounting
    def bytes_for(self, suffix: str) -> int:
        """Body bytes sent for resolve requests of files whose path ends with `suffix`."""
        return sum(r.sent for r in self.log if "/resolve/" in r.path and r.path.endswith(suffix) and r.method == "GET")

    def reset(self) -> None:
        with self._lock:
            self.log.clear()

    # ------------------------------------------------------------------ routing
    def _repo(self, kind: str, repo_id: str) -> Repo | None:
        return self.repos.get((kind, repo_id))

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlparse(h.path)
        path = unquote(url.path)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        status, headers, payload = self._route(h.command, path, url.query, body, h.headers.get("Range", ""))
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if not head:
            h.wfile.write(payload)
        with self._lock:
            self.log.append(Request(h.command, path, h.headers.get("Range", ""), status, 0 if head else len(payload)))

    # (pattern, handler name, HTTP method or None for any); group "kind" is models/datasets or the
    # datasets/ prefix of a resolve URL, group "repo" the owner/name.
    ROUTES = [
        (r"/api/(?P<kind>models|datasets)/(?P<repo>[^/]+/[^/]+)(?:/revision/[^/]+)?", "_info", None),
        (r"/api/(?P<kind>models|datasets)/(?P<repo>[^/]+/[^/]+)/tree/[^/]+(?:/(?P<rest>.*))?", "_tree", None),
        (r"/api/(?P<kind>models|datasets)/(?P<repo>[^/]+/[^/]+)/paths-info/[^/]+", "_paths_info", "POST"),
        (r"/(?P<kind>datasets/)?(?P<repo>[^/]+/[^/]+)/resolve/[^/]+/(?P<rest>.+)", "_resolve", None),
    ]

    def _route(self, method: str, path: str, query: str, body: bytes, range_header: str):
        for pattern, handler, only in self.ROUTES:
            m = re.fullmatch(pattern, path)
            if m and only in (None, method):
                kind = "dataset" if m.group("kind") in ("datasets", "datasets/") else "model"
                repo = self._repo(kind, m.group("repo"))
                if repo is None:
                    return self._error(404, "RepoNotFound", f"Repository Not Found for {kind} {m.group('repo')}")
                request = {"rest": m.groupdict().get("rest") or "", "query": query, "body": body, "range": range_header}
                return getattr(self, handler)(repo, request)
        return self._error(404, "EntryNotFound", f"no route for {path}")

    @staticmethod
    def _json(obj, status: int = 200):
        return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()

    @staticmethod
    def _error(status: int, code: str, message: str):
        return (
            status,
            {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message},
            json.dumps({"error": message}).encode(),
        )

    def _entry(self, repo: Repo, rel: str) -> dict:
        p = repo.root / rel
        if p.is_dir():
            return {"type": "directory", "path": rel, "oid": hashlib.sha1(rel.encode()).hexdigest(), "size": 0}
        size = p.stat().st_size
        oid = _file_oid(p)
        entry = {"type": "file", "path": rel, "size": size, "oid": hashlib.sha1(oid.encode()).hexdigest()}
        if p.suffix in (".parquet", ".safetensors", ".bin", ".onnx"):
            entry["lfs"] = {"oid": oid, "size": size, "pointerSize": 134}
        return entry

    def _info(self, repo: Repo, request: dict):
        repo_id = repo.repo_id
        return self._json(
            {
                "id": repo_id,
                "_id": repo.sha[:24],
                "sha": repo.sha,
                "private": False,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "lastModified": "2026-01-01T00:00:00.000Z",
                "createdAt": "2026-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": f} for f in repo.files()],
                "cardData": {},
            }
        )

    def _tree(self, repo: Repo, request: dict):
        sub, query = request["rest"], request["query"].lower()
        recursive = "recursive=true" in query or "recursive=1" in query
        base = repo.root / sub
        if not base.is_dir():
            return self._error(404, "EntryNotFound", f"{sub} does not exist")
        children = sorted(base.rglob("*") if recursive else base.iterdir())
        return self._json([self._entry(repo, str(p.relative_to(repo.root))) for p in children])

    def _paths_info(self, repo: Repo, request: dict):
        text = request["body"].decode()
        try:
            paths = json.loads(text).get("paths", [])
        except json.JSONDecodeError:  # form-encoded: paths=a&paths=b
            paths = parse_qs(text).get("paths", [])
        return self._json([self._entry(repo, p) for p in paths if (repo.root / p).exists()])

    def _resolve(self, repo: Repo, request: dict):
        rel, range_header = request["rest"], request["range"]
        p = repo.root / rel
        if not p.is_file() or (rel in self.failing and range_header.strip()):
            return self._error(404, "EntryNotFound", f"{rel} does not exist in {repo.repo_id}")
        data = p.read_bytes()
        oid = _file_oid(p)
        headers = {
            "X-Repo-Commit": repo.sha,
            "ETag": f'"{oid}"',
            "X-Linked-Etag": f'"{oid}"',
            "X-Linked-Size": str(len(data)),
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())
        if not m:
            return 200, headers, data
        start, end = m.group(1), m.group(2)
        if start == "":  # a suffix range: the last N bytes
            first, last = max(0, len(data) - int(end)), len(data) - 1
        else:
            first, last = int(start), min(int(end) if end else len(data) - 1, len(data) - 1)
        headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        return 206, headers, data[first : last + 1]
