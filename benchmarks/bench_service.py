"""Service benchmark: API latency while jobs run, and how fast an idle queue starts a job.

    .venv/bin/python benchmarks/bench_service.py [--duration 10] [--json results.json]

Starts a real `kalla serve` (2 workers) on a free port with its own temporary state, and
measures, on this machine:

1. submit -> start on an idle queue: POST /api/jobs until the job's `started_at` (the moment
   the supervisor handed it to a worker) and until its first progress callback arrives;
2. `GET /health` and `POST /api/jobs` latency (p50/p99) under a steady load sent from a second
   process (this script with --load), first with nothing running, then while two jobs run
   (CPU-bound cross-product matches that keep both workers busy; cancelled afterwards).

Every request targets 127.0.0.1 only; the load is bounded in rate and duration.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() \
    else sys.executable
SLOW_ROWS = 12000           # 144M matched rows: far longer than the measurement


# ---------------------------------------------------------------------- helpers

def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile.

    >>> percentile([1, 2, 3, 4], 0.5), percentile([1, 2, 3, 4], 0.99)
    (2, 4)
    """
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(round(q * len(ordered) + 0.5)) - 1))]


def summary_ms(values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 0.50), 2),
            "p99_ms": round(percentile(ms, 0.99), 2), "max_ms": round(max(ms), 2)}


def request(port: int, method: str, path: str, body: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body,
                     headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Listener:
    """Callback receiver recording the arrival time of each run's first callback."""

    def __init__(self):
        self.first: dict[str, float] = {}
        self.terminal: dict[str, float] = {}
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                now = time.time()
                listener.first.setdefault(body["run_id"], now)
                if "error" in body or "unmatched_left_count" in body:
                    listener.terminal[body["run_id"]] = now
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/cb"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def write_inputs(root: Path) -> dict:
    def csv(name, header, rows):
        path = root / name
        with open(path, "w") as fh:
            fh.write(header + "\n")
            fh.writelines(rows)
        return str(path)

    return {"left": csv("l.csv", "id,amount", (f"{i},{i}.5\n" for i in range(100))),
            "right": csv("r.csv", "pid,ref,paid", (f"{i},{i},{i}.5\n" for i in range(100))),
            "slow_left": csv("sl.csv", "id,g", (f"{i},1\n" for i in range(SLOW_ROWS))),
            "slow_right": csv("sr.csv", "pid,g", (f"{i},1\n" for i in range(SLOW_ROWS)))}


def job(inputs: dict, out: Path, callback: str, slow: bool = False) -> dict:
    run_id = str(uuid.uuid4())
    prefix = "slow_" if slow else ""
    on = "l.g = r.g" if slow else "l.id = r.ref"
    return {"run_id": run_id, "callback_url": callback, "output_path": str(out / run_id),
            "match_sql": f"SELECT l.id, r.pid FROM l JOIN r ON {on}",
            "sources": [{"alias": "l", "uri": inputs[prefix + "left"]},
                        {"alias": "r", "uri": inputs[prefix + "right"]}],
            "primary_keys": {"l": ["id"], "r": ["pid"]}}


# ---------------------------------------------------------------------- the server

def start_server(root: Path) -> tuple[subprocess.Popen, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KALLA_")}
    env.update({"KALLA_BIND": "127.0.0.1:0", "KALLA_WORKERS": "2", "KALLA_QUEUE_SIZE": "100000",
                "KALLA_STATE_DIR": os.environ.get("BENCH_STATE_DIR") or str(root / "state"), "KALLA_WORK_DIR": str(root / "work"),
                "KALLA_WORKER_MEMORY": "1GiB", "KALLA_LOG_LEVEL": "INFO",
                "PYTHONPATH": str(REPO)})
    (root / "work").mkdir()
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([PYTHON, "-m", "kalla", "serve"], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    port = None
    while time.monotonic() < deadline:
        text = (root / "server.log").read_text()
        if port is None and "listening on" in text:
            port = int(text.split("listening on http://127.0.0.1:")[1].split()[0])
        if port and request(port, "GET", "/ready")[0] == 200:
            return proc, port
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"server did not become ready:\n{(root / 'server.log').read_text()}")


def started_at(port: int, run_id: str) -> float | None:
    status, body = request(port, "GET", f"/api/jobs/{run_id}")
    value = json.loads(body).get("started_at") if status == 200 else None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def queue_empty(port: int) -> bool | None:
    for status in ("queued", "running"):
        if json.loads(request(port, "GET", f"/api/jobs?status={status}&limit=1")[1])["jobs"]:
            return None
    return True


def wait(predicate, timeout: float = 60, tick: float = 0.01):
    deadline = time.monotonic() + timeout
    while (value := predicate()) is None:
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(tick)
    return value


def measure_start(port, inputs, out, listener, rounds: int) -> dict:
    """Submit -> dispatched to a worker, and submit -> first progress callback, idle queue."""
    dispatch, first = [], []
    for _ in range(rounds):
        body = job(inputs, out, listener.url)
        sent = time.time()
        assert request(port, "POST", "/api/jobs", json.dumps(body).encode())[0] == 200
        dispatch.append(wait(lambda: started_at(port, body["run_id"])) - sent)
        first.append(wait(lambda: listener.first.get(body["run_id"])) - sent)
        wait(lambda: listener.terminal.get(body["run_id"]))
    return {"submit_to_worker_start": summary_ms(dispatch),
            "submit_to_first_progress_callback": summary_ms(first)}


def run_load(port: int, inputs_file: str, out: Path, callback: str, duration: float) -> dict:
    """Run the load generator in a second process and return its latencies."""
    result = subprocess.run([PYTHON, __file__, "--load", str(port), "--inputs", inputs_file,
                             "--out", str(out), "--callback", callback,
                             "--duration", str(duration)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


# ---------------------------------------------------------------------- the load process

def load(port: int, inputs: dict, out: Path, callback: str, duration: float) -> dict:
    """Steady load: GET /health at 50/s and POST /api/jobs at 10/s, for `duration` seconds."""
    results = {"health": [], "submit": []}

    def paced(name: str, rate: float, send) -> None:
        interval, start = 1 / rate, time.monotonic()
        n = 0
        while time.monotonic() - start < duration:
            t0 = time.perf_counter()
            status = send()
            results[name].append(time.perf_counter() - t0)
            assert status == 200, (name, status)
            n += 1
            time.sleep(max(0.0, start + n * interval - time.monotonic()))

    def health():
        return request(port, "GET", "/health")[0]

    def submit():
        return request(port, "POST", "/api/jobs", json.dumps(job(inputs, out, callback)).encode())[0]

    threads = [threading.Thread(target=paced, args=("health", 50, health)),
               threading.Thread(target=paced, args=("submit", 10, submit))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"health": summary_ms(results["health"]), "submit": summary_ms(results["submit"])}


# ---------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per phase")
    parser.add_argument("--rounds", type=int, default=30, help="idle-queue submissions")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--load", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--callback", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        inputs = json.loads(Path(args.inputs).read_text())
        print(json.dumps(load(args.load, inputs, Path(args.out), args.callback, args.duration)))
        return 0
    results = benchmark(args.duration, args.rounds)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def benchmark(duration: float, rounds: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="kalla-bench-"))
    proc = None
    try:
        inputs = write_inputs(root)
        inputs_file = root / "inputs.json"
        inputs_file.write_text(json.dumps(inputs))
        out, listener = root / "out", Listener()
        proc, port = start_server(root)
        results = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                   "idle_queue": measure_start(port, inputs, out, listener, rounds)}
        results["load_idle"] = run_load(port, str(inputs_file), out, listener.url, duration)
        wait(lambda: queue_empty(port), 120, 0.2)     # the load's jobs have run
        slow = [job(inputs, out, listener.url, slow=True) for _ in range(2)]
        for body in slow:
            request(port, "POST", "/api/jobs", json.dumps(body).encode())
        for body in slow:
            wait(lambda: started_at(port, body["run_id"]))
        results["load_two_jobs_running"] = run_load(port, str(inputs_file), out, listener.url,
                                                    duration)
        busy = [json.loads(request(port, "GET", f"/api/jobs/{b['run_id']}")[1])["status"]
                for b in slow]
        results["load_two_jobs_running"]["slow_jobs_still_running"] = busy == ["running"] * 2
        for body in slow:
            request(port, "DELETE", f"/api/jobs/{body['run_id']}")
        return results
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGTERM)      # second signal: stop now, leave the queue
            proc.wait(60)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
