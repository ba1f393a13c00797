"""The HTTP API: routes, plain-text errors, body cap, read deadlines, bearer token.

A stdlib HTTPServer whose connections wait in the intake (intake.py) until their request has
fully arrived, and are then answered by one of at most MAX_THREADS handler threads: a slow
client costs a buffer, never a thread, and /health is answered even when every thread is
busy. Handler threads read only buffered bytes, except for a body the client sends after
``100 Continue``; that read, and every response write, has a deadline (KALLA_READ_TIMEOUT).
Errors are KallaErrors; their `status` becomes the HTTP status here and nowhere else.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import logging
import re
import socket
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlsplit

import orjson

from ..callbacks import url_problem
from ..errors import InvalidInput, KallaError
from ..jobs import parse_job
from .intake import MAX_THREADS, Connection, HandlerPool, Intake
from .jobqueue import one_line
from .journal import JobStatus

log = logging.getLogger("kalla.httpd")

MAX_DISCARD = 16 << 20      # bytes of a refused body read and dropped before closing
WRITE_CHUNK = 65536


class HttpError(KallaError):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class ReadTimeout(TimeoutError):
    """The rest of a request did not arrive by its deadline."""


class SocketReader(io.RawIOBase):
    """The bytes the intake buffered, then the socket, each recv bounded by one deadline."""

    def __init__(self, buffered: bytes, sock: socket.socket, deadline: float | None):
        self.buffered = memoryview(buffered)
        self.sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        if self.buffered:
            n = min(len(target), len(self.buffered))
            target[:n] = self.buffered[:n]
            self.buffered = self.buffered[n:]
            return n
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise ReadTimeout("request not received in time")
            self.sock.settimeout(left)
        try:
            return self.sock.recv_into(target)
        except socket.timeout:
            raise ReadTimeout("request not received in time") from None


class SocketWriter:
    """sendall with a deadline per write: a client that does not read cannot hold a thread."""

    def __init__(self, sock: socket.socket, timeout: float):
        self.sock = sock
        self.timeout = timeout
        self.closed = False

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        deadline = time.monotonic() + self.timeout if self.timeout > 0 else None
        while view:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the client did not take the response in time")
                self.sock.settimeout(left)
            sent = self.sock.send(view[:WRITE_CHUNK])
            view = view[sent:]
        return len(data)

    def flush(self) -> None:
        pass


class ApiServer(HTTPServer):
    request_queue_size = 1024     # listen backlog: a burst of connections waits in the kernel

    def __init__(self, bind: tuple[str, int], service, settings):
        self.service = service
        self.settings = settings
        self.address_family = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET
        super().__init__(bind, Handler)
        self.pool = HandlerPool(self.answer, MAX_THREADS)
        self.intake = Intake(self.pool.submit, settings.read_timeout, settings.max_body_bytes)

    def process_request(self, request, client_address) -> None:
        self.intake.add(Connection(request, client_address, self.intake.budget))

    def answer(self, conn: Connection) -> None:
        """On a handler thread: answer the request the intake buffered, then hand the
        connection back to the intake for the next one, or close it."""
        try:
            handler = self.RequestHandlerClass(conn, conn.address, self)
            keep = not handler.close_connection and conn.request.complete
        except Exception:  # the handler answers its own errors; this is a bug or a reset
            log.debug("connection from %s failed", conn.address[0], exc_info=True)
            keep = False
        if keep:
            conn.answered += 1
            conn.request = None
            self.intake.add(conn)
        else:
            conn.close()

    def handle_error(self, request, client_address) -> None:
        log.exception("connection from %s failed", client_address[0])


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def version_string(self) -> str:
        return "kalla"

    def setup(self) -> None:
        conn: Connection = self.request
        self.conn = conn
        self.connection = conn.sock
        conn.sock.setblocking(True)
        head = conn.take(conn.request.size)
        timeout = self.server.settings.read_timeout
        if conn.request.complete:          # every byte is buffered: no socket read at all
            self.rfile = io.BytesIO(head)
        else:                              # the body follows (100-continue) or is refused
            deadline = conn.deadline if timeout > 0 else None
            self.rfile = io.BufferedReader(SocketReader(head, conn.sock, deadline))
        self.wfile = SocketWriter(conn.sock, timeout)
        self.close_connection = True

    def handle(self) -> None:
        self.handle_one_request()          # one request; the intake waits for the next

    def finish(self) -> None:
        pass                               # the server closes or keeps the connection

    # every method goes through one router, so a wrong one gets 405 rather than 501
    def do_GET(self): self.dispatch()
    do_POST = do_DELETE = do_PUT = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def dispatch(self) -> None:
        try:
            self.route()
        except KallaError as exc:
            self.reply_error(exc)
            self.discard_unread_body()
        except ReadTimeout:
            self.close_connection = True
            self.reply_text(408, "request not received in time")
        except (ConnectionError, TimeoutError):
            self.close_connection = True       # the client left, or did not read our answer
        except Exception:
            log.exception("%s %s failed", self.command, self.path)
            self.close_connection = True
            self.reply_text(500, "internal error; see the server log")

    def route(self) -> None:
        self.body = None
        if not self.conn.request.complete:
            self.close_connection = True       # its body was not buffered: never reuse
        path = urlsplit(self.path).path.rstrip("/") or "/"
        if path.startswith("/api/"):
            self.check_token()                 # before anything that reveals what exists
        handler, params = find_route(path, self.command)
        self.body = self.read_body()
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
        self.send_header("X-Content-Type-Options", "nosniff")    # error texts echo input
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def reply_text(self, status: int, text: str, headers: dict | None = None) -> None:
        # One line, whatever the message quotes from the request (a key with a newline...)
        self.reply(status, (one_line(text) + "\n").encode("utf-8", "backslashreplace"),
                   "text/plain; charset=utf-8", headers)

    def reply_json(self, status: int, value) -> None:
        self.reply(status, orjson.dumps(value), "application/json")

    def reply_error(self, exc: KallaError) -> None:
        headers = dict(getattr(exc, "headers", {}))
        if getattr(exc, "retry_after", None):
            headers["Retry-After"] = str(exc.retry_after)
        self.reply_text(exc.status, str(exc), headers)

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":     # no status line, no headers: refused
            self.send_error(505, "HTTP/0.9 is not supported; use HTTP/1.0 or HTTP/1.1")
            return False
        return True

    def send_error(self, code, message=None, explain=None) -> None:
        """The stdlib's own errors (bad request line, huge headers): plain text too."""
        self.close_connection = True
        # The stdlib answers an unsupported version before it has one to reply in; without
        # this the answer would be HTTP/0.9 style, a body without a status line.
        if self.request_version == "HTTP/0.9" or not hasattr(self, "request_version"):
            self.request_version = "HTTP/1.1"
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
    check_callback_url(data, settings.callback_hosts)
    spec = parse_job(data, output_root=settings.output_root, data_roots=settings.data_roots)
    digest = hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()
    handler.reply_json(200, handler.server.service.submit(spec, digest))


def check_callback_url(data, allowed_hosts) -> None:
    """The service POSTs to callback_url, so it checks it first: scheme, host, no
    credentials or control characters, and KALLA_CALLBACK_HOSTS."""
    url = data.get("callback_url") if isinstance(data, dict) else None
    if isinstance(url, str):
        problem = url_problem(url, allowed_hosts)
        if problem is not None:
            raise InvalidInput("callback_url", problem)


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
