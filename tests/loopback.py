"""Real HTTP servers on 127.0.0.1 for download tests, and pytest fixtures that start them.

* :class:`FileServer` serves a directory like any static host (``download.pytorch.org``,
  ``download.openmmlab.com``): ``GET``/``HEAD``, single ``Range: bytes=a-[b]`` requests.
* :class:`HubServer` speaks the part of the Hugging Face Hub protocol that
  ``huggingface_hub.hf_hub_download`` (2.x, httpx2 client) uses: ``HEAD`` then ``GET`` on
  ``/{repo_id}/resolve/{revision}/{filename}``, answered with ``ETag``, ``X-Repo-Commit``,
  ``Content-Length`` and, as for LFS files, ``X-Linked-Etag``/``X-Linked-Size`` (the ETag is the
  file's sha256, as the hub's is for LFS files). Missing repo, revision or file get 404 with
  ``X-Error-Code`` ``RepoNotFound``/``RevisionNotFound``/``EntryNotFound``. Files live at
  ``root/{repo_id}/{filename}``; the revision is ``main`` or :attr:`HubServer.commit`.

Both servers record every request (:attr:`requests`) and have switches for failure modes:
``corrupt`` flips the first byte of every body (same length, wrong hash), ``cut_next_after=n``
ends the next GET body after ``n`` bytes and drops the connection (``cut_every_after=n``: every
GET body), ``honor_range=False`` answers
Range requests with the whole file, ``chunk_delay`` sleeps between 64 KiB chunks so that
concurrent clients overlap. Hostile switches: ``extra_headers`` are added to (or replace) the
answer's headers from request number ``extra_headers_from`` on (0: every request);
``drip=s`` sends the body one byte every ``s`` seconds; ``drip_head=s`` sends the status line and
headers so (from request number ``drip_head_from`` on; ``drip_status=False`` sends the status line
whole and drips the headers only); ``endless=True`` sends no
Content-Length and repeats the body until the client hangs up; ``range_start`` answers a
Range request with a 206 starting at that byte instead of the one asked for. Responses are HTTP/1.0 (one request per connection), so a stopped
server is really gone: no kept-alive connection keeps serving.

Use the servers as context managers, or the fixtures ``file_server``/``hub_server`` (in a
conftest: ``from loopback import file_server, hub_server``; ``hub_server`` also sets
``HF_ENDPOINT``) together with ``weights_env``, which gives each test its own ``HF_HOME`` and
``TORCH_HOME``.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

_BLOCK = 64 * 1024


@dataclass(frozen=True)
class Request:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]


class _LoopbackServer:
    """A ThreadingHTTPServer on 127.0.0.1:0 in a daemon thread; subclasses map a path to a file."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.requests: list[Request] = []
        self.corrupt = False
        self.honor_range = True
        self.cut_next_after: int | None = None
        self.cut_every_after: int | None = None
        self.chunk_delay = 0.0
        self.extra_headers: dict[str, str] = {}
        self.extra_headers_from = 0
        self.drip: float | None = None
        self.drip_head: float | None = None
        self.drip_head_from = 0
        self.drip_status = True
        self.endless = False
        self.range_start: int | None = None
        self._lock = threading.Lock()
        self._httpd: http.server.ThreadingHTTPServer | None = None

    # -- lifecycle
    def start(self) -> "_LoopbackServer":
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.block_on_close = False  # a dripping handler must not hold up stop()
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def gets(self, path_suffix: str = "") -> list[Request]:
        """The GET requests whose path ends with ``path_suffix``."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.path.endswith(path_suffix)]

    # -- request handling
    def _record(self, handler) -> int:
        with self._lock:
            self.requests.append(Request(handler.command, handler.path, dict(handler.headers)))
            return len(self.requests) - 1

    def resolve(self, handler) -> tuple[Path | None, dict[str, str]]:
        """(file to serve, or None for a 404; headers to add to the answer)."""
        raise NotImplementedError

    def _take_cut(self) -> int | None:
        with self._lock:
            cut, self.cut_next_after = self.cut_next_after, None
            return self.cut_every_after if cut is None else cut

    def serve(self, handler, head: bool) -> None:
        number = self._record(handler)
        path, headers = self.resolve(handler)
        if number >= self.extra_headers_from:
            headers = {**headers, **self.extra_headers}
        if path is None:
            handler.send_response(404)
            for key, value in {**headers, "Content-Length": "0"}.items():
                handler.send_header(key, value)
            handler.end_headers()
            return
        data = path.read_bytes()
        if self.corrupt and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start, end, status = 0, len(data), 200
        spec = handler.headers.get("Range")
        if spec and self.honor_range and not head:
            first, _, last = spec.removeprefix("bytes=").partition("-")
            start = int(first) if self.range_start is None else self.range_start
            end = int(last) + 1 if last else len(data)
            if start >= len(data):
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{len(data)}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            status = 206
        body = data[start:end]
        if not self.endless:
            headers = {"Content-Length": str(len(body)), **headers}
        if status == 206:
            headers = {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}", **headers}
        if self.drip_head is not None and number >= self.drip_head_from:
            if not self._drip_head(handler, status, headers):
                return
        else:
            handler.send_response(status)
            handler.send_header("Accept-Ranges", "bytes")
            for key, value in headers.items():
                handler.send_header(key, value)
            handler.end_headers()
        if head:
            return
        cut = self._take_cut()
        if cut is not None:
            body = body[:cut]
        try:
            if self.drip is not None:
                for i in range(len(body)):
                    handler.wfile.write(body[i:i + 1])
                    handler.wfile.flush()
                    time.sleep(self.drip)
                return
            while self.endless:
                handler.wfile.write(body or b"\0")
            for i in range(0, len(body), _BLOCK):
                handler.wfile.write(body[i:i + _BLOCK])
                if self.chunk_delay:
                    time.sleep(self.chunk_delay)
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client hung up (e.g. it refused the answer)
            return


    def _drip_head(self, handler, status: int, headers: dict[str, str]) -> bool:
        """Send status line and headers byte by byte; False when the client hung up meanwhile."""
        status_line = f"HTTP/1.0 {status} {handler.responses[status][0]}\r\n".encode()
        head = "".join(f"{k}: {v}\r\n" for k, v in {"Accept-Ranges": "bytes", **headers}.items()).encode() + b"\r\n"
        try:
            if not self.drip_status:
                handler.wfile.write(status_line)
                status_line = b""
            for byte in status_line + head:
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
                time.sleep(self.drip_head)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True


def _make_handler(server: _LoopbackServer):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self):
            server.serve(self, head=False)

        def do_HEAD(self):
            server.serve(self, head=True)

        def log_message(self, *args):  # keep test output clean
            pass

    return Handler


class FileServer(_LoopbackServer):
    """Static files under ``root``: ``GET /a/b.pth`` serves ``root/a/b.pth``."""

    def resolve(self, handler):
        path = (self.root / unquote(urlsplit(handler.path).path).lstrip("/")).resolve()
        return (path if self.root.resolve() in path.parents and path.is_file() else None), {}


class HubServer(_LoopbackServer):
    """A Hugging Face Hub ``resolve`` endpoint over ``root/{repo_id}/{filename}``."""

    commit = hashlib.sha1(b"gczoo loopback hub").hexdigest()

    def resolve(self, handler):
        repo_id, sep, rest = unquote(urlsplit(handler.path).path).lstrip("/").partition("/resolve/")
        revision, _, filename = rest.partition("/")
        repo = (self.root / repo_id).resolve()
        if not sep or self.root.resolve() not in repo.parents or not repo.is_dir():
            return None, self._error("RepoNotFound")
        if revision not in ("main", self.commit):
            return None, self._error("RevisionNotFound")
        path = (repo / filename).resolve()
        if repo not in path.parents or not path.is_file():
            return None, self._error("EntryNotFound")
        data = path.read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()  # the ETag of the intact file, even when corrupt
        return path, {
            "ETag": f'"{sha256}"',
            "X-Linked-Etag": f'"{sha256}"',
            "X-Linked-Size": str(len(data)),
            "X-Repo-Commit": self.commit,
        }

    def _error(self, code: str) -> dict[str, str]:
        return {"X-Error-Code": code, "X-Repo-Commit": self.commit}


@pytest.fixture
def weights_env(tmp_path, monkeypatch):
    """Private HF_HOME and TORCH_HOME; no offline flag, mirror, endpoint or deadline from the outer env.

    huggingface_hub read HF_HUB_OFFLINE when it was imported; its module constant is reset too
    so that an outer ``HF_HUB_OFFLINE=1`` does not block the loopback hub (tests that need offline
    mode from import on run a subprocess). A ``torch.hub.set_dir`` made earlier in the session
    would override TORCH_HOME; it is undone for the test's duration.
    """
    import torch.hub
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "GCZOO_OFFLINE", "GCZOO_MIRROR", "HF_ENDPOINT", "HF_HUB_CACHE",
                "GCZOO_DOWNLOAD_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    # The loopback servers speak plain http, where a source pinned only by a hash prefix needs this
    # opt-in; the tests of that policy remove it.
    monkeypatch.setenv("GCZOO_ALLOW_PREFIX_ONLY", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path


@pytest.fixture
def file_server(tmp_path):
    """A started :class:`FileServer` over ``tmp_path/files``."""
    root = tmp_path / "files"
    root.mkdir()
    with FileServer(root) as server:
        yield server


@pytest.fixture
def hub_server(weights_env, tmp_path, monkeypatch):
    """A started :class:`HubServer` over ``tmp_path/hub``; ``HF_ENDPOINT`` points at it (after
    ``weights_env`` has cleared the outer environment)."""
    root = tmp_path / "hub"
    root.mkdir()
    with HubServer(root) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server
