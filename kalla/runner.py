"""`kalla run`: run job files in-process with progress on stderr and a summary on stdout."""
from __future__ import annotations

import sys
import time

import orjson

from .callbacks import CallbackSender, Courier, url_problem
from .cli import EXIT_BAD_INPUT, EXIT_EXPECTATIONS, EXIT_FAILED, EXIT_OK, load_job_file, worst
from .errors import KallaError
from .pipeline import run_job


class TerminalProgress:
    """Progress on stderr: a bar per stage when stderr is a terminal, silent otherwise."""

    def __init__(self, stream=sys.stderr, enabled: bool | None = None):
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled

    def __call__(self, event: dict) -> None:
        if not self.enabled:
            return
        fraction = float(event.get("progress") or 0.0)
        bar = "#" * int(fraction * 30)
        what = event.get("source") or (f"{event['matched_count']:,} matched"
                                       if "matched_count" in event else "")
        self.stream.write(f"\r{event['stage']:<10} [{bar:<30}] {fraction:6.1%} {what:<30}")
        if fraction >= 1.0:
            self.stream.write("\n")
        self.stream.flush()


def run_files(args, settings) -> int:
    status = EXIT_OK
    for path in args.files:
        try:
            spec = load_job_file(path, args.source, settings, args.output, args.explain)
        except KallaError as exc:
            print(f"kalla: {path}: {exc}", file=sys.stderr)
            status = worst(status, EXIT_BAD_INPUT)
            continue
        status = worst(status, run_one(spec, settings, args))
    return status


def run_one(spec, settings, args) -> int:
    progress = TerminalProgress(enabled=False if args.quiet else None)
    courier = None
    if spec.callback_url:
        problem = url_problem(spec.callback_url, settings.callback_hosts)
        if problem:
            print(f"kalla: callback_url: {problem}", file=sys.stderr)
            return EXIT_BAD_INPUT
        sender = CallbackSender(spec.callback_url, style=settings.callback_style,
                                timeout=settings.callback_timeout, retries=settings.callback_retries,
                                backoff=settings.callback_backoff, allowed_hosts=settings.callback_hosts)
        # progress goes through a courier thread: a slow receiver never slows the job
        courier = Courier(sender, spec.run_id)

    def report(event: dict) -> None:
        progress(event)
        if courier:
            courier.progress(event)

    started = time.perf_counter()
    try:
        result = run_job(spec, settings, report)
    except KallaError as exc:
        body = {"run_id": spec.run_id, "error": str(exc), "stage": exc.stage}
        _finish(courier, "error", body)
        if args.json:
            print(orjson.dumps({**body, "status": "failed"}).decode())
        print(f"kalla: run {spec.run_id} failed in {exc.stage or 'setup'}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT if exc.exit_code == EXIT_BAD_INPUT else EXIT_FAILED
    _finish(courier, "complete", result)
    if args.json:
        print(orjson.dumps({**result, "status": "completed"}).decode())
    else:
        print(format_summary(result, time.perf_counter() - started))
    if result.get("passed") is False:
        failed = ", ".join(check["check"] for check in result["failed_checks"])
        print(f"kalla: run {spec.run_id} failed its expectations: {failed}", file=sys.stderr)
        return EXIT_EXPECTATIONS
    return EXIT_OK


def _finish(courier, kind: str, body: dict) -> None:
    """Queue the terminal callback after the progress already waiting, and wait for it."""
    if courier:
        courier.finish(kind, body)
        courier.done.wait()


def format_summary(result: dict, seconds: float) -> str:
    paths = result["output_paths"]
    lines = [f"run {result['run_id']} completed in {seconds:.2f}s"]
    for name, key in (("matched", "matched_count"), ("unmatched_left", "unmatched_left_count"),
                      ("unmatched_right", "unmatched_right_count")):
        lines.append(f"  {name:<16} {result[key]:>12,}  {paths[name]}")
    sources = ", ".join(f"{alias} {rows:,}" for alias, rows in result.get("source_rows", {}).items())
    lines.append(f"  source rows      {sources}")
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in result.get("stage_seconds", {}).items())
    lines.append(f"  stages           {stages}")
    ambiguous = result.get("ambiguous", {})
    for rule, count in result.get("rule_counts", {}).items():
        held = f"  ({ambiguous[rule]:,} ambiguous held back)" if ambiguous.get(rule) else ""
        lines.append(f"  rule {rule!r}: {count:,} matched{held}")
    for side, reasons in result.get("break_reasons", {}).items():
        top = sorted(reasons.items(), key=lambda item: -item[1])
        lines.append(f"  {side} breaks     " + ", ".join(f"{reason} {n:,}" for reason, n in top))
        for reason, keys in _example_keys(result["output_paths"][f"unmatched_{side}"], top[:3]).items():
            lines.append(f"    {reason}: e.g. {', '.join(keys)}")
    if "passed" in result:
        lines.append(f"  expectations     {'passed' if result['passed'] else 'FAILED'}")
        for check in result["failed_checks"]:
            lines.append(f"    {check['check']}: actual {check['actual']}, expected {check['expected']}")
    return "\n".join(lines)


def _example_keys(path: str, reasons, per_reason: int = 3) -> dict[str, list[str]]:
    """A few unmatched records per reason, shown by their first column (usually the key)."""
    import pyarrow.parquet as pq
    wanted = {reason for reason, _ in reasons}
    first = pq.read_schema(path).names[0]
    table = pq.read_table(path, columns=[first, "_kalla_reason"])
    examples: dict[str, list[str]] = {}
    for row in table.select([first, "_kalla_reason"]).to_pylist():
        reason = row["_kalla_reason"]
        if reason in wanted and len(examples.setdefault(reason, [])) < per_reason:
            examples[reason].append(str(row[first]))
    return examples
