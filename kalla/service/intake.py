"""Connections wait here, on one selector thread, until a whole request has arrived.

The stdlib ThreadingHTTPServer gives every accepted connection a thread, which then blocks
reading the request: a client that sends its request slowly (slowloris) holds a thread,
and a few dozen such clients hold them all. Here an accepted connection only costs a
buffer until its request head and body are complete; then one of at most MAX_THREADS
handler threads answers it and hands the connection back for its next request.

- Each connection has KALLA_READ_TIMEOUT seconds to deliver a request; a connection that
  misses it gets 408 (only when it has started a request, or has not sent one yet: on an
  idle keep-alive connection a client would read the 408 as the answer to its next request)
  and is closed.
- At most ``limit`` connections wait; a new one beyond that evicts the one waiting longest.
  Together they may buffer MAX_BUFFERED bytes (or four request bodies, if more); beyond
  that the connection holding the most is dropped, so slow bodies cannot exhaust memory.
- ``GET /health`` is answered right here, so health checks stay fast while every handler
  thread is busy.
- A request whose body the handler must decide on first (``Expect: 100-continue``, a body
  over the cap, chunked encoding, a bad Content-Length) goes to a handler as soon as its
  head is complete; the handler reads or refuses the body itself, then closes.
"""
from __future__ import annotations

import email.utils
import http.client
import io
import logging
import queue
import resource
import selectors
import socket
import threading
import time
from collections import deque
from typing import Callable

log = logging.getLogger("kalla.httpd")

MAX_THREADS = 64          # handler threads; requests beyond them wait in a queue
MAX_WAITING = 256         # complete requests waiting for a handler thread before 503
MAX_CONNECTIONS = 1024    # connections waiting for (the rest of) a request
MAX_HEAD_BYTES = 65536    # request line and headers
MAX_BUFFERED = 64 << 20   # bytes all connections may have buffered together
RECV_BYTES = 65536

BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
                 b"Retry-After: 1\r\nContent-Length: 12\r\nConnection: close\r\n\r\nserver busy\n")
TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    b"Content-Length: 28\r\nConnection: close\r\n\r\nrequest not received in time\n")
INCOMPLETE_RESPONSE = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                       b"Content-Length: 50\r\nConnection: close\r\n\r\n"
                       b"request: the client closed it before it was whole\n")
HEAD_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; "
                  b"charset=utf-8\r\nContent-Length: 37\r\nConnection: close\r\n\r\n"
                  b"request line and headers over 64 KiB\n")


class Budget:
    """Bytes buffered by every connection together, waiting or queued for a handler."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def charge(self, size: int) -> None:
        with self._lock:
            self.used += size

    @property
    def exceeded(self) -> bool:
        return self.used > self.limit


class Connection:
    """An accepted socket and the bytes received on it that no request has consumed yet."""

    __slots__ = ("sock", "address", "buffer", "deadline", "answered", "request", "budget")
    # request: the head parsed so far (its body still arriving), then the request handed
    # to a handler thread

    def __init__(self, sock: socket.socket, address, budget: Budget | None = None):
        self.sock = sock
        self.address = address
        self.buffer = bytearray()
        self.deadline = 0.0        # monotonic: the current request must have arrived by then
        self.answered = 0          # requests answered on this connection so far
        self.request: Request | None = None
        self.budget = budget or Budget(1 << 62)

    def receive(self, data: bytes) -> None:
        self.buffer += data
        self.budget.charge(len(data))

    def take(self, size: int) -> bytes:
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        self.budget.charge(-len(data))
        return data

    def send_now(self, data: bytes) -> bool:
        """Send without blocking; False unless every byte went out."""
        try:
            return self.sock.send(data, socket.MSG_DONTWAIT) == len(data)
        except OSError:
            return False

    def close(self) -> None:
        self.budget.charge(-len(self.buffer))
        self.buffer.clear()
        try:
            self.sock.close()
        except OSError:
            pass


class Request:
    """What the intake knows of a request from its head: how many bytes to buffer before a
    handler takes it (``size``), and whether that is all of it (``complete``; when not,
    the handler reads or refuses the body itself)."""

    def __init__(self, size: int, complete: bool, method: bytes, path: bytes, close: bool):
        self.size, self.complete = size, complete
        self.method, self.path, self.close = method, path, close

    @property
    def is_health(self) -> bool:
        path = self.path.split(b"?", 1)[0].rstrip(b"/")
        return self.complete and self.method in (b"GET", b"HEAD") and path == b"/health"


def find_request(buffer: bytearray, max_body: int) -> Request | None | bool:
    """The first request in ``buffer`` once its head is there: a Request, None while the
    head is incomplete, or False when the head is over MAX_HEAD_BYTES.

    >>> find_request(bytearray(b"POST /api/jobs HTTP/1.1\\r\\nContent-Length: 2\\r\\n\\r\\n{"), 10).size
    48
    >>> find_request(bytearray(b"POST /api/jobs HTTP/1.1\\r\\nContent-Len"), 10) is None
    True
    """
    end = _head_end(buffer)
    if end < 0:
        return False if len(buffer) > MAX_HEAD_BYTES else None
    head = bytes(buffer[:end])
    line, _, rest = head.partition(b"\n")
    words = line.split()
    method, path = (words + [b"", b""])[:2]
    version = words[2] if len(words) > 2 else b"HTTP/0.9"
    try:
        # the very parser BaseHTTPRequestHandler uses, so both agree on the body's length
        headers = http.client.parse_headers(io.BytesIO(rest))
    except (http.client.HTTPException, ValueError):
        return Request(end, False, method, path, True)     # the handler answers 400
    connection = (headers.get("Connection") or "").lower()
    close = "close" in connection or version == b"HTTP/1.0" and "keep-alive" not in connection
    length = headers.get("Content-Length")
    if "Transfer-Encoding" in headers or "Expect" in headers:
        return Request(end, False, method, path, True)
    if length is None:
        return Request(end, True, method, path, close)
    if not length.isdigit() or int(length) > max_body:
        return Request(end, False, method, path, True)     # the handler answers 400 or 413
    return Request(end + int(length), True, method, path, close)


def _head_end(buffer: bytearray) -> int:
    """Index just past the blank line ending the head, or -1 (CRLF or bare LF lines)."""
    limit = MAX_HEAD_BYTES + 4          # a body can be large: never scan past the head
    ends = [i + n for i, n in ((buffer.find(b"\r\n\r\n", 0, limit), 4),
                               (buffer.find(b"\n\n", 0, limit), 2)) if i >= 0]
    return min(ends) if ends else -1


def health_response(head_only: bool, close: bool) -> bytes:
    lines = [b"HTTP/1.1 200 OK", b"Server: kalla",
             b"Date: " + email.utils.formatdate(usegmt=True).encode(),
             b"Content-Type: text/plain; charset=utf-8", b"Content-Length: 3"]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head_only else b"ok\n")


class HandlerPool:
    """At most ``limit`` threads running ``handle(item)``; they start as work arrives."""

    def __init__(self, handle: Callable, limit: int = MAX_THREADS, waiting: int = MAX_WAITING):
        self.handle = handle
        self.limit = limit
        self.items: queue.Queue = queue.Queue(waiting)
        self.threads = 0
        self.idle = 0
        self.lock = threading.Lock()

    def submit(self, item) -> bool:
        """Queue an item; False when the queue is full."""
        try:
            self.items.put_nowait(item)
        except queue.Full:
            return False
        with self.lock:
            if self.idle == 0 and self.threads < self.limit:
                self.threads += 1
                threading.Thread(target=self._run, name=f"http-{self.threads}",
                                 daemon=True).start()
        return True

    def _run(self) -> None:
        while True:
            with self.lock:
                self.idle += 1
            item = self.items.get()
            with self.lock:
                self.idle -= 1
            try:
                self.handle(item)
            except Exception:  # the handler reports its own errors; this is a bug
                log.exception("request handling failed")


class Intake:
    """The selector thread: buffers requests, enforces read deadlines, answers /health."""

    CHECK_EVERY = 0.1     # seconds between two sweeps for missed deadlines

    def __init__(self, dispatch: Callable[[Connection], bool], timeout: float,
                 max_body: int, limit: int | None = None):
        self.dispatch = dispatch          # False: no handler could take it (busy)
        self.timeout = timeout
        self.max_body = max_body
        self.limit = limit or connection_limit()
        self.budget = Budget(max(MAX_BUFFERED, 4 * (max_body + MAX_HEAD_BYTES)))
        self.selector = selectors.DefaultSelector()
        self.waiting: dict[socket.socket, Connection] = {}
        self.arrivals: deque[Connection] = deque()
        self._next_sweep = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ)
        threading.Thread(target=self._run, name="http-intake", daemon=True).start()

    # ------------------------------------------------------------------ other threads
    def add(self, conn: Connection) -> None:
        """A new connection, or one a handler has answered and kept open."""
        self.arrivals.append(conn)
        try:
            self._wake_w.send(b"w")
        except OSError:
            pass          # the intake is already due to wake

    # ------------------------------------------------------------------ the intake thread
    def _run(self) -> None:
        while True:
            for key, _ in self.selector.select(self._next_wait()):
                if key.fileobj is self._wake_r:
                    self._drain_wake()
                elif (conn := self.waiting.get(key.fileobj)) is not None:
                    self._guarded(self._receive, conn)
            while self.arrivals:
                self._guarded(self._admit, self.arrivals.popleft())
            self._expire()

    def _guarded(self, step: Callable[[Connection], None], conn: Connection) -> None:
        """One connection's step; a bug it hits drops that connection, not the intake."""
        try:
            step(conn)
        except Exception:
            log.exception("dropping a connection from %s", conn.address[0])
            self._drop(conn)

    def _next_wait(self) -> float | None:
        return self.CHECK_EVERY if self.waiting and self.timeout > 0 else None

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _admit(self, conn: Connection) -> None:
        conn.deadline = time.monotonic() + self.timeout
        if len(self.waiting) >= self.limit:
            oldest = min(self.waiting.values(), key=lambda c: c.deadline)
            self._drop(oldest, BUSY_RESPONSE)
        try:
            conn.sock.setblocking(False)
            self.selector.register(conn.sock, selectors.EVENT_READ)
        except (OSError, ValueError):
            conn.close()
            return
        self.waiting[conn.sock] = conn
        self._process(conn)           # a pipelined request may be buffered already

    def _receive(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:            # the client closed (its sending side)
            self._drop(conn, INCOMPLETE_RESPONSE if conn.buffer else None)
            return
        conn.receive(data)
        if self.budget.exceeded:
            largest = max(self.waiting.values(), key=lambda c: len(c.buffer))
            self._drop(largest, BUSY_RESPONSE)
        self._process(conn)

    def _process(self, conn: Connection) -> None:
        while conn.sock in self.waiting:
            request = conn.request or find_request(conn.buffer, self.max_body)
            if request is None:
                return
            if request is False:
                self._drop(conn, HEAD_TOO_LARGE)
                return
            if len(conn.buffer) < request.size:
                conn.request = request       # parse the head once; wait for the body
                return
            conn.request = None
            if request.is_health:
                conn.take(request.size)
                conn.answered += 1
                if not conn.send_now(health_response(request.method == b"HEAD", request.close)) \
                        or request.close:
                    self._drop(conn)
                else:
                    conn.deadline = time.monotonic() + self.timeout
                continue
            self._release(conn)
            conn.request = request
            if not self.dispatch(conn):
                conn.send_now(BUSY_RESPONSE)
                conn.close()
            return

    def _expire(self) -> None:
        now = time.monotonic()
        if self.timeout <= 0 or now < self._next_sweep:
            return
        self._next_sweep = now + self.CHECK_EVERY
        for conn in [c for c in self.waiting.values() if c.deadline <= now]:
            # A 408 only where a request was started or none was sent yet (see above).
            self._drop(conn, TIMEOUT_RESPONSE if conn.buffer or not conn.answered else None)

    def _release(self, conn: Connection) -> None:
        self.waiting.pop(conn.sock, None)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _drop(self, conn: Connection, answer: bytes | None = None) -> None:
        self._release(conn)
        if answer:
            conn.send_now(answer)
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        conn.close()


def connection_limit() -> int:
    """MAX_CONNECTIONS, or fewer when the open-files limit could not hold them."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft // 2 - 64))
