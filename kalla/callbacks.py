"""Progress, completion and error callbacks: small validated POSTs with the stdlib.

Delivery never raises into the job: it returns an outcome that the caller records.
Completion and error callbacks retry with exponential backoff on connection errors,
timeouts, 5xx and 429; other answers are final. Progress callbacks are one attempt.
`Courier` orders one job's callbacks: coalesced progress first, the terminal one last.

A callback URL is chosen by whoever submits a job, so the receiver is untrusted: every
attempt has one deadline for the whole exchange (a per-recv timeout alone lets a receiver
that trickles a byte every few seconds hold the sender forever), redirects are never
followed (a 3xx could point the service at a host KALLA_CALLBACK_HOSTS does not allow),
and a receiver that does not speak HTTP is a failed delivery, not an exception.
"""
from __future__ import annotations

import http.client
import logging
import socket
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

import orjson

log = logging.getLogger("kalla.callbacks")

KINDS = ("progress", "complete", "error")
MAX_ANSWER_BYTES = 65536       # of a receiver's answer body read before closing


@dataclass
class Outcome:
    kind: str
    delivered: bool
    attempts: int
    status: int | None = None
    error: str | None = None
    final: bool = False          # retrying cannot help (refused URL, 4xx, 3xx)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "delivered": self.delivered, "attempts": self.attempts,
                "status": self.status, "error": self.error}


def url_problem(url: str, allowed_hosts=None) -> str | None:
    """Why the service must not POST to ``url``, or None when it may.

    >>> url_problem("https://hooks.example.com/kalla?t=1", ("hooks.example.com",)) is None
    True
    >>> url_problem("ftp://x/y")
    'must be an http:// or https:// URL with a host'
    >>> url_problem("http://hooks.example.com@evil.example/", ("hooks.example.com",))
    'must not carry credentials (user:password@); put a token in the path or query'
    >>> url_problem("http://other.example/cb", ("hooks.example.com",))
    "host 'other.example' is not allowed (KALLA_CALLBACK_HOSTS)"
    """
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        return "must not contain spaces or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:            # "Invalid IPv6 URL", "Port out of range 0-65535"
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if port == 0:
        return "is not a valid URL (port 0)"
    if "@" in parts.netloc:
        return "must not carry credentials (user:password@); put a token in the path or query"
    host = parts.hostname.rstrip(".")
    if allowed_hosts and host not in allowed_hosts:
        return f"host {host!r} is not allowed (KALLA_CALLBACK_HOSTS)"
    return None


def _json_default(value):
    # orjson does not serialise Decimal; callbacks only carry counts and text, but be safe.
    return str(value)


def encode(body: dict) -> bytes:
    return orjson.dumps(body, default=_json_default)


class CallbackSender:
    """POSTs callback bodies to one job's callback_url."""

    def __init__(self, url: str, *, style: str = "exact", timeout: float = 10.0,
                 retries: int = 5, backoff: float = 0.5, max_backoff: float = 8.0,
                 allowed_hosts=None):
        self.url = url
        self.style = style
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.allowed_hosts = allowed_hosts

    def target(self, kind: str) -> str:
        if self.style == "suffix":
            return self.url.rstrip("/") + "/" + kind
        return self.url

    def send(self, kind: str, body: dict) -> Outcome:
        attempts = 1 if kind == "progress" else self.retries
        outcome = Outcome(kind, False, 0)
        delay = self.backoff
        for attempt in range(1, attempts + 1):
            outcome = self._attempt(kind, body)
            outcome.attempts = attempt
            if outcome.delivered or not _retryable(outcome):
                break
            if attempt < attempts:
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
        if not outcome.delivered:
            # progress is best effort: one lost update is not worth a warning
            (log.debug if kind == "progress" else log.warning)(
                "callback %s for run %s not delivered after %d attempt(s): %s",
                kind, body.get("run_id"), outcome.attempts, outcome.error)
        return outcome

    def _attempt(self, kind: str, body: dict) -> Outcome:
        url = self.target(kind)
        problem = url_problem(url, self.allowed_hosts)
        if problem is not None:
            return Outcome(kind, False, 0, None, f"callback_url {problem}", final=True)
        try:
            status = post(url, encode(body), self.timeout)
        except Exception as exc:  # a receiver must never crash delivery, whatever it sends
            return Outcome(kind, False, 0, None, _describe(exc, self.timeout))
        if 200 <= status < 300:
            return Outcome(kind, True, 0, status)
        note = " (redirects are not followed)" if 300 <= status < 400 else ""
        return Outcome(kind, False, 0, status, f"HTTP {status}{note}")


def post(url: str, data: bytes, timeout: float) -> int:
    """POST ``data`` as JSON; the answer's status. The whole exchange gets ``timeout``
    seconds: a watchdog shuts the socket down when they run out."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    expired = threading.Event()
    watchdog = threading.Timer(timeout, _expire, (conn, expired)) if timeout > 0 else None
    if watchdog:
        watchdog.daemon = True
        watchdog.start()
    try:
        conn.request("POST", path, body=data, headers={
            "Content-Type": "application/json", "User-Agent": "kalla-runner",
            "Connection": "close"})
        response = conn.getresponse()
    except Exception:
        if expired.is_set():
            raise TimeoutError(f"no complete answer within {timeout:g}s") from None
        raise
    else:
        try:                       # the status is the answer; the body is only drained
            response.read(MAX_ANSWER_BYTES)
        except (OSError, http.client.HTTPException):
            pass
        return response.status
    finally:
        if watchdog:
            watchdog.cancel()
        conn.close()


def _expire(conn: http.client.HTTPConnection, expired: threading.Event) -> None:
    expired.set()
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)     # wakes the blocked send or recv
        except OSError:
            pass


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, (TimeoutError, socket.timeout)):
        text = str(exc) if "within" in str(exc) else f"no answer within {timeout:g}s"
        return f"timeout: {text}"
    if isinstance(exc, http.client.HTTPException):
        return f"not an HTTP answer ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"[:300]


def _retryable(outcome: Outcome) -> bool:
    if outcome.final:
        return False
    return outcome.status is None or outcome.status == 429 or outcome.status >= 500


class Courier:
    """Delivers one job's callbacks in order, on its own thread, off the job's path.

    Progress is coalesced by (stage, source): a newer event replaces the one still waiting,
    so the buffer holds at most one event per source and stage, and the last one - a
    source's 1.0, matching's final matched_count - is never the one dropped. The terminal
    callback goes last, after every progress event queued before it, exactly once. Once a
    progress POST fails the receiver is presumed unwell and the remaining progress is
    dropped, so a hanging receiver cannot hold back the terminal callback for long.
    """

    MAX_PENDING = 32

    def __init__(self, sender: CallbackSender, run_id: str,
                 on_delivery: Callable[[Outcome], None] | None = None):
        self.sender = sender
        self.run_id = run_id
        self.on_delivery = on_delivery or (lambda outcome: None)
        self._pending: OrderedDict[tuple, dict] = OrderedDict()
        self._terminal: tuple[str, dict] | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"courier-{run_id[:8]}",
                                        daemon=True)
        self._started = False
        self.done = threading.Event()

    def progress(self, body: dict) -> None:
        with self._cond:
            if self._closed:
                return
            key = (body.get("stage"), body.get("source"))
            self._pending.pop(key, None)
            self._pending[key] = body
            while len(self._pending) > self.MAX_PENDING:
                self._pending.popitem(last=False)
            self._start_locked()

    def finish(self, kind: str, body: dict) -> None:
        """Queue the terminal callback (complete or error); later calls are ignored."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._terminal = (kind, body)
            self._start_locked()

    def abandon(self) -> None:
        """Drop what is waiting and send no terminal callback (the job will run again)."""
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify()
        if not self._started:
            self.done.set()

    def _start_locked(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()
        self._cond.notify()

    def _next(self) -> tuple[str, dict] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._pending:
                return "progress", self._pending.popitem(last=False)[1]
            terminal, self._terminal = self._terminal, None
            return terminal

    def _run(self) -> None:
        try:
            while (item := self._next()) is not None:
                try:
                    outcome = self.sender.send(*item)
                except Exception as exc:  # a bug; the outcome must still be recorded
                    log.exception("sending a %s callback failed", item[0])
                    outcome = Outcome(item[0], False, 1, None, f"internal error: {exc!r}"[:300])
                if item[0] == "progress" and not outcome.delivered:
                    with self._cond:
                        self._pending.clear()
                try:
                    self.on_delivery(outcome)
                except Exception:  # bookkeeping must not stop delivery
                    log.exception("recording a %s callback outcome failed", item[0])
                if item[0] != "progress":
                    return
        finally:
            self.done.set()
