"""A throwaway Ballista cluster on this host - one scheduler, one executor - for the
tests in this folder and benchmarks/bench_ballista.py.

Where it runs:
- KALLA_TEST_BALLISTA_PYTHON set: that command is a Python with ballista==54.1.0
  (a host with glibc >= 2.39); nodes and clients use this host's network.
- otherwise scripts/ballista-env.sh builds (once, cached) a Debian 13 userland and runs the
  ballista Python inside it. The nodes and every client then share a private network
  namespace: an executor always takes port 50052, so this keeps two runs on one host - or
  a real cluster on it - out of each other's way.

The nodes are started with `kalla ballista-scheduler` / `kalla ballista-executor`, the
launchers users run, and stopped by PID with SIGTERM (which the launchers pass on).
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV_SCRIPT = os.path.join(REPO, "scripts", "ballista-env.sh")
SCHEDULER_PORT = 50050
BUILD_TIMEOUT = 900           # a cold build took about 50 s here; networks vary
START_TIMEOUT = 120

# Brings up the loopback interface of a fresh network namespace, then waits to be killed:
# while it lives the namespace stays at /proc/PID/ns/net for the nodes and clients.
NETNS_HOLDER = """
import fcntl, signal, socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
fcntl.ioctl(s, 0x8914, struct.pack("16sH14s", b"lo", 0x1 | 0x8 | 0x40, b""))  # SIOCSIFFLAGS up
print("ready", flush=True)
signal.pause()
"""


class Unavailable(Exception):
    """This host cannot run a Ballista cluster; the message says why."""


@dataclass
class LocalCluster:
    shared_dir: str              # KALLA_SHARED_DIR: bound into the userland at the same path
    logs: str
    concurrent_tasks: int = 2
    url: str = f"df://127.0.0.1:{SCHEDULER_PORT}"
    description: str = ""
    wrap: list[str] = field(default_factory=list)          # enters the network namespace
    ballista_python: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def python(self) -> str:
        """KALLA_BALLISTA_PYTHON for clients of this cluster."""
        return shlex.join([*self.wrap, *self.ballista_python])

    def __enter__(self) -> "LocalCluster":
        try:
            self._prepare()
            self.procs.append(self.start_node("scheduler", "--bind", f"127.0.0.1:{SCHEDULER_PORT}"))
            self.procs.append(self.start_node(
                "executor", "--scheduler", f"127.0.0.1:{SCHEDULER_PORT}", "--bind", "127.0.0.1:50051",
                "--concurrent-tasks", str(self.concurrent_tasks)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        while self.procs:
            stop(self.procs.pop())

    def _prepare(self) -> None:
        os.makedirs(self.logs, exist_ok=True)
        native = os.environ.get("KALLA_TEST_BALLISTA_PYTHON")
        if native:
            self.ballista_python, self.description = shlex.split(native), f"native: {native}"
            return
        check = subprocess.run([ENV_SCRIPT, "check"], capture_output=True, text=True)
        if check.returncode != 0:
            raise Unavailable(check.stdout.strip() or check.stderr.strip())
        started = time.monotonic()
        build = subprocess.run([ENV_SCRIPT, "build"], capture_output=True, text=True,
                               timeout=BUILD_TIMEOUT)
        if build.returncode != 0:
            raise Unavailable(f"building the userland failed: {build.stderr.strip()[-2000:]}")
        took = time.monotonic() - started
        self.description = f"userland {build.stdout.strip()}, ready in {took:.1f} s"
        self.ballista_python = [ENV_SCRIPT, "python", "--bind", self.shared_dir, "--"]
        log = os.path.join(self.logs, "netns.log")
        holder = spawn(["unshare", "--net", "--", sys.executable, "-c", NETNS_HOLDER], log)
        self.procs.append(holder)
        wait_for(log, "ready", holder, 10)
        self.wrap = ["nsenter", f"--net=/proc/{holder.pid}/ns/net", "--"]

    def start_node(self, role: str, *args: str, log_name: str | None = None) -> subprocess.Popen:
        """`kalla ballista-<role> ARGS` in the cluster's network; returns once it listens."""
        log = os.path.join(self.logs, log_name or f"{role}.log")
        proc = spawn([*self.wrap, sys.executable, "-m", "kalla", f"ballista-{role}", *args,
                      "--ballista-python", shlex.join(self.ballista_python)], log)
        try:
            wait_for(log, "listening on", proc, START_TIMEOUT)
        except RuntimeError:
            stop(proc)
            raise
        return proc


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KALLA_")}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def spawn(argv, log_path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=clean_env(), cwd=REPO, start_new_session=True)


def wait_for(path: str, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, errors="replace") as fh:
            if text in fh.read():
                return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    with open(path, errors="replace") as fh:
        tail = fh.read()[-2000:]
    raise RuntimeError(f"{os.path.basename(path)}: no {text!r} within {timeout} s "
                       f"(exit status {proc.poll()}):\n{tail}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (a launcher passes it on to its node), then SIGKILL to the process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def route_stages_through_engines(pipeline) -> tuple:
    """run_job's stages wired to kalla/engines as kalla/pipeline.py and kalla/matching.py
    wire them (issue 10): identical in effect where those lines are in place, and local
    mode runs exactly as before. Returns the new STAGES tuple."""
    import inspect

    from kalla import matching
    from kalla.engines import check_engine, engine_name
    if hasattr(pipeline, "check_engine") and "ballista" in inspect.getsource(matching.run_match):
        return pipeline.STAGES       # wired already
    stages = dict(pipeline.STAGES)

    def staging(job):
        check_engine(job)
        stages["staging"](job)

    def matching(job):
        if engine_name(job.settings) == "ballista":
            from kalla.engines.ballista import run_match
            return run_match(job)
        return stages["matching"](job)

    def unmatched(job):
        if not job.unmatched:        # the cluster derived them already
            stages["unmatched"](job)

    patched = {"staging": staging, "matching": matching, "unmatched": unmatched}
    return tuple((name, patched.get(name, fn)) for name, fn in pipeline.STAGES)


def settings_with(settings, values: dict, setenv) -> object:
    """``settings`` plus the engine's KALLA_* values. Until kalla/config.py declares them,
    they go through the environment (``setenv(name, value)``), where kalla/engines reads them."""
    from kalla.config import SETTINGS_BY_NAME, load_settings
    if "KALLA_ENGINE" in SETTINGS_BY_NAME:
        return load_settings({**settings.to_env(), **values})
    for name, value in values.items():
        setenv(name, value)
    return settings
