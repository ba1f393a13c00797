"""Constants and small helpers shared by the test modules (import as `support`)."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KALLA_RUN = os.path.join(ROOT, "bin", "kalla-run")
PYTHON = sys.executable

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class CallbackListener:
    """A real local HTTP server recording every callback POST (path and JSON body)."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.lock = threading.Condition()     # also signalled on every callback
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with listener.lock:
                    listener.calls.append((self.path, json.loads(body)))
                    listener.lock.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/callback"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self) -> list[dict]:
        with self.lock:
            return [body for _, body in self.calls]

    def terminal(self, run_id: str, timeout: float = 120) -> dict:
        """Wait for the completion or error callback of run_id."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                for body in (body for _, body in self.calls):
                    if body.get("run_id") == run_id and is_terminal(body):
                        return body
                assert self.lock.wait(max(0.0, deadline - time.monotonic())), self.calls
                assert time.monotonic() < deadline

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll predicate until it is true or timeout seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def is_terminal(body: dict) -> bool:
    """A completion (counts, no stage) or an error callback."""
    return "error" in body or ("unmatched_left_count" in body and "stage" not in body)
