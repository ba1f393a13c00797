"""The supervisor: owns the worker processes and the main loop; never touches job data.

One main loop acts on everything - worker messages, worker deaths, signals, dispatch,
cancel deadlines, drain - so none of it races. Signal handlers and HTTP threads only record
what happened and wake the loop through a pipe. Workers are started with the ``spawn``
context: the supervisor never imports the data stack, and nothing is forked once Arrow or
DataFusion threads could exist.
"""
from __future__ import annotations

import glob
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from multiprocessing.connection import wait as wait_for

from ..errors import JobCancelled, KallaError, WorkerDied
from ..worker import BOOT_ERROR, WorkerHandle, describe_exit
from .jobqueue import JobBook, ServiceDraining
from .journal import Journal
from .memguard import MemoryGuard, gib, memory_cap

log = logging.getLogger("kalla.supervisor")

EXIT_OK, EXIT_ERROR, EXIT_HALT = 0, 1, 3
CANCEL_GRACE = 5.0       # seconds a worker has to stop a cancelled job before it is killed
BOOT_TIMEOUT = 120.0     # seconds a new worker has to import the data stack
MAX_BOOT_FAILURES = 3    # workers dying before ready, in a row, before we halt
TICK = 0.5               # main loop wake-up for deadlines when nothing else happens
PRUNE_EVERY = 3600.0


class Halt(Exception):
    """Stop the service: continuing would only respawn a worker that cannot start."""


class Supervisor:
    def __init__(self, settings, book, metrics):
        self.settings = settings
        self.book = book
        self.metrics = metrics
        self.ctx = multiprocessing.get_context("spawn")
        self.env = {**settings.to_env()}
        self.workers: list[WorkerHandle] = []
        self.signals: list[int] = []
        self.draining = False
        self.fast_stop = False
        self.halting = False
        self.drain_deadline = 0.0
        self.boot_failures = 0
        self.notified_ready = False
        self.last_prune = 0.0
        self.overweight: list[tuple[int, object, int]] = []    # from the memory guard
        self.guard = MemoryGuard(memory_cap(settings), self.on_overweight)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # ------------------------------------------------------------------ for HTTP threads
    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"w")
        except (BlockingIOError, OSError):
            pass    # the loop is already due to wake

    def idle_workers(self) -> int:
        return sum(1 for w in self.workers if w.idle)

    def readiness(self) -> str | None:
        """None when ready, else why not."""
        if self.draining:
            return "shutting down"
        if not any(w.ready and not w.gone for w in self.workers):
            return "no worker is ready"
        if self.book.queue.is_full(self.idle_workers()):
            return "the job queue is full"
        return None

    def submit(self, spec, digest: str) -> dict:
        if self.draining:
            self.metrics.JOBS_REJECTED.labels("draining").inc()
            raise ServiceDraining("the service is shutting down; submit again later")
        accepted = self.book.submit(spec.run_id, spec.to_dict(), digest, self.idle_workers())
        self.wake()
        return accepted

    def cancel(self, run_id: str) -> dict:
        job = self.book.request_cancel(run_id, CANCEL_GRACE)
        if job is not None:
            self.wake()
            job.finished.wait(CANCEL_GRACE + 5)
        return self.book.status(run_id)

    def update_gauges(self) -> None:
        self.metrics.ACTIVE_JOBS.set(len(self.book.running))
        self.metrics.QUEUED_JOBS.set(len(self.book.queue))
        self.metrics.LIVE_WORKERS.set(sum(1 for w in self.workers if w.ready and not w.gone))

    def metrics_text(self) -> bytes:
        self.update_gauges()
        return self.metrics.render()

    def on_overweight(self, pid: int, run_id: str | None, used: int) -> None:
        self.overweight.append((pid, run_id, used))      # the main loop acts on it
        self.wake()

    def on_signal(self, signum: int, frame) -> None:
        self.signals.append(signum)       # the main loop acts on it
        self.wake()

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        for index in range(self.settings.workers):
            self.workers.append(self.spawn(index))
        try:
            while not self.finished():
                self.wait()
                self.handle_signals()
                for worker in list(self.workers):
                    self.read_messages(worker)
                self.enforce_memory_cap()
                self.reap_workers()
                self.check_ready()
                self.dispatch()
                self.enforce_cancels()
                self.housekeeping()
                self.update_gauges()
                self.guard.watch((w.pid, w.job.run_id if w.job else None)
                                 for w in self.workers if w.ready and not w.gone)
        except Halt as exc:
            log.error("stopping: %s", exc)
            self.halting = True
            self.stop_workers(fast=True)
            return EXIT_HALT
        self.stop_workers(fast=self.fast_stop)
        return EXIT_OK

    def wait(self) -> None:
        handles = [self._wake_r]
        for worker in self.workers:
            handles.append(worker.process.sentinel)
            if not worker.gone:
                handles.append(worker.conn)
        if self._wake_r in wait_for(handles, TICK):
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass

    def finished(self) -> bool:
        if self.fast_stop:
            return True
        if not self.draining:
            return False
        return not self.book.running or time.monotonic() >= self.drain_deadline

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if self.draining:
                log.warning("%s again: stopping now", signal.Signals(signum).name)
                self.fast_stop = True
                return
            log.info("%s: draining (no new jobs; running jobs get %.0fs)",
                     signal.Signals(signum).name, self.settings.stop_timeout)
            self.draining = True
            self.drain_deadline = time.monotonic() + self.settings.stop_timeout
            sd_notify("STOPPING=1")

    # ------------------------------------------------------------------ workers
    def spawn(self, index: int) -> WorkerHandle:
        worker = WorkerHandle(self.ctx, index, self.env)
        log.debug("worker %d started (pid %d)", index, worker.pid)
        return worker

    def read_messages(self, worker: WorkerHandle) -> None:
        while not worker.gone:
            try:
                if not worker.conn.poll():
                    return
                message = worker.conn.recv()
            except (EOFError, OSError):
                worker.gone = True
                return
            self.handle_message(worker, message)

    def handle_message(self, worker: WorkerHandle, message: dict) -> None:
        kind = message["type"]
        if kind == "ready":
            worker.ready = True
            self.boot_failures = 0
        elif kind == "boot_error":
            worker.boot_error = message["error"]
        elif worker.job is None or message.get("run_id") != worker.job.run_id:
            log.debug("ignoring %s from worker %d: not its job", kind, worker.index)
        elif kind == "progress":
            self.book.progress(worker.job.run_id, message["event"])
        elif kind == "done":
            self.book.complete(worker.job.run_id, message["body"])
            worker.job = None
        elif kind == "failed":
            self.book.fail(worker.job.run_id, KallaError.from_dict(message["error"]))
            worker.job = None

    def reap_workers(self) -> None:
        for worker in list(self.workers):
            if worker.process.is_alive() and not worker.gone:
                continue
            worker.process.join(timeout=1)     # its pipe closed: it is exiting
            if worker.process.exitcode is None:
                worker.kill()
                worker.process.join()
            self.workers.remove(worker)
            self.metrics.mark_process_dead(worker.pid)
            self.on_worker_exit(worker)

    def enforce_memory_cap(self) -> None:
        """Kill the workers the memory guard found above KALLA_WORKER_MEMORY_LIMIT."""
        while self.overweight:
            pid, run_id, used = self.overweight.pop(0)
            for worker in self.workers:
                if worker.pid != pid or (worker.job.run_id if worker.job else None) != run_id:
                    continue         # it has moved on to another job since the sample
                if worker.job is None:
                    log.info("worker %d (pid %d) holds %s while idle, over "
                             "KALLA_WORKER_MEMORY_LIMIT; replacing it", worker.index, pid, gib(used))
                    worker.killed = True
                else:
                    worker.exit_reason = (
                        f"used {gib(used)} of memory, more than KALLA_WORKER_MEMORY_LIMIT "
                        f"({gib(self.guard.cap)}), and was stopped")
                    log.error("worker %d (pid %d) running job %s %s", worker.index, pid,
                              run_id, worker.exit_reason)
                worker.kill()
                worker.gone = True       # no job is dispatched to it; reaped right below

    def on_worker_exit(self, worker: WorkerHandle) -> None:
        how = worker.exit_reason or describe_exit(worker.process.exitcode)
        if worker.process.exitcode == BOOT_ERROR or not worker.ready:
            self.boot_failures += 1
            reason = worker.boot_error or f"it {how} before it was ready"
            if worker.process.exitcode == BOOT_ERROR or self.boot_failures >= MAX_BOOT_FAILURES:
                raise Halt(f"worker process could not start: {reason}")
        elif not worker.killed:
            self.metrics.WORKER_DEATHS.inc()
            log.error("worker %d (pid %d) %s", worker.index, worker.pid, how)
        if worker.job is not None:
            self.lose_job(worker, how)
        if not self.draining:
            self.workers.append(self.spawn(worker.index))

    def lose_job(self, worker: WorkerHandle, how: str) -> None:
        """The job of a worker that is gone: cancelled if asked, else re-queued when we are
        stopping (it runs again at the next start), else failed."""
        job, worker.job = worker.job, None
        self.book.discard_partial(job.run_id, job.request)
        if job.cancel_deadline is not None:
            self.book.fail(job.run_id, JobCancelled("cancelled", stage=job.stage))
        elif self.draining or self.halting:
            self.book.interrupt(job.run_id)
        else:
            self.book.fail(job.run_id, WorkerDied(
                f"the worker process running this job {how}; the job was not retried "
                "(if it ran out of memory, raise KALLA_WORKER_MEMORY or lower KALLA_WORKERS)",
                stage=job.stage))

    def check_ready(self) -> None:
        if not self.notified_ready and self.workers and all(w.ready for w in self.workers):
            self.notified_ready = True
            log.info("ready: %d workers", len(self.workers))
            sd_notify(f"READY=1\nSTATUS=serving with {len(self.workers)} workers")
        now = time.monotonic()
        for worker in self.workers:
            if not worker.ready and now - worker.started > BOOT_TIMEOUT:
                worker.kill()
                raise Halt(f"worker {worker.index} did not start within {BOOT_TIMEOUT:.0f}s")

    def stop_workers(self, fast: bool) -> None:
        """Stop every worker; jobs still running go back to queued in the journal."""
        for worker in self.workers:
            if fast or worker.job is not None:
                worker.kill()
            else:
                worker.send({"type": "stop"})
        deadline = time.monotonic() + 5
        for worker in self.workers:
            worker.process.join(max(0.1, deadline - time.monotonic()))
            worker.kill()
            worker.process.join()
            self.metrics.mark_process_dead(worker.pid)
            self.read_messages(worker)        # a result sent just before the kill still counts
            if worker.job is not None:
                self.lose_job(worker, "was stopped")
        self.workers.clear()

    # ------------------------------------------------------------------ jobs
    def dispatch(self) -> None:
        if self.draining:
            return       # what is still queued stays queued in the journal for the next start
        for worker in self.workers:
            if worker.idle and (job := self.book.take(worker.pid)) is not None:
                worker.job = job
                worker.send({"type": "job", "run_id": job.run_id, "request": job.request})

    def enforce_cancels(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            job = worker.job
            if job is None or job.cancel_deadline is None:
                continue
            if not job.cancel_sent:
                job.cancel_sent = worker.send({"type": "cancel", "run_id": job.run_id})
            elif now >= job.cancel_deadline:
                log.warning("worker %d did not stop job %s in time; killing it",
                            worker.index, job.run_id)
                worker.killed = True
                worker.kill()    # reaped next turn; lose_job then records the cancel

    def housekeeping(self) -> None:
        now = time.monotonic()
        if now - self.last_prune >= PRUNE_EVERY:
            self.last_prune = now
            pruned = self.book.journal.prune(self.settings.retention_days)
            if pruned:
                log.info("pruned %d finished jobs older than %g days", pruned,
                         self.settings.retention_days)


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):           # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("sd_notify(%s) failed: %s", state.split("\n")[0], exc)


def serve(settings) -> int:
    """`kalla serve`: run the HTTP API and the workers until SIGTERM; return the exit status."""
    metrics_dir = prepare_metrics_dir()
    try:
        return run_service(settings)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def run_service(settings) -> int:
    from .. import metrics          # only now: prometheus_client reads the variable on import
    from .httpd import ApiServer
    try:
        journal = Journal(settings.state_dir)
    except Exception as exc:  # sqlite3.Error or OSError: either way we cannot run
        log.error("cannot open the job journal in %s: %s (check KALLA_STATE_DIR)",
                  settings.state_dir, exc)
        return EXIT_ERROR
    book = JobBook(settings, journal, metrics)
    supervisor = Supervisor(settings, book, metrics)
    try:
        server = ApiServer(settings.bind, supervisor, settings)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s (check KALLA_BIND)", *settings.bind, exc.strerror)
        return EXIT_ERROR
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, supervisor.on_signal)
    book.resume()
    threading.Thread(target=server.serve_forever, name="httpd", daemon=True).start()
    log.info("listening on http://%s:%d", *server.server_address[:2])
    try:
        code = supervisor.run()
    finally:
        server.shutdown()
        server.server_close()
        if not supervisor.fast_stop:   # let terminal callbacks in flight finish, within bounds
            book.wait_for_couriers(max(2.0, supervisor.drain_deadline - time.monotonic()))
    log.info("stopped (exit status %d)", code)
    return code


def pid_alive(text: str) -> bool:
    """Whether a process with this pid exists (True when unsure)."""
    try:
        os.kill(int(text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return True


def prepare_metrics_dir() -> str:
    """A fresh, empty PROMETHEUS_MULTIPROC_DIR for this run, created (and wiped) only here.

    Under systemd it lives in RuntimeDirectory, which systemd empties when we stop.
    """
    if "prometheus_client" in sys.modules:
        log.warning("prometheus_client was imported before serve(): worker metrics will be lost")
    base = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or tempfile.gettempdir()
    for stale in glob.glob(os.path.join(glob.escape(base), "kalla-metrics-*")):
        if not pid_alive(stale.rsplit("-", 1)[1]):      # left by a supervisor that crashed
            shutil.rmtree(stale, ignore_errors=True)
    path = os.path.join(base, f"kalla-metrics-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, mode=0o700)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path
