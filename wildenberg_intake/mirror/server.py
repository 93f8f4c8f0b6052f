"""An S3-like static HTTP server on 127.0.0.1 with injectable faults.

It serves the test mirror (BossDB layout) and, through `wildenberg-intake serve` and `view`, a cache's
zarr store to browser viewers: `X.gz` files are served as `X` with Content-Encoding: gzip, byte ranges
(suffix ranges too), HEAD, and CORS. `Faults` injects server errors, resets, truncations, slow and
hostile answers for the fault tests.
"""

from __future__ import annotations

import http.server
import random
import re
import socket
import struct
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves files like S3: `X.gz` on disk is served as `X` with Content-Encoding: gzip; byte ranges
    (suffix ranges too), HEAD, and CORS headers for browser viewers."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle's algorithm the body would wait for the
    # client's delayed ACK (~40 ms a request on Linux), which S3 does not do.
    disable_nagle_algorithm = True

    def log_message(self, *args):  # keep test output clean
        pass

    def _refused(self) -> bool:
        """Answer 403, before any work (no file read, no fetch), to a request that is not the server's
        own: without its token in the path, with a Host other than its own address (the door DNS
        rebinding uses), or from a browser page of an origin it does not serve. Returns whether it did."""
        server = self.server
        if server.token is None:
            return False
        own = {f"127.0.0.1:{server.server_address[1]}", f"localhost:{server.server_address[1]}"}
        origin = self.headers.get("Origin")
        if self.headers.get("Host") not in own or not self.path.startswith(f"/{server.token}/") \
                or (origin is not None and origin not in server.origins):
            with server.lock:
                server.refused += 1
            self._empty(403)
            return True
        self.path = self.path[len(server.token) + 1:]
        return False

    def _resolve(self):
        rel = self.path.split("?", 1)[0].lstrip("/")
        target = (self.server.root / rel).resolve()
        if self.server.root not in target.parents and target != self.server.root:
            return None, False
        if target.is_file():
            return target, False
        gz = target.with_name(target.name + ".gz")
        if gz.is_file():
            return gz, True
        return None, False

    def _answer(self, send_body):
        server = self.server
        if server.latency:
            time.sleep(server.latency)
        path = self.path.split("?", 1)[0]
        if server.before is not None:  # e.g. `view`: make the shard a viewer asks for before serving it
            try:
                server.before(path)
            except Exception as e:  # noqa: BLE001  (the viewer sees a server error, the console why)
                print(f"wildenberg-intake: {path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                return self._empty(503)
        target, gzipped = self._resolve()
        with server.lock:
            server.requests[path] += 1
            fault = server.faults.draw(path) if server.faults else None
        hostile = server.faults.hostile_for(path) if server.faults else None
        if hostile is not None:
            return self._hostile(hostile, target, send_body)
        if server.bandwidth and target is not None:  # per-response bandwidth, like a remote store
            time.sleep(target.stat().st_size / server.bandwidth)
        if fault == "slow":
            time.sleep(server.faults.slow_seconds)
        elif fault == "error":
            return self._empty(503)
        elif fault == "outage":
            after = server.faults.retry_after
            return self._empty(server.faults.outage_status, {"Retry-After": f"{after:g}"} if after is not None else None)
        if target is None and server.absent is not None:
            try:
                status = server.absent(path)
            except Exception as e:  # noqa: BLE001  (the viewer sees a server error, the console why)
                print(f"wildenberg-intake: {path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                status = 503
            if status == 200:
                target, gzipped = self._resolve()
            if target is None:
                return self._empty(503 if status == 200 else status)
        if target is None:
            return self._empty(404)
        status, headers = 200, {}
        # One range, as S3 answers it: "a-b", "a-" or a suffix "-n" (neuroglancer reads shard
        # indexes with suffix ranges such as bytes=-516), read by seeking: only the range is read.
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if match and not gzipped and (match.group(1) or match.group(2)):
            size = target.stat().st_size
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
            else:
                start, end = max(0, size - int(match.group(2))), size - 1
            if start >= size or end < start:
                return self._empty(416, {"Content-Range": f"bytes */{size}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            with open(target, "rb") as f:
                f.seek(start)
                body = f.read(end + 1 - start)
            status = 206
        else:
            body = target.read_bytes()
        with server.lock:
            server.bytes_read += len(body)
        self.send_response(status)
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        headers["Content-Length"] = str(len(body))
        headers["Content-Type"] = "application/octet-stream"
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if send_body and fault in ("reset", "truncate"):
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            if fault == "reset":  # RST instead of FIN: the client sees "connection reset"
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR) if fault == "truncate" else None
            return
        if send_body:
            self.wfile.write(body)
            with server.lock:
                server.bytes_sent += len(body)

    def _empty(self, status: int, headers=None):
        """An answer without a body: an error, a missing file, a range outside the file."""
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _hostile(self, kind, target, send_body):
        """Answers no honest server gives: a gzip bomb, an HTML page, silence, a trickle."""
        server = self.server
        if kind == "stall":  # accept, read the request, never answer
            server.stopping.wait()
            self.close_connection = True
            return
        if kind == "bomb":
            body, headers = gzip_bomb(server.faults.bomb_bytes), {"Content-Encoding": "gzip"}
        elif kind == "html":
            body = (b"<!DOCTYPE html><html><head><title>503 Service Unavailable</title></head><body>"
                    b"<h1>Please try again later</h1></body></html>" + b" " * 64)
            headers = {"Content-Type": "text/html"}
        else:  # trickle: the true body, one byte every trickle_seconds
            body, headers = (target.read_bytes() if target is not None else b"x" * 1024), {}
        self.send_response(200)
        headers["Content-Length"] = str(len(body))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not send_body:
            return
        if kind != "trickle":
            self.wfile.write(body)
            return
        for i in range(len(body)):
            if server.stopping.wait(server.faults.trickle_seconds):
                break
            self.wfile.write(body[i:i + 1])
            self.wfile.flush()
        self.close_connection = True

    def end_headers(self):
        # CORS, so that a viewer served from another origin (neuroglancer) may read the files: any
        # origin for an open server (the test mirror), only the origins it serves for one with a token.
        origin = self.headers.get("Origin")
        if self.server.token is None:
            self.send_header("Access-Control-Allow-Origin", "*")
        elif origin in self.server.origins:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        self.send_header("Access-Control-Expose-Headers", "Content-Range, Content-Length, Content-Encoding")
        self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def do_OPTIONS(self):  # a CORS preflight (a Range header makes one)
        if self._refused():
            return
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Range, Content-Type")
        self.send_header("Access-Control-Max-Age", "3600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        self._quietly(True)

    def do_HEAD(self):
        self._quietly(False)

    def _quietly(self, send_body):
        try:
            if not self._refused():
                self._answer(send_body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (killed, or gave up): nothing to answer


@dataclass
class Faults:
    """Faults the server injects, by rate and seed: 5xx answers, connections reset mid-body,
    bodies cut short of their Content-Length, slow answers. `fail_paths`: paths (substrings)
    that always answer 503. `outage_after`: after this many chunk requests, every chunk request
    answers `outage_status` (with `Retry-After: retry_after` if set) for `outage_seconds`, as S3
    throttling or a network outage would. Only chunk data is hit unless `include_info` is set."""

    error_rate: float = 0.0
    reset_rate: float = 0.0
    truncate_rate: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = 0.5
    seed: int = 0
    fail_paths: tuple = ()
    include_info: bool = False
    injected: Counter = field(default_factory=Counter)
    # Hostile answers for paths containing a key: "bomb" (a gzip body inflating to bomb_bytes),
    # "html" (an error page with 200), "stall" (no answer), "trickle" (a byte every trickle_seconds).
    hostile: dict = field(default_factory=dict)
    bomb_bytes: int = 2**30
    trickle_seconds: float = 0.5
    outage_after: int | None = None
    outage_seconds: float = 0.0
    outage_status: int = 503
    retry_after: float | None = None

    def hostile_for(self, path: str):
        for key, kind in self.hostile.items():
            if key in path:
                if kind not in ("bomb", "html", "stall", "trickle"):
                    raise ValueError(f"hostile kind {kind!r} is unknown; allowed: bomb, html, stall, trickle")
                return kind
        return None

    def __post_init__(self):
        for name in ("error_rate", "reset_rate", "truncate_rate", "slow_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r} is not valid; allowed: a rate between 0 and 1")
        self._rng = random.Random(self.seed)
        self._data_requests, self._outage_started = 0, None

    def draw(self, path: str):
        """The fault for this request, or None (called under the server's lock)."""
        if any(p in path for p in self.fail_paths):
            self.injected["error"] += 1
            return "error"
        if path.endswith(("/info", "/provenance")) and not self.include_info:
            return None
        self._data_requests += 1
        if self.outage_after is not None and self._data_requests > self.outage_after:
            now = time.monotonic()
            if self._outage_started is None:
                self._outage_started = now
            if now < self._outage_started + self.outage_seconds:
                self.injected["outage"] += 1
                return "outage"
        r = self._rng.random()
        for kind, rate in (("error", self.error_rate), ("reset", self.reset_rate),
                           ("truncate", self.truncate_rate), ("slow", self.slow_rate)):
            if r < rate:
                self.injected[kind] += 1
                return kind
            r -= rate
        return None


_BOMBS: dict = {}


def gzip_bomb(size: int) -> bytes:
    """A gzip stream of `size` zero bytes (about size / 1000 bytes long), made once per size."""
    if size not in _BOMBS:
        import zlib
        c = zlib.compressobj(9, zlib.DEFLATED, 31)
        block = bytes(2**20)
        parts = [c.compress(block) for _ in range(size // len(block))]
        parts.append(c.compress(bytes(size % len(block))))
        _BOMBS[size] = b"".join(parts) + c.flush()
    return _BOMBS[size]


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # Python's default of 5 drops connections under parallel load

    def handle_error(self, request, client_address):
        import sys
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return  # a client killed mid-request: expected in fault and kill tests
        super().handle_error(request, client_address)


class MirrorServer:
    """Serve a folder over HTTP on 127.0.0.1 on a free port, counting requests and bytes.

    >>> with MirrorServer(mirror.root) as server:
    ...     base_url = server.base_url  # http://127.0.0.1:PORT/wildenberg2023
    """

    def __init__(self, root, latency: float = 0.0, port: int = 0, faults: Faults | None = None,
                 bandwidth: float = 0.0, before=None, token: str | bool | None = None, origins=(), absent=None):
        self.root = Path(root).resolve()
        self.latency = float(latency)
        self.bandwidth = float(bandwidth)  # bytes per second per response; 0 for unlimited
        self.faults = faults
        self.port = int(port)
        self.before = before  # called with each request's path before it is answered (in the request's thread)
        # Called with the path of a request whose file is absent: the status to answer instead of 404
        # (a shard a store records is damage: 503, never the zeros a viewer draws for 404), or 200
        # when it made the file meanwhile (it is then served).
        self.absent = absent
        # A server that other web pages in the user's browser must not drive (`serve`, `view`): every
        # URL carries an unguessable token (True: made here), the Host must be the server's own
        # address, and CORS answers only `origins` (e.g. the viewer's own page). None: an open
        # server, as a public bucket is (the test mirror).
        if token is True:
            import secrets
            token = secrets.token_urlsafe(24)
        self.token = token
        self.origins = set(origins)
        self._server = None
        self._thread = None

    def __enter__(self):
        if self._server is None:
            self.start()
        return self

    def start(self):
        """Bind and start serving (raises OSError if the port is taken)."""
        self._server = _Server(("127.0.0.1", self.port), _Handler)
        self._server.root = self.root
        self._server.latency = self.latency
        self._server.bandwidth = self.bandwidth
        self._server.faults = self.faults
        self._server.before = self.before
        self._server.absent = self.absent
        self._server.token = self.token
        self._server.origins = self.origins  # the same set: `allow_origin` adds to it while serving
        self._server.refused = 0
        self._server.lock = threading.Lock()
        self._server.requests = Counter()
        self._server.bytes_sent = 0
        self._server.bytes_read = 0  # read from disk to answer (a byte range reads only its range)
        self._server.stopping = threading.Event()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        if self._server is not None:
            self._server.stopping.set()  # stalled and trickling answers end
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    def set_faults(self, faults: Faults | None):
        """Change the injected faults while serving (None: no faults)."""
        self.faults = faults
        if self._server is not None:
            with self._server.lock:
                self._server.faults = faults

    @property
    def url(self) -> str:
        """The server's address, with its token when it has one (every served URL starts here)."""
        token = f"/{self.token}" if self.token else ""
        return f"http://127.0.0.1:{self._server.server_address[1]}{token}"

    def allow_origin(self, origin: str):
        """Answer CORS for pages of `origin` (scheme://host:port), e.g. a viewer's own page."""
        self.origins.add(origin.rstrip("/"))

    @property
    def refused(self) -> int:
        """Requests answered 403 (no token, a foreign Host or origin) so far."""
        with self._server.lock:
            return self._server.refused

    @property
    def base_url(self) -> str:
        """The BossDB-style base URL to hand to the catalog (`base_url=`)."""
        return f"{self.url}/wildenberg2023"

    @property
    def requests(self) -> Counter:
        """Requests so far by path."""
        with self._server.lock:
            return Counter(self._server.requests)

    @property
    def bytes_read(self) -> int:
        """Bytes read from disk to answer requests so far."""
        with self._server.lock:
            return self._server.bytes_read

    @property
    def bytes_sent(self) -> int:
        with self._server.lock:
            return self._server.bytes_sent

    def requests_under(self, prefix: str) -> int:
        """Number of requests whose path starts with `prefix` (e.g. '/wildenberg2023/mouse_v1_l4_p105/em/')."""
        return sum(n for p, n in self.requests.items() if p.startswith(prefix))
