"""Helpers of the adversarial suite: job bodies, a server harness, hostile peers, checks.

Plain classes and functions (fixtures are in conftest.py); tests import them as
``security.hostile``.
"""
from __future__ import annotations

import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path

from service.conftest import Listener, Server, is_terminal  # noqa: F401 (re-exported)
from support import wait_until  # noqa: F401 (re-exported)


class JobMaker:
    """JobRequest bodies whose sources live in the data root; each run writes under
    ``out/<run_id>`` (relative to KALLA_OUTPUT_ROOT when the server has one)."""

    def __init__(self, data_root: Path, out_root: Path, callback_url: str, relative: bool):
        self.data_root, self.out_root = data_root, out_root
        self.callback_url, self.relative = callback_url, relative

    def make(self, kind: str = "ok", **overrides) -> dict:
        run_id = str(uuid.uuid4())
        names = {"ok": ("left.csv", "right.csv"), "slow": ("slow_l.csv", "slow_r.csv"),
                 "medium": ("medium_l.csv", "medium_r.csv")}[kind]
        on = "l.id = r.ref" if kind == "ok" else "l.g = r.g"
        job = {"run_id": run_id, "callback_url": self.callback_url,
               "match_sql": f"SELECT l.id, r.pid FROM l JOIN r ON {on}",
               "sources": [{"alias": "l", "uri": str(self.data_root / names[0])},
                           {"alias": "r", "uri": str(self.data_root / names[1])}],
               "output_path": run_id if self.relative else str(self.out_root / run_id),
               "primary_keys": {"l": ["id"], "r": ["pid"]}}
        job.update(overrides)
        return job

    def output_dir(self, job: dict) -> Path:
        return self.out_root / job["output_path"]


def guard_env(data_root: Path, out_root: Path, **extra: str) -> dict:
    """Every confinement on: outputs, local sources and callback hosts."""
    return {"KALLA_OUTPUT_ROOT": str(out_root), "KALLA_DATA_ROOTS": str(data_root),
            "KALLA_CALLBACK_HOSTS": "127.0.0.1,localhost", "KALLA_QUEUE_SIZE": "256",
            **extra}


class Harness:
    """One server, its listener and a JobMaker aimed at both."""

    def __init__(self, server: Server, listener: Listener, jobs: JobMaker, out_root: Path):
        self.server, self.listener, self.jobs, self.out_root = server, listener, jobs, out_root

    def run(self, job: dict, timeout: float = 60) -> dict:
        """Submit, expect 200, return the terminal callback."""
        resp = self.server.submit(job)
        assert resp.status == 200, resp.text
        return self.listener.terminal(job["run_id"], timeout)

    def assert_serving(self) -> None:
        """The service still answers and still runs jobs correctly."""
        assert self.server.get("/health").status == 200
        final = self.run(self.jobs.make())
        assert final.get("matched_count") == 90, final


# ---------------------------------------------------------------------- hostile peers


class HangingReceiver:
    """Accepts connections and never answers (optionally trickles bytes), like a broken or
    malicious callback receiver."""

    def __init__(self, trickle: bytes = b""):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.trickle = trickle
        self.accepted = 0
        self.held: list[socket.socket] = []
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str = "/cb") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.held.append(conn)
            if self.trickle:
                threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        for byte in self.trickle:
            if self.stopped.wait(0.3):
                return
            try:
                conn.send(bytes([byte]))
            except OSError:
                return

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()
        for conn in self.held:
            conn.close()


class RawReceiver:
    """Answers every connection with fixed bytes (garbage, a redirect...) and records paths."""

    def __init__(self, answer: bytes):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        self.requests: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def url(self, path: str = "/cb") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    self.requests.append(conn.recv(65536))
                    conn.sendall(self.answer)
                    time.sleep(0.05)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------- assertions


def assert_plain_400(resp, field: str) -> None:
    """A 400 answer in plain text whose message names ``field``."""
    assert resp.status == 400, (resp.status, resp.text)
    assert resp.headers["Content-Type"].startswith("text/plain"), resp.headers["Content-Type"]
    assert field in resp.text, resp.text


def no_partial_files(directory: Path) -> list[str]:
    """Names under ``directory`` that a failed job must not leave behind."""
    if not directory.exists():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.name.startswith(".kalla-") or p.suffix in (".parquet", ".json"))


def server_traceback(server: Server) -> list[str]:
    """The exceptions of crashes or unexpected errors in the server log (the last line of
    each traceback: ``ValueError: ...``), or its error lines without one."""
    found, in_traceback = [], False
    for line in server.log().splitlines():
        if line.startswith("Traceback"):
            in_traceback = True
        elif in_traceback and not line.startswith((" ", "\t")):
            found.append(line)
            in_traceback = False
        elif re.search(r"internal error|ERROR kalla\.httpd", line):
            found.append(line)
    return found


def scratch_is_empty(server: Server) -> bool:
    work = server.root / "work"
    return not [p for p in os.listdir(work) if p.startswith("kalla-")]


def free_port_closed() -> int:
    """A local port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Proxy:
    """A TCP proxy to ``target`` that can throttle, stall (keep connections, pass nothing) or
    vanish (reset every connection and stop listening): a network path going bad."""

    def __init__(self, target: tuple[str, int], bytes_per_second: int = 0):
        self.target = target
        self.rate = bytes_per_second
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.stalled = threading.Event()
        self.gone = threading.Event()
        self.conns: list[socket.socket] = []
        self.bytes_down = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.gone.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        src.settimeout(None)
        try:
            while not self.gone.is_set():
                data = src.recv(16384 if not (down and self.rate) else max(1024, self.rate // 20))
                if not data:
                    break
                while self.stalled.is_set() and not self.gone.is_set():
                    time.sleep(0.05)
                if self.gone.is_set():
                    break
                if down and self.rate:
                    time.sleep(len(data) / self.rate)
                dst.sendall(data)
                if down:
                    self.bytes_down += len(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stall(self) -> None:
        self.stalled.set()

    def vanish(self) -> None:
        """Reset every connection and stop listening: the endpoint is gone."""
        self.gone.set()
        self.sock.close()
        with self.lock:
            for conn in self.conns:
                try:    # shutdown, not just close: a thread blocked in recv keeps it open
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()

    def close(self) -> None:
        if not self.gone.is_set():
            self.vanish()
