"""The HTTP API: routes, plain-text errors, body cap, read deadlines, bearer token.

A stdlib ThreadingHTTPServer with two limits the stdlib lacks: at most MAX_THREADS
handler threads (beyond that a connection gets an immediate 503), and a whole-request read
deadline (KALLA_READ_TIMEOUT) enforced by one watchdog thread - a per-recv socket timeout
alone lets a client that sends one byte every few seconds hold a thread forever.
Errors are KallaErrors; their `status` becomes the HTTP status here and nowhere else.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import re
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import orjson

from ..errors import InvalidInput, KallaError
from ..jobs import parse_job
from .journal import JobStatus

log = logging.getLogger("kalla.httpd")

MAX_THREADS = 64
MAX_DISCARD = 16 << 20      # bytes of a refused body read and dropped before closing
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
                 b"Retry-After: 1\r\nContent-Length: 12\r\nConnection: close\r\n\r\nserver busy\n")
TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    b"Content-Length: 28\r\nConnection: close\r\n\r\nrequest not received in time\n")


class HttpError(KallaError):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class ReadDeadlines:
    """Shuts down connections whose request has not fully arrived within the timeout."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._armed: dict[socket.socket, tuple[float, bool]] = {}
        self._expired: set[socket.socket] = set()
        self._lock = threading.Lock()
        if timeout > 0:
            threading.Thread(target=self._watch, name="read-deadlines", daemon=True).start()

    def arm(self, sock: socket.socket, first_request: bool) -> None:
        if self.timeout > 0:
            with self._lock:
                self._armed[sock] = (time.monotonic() + self.timeout, first_request)

    def disarm(self, sock: socket.socket) -> bool:
        """Stop watching; False if the deadline already passed (the socket is shut down)."""
        with self._lock:
            self._armed.pop(sock, None)
            if sock in self._expired:
                self._expired.discard(sock)
                return False
            return True

    def _watch(self) -> None:
        tick = min(0.25, self.timeout / 4)
        while True:
            time.sleep(tick)
            now = time.monotonic()
            with self._lock:
                for sock, (deadline, first) in list(self._armed.items()):
                    if now >= deadline:
                        del self._armed[sock]
                        self._expired.add(sock)
                        self._expire(sock, first)

    @staticmethod
    def _expire(sock: socket.socket, first_request: bool) -> None:
        try:
            # Only a connection's first request gets a 408: on an idle keep-alive connection
            # a client would read it as the answer to the request it sends next.
            if first_request:
                sock.send(TIMEOUT_RESPONSE, socket.MSG_DONTWAIT)
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, bind: tuple[str, int], service, settings):
        self.service = service
        self.settings = settings
        self.slots = threading.BoundedSemaphore(MAX_THREADS)
        self.deadlines = ReadDeadlines(settings.read_timeout)
        self.address_family = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET
        super().__init__(bind, Handler)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                request.send(BUSY_RESPONSE, socket.MSG_DONTWAIT)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address) -> None:
        log.exception("connection from %s failed", client_address[0])


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def version_string(self) -> str:
        return "kalla"

    def setup(self) -> None:
        # A per-recv timeout only as a backstop, later than the watchdog's deadline so that
        # a slow client gets the watchdog's 408 rather than a silent close.
        read_timeout = self.server.settings.read_timeout
        self.timeout = read_timeout + 5 if read_timeout else None
        super().setup()
        self.requests_seen = 0

    def handle_one_request(self) -> None:
        self.server.deadlines.arm(self.connection, first_request=self.requests_seen == 0)
        self.requests_seen += 1
        try:
            super().handle_one_request()
        finally:
            self.server.deadlines.disarm(self.connection)

    # every method goes through one router, so a wrong one gets 405 rather than 501
    def do_GET(self): self.dispatch()
    do_POST = do_DELETE = do_PUT = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def dispatch(self) -> None:
        try:
            self.route()
        except KallaError as exc:
            self.reply_error(exc)
            self.discard_unread_body()
        except (ConnectionError, TimeoutError):
            self.close_connection = True       # the client left, or its deadline passed
        except Exception:
            log.exception("%s %s failed", self.command, self.path)
            self.close_connection = True
            self.reply_text(500, "internal error; see the server log")

    def route(self) -> None:
        self.body = None
        path = urlsplit(self.path).path.rstrip("/") or "/"
        if path.startswith("/api/"):
            self.check_token()                 # before anything that reveals what exists
        handler, params = find_route(path, self.command)
        self.body = self.read_body()
        if not self.server.deadlines.disarm(self.connection):
            self.close_connection = True       # too slow: the watchdog already answered 408
            return
        handler(self, **params)

    def handle_expect_100(self) -> bool:
        # Refuse an oversized body before the client sends it, rather than after.
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.server.settings.max_body_bytes:
            self.close_connection = True
            self.reply_error(body_too_large(int(length), self.server.settings.max_body_bytes))
            return False
        return super().handle_expect_100()

    # ------------------------------------------------------------------ request
    def check_token(self) -> None:
        token = self.server.settings.api_token
        if not token:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                                 token.encode()):
            raise HttpError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                            {"WWW-Authenticate": 'Bearer realm="kalla"'})

    def read_body(self) -> bytes:
        if "Transfer-Encoding" in self.headers:
            self.close_connection = True
            raise HttpError(411, "chunked request bodies are not supported; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            if self.command == "POST":
                raise HttpError(411, "Content-Length is required")
            return b""
        if not length.isdigit():
            self.close_connection = True
            raise HttpError(400, f"Content-Length: not a number: {length[:32]!r}")
        size, cap = int(length), self.server.settings.max_body_bytes
        if size > cap:
            self.close_connection = True       # the unread body would poison the connection
            raise body_too_large(size, cap)
        body = self.rfile.read(size)
        if len(body) < size:
            self.close_connection = True
            raise HttpError(400, f"request body: ended after {len(body)} of {size} bytes")
        return body

    def discard_unread_body(self) -> None:
        """After an error answer, read and drop a body we did not read, so that a client still
        sending it reads our answer instead of a reset; then close. Bounded in bytes here and
        in time by the read deadline."""
        length = self.headers.get("Content-Length", "")
        if self.body is not None or not length.isdigit() or int(length) == 0:
            return
        self.close_connection = True
        size = min(int(length), MAX_DISCARD)
        while size > 0 and (chunk := self.rfile.read(min(size, 65536))):
            size -= len(chunk)

    def query(self, name: str) -> str | None:
        values = parse_qs(urlsplit(self.path).query).get(name)
        return values[0] if values else None

    # ------------------------------------------------------------------ response
    def reply(self, status: int, body: bytes, content_type: str, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def reply_text(self, status: int, text: str, headers: dict | None = None) -> None:
        self.reply(status, (text + "\n").encode(), "text/plain; charset=utf-8", headers)

    def reply_json(self, status: int, value) -> None:
        self.reply(status, orjson.dumps(value), "application/json")

    def reply_error(self, exc: KallaError) -> None:
        headers = dict(getattr(exc, "headers", {}))
        if getattr(exc, "retry_after", None):
            headers["Retry-After"] = str(exc.retry_after)
        self.reply_text(exc.status, str(exc), headers)

    def send_error(self, code, message=None, explain=None) -> None:
        """The stdlib's own errors (bad request line, huge headers): plain text too."""
        self.close_connection = True
        try:
            self.reply_text(code, message or self.responses.get(code, ("error",))[0])
        except OSError:
            pass

    def log_message(self, format, *args) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def body_too_large(size: int, cap: int) -> HttpError:
    return HttpError(413, f"request body is {size} bytes; the limit is {cap} "
                          "(KALLA_MAX_BODY_BYTES)")


# ---------------------------------------------------------------------- routes

def health(handler: Handler) -> None:
    handler.reply_text(200, "ok")


def ready(handler: Handler) -> None:
    reason = handler.server.service.readiness()
    if reason is None:
        handler.reply_text(200, "ready")
    else:
        handler.reply_text(503, f"not ready: {reason}", {"Retry-After": "5"})


def metrics(handler: Handler) -> None:
    text = handler.server.service.metrics_text()
    handler.reply(200, text, "text/plain; version=0.0.4; charset=utf-8")


def submit_job(handler: Handler) -> None:
    try:
        data = orjson.loads(handler.body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput("request body", f"invalid JSON: {exc}") from None
    settings = handler.server.settings
    spec = parse_job(data, output_root=settings.output_root, data_roots=settings.data_roots)
    host = (urlsplit(spec.callback_url).hostname or "").lower()
    if settings.callback_hosts and host not in settings.callback_hosts:
        raise InvalidInput("callback_url", f"host {host!r} is not allowed (KALLA_CALLBACK_HOSTS)")
    digest = hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()
    handler.reply_json(200, handler.server.service.submit(spec, digest))


def list_jobs(handler: Handler) -> None:
    limit = handler.query("limit") or "50"
    if not limit.isdigit() or not 1 <= int(limit) <= 1000:
        raise InvalidInput("limit", "must be a whole number from 1 to 1000")
    status = handler.query("status")
    if status is not None and status not in {s.value for s in JobStatus}:
        raise InvalidInput("status", f"must be one of {', '.join(s.value for s in JobStatus)}")
    jobs = handler.server.service.book.recent(int(limit), status)
    handler.reply_json(200, {"jobs": jobs})


def job_status(handler: Handler, run_id: str) -> None:
    handler.reply_json(200, handler.server.service.book.status(run_id))


def cancel_job(handler: Handler, run_id: str) -> None:
    handler.reply_json(200, handler.server.service.cancel(run_id))


ROUTES = (
    (re.compile(r"/health"), {"GET": health, "HEAD": health}),
    (re.compile(r"/ready"), {"GET": ready, "HEAD": ready}),
    (re.compile(r"/metrics"), {"GET": metrics}),
    (re.compile(r"/api/jobs"), {"GET": list_jobs, "POST": submit_job}),
    (re.compile(r"/api/jobs/(?P<run_id>[^/]+)"), {"GET": job_status, "DELETE": cancel_job}),
)


def find_route(path: str, method: str):
    """The handler and path parameters for a request, or HttpError 404 / 405."""
    for pattern, methods in ROUTES:
        match = pattern.fullmatch(path)
        if match is None:
            continue
        if method not in methods:
            allowed = ", ".join(methods)
            raise HttpError(405, f"{method} is not allowed on {path}; use {allowed}",
                            {"Allow": allowed})
        params = match.groupdict()
        if "run_id" in params:
            params["run_id"] = canonical_run_id(params["run_id"])
        return methods[method], params
    raise HttpError(404, f"not found: {path}")


def canonical_run_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise HttpError(404, f"unknown run_id: {text[:64]}") from None
