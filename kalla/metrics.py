"""Prometheus metrics, correct across worker processes.

prometheus-client's multiprocess mode: every process writes its samples to files in
PROMETHEUS_MULTIPROC_DIR and /metrics merges them. prometheus_client decides the mode when
it is first imported, so the supervisor creates a fresh per-run directory and sets the
variable before anything imports this module; spawned workers inherit it. Only the
supervisor creates and wipes that directory, and it calls `mark_process_dead` for every
worker it reaps so that their live gauges disappear.
"""
from __future__ import annotations

import os

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, generate_latest,
                               multiprocess)

# Gauges are set by the supervisor only; "livesum" drops them when it exits.
ACTIVE_JOBS = Gauge("kalla_runner_active_jobs", "jobs running in a worker",
                    multiprocess_mode="livesum")
QUEUED_JOBS = Gauge("kalla_runner_queued_jobs", "jobs waiting for a worker",
                    multiprocess_mode="livesum")
LIVE_WORKERS = Gauge("kalla_runner_workers", "worker processes ready to take jobs",
                     multiprocess_mode="livesum")
JOBS_COMPLETED = Counter("kalla_runner_jobs_completed", "jobs that completed")
JOBS_FAILED = Counter("kalla_runner_jobs_failed", "jobs that failed")
JOBS_CANCELLED = Counter("kalla_runner_jobs_cancelled", "jobs cancelled by request")
JOBS_REJECTED = Counter("kalla_runner_jobs_rejected", "submissions refused: queue full or draining",
                        ["reason"])
WORKER_DEATHS = Counter("kalla_runner_worker_deaths", "worker processes that died and were replaced")
STAGE_SECONDS = Histogram("kalla_runner_stage_duration_seconds", "time spent in each job stage",
                          ["stage"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                                              60, 300, 900, 3600))
ROWS_READ = Counter("kalla_runner_rows_read", "rows read from sources, after filters", ["kind"])
CALLBACKS = Counter("kalla_runner_callbacks", "callback deliveries by kind and outcome",
                    ["kind", "outcome"])


def observe_completion(body: dict, kinds: dict[str, str]) -> None:
    """Stage timings and rows read, from a completion body; kinds maps alias -> source kind."""
    for stage, seconds in (body.get("stage_seconds") or {}).items():
        STAGE_SECONDS.labels(stage).observe(seconds)
    for alias, rows in (body.get("source_rows") or {}).items():
        ROWS_READ.labels(kinds.get(alias, "unknown")).inc(rows)


def observe_callback(kind: str, delivered: bool) -> None:
    CALLBACKS.labels(kind, "delivered" if delivered else "failed").inc()


def mark_process_dead(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)


def render() -> bytes:
    """The Prometheus text exposition of every process's samples."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import REGISTRY
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)
