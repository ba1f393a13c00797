"""The bounded queue of jobs waiting for a worker, the book of running jobs, the service's errors.

The queue lives in the supervisor rather than in a shared multiprocessing.Queue: the
supervisor hands each job to one idle worker over that worker's own pipe, so it always knows
which process holds which job. That is what lets it cancel a running job, and fail (rather
than silently lose) the job of a worker that died - a shared queue loses a job that a worker
took and died with before saying so. Running jobs are not in the queue, so they do not count
against KALLA_QUEUE_SIZE.
"""
from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from types import SimpleNamespace

import orjson

from ..callbacks import CallbackSender, Courier
from ..errors import KallaError
from ..jobs import scrub, secrets_of
from ..outputs import Outputs
from .journal import Journal, JobStatus, render


def one_line(text: str) -> str:
    """Text made safe for a one-line answer or log line: control characters and line
    separators (which a request can smuggle into a field name) become escapes.

    >>> one_line("expect.\\nFAKE LOG LINE\\x1b[31m")
    'expect.\\\\nFAKE LOG LINE\\\\x1b[31m'
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else
                   ch.encode("unicode_escape").decode("ascii") for ch in text)


class QueueFull(KallaError):
    status = 500          # the reference says 500; Retry-After tells clients when to retry
    retryable = True
    retry_after = 5


class ServiceDraining(KallaError):
    status = 503
    retryable = True
    retry_after = 10


class RunConflict(KallaError):
    status = 409


class UnknownRun(KallaError):
    status = 404


class JobQueue:
    """Jobs waiting for a worker, oldest first; thread-safe."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, run_id: str) -> bool:
        return run_id in self._items

    def is_full(self, idle_workers: int = 0) -> bool:
        """Full when every slot is taken; jobs an idle worker is about to take do not count.

        >>> q = JobQueue(1); q.put("a", {}); q.is_full(), q.is_full(idle_workers=1)
        (True, False)
        """
        return len(self._items) >= self.capacity + idle_workers

    def offer(self, run_id: str, request: dict, idle_workers: int = 0) -> bool:
        """Add a job unless the queue is full; False when it is."""
        with self._lock:
            if self.is_full(idle_workers):
                return False
            self._items[run_id] = request
            return True

    def put(self, run_id: str, request: dict) -> None:
        """Add a job even beyond capacity: jobs recovered from the journal are never dropped."""
        with self._lock:
            self._items[run_id] = request

    def pop(self) -> tuple[str, dict] | None:
        with self._lock:
            return self._items.popitem(last=False) if self._items else None

    def remove(self, run_id: str) -> bool:
        with self._lock:
            return self._items.pop(run_id, None) is not None


log = logging.getLogger("kalla.jobs")

CANCELLED_MESSAGE = "job cancelled by request"


@dataclass
class RunningJob:
    """A job handed to a worker; the live part of its status (stage, progress) is kept here."""
    run_id: str
    request: dict
    courier: Courier
    worker_pid: int
    stage: str = "staging"
    fractions: dict = field(default_factory=dict)
    matched_count: int | None = None
    cancel_deadline: float | None = None     # monotonic; set by DELETE
    cancel_sent: bool = False
    finished: threading.Event = field(default_factory=threading.Event)

    def live_status(self) -> dict:
        if self.stage == "staging":
            aliases = [s["alias"] for s in self.request["sources"]]
            progress = sum(self.fractions.get(a, 0.0) for a in aliases) / len(aliases)
        else:
            progress = self.fractions.get(self.stage, 0.0)
        out = {"status": "running", "stage": self.stage, "progress": round(progress, 4),
               "worker_pid": self.worker_pid}
        if self.matched_count is not None:
            out["matched_count"] = self.matched_count
        return out


def secrets_in(request: dict) -> list[str]:
    """Credentials of a stored request, to scrub from any text we show."""
    sources = [SimpleNamespace(uri=s.get("uri", "")) for s in request.get("sources", [])]
    return secrets_of(SimpleNamespace(sources=sources))


class JobBook:
    """Every job the service knows: waiting (JobQueue), running (RunningJob), the journal.

    HTTP threads submit, cancel and read; the supervisor's main loop takes jobs for workers
    and records how they end. One lock makes "queued or running" a single fact, so a job is
    never in neither place (a cancel racing a dispatch) nor finished twice.
    """

    def __init__(self, settings, journal: Journal, metrics):
        self.settings = settings
        self.journal = journal
        self.metrics = metrics
        self.queue = JobQueue(settings.queue_size)
        self.running: dict[str, RunningJob] = {}
        self.couriers: list[Courier] = []
        self.lock = threading.RLock()          # queue + running: held briefly
        self.submit_lock = threading.Lock()    # orders submissions; always taken before lock

    # ------------------------------------------------------------------ HTTP side
    def submit(self, run_id: str, request: dict, digest: str, idle_workers: int) -> dict:
        accepted = {"run_id": run_id, "status": "accepted"}
        # A worker gets the request exactly as the journal holds it (JSON: tuples become
        # arrays), so a job runs the same whether it starts now or after a restart.
        request = orjson.loads(orjson.dumps(request))
        # submit_lock, not self.lock: the journal's fsync must not stall the main loop.
        with self.submit_lock:
            existing = self.journal.get(run_id)
            if existing is not None:
                if existing["digest"] == digest:
                    return accepted          # the same request again: no second run
                raise RunConflict(f"run_id {run_id} was already submitted with a different "
                                  "request; use a new run_id")
            if self.queue.is_full(idle_workers):
                self.metrics.JOBS_REJECTED.labels("queue_full").inc()
                raise QueueFull(f"the job queue is full ({self.queue.capacity} waiting); "
                                "retry later")
            self.journal.insert(run_id, digest, request)   # durable before we answer 200
            with self.lock:
                self.queue.put(run_id, request)
        return accepted

    def request_cancel(self, run_id: str, grace: float) -> RunningJob | None:
        """Cancel a queued job now, or mark a running one; returns the running job."""
        with self.submit_lock, self.lock:     # a job being submitted is in the queue after
            if self.queue.remove(run_id):
                request = self.journal.get(run_id)
                self._finish_cancelled(run_id, orjson.loads(request["request"]), None)
                return None
            job = self.running.get(run_id)
            if job is not None:
                if job.cancel_deadline is None:
                    job.cancel_deadline = time.monotonic() + grace
                return job
            row = self.journal.get(run_id)
        if row is None:
            raise UnknownRun(f"unknown run_id: {run_id}")
        raise RunConflict(f"run {run_id} already finished ({row['status']}); nothing to cancel")

    def status(self, run_id: str) -> dict:
        row = self.journal.get(run_id)      # not under self.lock: a read may wait for an fsync
        if row is None:
            raise UnknownRun(f"unknown run_id: {run_id}")
        with self.lock:
            job = self.running.get(run_id)
            live = job.live_status() if job else None
        return render(row, live)

    def recent(self, limit: int, status: str | None) -> list[dict]:
        rows = self.journal.recent(limit, status)
        with self.lock:
            lives = {r["run_id"]: self.running[r["run_id"]].live_status()
                     for r in rows if r["run_id"] in self.running}
        return [render(r, lives.get(r["run_id"])) for r in rows]

    # ------------------------------------------------------------------ main-loop side
    def take(self, worker_pid: int) -> RunningJob | None:
        """The next queued job, now registered as running on that worker."""
        with self.lock:
            item = self.queue.pop()
            if item is None:
                return None
            run_id, request = item
            job = RunningJob(run_id, request, self._courier(run_id, request), worker_pid)
            self.running[run_id] = job
            self.journal.mark_running(run_id)
        return job

    def progress(self, run_id: str, event: dict) -> None:
        with self.lock:
            job = self.running.get(run_id)
            if job is None or job.cancel_deadline is not None:
                return      # a cancelled job reports nothing more than its error
            job.stage = event.get("stage", job.stage)
            key = event.get("source") or job.stage
            job.fractions[key] = float(event.get("progress") or 0.0)
            if "matched_count" in event:
                job.matched_count = event["matched_count"]
        job.courier.progress(event)

    def complete(self, run_id: str, body: dict) -> None:
        with self.lock:
            job = self.running.pop(run_id, None)
            if job is None:
                return
            self.journal.finish(run_id, JobStatus.COMPLETED, stage="publish",
                                kind="complete", body=body)
        self.metrics.JOBS_COMPLETED.inc()
        log.info("job %s completed: %s matched", run_id, body.get("matched_count"))
        job.courier.finish("complete", body)
        job.finished.set()

    def fail(self, run_id: str, error: KallaError) -> None:
        """Record a failure; a job whose cancel was requested ends as cancelled instead."""
        with self.lock:
            job = self.running.pop(run_id, None)
            if job is None:
                return
            if job.cancel_deadline is not None:
                self._finish_cancelled(run_id, job.request, job)
                return
            stage = error.stage or job.stage
            text = scrub(str(error), secrets_in(job.request))
            body = {"run_id": run_id, "error": text, "stage": stage}
            self.journal.finish(run_id, JobStatus.FAILED, stage=stage, kind="error",
                                body=body, error=text)
        self.metrics.JOBS_FAILED.inc()
        log.info("job %s failed in %s: %s", run_id, stage, one_line(text))
        job.courier.finish("error", body)
        job.finished.set()

    def interrupt(self, run_id: str) -> None:
        """A running job stopped by shutdown: back to queued in the journal, no callback."""
        with self.lock:
            job = self.running.pop(run_id, None)
            if job is None:
                return
            self.journal.requeue(run_id)
        job.courier.abandon()
        job.finished.set()

    def _finish_cancelled(self, run_id: str, request: dict, job: RunningJob | None) -> None:
        stage = job.stage if job else None
        body = {"run_id": run_id, "error": CANCELLED_MESSAGE, "stage": stage}
        self.journal.finish(run_id, JobStatus.CANCELLED, stage=stage, kind="error",
                            body=body, error=CANCELLED_MESSAGE)
        self.metrics.JOBS_CANCELLED.inc()
        log.info("job %s cancelled (%s)", run_id, "running" if job else "queued")
        courier = job.courier if job else self._courier(run_id, request)
        courier.finish("error", body)
        if job:
            job.finished.set()

    # ------------------------------------------------------------------ callbacks
    def _courier(self, run_id: str, request: dict) -> Courier:
        sender = CallbackSender(request["callback_url"], style=self.settings.callback_style,
                                timeout=self.settings.callback_timeout,
                                retries=self.settings.callback_retries,
                                backoff=self.settings.callback_backoff,
                                # checked again at every send: a job accepted before the
                                # allow-list was tightened (and recovered at restart) too
                                allowed_hosts=self.settings.callback_hosts)

        def record(outcome) -> None:
            self.metrics.observe_callback(outcome.kind, outcome.delivered)
            if outcome.kind != "progress":
                self.journal.record_callback(run_id, outcome.to_dict())

        courier = Courier(sender, run_id, record)
        with self.lock:
            self.couriers = [c for c in self.couriers if not c.done.is_set()] + [courier]
        return courier

    def redeliver(self) -> int:
        """Send again the terminal callbacks a previous run could not confirm."""
        pending = self.journal.undelivered()
        for run_id, terminal, request in pending:
            self._courier(run_id, request).finish(terminal["kind"], terminal["body"])
        return len(pending)

    def recover(self) -> int:
        """Queue again the jobs a previous run left queued or interrupted."""
        jobs = self.journal.unfinished()
        for run_id, request, status in jobs:
            if status == JobStatus.RUNNING.value:      # the previous run crashed mid-job
                self.discard_partial(run_id, request)
            self.journal.requeue(run_id)
            self.queue.put(run_id, request)
        return len(jobs)

    def resume(self) -> None:
        """At start: pick up where the previous run stopped; forget what is past retention."""
        pruned = self.journal.prune(self.settings.retention_days)
        requeued = self.recover()
        redelivered = self.redeliver()
        if requeued or redelivered or pruned:
            log.info("journal: %d jobs queued again, %d callbacks to send again, %d pruned",
                     requeued, redelivered, pruned)

    def discard_partial(self, run_id: str, request: dict) -> None:
        """Remove what a killed worker left: the hidden partial output directory and scratch."""
        Outputs(request["output_path"], run_id).discard()
        scratch = self.settings.work_dir or tempfile.gettempdir()
        for path in glob.glob(os.path.join(glob.escape(scratch), f"kalla-{run_id}-*")):
            shutil.rmtree(path, ignore_errors=True)

    def wait_for_couriers(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            couriers = list(self.couriers)
        for courier in couriers:
            courier.done.wait(max(0.0, deadline - time.monotonic()))
