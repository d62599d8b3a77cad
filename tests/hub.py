"""A Hugging Face hub stand-in for tests: local directories served as model repositories on the
routes huggingface_hub calls (repository info, tree listing, file resolve with byte ranges), so
`lacuna pull` runs end to end against `HF_ENDPOINT` with no network."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
ROUTE = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree)/(?P<rev>[^/?]+))?")
RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)")


class Hub:
    """Serves `repos` (repository id -> directory) at `url`; a file named in `drop` has its first
    download cut off after that many bytes, as a dropped connection would."""

    def __init__(self, repos: dict[str, Path], drop: dict[str, int] | None = None):
        self.repos, self.drop = repos, dict(drop or {})
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo: str) -> list[Path]:
        root = self.repos[repo]
        return sorted(p for p in root.rglob("*") if p.is_file())

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def reply(self, status: int, body: bytes = b"", headers: dict | None = None, length: int | None = None):
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def not_found(self, code: str):
                self.reply(404, json.dumps({"error": code}).encode(), {"X-Error-Code": code})

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                hub.requests.append(f"{self.command} {self.path} {self.headers.get('Range', '')}".rstrip())
                path = self.path.split("?")[0]
                match = ROUTE.fullmatch(path) or RESOLVE.fullmatch(path)
                if match and match["rev"] not in (None, "main", COMMIT) and match["repo"] in hub.repos:
                    return self.not_found("RevisionNotFound")
                if match and match.re is ROUTE:
                    return self.api(match["repo"], match["kind"])
                if match:
                    return self.resolve(match["repo"], match["path"])
                self.not_found("EntryNotFound")

            def api(self, repo: str, kind: str | None):
                if repo not in hub.repos:
                    return self.not_found("RepoNotFound")
                root = hub.repos[repo]
                files = [p.relative_to(root).as_posix() for p in hub.files(repo)]
                if kind == "tree":
                    body = [{"type": "file", "path": f, "size": (root / f).stat().st_size,
                             "oid": hashlib.sha1((root / f).read_bytes()).hexdigest()} for f in files]
                else:
                    body = {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                            "siblings": [{"rfilename": f} for f in files]}
                self.reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

            def resolve(self, repo: str, name: str):
                file = hub.repos.get(repo, Path("/nonexistent")) / name
                if repo not in hub.repos or not file.is_file():
                    return self.not_found("EntryNotFound" if repo in hub.repos else "RepoNotFound")
                data = file.read_bytes()
                headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                           "Accept-Ranges": "bytes"}
                start = int(m[1]) if (m := re.match(r"bytes=(\d+)-", self.headers.get("Range", ""))) else 0
                if self.command == "GET" and name in hub.drop:
                    cut = hub.drop.pop(name)
                    self.reply(200, data[:cut], headers, length=len(data))
                    self.close_connection = True
                    return
                if start:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                    return self.reply(206, data[start:], headers)
                self.reply(200, data, headers)

        return Handler
