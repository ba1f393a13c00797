"""Worker process entry: take a job (a plain dict), run the pipeline, report back.

Started by the supervisor with the ``spawn`` context, so the data stack (Arrow, DataFusion,
Polars and their thread pools) is only ever loaded here, in a fresh interpreter, and never
forked. Messages on the worker's pipe are plain dicts:

    supervisor -> worker   {"type": "job", "run_id", "request"} | {"type": "cancel", "run_id"}
                           | {"type": "stop"}
    worker -> supervisor   {"type": "ready", "pid"} | {"type": "boot_error", "error"}
                           | {"type": "progress", "run_id", "event"}
                           | {"type": "done", "run_id", "body"} | {"type": "failed", "run_id", "error"}

A worker that cannot boot (import error, bad settings) says why and exits with
BOOT_ERROR; the supervisor then halts instead of respawning it forever. `WorkerHandle` is the
supervisor's end of the pipe.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback

BOOT_ERROR = 3

log = logging.getLogger("kalla.worker")


def main(conn, settings_env: dict, index: int) -> None:
    """Process target (must stay importable without the data stack)."""
    # Ctrl-C reaches the whole process group; the supervisor decides what happens to jobs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(settings_env)
    try:
        worker = Worker(conn, index)
    except BaseException as exc:  # anything at all: the supervisor must hear about it
        traceback.print_exc()
        _send_quietly(conn, {"type": "boot_error", "error": f"{type(exc).__name__}: {exc}"})
        os._exit(BOOT_ERROR)
    worker.serve()
    os._exit(0)   # skip interpreter teardown: data-stack thread pools can stall it


def _send_quietly(conn, message: dict) -> None:
    try:
        conn.send(message)
    except OSError:
        pass


class Worker:
    def __init__(self, conn, index: int):
        from .config import load_settings
        settings = load_settings(os.environ)
        logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                            format=f"%(asctime)s %(levelname)s worker-{index}[%(process)d] "
                                   "%(name)s: %(message)s")
        from . import metrics, pipeline   # the data stack: may fail, which is a boot error
        self.conn = conn
        self.settings = settings
        self.pipeline = pipeline
        self.metrics = metrics
        self.inbox: queue.Queue = queue.Queue()
        self.send_lock = threading.Lock()
        self.current: tuple[str, threading.Event] | None = None
        self.conn.send({"type": "ready", "pid": os.getpid()})

    def send(self, message: dict) -> None:
        # The pipeline may report from several staging threads at once.
        with self.send_lock:
            try:
                self.conn.send(message)
            except OSError:
                self.cancel(None)    # the supervisor is gone: nobody wants this job's result

    def serve(self) -> None:
        threading.Thread(target=self.listen, name="control", daemon=True).start()
        while (job := self.inbox.get()) is not None:
            self.run(job["run_id"], job["request"])

    def listen(self) -> None:
        """Read the supervisor's messages; EOF means it is gone, so stop."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                message = {"type": "stop"}
                self.cancel(None)
            if message["type"] == "job":
                self.inbox.put(message)
            elif message["type"] == "cancel":
                self.cancel(message["run_id"])
            else:
                self.inbox.put(None)
                return

    def cancel(self, run_id: str | None) -> None:
        current = self.current
        if current and run_id in (None, current[0]):
            current[1].set()

    def run(self, run_id: str, request: dict) -> None:
        from .errors import KallaError
        from .jobs import parse_job
        cancel = threading.Event()
        self.current = (run_id, cancel)
        try:
            spec = parse_job(request, batch=True, output_root=self.settings.output_root,
                             data_roots=self.settings.data_roots)
            report = lambda event: self.send({"type": "progress", "run_id": run_id, "event": event})
            body = self.pipeline.run_job(spec, self.settings, report, cancel)
            self.metrics.observe_completion(body, {s.alias: s.kind for s in spec.sources})
            self.send({"type": "done", "run_id": run_id, "body": body})
        except KallaError as exc:
            self.send({"type": "failed", "run_id": run_id, "error": exc.to_dict()})
        except Exception as exc:  # run_job wraps its own errors; this is parse_job or a bug
            log.exception("job %s failed unexpectedly", run_id)
            error = KallaError(f"internal error: {type(exc).__name__}", stage="staging")
            self.send({"type": "failed", "run_id": run_id, "error": error.to_dict()})
        finally:
            self.current = None


# ---------------------------------------------------------------------- the supervisor's end

class WorkerHandle:
    """The supervisor's end of one worker process: its pipe, its state and its job."""

    def __init__(self, ctx, index: int, env: dict):
        self.index = index
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=main, args=(child_conn, env, index),
                                   name=f"kalla-worker-{index}")
        self.process.start()
        child_conn.close()
        self.pid = self.process.pid
        self.started = time.monotonic()
        self.ready = False
        self.job = None              # the RunningJob it was given, if any
        self.gone = False            # pipe closed: the process is exiting or dead
        self.killed = False          # by us, on purpose: a job that ignored its cancel
        self.exit_reason: str | None = None   # why we killed it, for its job's error
        self.boot_error: str | None = None

    @property
    def idle(self) -> bool:
        return self.ready and self.job is None and not self.gone

    def send(self, message: dict) -> bool:
        try:
            self.conn.send(message)
            return True
        except OSError:
            self.gone = True
            return False

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()


def describe_exit(code: int | None) -> str:
    """How a process ended, in words.

    >>> describe_exit(-9), describe_exit(1)
    ('was killed by SIGKILL', 'exited with status 1')
    """
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
