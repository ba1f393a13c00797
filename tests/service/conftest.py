"""A real `kalla serve` subprocess and a real callback listener, for black-box service tests.

The server runs as `.venv/bin/python -m kalla serve` with its own state, work and output
directories, binds port 0 and reports readiness over a NOTIFY_SOCKET owned by the test (the
same sd_notify protocol systemd uses). The listener is a stdlib ThreadingHTTPServer that
records every callback (path, body, arrival time) and can answer with scripted statuses.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal as signals
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() \
    else sys.executable
TINY_ROWS = 100
SLOW_ROWS = 7000     # N x N matched rows: ~6 s of matching on the 2-core reference machine
MEDIUM_ROWS = 4000   # ~2 s


# ---------------------------------------------------------------------- callback listener

class Listener:
    """Records callbacks; `script` is a queue of HTTP statuses to answer (then 200)."""

    def __init__(self, port: int = 0, script=()):
        self.records: list[dict] = []
        self.script = deque(script)
        self.cond = threading.Condition()
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with listener.cond:
                    status = listener.script.popleft() if listener.script else 200
                    listener.records.append({"path": self.path, "body": body,
                                             "status": status, "at": time.monotonic()})
                    listener.cond.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, suffix: str = "/cb") -> str:
        return f"http://127.0.0.1:{self.port}{suffix}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def bodies(self, run_id: str, delivered_only: bool = True) -> list[dict]:
        with self.cond:
            return [r["body"] for r in self.records if r["body"].get("run_id") == run_id
                    and (r["status"] == 200 or not delivered_only)]

    def terminal(self, run_id: str, timeout: float = 60) -> dict:
        """Wait for the delivered terminal (complete or error) callback of a run."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [b for b in self.bodies(run_id) if is_terminal(b)]
                if found:
                    return found[-1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no terminal callback for {run_id} in {timeout}s; "
                                         f"got {self.bodies(run_id, False)}")
                self.cond.wait(left)


def is_terminal(body: dict) -> bool:
    return "error" in body or "unmatched_left_count" in body


# ---------------------------------------------------------------------- server

class Response:
    def __init__(self, status: int, headers, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self):
        return json.loads(self.body)


class Server:
    def __init__(self, root: Path, env: dict):
        self.root = root
        self.log_path = root / "server.log"
        self.notify_dir = tempfile.mkdtemp(prefix="kn")   # AF_UNIX paths are short
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(os.path.join(self.notify_dir, "s"))
        self.notices: list[str] = []
        base = {k: v for k, v in os.environ.items() if not k.startswith("KALLA_")}
        base.update({"KALLA_BIND": "127.0.0.1:0", "KALLA_WORKERS": "2",
                     "KALLA_STATE_DIR": str(root / "state"), "KALLA_WORK_DIR": str(root / "work"),
                     "KALLA_WORKER_MEMORY": "512MiB", "KALLA_PROGRESS_INTERVAL": "0.1",
                     "KALLA_LOG_LEVEL": "INFO", "PYTHONPATH": str(REPO),
                     "NOTIFY_SOCKET": self.notify.getsockname()})
        base.update(env)
        self.env = base
        (root / "work").mkdir(exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.python = PYTHON

    def start(self, wait_ready: bool = True, timeout: float = 60) -> "Server":
        self.notices.clear()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([PYTHON, "-m", "kalla", "serve"], cwd=REPO,
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_notice("READY=1", timeout)
            match = re.findall(r"listening on http://127\.0\.0\.1:(\d+)", self.log())
            self.port = int(match[-1])
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_notice(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in n for n in self.notices):
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}):\n{self.log()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {text} from the server in {timeout}s:\n{self.log()}")
            self.notify.settimeout(min(left, 0.5))
            try:
                self.notices.append(self.notify.recv(4096).decode())
            except socket.timeout:
                pass

    def request(self, method: str, path: str, body=None, headers=None, timeout=30) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return Response(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    def get(self, path: str, **kw) -> Response:
        return self.request("GET", path, **kw)

    def submit(self, job: dict, **kw) -> Response:
        return self.request("POST", "/api/jobs", body=job, **kw)

    def status(self, run_id: str) -> dict:
        resp = self.get(f"/api/jobs/{run_id}")
        assert resp.status == 200, resp.text
        return resp.json()

    def wait_status(self, run_id: str, wanted: set, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(run_id)
            if status["status"] in wanted:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"{run_id} is {status['status']}, not {wanted}")
            time.sleep(0.05)

    def wait_delivered(self, run_id: str, timeout: float = 60) -> dict:
        """The status once the terminal callback's delivery outcome is recorded."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(run_id)
            if status["callback"] and status["callback"]["state"] != "pending":
                return status
            assert time.monotonic() < deadline, status
            time.sleep(0.05)

    def wait_running(self, run_id: str, stage: str = "matching", timeout: float = 60) -> dict:
        """Wait until the job runs and has reached `stage` (a slow job's long stage)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(run_id)
            if status["status"] == "running" and status["stage"] == stage:
                return status
            assert status["status"] in ("queued", "running"), status
            assert time.monotonic() < deadline, status
            time.sleep(0.02)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.get("/metrics").text)

    def worker_pids(self) -> set[int]:
        import psutil
        return {c.pid for c in psutil.Process(self.pid).children()
                if "spawn_main" in " ".join(c.cmdline()) and c.status() != psutil.STATUS_ZOMBIE}

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, signum: int = signals.SIGTERM, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not stop within {timeout}s:\n{self.log()}")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.notify.close()
        shutil.rmtree(self.notify_dir, ignore_errors=True)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {'name{labels}': value}, labels sorted."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if "{" in key:
            name, labels = key[:-1].split("{", 1)
            parts = sorted(p for p in re.findall(r'\w+="[^"]*"', labels))
            key = name + "{" + ",".join(parts) + "}"
        out[key] = float(value)
    return out


# ---------------------------------------------------------------------- data and jobs

def write_csv(path: Path, header: str, rows) -> str:
    with open(path, "w") as fh:
        fh.write(header + "\n")
        fh.writelines(rows)
    return str(path)


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict:
    """Tiny inputs (90 of 100 rows match) and N x N cross-product inputs for slow jobs."""
    root = tmp_path_factory.mktemp("data")
    n = TINY_ROWS
    files = {
        "left": write_csv(root / "left.csv", "id,amount", (f"{i},{i * 1.5}\n" for i in range(n))),
        "right": write_csv(root / "right.csv", "pid,ref,paid",
                           (f"{1000 + i},{i if i % 10 else 999},{i * 1.5}\n" for i in range(n))),
    }
    for name, rows in (("slow", SLOW_ROWS), ("medium", MEDIUM_ROWS)):
        files[f"{name}_left"] = write_csv(root / f"{name}_l.csv", "id,g",
                                          (f"{i},1\n" for i in range(rows)))
        files[f"{name}_right"] = write_csv(root / f"{name}_r.csv", "pid,g",
                                           (f"{i},1\n" for i in range(rows)))
    return files


class Jobs:
    """Builds JobRequest bodies; every job writes under its own output directory."""

    def __init__(self, data: dict, out_root: Path, callback_url: str):
        self.data, self.out_root, self.callback_url = data, out_root, callback_url

    def make(self, kind: str = "ok", run_id: str | None = None, **overrides) -> dict:
        run_id = run_id or str(uuid.uuid4())
        d = self.data
        job = {"run_id": run_id, "callback_url": self.callback_url,
               "output_path": str(self.out_root / run_id),
               "primary_keys": {"l": ["id"], "r": ["pid"]}}
        if kind in ("ok", "fail"):
            on = "l.id = r.ref" if kind == "ok" else "l.nope = r.ref"
            job["match_sql"] = f"SELECT l.id, r.pid FROM l JOIN r ON {on}"
            job["sources"] = [{"alias": "l", "uri": d["left"]}, {"alias": "r", "uri": d["right"]}]
        else:   # slow / medium: every row of l matches every row of r
            job["match_sql"] = "SELECT l.id, r.pid FROM l JOIN r ON l.g = r.g"
            job["sources"] = [{"alias": "l", "uri": d[f"{kind}_left"]},
                              {"alias": "r", "uri": d[f"{kind}_right"]}]
        job.update(overrides)
        return job


@pytest.fixture
def listener():
    lst = Listener()
    yield lst
    lst.close()


@pytest.fixture
def make_listener():
    """Factory: make_listener(port=0, script=()) -> a started Listener."""
    made = []

    def make(port: int = 0, script=()) -> Listener:
        made.append(Listener(port, script))
        return made[-1]

    yield make
    for lst in made:
        lst.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def unused_port() -> int:
    return free_port()


@pytest.fixture
def make_server(tmp_path):
    """Factory: make_server(env) -> a started Server under this test's tmp_path."""
    servers = []

    def make(env: dict | None = None, name: str = "server", start: bool = True) -> Server:
        root = tmp_path / f"{name}{len(servers)}"
        root.mkdir()
        server = Server(root, env or {})
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def jobs(data, tmp_path, listener) -> Jobs:
    return Jobs(data, tmp_path / "out", listener.url())


@pytest.fixture(scope="module")
def shared(tmp_path_factory, data):
    """One server (2 workers) with its own listener, shared by a module's tests."""
    root = tmp_path_factory.mktemp("shared")
    lst = Listener()
    server = Server(root, {"KALLA_QUEUE_SIZE": "64", "KALLA_CALLBACK_RETRIES": "6"}).start()
    yield server, lst, Jobs(data, root / "out", lst.url())
    server.close()
    lst.close()
