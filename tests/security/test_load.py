"""Many clients and slow clients against the HTTP front end, on loopback: handler threads stay
bounded, slow requests are cut off at KALLA_READ_TIMEOUT, and /health stays fast throughout
(its latency is measured during each attack)."""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
import statistics
import threading
import time

import psutil
import pytest

from security.hostile import wait_until

READ_TIMEOUT = 3.0
MAX_HANDLER_THREADS = 64          # kalla.service.intake.MAX_THREADS


@pytest.fixture(scope="module")
def harness(harness_factory):
    return harness_factory({"KALLA_READ_TIMEOUT": str(READ_TIMEOUT)}, name="load")


def health_latencies(port: int, count: int, pause: float = 0.02) -> list[float]:
    """Seconds per GET /health, each on a new connection; a failure counts as 10 s."""
    out = []
    for _ in range(count):
        started = time.monotonic()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/health")
            resp = conn.getresponse()
            ok = resp.status == 200 and resp.read() == b"ok\n"
            conn.close()
        except OSError:
            ok = False
        out.append(time.monotonic() - started if ok else 10.0)
        time.sleep(pause)
    return out


def assert_fast(latencies: list[float], what: str) -> None:
    p95 = statistics.quantiles(latencies, n=20)[-1]
    assert max(latencies) < 1.0 and p95 < 0.25, (what, f"p95 {p95:.3f}s max {max(latencies):.3f}s")


def server_threads(server) -> int:
    return psutil.Process(server.pid).num_threads()


class Slowloris:
    """Connections that send a request a byte at a time, and never finish it."""

    def __init__(self, port: int, count: int, opening: bytes, interval: float = 0.5):
        self.socks: list[socket.socket] = []
        self.answers: dict[int, bytes] = {}
        self.stop = threading.Event()
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(opening)
            self.socks.append(sock)
        self.thread = threading.Thread(target=self._drip, args=(interval,), daemon=True)
        self.thread.start()

    def _drip(self, interval: float) -> None:
        while not self.stop.wait(interval):
            for i, sock in enumerate(self.socks):
                if i in self.answers:
                    continue
                try:                    # answered (or closed) already? then stop sending
                    self.answers[i] = sock.recv(4096, socket.MSG_DONTWAIT)
                    continue
                except BlockingIOError:
                    pass
                except OSError:
                    self.answers[i] = b""
                    continue
                try:
                    sock.send(b"X")
                except OSError:
                    self.answers[i] = self._read(sock)

    @staticmethod
    def _read(sock: socket.socket) -> bytes:
        try:
            sock.settimeout(0.5)
            return sock.recv(4096)
        except OSError:
            return b""

    def collect(self) -> dict[int, bytes]:
        """What each connection received once the server cut it off."""
        self.stop.set()
        self.thread.join()
        for i, sock in enumerate(self.socks):
            if i not in self.answers:
                self.answers[i] = self._read(sock)
        return self.answers

    def close(self) -> None:
        self.stop.set()
        for sock in self.socks:
            sock.close()


def test_slowloris_on_headers_and_bodies(harness):
    server = harness.server
    baseline = health_latencies(server.port, 20)
    threads_before = server_threads(server)
    attacks = [
        Slowloris(server.port, 300, b"GET /api/jobs HTTP/1.1\r\nHost: x\r\nX-a: "),
        Slowloris(server.port, 150, b"POST /api/jobs HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Length: 100000\r\n\r\n{\"run_id\": \""),
        Slowloris(server.port, 100, b"", interval=10),             # connect, send nothing
    ]
    try:
        started = time.monotonic()
        during = health_latencies(server.port, 60)
        assert time.monotonic() - started < READ_TIMEOUT + 2
        threads_during = server_threads(server)
        job = harness.jobs.make()                                  # the API works meanwhile
        assert server.submit(job).status == 200
        answers = [a.collect() for a in attacks]
        elapsed = time.monotonic() - started
    finally:
        for attack in attacks:
            attack.close()
    assert_fast(baseline, "baseline")
    assert_fast(during, "under slowloris")
    # a slow connection costs a buffer, not a thread
    assert threads_during <= threads_before + 8, (threads_before, threads_during)
    # every slow connection was cut off with a 408, at the read timeout
    for attack_answers in answers:
        cut = [a for a in attack_answers.values() if a.startswith(b"HTTP/1.1 408")]
        assert len(cut) == len(attack_answers), {a[:40] for a in attack_answers.values()}
    assert elapsed < READ_TIMEOUT + 5
    assert harness.listener.terminal(job["run_id"]).get("matched_count") == 90


def test_many_concurrent_clients(harness):
    server = harness.server
    bad_job = json.dumps({"run_id": "nope"})

    def client(i: int) -> list[int]:
        statuses = []
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        for j in range(8):                                       # keep-alive connection
            method, path, body = [("GET", "/health", None), ("GET", "/ready", None),
                                  ("GET", "/api/jobs?limit=20", None),
                                  ("POST", "/api/jobs", bad_job), ("GET", "/metrics", None),
                                  ("GET", "/nope", None)][(i + j) % 6]
            conn.request(method, path, body=body)
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
            if resp.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.close()
        return statuses

    latencies: list[float] = []
    prober = threading.Thread(target=lambda: latencies.extend(health_latencies(server.port, 40)))
    started = time.monotonic()
    prober.start()
    with concurrent.futures.ThreadPoolExecutor(200) as pool:
        results = list(pool.map(client, range(200)))
    prober.join()
    elapsed = time.monotonic() - started
    statuses = [s for r in results for s in r]
    assert len(statuses) == 1600
    assert set(statuses) <= {200, 400, 404}, sorted(set(statuses))
    assert elapsed < 30
    assert_fast(latencies, "under 200 concurrent clients")
    assert server_threads(server) <= MAX_HANDLER_THREADS + 24


def test_a_connection_flood_evicts_the_oldest_and_health_still_answers(harness):
    """More idle connections than the intake holds (1024): the oldest are dropped with 503,
    the newest - and /health - are served."""
    server = harness.server
    socks = []
    try:
        for _ in range(1100):
            socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        latencies = health_latencies(server.port, 20)
        evicted = 0
        for sock in socks[:60]:
            sock.settimeout(2)
            try:
                evicted += sock.recv(4096).startswith(b"HTTP/1.1 503")
            except OSError:
                pass
        assert evicted >= 50, evicted
    finally:
        for sock in socks:
            sock.close()
    assert_fast(latencies, "with 1100 idle connections")
    # the intake notices the closed connections: no descriptor is left behind
    assert wait_until(lambda: psutil.Process(server.pid).num_fds() < 100, READ_TIMEOUT + 3)


def test_slow_bodies_cannot_exhaust_the_services_memory(harness):
    """100 clients each send 900 KB of a 1 MB body, then stall: together they may buffer
    64 MiB at most; the connections holding the most are dropped with 503 beyond that."""
    server = harness.server
    rss_before = psutil.Process(server.pid).memory_info().rss
    chunk = b"x" * 900_000
    socks = []
    try:
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
            try:
                sock.sendall(chunk)
            except OSError:
                pass                                     # already dropped
            socks.append(sock)
        latencies = health_latencies(server.port, 20)
        grown = psutil.Process(server.pid).memory_info().rss - rss_before
        dropped = 0
        for sock in socks:
            sock.settimeout(0.2)
            try:
                dropped += sock.recv(4096).startswith(b"HTTP/1.1 503")
            except OSError:
                pass
    finally:
        for sock in socks:
            sock.close()
    assert_fast(latencies, "with 90 MB of stalled bodies")
    assert dropped >= 20, dropped
    assert grown < 120 << 20, f"the service grew by {grown >> 20} MiB"
