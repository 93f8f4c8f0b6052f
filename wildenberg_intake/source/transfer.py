"""Transfer: fetch bytes over HTTP(S) or from local files, telling a missing object from a fault.

BossDB serves public volumes from S3. A 404 means the object does not exist (for a chunk: empty,
zeros). Anything else that is not a complete 200/206 answer (5xx, 429, a reset connection, a body
shorter than its Content-Length, a broken gzip stream, a timeout) is a transient fault: retried
with exponential backoff a bounded number of times, then raised as `TransferError` naming the URL
and the failure. A fault is never turned into zeros. 403 and other 4xx answers are errors at once.

cloud-volume's own transfer layer retries every exception seven times with waits up to a minute
and zero-fills 403 like 404 when fill_missing is on; this module replaces it for reads.
"""

from __future__ import annotations

import http.client
import os
import random
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import urllib3

try:  # ISA-L inflates gzip ~1.6x faster than zlib (measured here); optional
    from isal import isal_zlib as _fast_zlib
except ImportError:  # pragma: no cover
    _fast_zlib = zlib


class TooLarge(ValueError):
    """A body, or what it inflates to, is larger than what it can hold (a bomb, or the wrong object)."""


def inflate(body: bytes, limit: int | None = None) -> bytes:
    """gzip or zlib stream -> bytes; the whole stream must be there (a cut one raises).

    limit: the most bytes it may inflate to; inflation stops there and raises `TooLarge`, so a
    small body that inflates to gigabytes never allocates them."""
    d = _fast_zlib.decompressobj(47)  # 32 + 15: gzip or zlib header, detected
    if limit is None:
        out = d.decompress(body) + d.flush()
    else:
        out = d.decompress(body, limit + 1)
        if len(out) > limit or d.unconsumed_tail:
            raise TooLarge(f"inflates to more than {limit} bytes")
    if not d.eof:
        raise zlib.error("stream ends before its end marker")
    return out


class _NoGate:
    """The gate of a caller that bounds nothing: taking and giving it back do nothing."""

    def acquire(self):
        pass

    def release(self):
        pass


NO_GATE = _NoGate()


class TransferError(IOError):
    """A fetch that failed for good: the URL and the last failure are in the message."""


class Cancelled(TransferError):
    """A fetch stopped because its run (or its shard) is stopping after another failure."""


FIRST_CONTACT_PATIENCE = 8.0  # seconds: how long a server that never answered is retried


@dataclass(frozen=True)
class RetryPolicy:
    """How transient faults (5xx, 429, resets, truncated or broken bodies, timeouts) are retried.

    A request is retried until `patience` seconds have passed since its first failure, so an
    outage or a throttle shorter than that is waited out by the whole run (an overnight fetch
    survives a 30-second outage at 3 a.m.); `attempts`, if set, also ends it after that many tries.
    Waits double from `backoff` up to `max_wait` seconds, with jitter (half to all of it), and are
    at least what a 429 or 503 asks for in `Retry-After`. A server that stays down ends the run
    within `patience` plus one wait and one request, naming the URL; one that never answered at
    all (a wrong URL, nothing listening) within FIRST_CONTACT_PATIENCE. 403, 404 and other 4xx are
    never retried. `connect_timeout`, `read_timeout`: socket timeouts; `deadline`: the most one
    request (headers and body) may take before it is cut and retried."""

    attempts: int | None = None
    patience: float = 300.0
    backoff: float = 0.25
    max_wait: float = 60.0
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    # Whole request (connect, headers and body): a body trickling in is cut here and retried.
    deadline: float = 30.0

    def __post_init__(self):
        if self.attempts is not None and (isinstance(self.attempts, bool) or not isinstance(self.attempts, int)
                                          or self.attempts < 1):
            raise ValueError(f"retry attempts={self.attempts!r} is not valid; allowed: a positive integer or None")
        for name in ("patience", "backoff", "max_wait", "connect_timeout", "read_timeout", "deadline"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
                    (value == 0 and name != "patience"):
                raise ValueError(f"retry {name}={value!r} is not valid; allowed: a number of seconds "
                                 f"{'>= 0' if name == 'patience' else '> 0'}")

    def wait(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before try `attempt + 2` (capped exponential with jitter), at least `retry_after`."""
        # The exponent is capped before the power is taken: 2 ** attempt overflows a float past ~1,000.
        wait = min(self.max_wait, self.backoff * 2.0 ** min(attempt, 64)) * (0.5 + random.random() / 2)
        return max(wait, retry_after or 0.0)


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header's seconds (a number or an HTTP date), None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from email.utils import parsedate_to_datetime
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def to_fetchable(url: str) -> str:
    """Public bucket URLs as HTTPS (s3://b/p -> https://b.s3.amazonaws.com/p, gs://b/p -> storage.googleapis.com)."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        return f"https://{parsed.netloc}.s3.amazonaws.com{parsed.path}"
    if parsed.scheme == "gs":
        return f"https://storage.googleapis.com/{parsed.netloc}{parsed.path}"
    return url


class Fetcher:
    """Thread-safe GETs with the retry policy; counts attempts, retries and bytes for reports."""

    def __init__(self, policy: RetryPolicy | None = None):
        self.policy = policy or RetryPolicy()
        self._lock = threading.Lock()
        # Set by `cancel()` when a run stops: requests in flight are cut, none is retried or sent.
        self.cancelled = threading.Event()
        self._watched, self._watchdog = {}, None
        self._pid = os.getpid()
        self.stats = {"requests": 0, "retries": 0, "bytes": 0, "missing": 0}
        # Called as on_wait(url, failure, seconds, patience left) before each wait for a retry (a
        # run's progress display says what it waits for).
        self.on_wait = None
        self.answered = False  # whether any server answered this fetcher (an HTTP status, any)
        # urllib3 directly, its connection pools shared by every thread: requests (a Session per
        # thread) measured 450-540 us of client CPU per chunk request against urllib3's 200.
        self._http = urllib3.PoolManager(num_pools=4, maxsize=64)
        # Redirects followed; no retry of urllib3's own: faults are retried here, with backoff.
        self._retries = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5,
                                      raise_on_status=False)
        self._timeout = urllib3.Timeout(connect=self.policy.connect_timeout, read=self.policy.read_timeout)

    def _after_fork(self):
        """In a forked child (a loader worker): fresh connections and locks; the parent's threads,
        and any lock one of them held, did not come along."""
        self._lock = threading.Lock()
        self._watched, self._watchdog = {}, None
        self._http = urllib3.PoolManager(num_pools=4, maxsize=64)
        self._pid = os.getpid()

    def _count(self, **kw):
        with self._lock:
            for k, v in kw.items():
                self.stats[k] += v

    def cancel(self):
        """Stop every request of this fetcher: those in flight are cut at their next read, waits
        for a retry end, and later ones fail at once (a run stopping after a failure)."""
        self.cancelled.set()

    def get(self, url: str, byte_range: tuple[int, int] | None = None, max_bytes: int | None = None) -> bytes | None:
        """The object's bytes (decompressed if served with Content-Encoding), or None if it does not exist.

        byte_range: (start, stop) for a part of the object, stop exclusive. max_bytes: the most bytes
        the body may hold, as sent and inflated; a larger one is refused (`TransferError`), unread.
        """
        return self.get_with_wire(url, byte_range, max_bytes=max_bytes)[0]

    def get_with_wire(self, url: str, byte_range: tuple[int, int] | None = None, gate=NO_GATE,
                      max_bytes: int | None = None, token: threading.Event | None = None) -> tuple:
        """(bytes, gzip stream as received or None): `get`, and the compressed body where the server sent
        one (already checked to inflate whole), for callers that keep the smaller form. (None, None) if
        the object does not exist.

        gate: a semaphore acquired once the server answers with a body, before the body is read and
            inflated. When bytes are returned the caller holds it and releases it when done with them,
            so that many requests can wait on the network while only a few bodies are in memory.
        token: an event that, once set, cuts this request and its retries (`Cancelled`), as
            `cancel()` does for every request of the fetcher.
        """
        if self._pid != os.getpid():
            self._after_fork()
        url = to_fetchable(url)
        if url.startswith("file://"):
            gate.acquire()
            try:
                data = self._get_file(Path(urlparse(url).path), byte_range, max_bytes)
            except TooLarge as e:
                gate.release()
                raise TransferError(f"GET {url}: {e}; refused") from None
            if data is None:
                gate.release()
            return data, None
        # gzip accepted as requests asked for it: a server that compresses on request (or Google
        # Cloud Storage, which otherwise inflates gzip-stored objects itself) sends the smaller body.
        headers = {"Accept-Encoding": "gzip, deflate"}
        if byte_range:
            headers["Range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"
        policy, attempt, first_failure = self.policy, 0, None
        while True:
            if self.cancelled.is_set() or (token is not None and token.is_set()):
                raise Cancelled(f"GET {url} cancelled: the run is stopping after another failure")
            self._count(requests=1)
            outcome = self._attempt(url, headers, byte_range, gate, max_bytes, token)
            attempt += 1
            if outcome[0] == "retry" and outcome[1] == "cancelled":
                raise Cancelled(f"GET {url} cancelled: the run is stopping after another failure")
            if outcome[0] == "ok":
                self._count(bytes=len(outcome[1]))
                return outcome[1], outcome[2]
            if outcome[0] == "missing":
                self._count(missing=1)
                return None, None
            last, retry_after = outcome[1], (outcome[2] if len(outcome) > 2 else None)
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            # A server that has never answered this fetcher is a wrong URL or down, not an outage:
            # the run ends within FIRST_CONTACT_PATIENCE instead of waiting the whole patience.
            patience = policy.patience if self.answered else min(policy.patience, FIRST_CONTACT_PATIENCE)
            left = first_failure + patience - now
            if left <= 0 or (policy.attempts is not None and attempt >= policy.attempts):
                tries = f"{attempt} times over {now - first_failure:.0f} s" if attempt > 1 else "once"
                raise TransferError(f"GET {url} failed {tries} (retry patience {patience:g} s"
                                    f"{f', attempts {policy.attempts}' if policy.attempts else ''}); "
                                    f"last failure: {last}")
            wait = min(policy.wait(attempt - 1, retry_after), left)
            self._count(retries=1)
            if self.on_wait is not None:
                self.on_wait(url, last, wait, left)
            self._sleep(wait, token)

    def _sleep(self, seconds: float, token: threading.Event | None):
        """Wait `seconds` before a retry, cut short (within 50 ms) by this request's `token` or by
        `cancel()`, whichever comes first."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.cancelled.wait(min(left, 0.05)) or (token is not None and token.is_set()):
                return

    def _attempt(self, url, headers, byte_range, gate, max_bytes=None, token=None) -> tuple:
        """One GET: ("ok", bytes, wire) with `gate` held, ("missing",), or ("retry", why); raises for an
        answer that retrying cannot change."""
        held = False
        # The deadline covers the request's body too: the watchdog cuts the connection when it
        # passes (a socket timeout alone restarts at every byte of a body that trickles in), or at
        # `cancel()`. Connecting and waiting for the headers are bounded by the socket timeouts.
        cut = threading.Event()
        state = {"resp": None, "cut": cut, "deadline": time.monotonic() + self.policy.deadline, "token": token}
        self._watch(state)
        try:
            try:
                resp = state["resp"] = self._http.request(
                    "GET", url, headers=headers, preload_content=False, retries=self._retries,
                    timeout=self._timeout)
                self.answered = True
                try:
                    body = b""
                    if resp.status in (200, 206):
                        length = resp.headers.get("Content-Length")
                        if max_bytes is not None and length is not None and int(length) > max_bytes:
                            raise TransferError(f"GET {url} answered a {int(length)}-byte body; at most "
                                                f"{max_bytes} bytes fit this object; refused unread")
                        gate.acquire()
                        held = True
                        # The whole body in one read, inflated once: decoding on the fly works in
                        # 10 kB pieces, which cost more CPU than the inflation itself.
                        body = resp.read(None if max_bytes is None else max_bytes + 1, decode_content=False)
                        if max_bytes is not None and len(body) > max_bytes:
                            raise TransferError(f"GET {url} sent more than {max_bytes} bytes, the most this "
                                                "object can hold; refused")
                    else:
                        resp.drain_conn()  # so that the connection serves the next request
                finally:
                    resp.release_conn()
            except urllib3.exceptions.MaxRetryError as e:  # urllib3's wrapper of a connect/read failure
                return "retry", self._why(cut, f"{type(e.reason).__name__}: {e.reason}", token)
            except (urllib3.exceptions.HTTPError, http.client.HTTPException,
                    OSError) as e:  # a reset, a timeout, or a body shorter than its Content-Length
                if isinstance(e, TransferError):
                    raise
                return "retry", self._why(cut, f"{type(e).__name__}: {e}", token)
            if cut.is_set():
                return "retry", self._why(cut, "cut", token)
            if resp.status == 404:
                return ("missing",)
            if resp.status in (200, 206):
                expected = resp.headers.get("Content-Length")
                if expected is not None and len(body) != int(expected):
                    return "retry", f"truncated body: {len(body)} of {expected} bytes"
                encoding = resp.headers.get("Content-Encoding", "").strip().lower()
                wire = None
                if encoding in ("gzip", "x-gzip", "deflate"):
                    try:
                        wire, body = body, inflate(body, max_bytes)
                    except TooLarge as e:  # a bomb: what it inflates to is never allocated
                        raise TransferError(f"GET {url}: {encoding} body {e}, the most this object can hold; "
                                            "refused") from None
                    except Exception as e:  # zlib.error / isal error: a broken stream is a fault
                        return "retry", f"broken {encoding} body: {e}"
                elif encoding not in ("", "identity"):
                    raise TransferError(f"GET {url} answered Content-Encoding {encoding!r}; "
                                        "allowed: gzip, deflate, identity")
                if byte_range and resp.status == 200:  # server ignored the range
                    body, wire = body[byte_range[0]:byte_range[1]], None
                held = False  # the caller's now
                return "ok", body, wire
            if resp.status == 429 or resp.status >= 500:
                after = retry_after_seconds(resp.headers.get("Retry-After")) if resp.status in (429, 503) else None
                return "retry", f"HTTP {resp.status}" + (f" (Retry-After {after:g} s)" if after is not None else ""), after
            raise TransferError(f"GET {url} answered HTTP {resp.status}; only 404 means a missing object")
        finally:
            with self._lock:
                self._watched.pop(id(state), None)
            if held:
                gate.release()

    def _watch(self, state: dict):
        """Have the watchdog thread (one per fetcher, started on first use) cut this request at its
        deadline or at `cancel()`."""
        with self._lock:
            self._watched[id(state)] = state
            if self._watchdog is None or not self._watchdog.is_alive():
                self._watchdog = threading.Thread(target=self._watchdog_loop, daemon=True,
                                                  name="wildenberg-deadlines")
                self._watchdog.start()

    def _watchdog_loop(self):
        while True:
            time.sleep(0.2)
            now = time.monotonic()
            with self._lock:
                if not self._watched:  # idle: a later request starts it again
                    self._watchdog = None
                    return
                due = [st for st in self._watched.values()
                       if self.cancelled.is_set() or now > st["deadline"]
                       or (st["token"] is not None and st["token"].is_set())]
            for st in due:
                st["cut"].set()
                resp = st["resp"]
                if resp is not None:
                    try:
                        resp.shutdown()
                    except Exception:  # closed meanwhile
                        pass

    def _why(self, cut: threading.Event, failure: str, token=None) -> str:
        if self.cancelled.is_set() or (token is not None and token.is_set()):
            return "cancelled"
        if cut.is_set():
            return f"no complete answer within the {self.policy.deadline:g} s deadline ({failure})"
        return failure

    def _get_file(self, path: Path, byte_range, max_bytes=None):
        for candidate, gz in ((path, False), (path.with_name(path.name + ".gz"), True)):
            if candidate.is_file():
                if max_bytes is not None and candidate.stat().st_size > max_bytes:
                    raise TooLarge(f"{candidate.stat().st_size} bytes on disk; at most {max_bytes} fit")
                data = candidate.read_bytes()
                if gz:
                    data = inflate(data, max_bytes)
                self._count(requests=1, bytes=len(data))
                return data[byte_range[0]:byte_range[1]] if byte_range else data
        self._count(requests=1, missing=1)
        return None
