"""The durable job journal: one SQLite database in KALLA_STATE_DIR.

A job is committed here before POST /api/jobs answers 200, so an accepted job is never
silently lost: after a restart, queued and interrupted jobs run again (outputs are published
with rename(2), so a re-run is safe) and terminal callbacks that were not yet delivered are
sent again. The stored request carries the sources' credentials (the job needs them to
re-run): the file is created 0600 and nothing read from it is shown without redaction.
"""
from __future__ import annotations

import datetime as dt
import os
import sqlite3
import threading
import time
from enum import Enum

import orjson

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    run_id TEXT PRIMARY KEY,
    digest TEXT NOT NULL,              -- sha256 of the canonical request: idempotency
    request TEXT NOT NULL,             -- JobSpec.to_dict() as JSON
    status TEXT NOT NULL,
    stage TEXT,
    progress REAL,
    matched_count INTEGER,
    unmatched_left_count INTEGER,
    unmatched_right_count INTEGER,
    output_paths TEXT,
    error TEXT,
    terminal TEXT,                     -- {"kind", "body"} of the terminal callback
    callback TEXT,                     -- delivery outcome of the terminal callback
    callback_state TEXT,               -- pending | delivered | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_at);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status);
"""


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with milliseconds.

    >>> iso(0.5)
    '1970-01-01T00:00:00.500Z'
    """
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def _json(value) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _unjson(text: str | None):
    return None if text is None else orjson.loads(text)


class Journal:
    """All job state that must survive a restart. Thread-safe (one connection, one lock)."""

    def __init__(self, state_dir: str):
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, "journal.sqlite3")
        if not os.path.exists(self.path):
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        # WAL mode. Status updates commit without fsync (NORMAL); inserting a job commits
        # with FULL, an fsync of the WAL, before POST answers 200. That fsync also makes
        # every earlier commit durable, since they precede it in the WAL. Losing a status
        # update to a power cut only makes a job run again, and a re-run is safe.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: tuple = (), durable: bool = False) -> int:
        with self._lock:
            if not durable:
                return self._db.execute(sql, args).rowcount
            self._db.execute("PRAGMA synchronous=FULL")
            try:
                return self._db.execute(sql, args).rowcount
            finally:
                self._db.execute("PRAGMA synchronous=NORMAL")

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ------------------------------------------------------------------ writes
    def insert(self, run_id: str, digest: str, request: dict) -> bool:
        """Record a new queued job; False if the run_id is already known."""
        return self._write(
            "INSERT OR IGNORE INTO jobs (run_id, digest, request, status, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (run_id, digest, _json(request), JobStatus.QUEUED.value, time.time()),
            durable=True) == 1

    def mark_running(self, run_id: str) -> None:
        self._write("UPDATE jobs SET status=?, stage=NULL, progress=0, started_at=?, "
                    "attempts=attempts+1 WHERE run_id=?",
                    (JobStatus.RUNNING.value, time.time(), run_id))

    def requeue(self, run_id: str) -> None:
        """Back to queued: the job was interrupted (shutdown) and runs again at next start."""
        self._write("UPDATE jobs SET status=?, stage=NULL, progress=NULL, started_at=NULL "
                    "WHERE run_id=?", (JobStatus.QUEUED.value, run_id))

    def finish(self, run_id: str, status: JobStatus, *, stage: str | None, kind: str,
               body: dict, error: str | None = None) -> None:
        """Record a terminal state and the callback body that announces it."""
        counts = [body.get(k) for k in
                  ("matched_count", "unmatched_left_count", "unmatched_right_count")]
        self._write(
            "UPDATE jobs SET status=?, stage=?, progress=?, matched_count=?, "
            "unmatched_left_count=?, unmatched_right_count=?, output_paths=?, error=?, "
            "terminal=?, callback_state='pending', finished_at=? WHERE run_id=?",
            (status.value, stage, 1.0 if status is JobStatus.COMPLETED else None, *counts,
             _json(body.get("output_paths")), error, _json({"kind": kind, "body": body}),
             time.time(), run_id))

    def record_callback(self, run_id: str, outcome: dict) -> None:
        state = "delivered" if outcome.get("delivered") else "failed"
        self._write("UPDATE jobs SET callback=?, callback_state=? WHERE run_id=?",
                    (_json(outcome), state, run_id))

    def prune(self, older_than_days: float) -> int:
        """Forget finished jobs older than the retention; returns how many."""
        cutoff = time.time() - older_than_days * 86400
        return self._write(
            "DELETE FROM jobs WHERE status IN (?, ?, ?) AND finished_at < ?",
            (JobStatus.COMPLETED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value,
             cutoff))

    # ------------------------------------------------------------------ reads
    def get(self, run_id: str) -> dict | None:
        rows = self._read("SELECT * FROM jobs WHERE run_id=?", (run_id,))
        return dict(rows[0]) if rows else None

    def recent(self, limit: int, status: str | None = None) -> list[dict]:
        if status:
            rows = self._read("SELECT * FROM jobs WHERE status=? ORDER BY created_at DESC "
                              "LIMIT ?", (status, limit))
        else:
            rows = self._read("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]

    def unfinished(self) -> list[tuple[str, dict, str]]:
        """(run_id, request, status) of queued and interrupted jobs, oldest first."""
        rows = self._read("SELECT run_id, request, status FROM jobs WHERE status IN (?, ?) "
                          "ORDER BY created_at",
                          (JobStatus.QUEUED.value, JobStatus.RUNNING.value))
        return [(r["run_id"], _unjson(r["request"]), r["status"]) for r in rows]

    def undelivered(self) -> list[tuple[str, dict, dict]]:
        """(run_id, terminal, request) of finished jobs whose terminal callback is pending."""
        rows = self._read("SELECT run_id, terminal, request FROM jobs "
                          "WHERE callback_state='pending' ORDER BY finished_at")
        return [(r["run_id"], _unjson(r["terminal"]), _unjson(r["request"])) for r in rows]


def render(row: dict, live: dict | None = None) -> dict:
    """The public status of one job: no request, so no source URI and no credential."""
    out = {
        "run_id": row["run_id"],
        "status": row["status"],
        "stage": row["stage"],
        "progress": row["progress"],
        "matched_count": row["matched_count"],
        "unmatched_left_count": row["unmatched_left_count"],
        "unmatched_right_count": row["unmatched_right_count"],
        "output_paths": _unjson(row["output_paths"]),
        "error": row["error"],
        "created_at": iso(row["created_at"]),
        "started_at": iso(row["started_at"]),
        "finished_at": iso(row["finished_at"]),
        "attempts": row["attempts"],
        "callback": _callback_view(row),
    }
    if live:
        out.update(live)
    return out


def _callback_view(row: dict) -> dict | None:
    state = row["callback_state"]
    if state is None:
        return None
    outcome = _unjson(row["callback"]) or {}
    kind = outcome.get("kind") or (_unjson(row["terminal"]) or {}).get("kind")
    return {"state": state, "kind": kind, "delivered": state == "delivered",
            "attempts": outcome.get("attempts", 0), "http_status": outcome.get("status"),
            "error": outcome.get("error")}
