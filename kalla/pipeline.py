"""run_job: the ordered stages of one reconciliation, shared by the CLI and the workers.

    staging (check, then read) -> matching -> unmatched -> publish

Each stage is a small function of the job state; its name is data (progress events,
error callbacks, summary timings). Any failure removes the job's partial files and
raises a KallaError whose ``stage`` names where it happened.
"""
from __future__ import annotations

import datetime as dt
import importlib
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import orjson

from . import __version__
from .engines import check_engine
from .errors import JobCancelled, KallaError
from .expectations import Facts, evaluate
from .jobs import JobSpec, scrub, secrets_of
from .rules import RuleSpec
from .outputs import SUMMARY, Outputs
from .staging import check_job, stage_sources
from .matching import run_match

# Polars and numpy take ~0.1 s to import and are first needed by the unmatched stage:
# import them on a side thread while the sources are staged and matched (a CLI run pays
# process start in its wall time; a worker has them ready for its first job).
threading.Thread(target=importlib.import_module, args=(f"{__package__}.unmatched",),
                 name="preload-unmatched", daemon=True).start()

Report = Callable[[dict], None]


class Job:
    """The state of one run as it moves through the stages."""

    def __init__(self, spec: JobSpec, settings, report: Report | None, cancel):
        self.spec = spec
        self.settings = settings
        self.cancel = cancel or threading.Event()
        self._report = report or (lambda event: None)
        self._report_lock = threading.Lock()
        self.stage = "staging"
        self.started_at = dt.datetime.now(dt.timezone.utc)
        self.timings: dict[str, float] = {}
        self.scratch = tempfile.mkdtemp(prefix=f"kalla-{spec.run_id}-", dir=settings.work_dir)
        self.outputs = Outputs(spec.output_path, spec.run_id)
        self.memory_bytes = settings.worker_memory
        # filled in by the stages
        self.connectors: dict = {}
        self.bound_filters: dict = {}
        self.staged: dict[str, list[str]] = {}
        self.source_rows: dict[str, int] = {}
        self.key_columns: dict[str, list[str]] = {}
        self.join_strategy = ""
        self.matched_count = 0
        self.unmatched: dict[str, object] = {}
        self.rule_counts: dict[str, int] = {}    # rules jobs: matched rows per rule
        self.ambiguous: dict[str, int] = {}      # one_to_one rules: pairs held back
        self.explained: dict = {}                # explain: reasons per side
        self.leftovers: dict = {}                # rules jobs: alias -> passes.Side

    def report(self, event: dict) -> None:
        with self._report_lock:
            self._report({**event, "run_id": self.spec.run_id} if "run_id" not in event else event)

    def check_cancelled(self) -> None:
        if self.cancel.is_set():
            raise JobCancelled("job was cancelled", stage=self.stage)


def derive(job: Job) -> None:
    if job.unmatched:        # the engine derived them on the cluster (kalla/engines)
        return
    from .unmatched import derive_unmatched, fits_side_by_side      # preloaded above
    left, right = job.spec.left.alias, job.spec.right.alias
    matched = job.outputs.partial("matched")

    explain = job.spec.explain
    if explain:
        from .explain import explain_file
        rules = job.spec.rules or (RuleSpec("match_sql", job.spec.match_sql),)

    def one(index: int, side: str, alias: str):
        # with explain the file is rewritten at once: written plain, then explained
        out, keys = job.outputs.partial(f"unmatched_{side}"), job.spec.primary_keys[alias]
        if alias in job.leftovers:     # a rules job: the passes' leftovers and key files since
            left_over = job.leftovers[alias]
            result = derive_unmatched(left_over.files, keys, left_over.key_files, keys, out,
                                      scratch=explain, schema=left_over.schema)
        else:
            result = derive_unmatched(job.staged[alias], keys, matched, job.key_columns[alias], out,
                                      scratch=explain)
        return result, (explain_file(job, rules, index) if explain else None)

    # Each Polars anti-join holds the matched keys in a hash table: both at once only when
    # that fits the budget (unmatched.fits_side_by_side).
    keys = max(len(job.spec.primary_keys[left]), len(job.spec.primary_keys[right]))
    together = fits_side_by_side(job.matched_count, keys, job.memory_bytes)
    with ThreadPoolExecutor(2 if together else 1) as pool:
        futures = {side: pool.submit(one, i, side, alias)
                   for i, (side, alias) in enumerate((("left", left), ("right", right)))}
        done = {side: f.result() for side, f in futures.items()}
    job.unmatched = {side: result for side, (result, _) in done.items()}
    if explain:
        job.explained = {side: reasons for side, (_, reasons) in done.items()}


def publish(job: Job) -> None:
    summary = summarize(job)
    with open(job.outputs.partial(SUMMARY), "wb") as fh:
        fh.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    job.outputs.publish()


def staging(job: Job) -> None:
    check_engine(job)    # what the engine cannot run, or a scheduler that does not answer
    check_job(job)       # cheap: schemas, filters, keys - fail before any heavy work
    job.outputs.prepare()
    stage_sources(job)


STAGES = (("staging", staging), ("matching", run_match), ("unmatched", derive),
          ("publish", publish))


def summarize(job: Job) -> dict:
    left, right = job.spec.left.alias, job.spec.right.alias
    return {
        "run_id": job.spec.run_id,
        "kalla_version": __version__,
        "status": "completed",
        "matched_count": job.matched_count,
        "unmatched_left_count": job.unmatched["left"].rows,
        "unmatched_right_count": job.unmatched["right"].rows,
        "output_paths": job.outputs.final_paths(),
        "source_rows": dict(job.source_rows),
        "null_key_rows": {left: job.unmatched["left"].null_key_rows,
                          right: job.unmatched["right"].null_key_rows},
        "key_columns": job.key_columns,
        "join_strategy": job.join_strategy,
        "stage_seconds": {k: round(v, 4) for k, v in job.timings.items()},
        "started_at": job.started_at.isoformat(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        **outcome(job, with_all_checks=True),
    }


def outcome(job: Job, with_all_checks: bool = False) -> dict:
    """Rule counts and the expect verdict; empty for a plain match_sql job without expect,
    whose results stay exactly what the reference describes."""
    out: dict = {}
    if job.spec.rules:
        out["rule_counts"] = dict(job.rule_counts)
        out["ambiguous"] = dict(job.ambiguous)
    if job.spec.expect is not None:
        checks = evaluate(job.spec.expect, facts(job))
        out["passed"] = all(check["passed"] for check in checks)
        out["failed_checks"] = [check for check in checks if not check["passed"]]
        if with_all_checks:
            out["checks"] = checks
    if job.spec.explain:
        out["break_reasons"] = {side: found["reasons"] for side, found in job.explained.items()}
        if with_all_checks:
            out["unexplained_rules"] = {rule: why for found in job.explained.values()
                                        for rule, why in found["unexplained_rules"].items()}
    return out


def facts(job: Job) -> Facts:
    left, right = job.spec.left.alias, job.spec.right.alias
    return Facts(left_rows=job.source_rows[left], right_rows=job.source_rows[right],
                 matched=job.matched_count, unmatched_left=job.unmatched["left"].rows,
                 unmatched_right=job.unmatched["right"].rows,
                 ambiguous=sum(job.ambiguous.values()))


def completion_body(job: Job) -> dict:
    """The completion callback: the reference's fields first, then Kalla's extras."""
    return {
        "run_id": job.spec.run_id,
        "matched_count": job.matched_count,
        "unmatched_left_count": job.unmatched["left"].rows,
        "unmatched_right_count": job.unmatched["right"].rows,
        "output_paths": job.outputs.final_paths(),
        "summary_path": job.outputs.final(SUMMARY),
        "source_rows": dict(job.source_rows),
        "stage_seconds": {k: round(v, 4) for k, v in job.timings.items()},
        **outcome(job),
    }


def run_job(spec: JobSpec, settings, report: Report | None = None,
            cancel: threading.Event | None = None) -> dict:
    """Run one reconciliation; return the completion body or raise KallaError(stage=...)."""
    job = Job(spec, settings, report, cancel)
    published = False
    try:
        for name, stage in STAGES:
            job.stage = name
            job.check_cancelled()
            started = time.perf_counter()
            stage(job)
            job.timings[name] = time.perf_counter() - started
        published = True
        return completion_body(job)
    except KallaError as exc:
        exc.stage = exc.stage or job.stage
        exc.message = scrub(exc.message, secrets_of(spec))
        exc.args = (exc.message,)
        raise
    except MemoryError:
        raise KallaError(f"{job.stage} ran out of memory; lower the data size or raise "
                         "KALLA_WORKER_MEMORY", stage=job.stage) from None
    except Exception as exc:  # a bug or an unexpected library error: still a clean callback
        text = scrub(f"{job.stage} failed: {type(exc).__name__}: {exc}", secrets_of(spec))
        raise KallaError(text, stage=job.stage) from None
    finally:
        if not published:
            job.outputs.discard()
        for connector in job.connectors.values():
            _close_quietly(connector)
        shutil.rmtree(job.scratch, ignore_errors=True)


def _close_quietly(connector) -> None:
    try:
        connector.close()
    except Exception:  # closing is best effort; the job's outcome is already decided
        pass
