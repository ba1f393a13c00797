"""The matching stage on an Apache Ballista cluster (KALLA_ENGINE=ballista).

Kalla never imports ballista: the wheel pins datafusion 54 (Kalla runs on 55) and needs
glibc >= 2.39. The cluster side is the self-contained program ballista_remote.py, fed on
standard input to the Python that has the wheel (KALLA_BALLISTA_PYTHON: a venv on a new
enough host, or scripts/ballista-env.sh's Debian 13 userland on an older one).

    staged Parquet in KALLA_SHARED_DIR  ->  ballista_remote.py match (on the cluster:
    counts, match, one key anti-join per side, each written as Parquet by the executors)
    ->  Kalla copies the parts into matched / unmatched_left / unmatched_right, typed
    exactly as local mode types them, with the same progress events and counts.

What the cluster cannot run is refused up front: jobs with ``rules`` (passes narrow the
sources with Polars on this host between passes) and ``jaro_winkler`` (a Python UDF;
executors run no Python).
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import JobCancelled, KallaError, MatchError
from ..sqltext import rewrite_calls, rewrite_functions, strip_statement_end
from . import setting
from .ballista_remote import BARRIER_COLUMN, parse_url

log = logging.getLogger("kalla.engines.ballista")
REMOTE_PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ballista_remote.py")
# Settings sent to the cluster with every job: plain Utf8 rather than Utf8View, as local
# mode sets them (kalla/engine.py), so outputs keep the sources' string types.
CLUSTER_CONFIG = {
    "datafusion.execution.parquet.schema_force_view_types": "false",
    "datafusion.sql_parser.map_string_types_to_utf8view": "false",
}
MIN_COPY_ROWS, MAX_COPY_ROWS = 65536, 1 << 20
# Python UDFs cannot be shipped to executors ("LogicalExtensionCodec is not provided").
PYTHON_FUNCTIONS = ("jaro_winkler",)


@dataclass(frozen=True)
class BallistaSettings:
    url: str
    shared_dir: str
    python: tuple[str, ...]
    start_timeout: float

    @classmethod
    def of(cls, settings) -> "BallistaSettings":
        timeout = setting(settings, "KALLA_BALLISTA_START_TIMEOUT", "60") or "60"
        shared = setting(settings, "KALLA_SHARED_DIR")
        return cls(url=setting(settings, "KALLA_BALLISTA_URL").strip(),
                   shared_dir=os.path.realpath(shared) if shared else "",
                   python=tuple(shlex.split(setting(settings, "KALLA_BALLISTA_PYTHON"))),
                   start_timeout=float(timeout))


def refuse(message: str) -> MatchError:
    return MatchError(f"KALLA_ENGINE=ballista: {message}")


def check_settings(bs: BallistaSettings) -> None:
    if not bs.url:
        raise refuse("set KALLA_BALLISTA_URL=df://HOST:PORT, the address of the Ballista scheduler")
    try:
        parse_url(bs.url)
    except ValueError as exc:
        raise refuse(f"KALLA_BALLISTA_URL: {exc}") from None
    if not bs.shared_dir or not os.path.isdir(bs.shared_dir):
        raise refuse("set KALLA_SHARED_DIR to a directory that every Ballista executor sees at "
                     f"the same path (got {bs.shared_dir or 'nothing'!r})")
    if not bs.python:
        raise refuse("set KALLA_BALLISTA_PYTHON to the command of a Python that has "
                     "ballista==54.1.0 (see docs/ballista.md)")


def check_spec(spec) -> None:
    """Refuse what executors cannot run, naming the way out."""
    if spec.rules:
        raise refuse("jobs with 'rules' run only with KALLA_ENGINE=local: between passes the "
                     "remaining records are narrowed on this host")
    sqls = [spec.match_sql] + [rule.match_sql for rule in spec.rules]
    for name in PYTHON_FUNCTIONS:
        if any(_calls(sql, name) for sql in sqls):
            raise refuse(f"match_sql calls {name}, a Python function that Ballista executors "
                         "cannot run; use the native functions (tolerance_match, tolerance_pct, "
                         "date_within, normalize_ref, levenshtein) or KALLA_ENGINE=local")


def _calls(sql: str, name: str) -> bool:
    found = []
    rewrite_calls(sql, {name: lambda args: found.append(args) or ""})
    return bool(found)


def check_job(job) -> None:
    """The up-front check (before staging): settings, the job's SQL, and the scheduler."""
    bs = BallistaSettings.of(job.settings)
    check_settings(bs)
    check_spec(job.spec)
    ping(bs)


def ping(bs: BallistaSettings) -> None:
    """The Ballista Python runs and the scheduler accepts connections."""
    try:
        proc = subprocess.run([*bs.python, "-", "ping", bs.url], input=_program(),
                              capture_output=True, timeout=120, start_new_session=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _not_runnable(bs, exc) from None
    outcome = _last_json(proc.stdout)
    if outcome is None:
        raise _no_result(bs, proc.returncode, proc.stderr)
    if not outcome["ok"]:
        raise _failure(outcome, bs)


def run_match(job) -> None:
    bs = BallistaSettings.of(job.settings)
    check_settings(bs)
    check_spec(job.spec)
    workdir, owned = _job_dir(job, bs)
    try:
        started = time.perf_counter()
        request = _request(job, bs, workdir)
        schema = _local_schema(job)     # exactly what local mode would write
        planned = time.perf_counter()
        result = _call(job, bs, request)
        _check_result(job, result, bs, schema)
        called = time.perf_counter()
        _publish_parts(job, request, result, schema)
        log.info("run %s on %s: cluster seconds %s, host seconds %s", job.spec.run_id, bs.url,
                 result["seconds"], {"plan": round(planned - started, 4),
                                     "client": round(called - planned, 4),
                                     "publish": round(time.perf_counter() - called, 4)})
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)


def _job_dir(job, bs: BallistaSettings) -> tuple[str, bool]:
    """Where this job's cluster files go: inside its scratch when that is shared already."""
    if _inside(job.scratch, bs.shared_dir):
        path = os.path.join(job.scratch, "ballista")
        os.makedirs(path, exist_ok=True)
        owned = False
    else:
        path = tempfile.mkdtemp(prefix=f"kalla-{job.spec.run_id}-", dir=bs.shared_dir)
        owned = True
    # Executors may run as another user of Kalla's group (docs/ballista.md).
    os.chmod(path, 0o770)
    return path, owned


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([path, root]) == root


def _shared_copy(path: str, workdir: str, alias: str) -> str:
    """A staged file the executors can read: itself when under KALLA_SHARED_DIR, else a
    hard link (same file system) or a copy in the job's shared directory."""
    target = os.path.join(workdir, f"source-{alias.lower()}.parquet")
    try:
        os.link(path, target)
    except OSError:
        shutil.copyfile(path, target)
    return target


def _request(job, bs: BallistaSettings, workdir: str) -> dict:
    sources = {}
    for alias, files in job.staged.items():
        if len(files) != 1:
            raise MatchError(f"source {alias!r} is staged as {len(files)} files; "
                             "the Ballista engine takes one per source")
        path = os.path.realpath(files[0])
        if not _inside(path, bs.shared_dir):
            path = _shared_copy(path, workdir, alias)
        sources[alias.lower()] = path
    sides = []
    for side, spec in (("left", job.spec.left), ("right", job.spec.right)):
        sides.append({"side": side, "table": spec.alias.lower(),
                      "keys": list(job.spec.primary_keys[spec.alias]),
                      "matched_columns": list(job.key_columns[spec.alias])})
    output_dir = os.path.join(workdir, "out")
    os.makedirs(output_dir)
    os.chmod(output_dir, 0o770)
    request = {"url": bs.url, "sql": rewrite_functions(strip_statement_end(job.spec.match_sql)),
               "sources": sources, "sides": sides, "output_dir": output_dir,
               "config": CLUSTER_CONFIG, "start_timeout": bs.start_timeout,
               "result_path": os.path.join(workdir, "result.json")}
    request["request_path"] = os.path.join(workdir, "request.json")
    with open(request["request_path"], "w", encoding="utf-8") as fh:
        json.dump(request, fh)
    return request


def _local_schema(job):
    """The match's output schema as Kalla's own DataFusion plans it (barrier dropped)."""
    from ..engine import make_context, plan_match, register_parquet
    ctx = make_context(memory_bytes=64 << 20, spill_dir=os.path.join(job.scratch, "spill"))
    for alias, files in job.staged.items():
        register_parquet(ctx, alias, files[0])
    schema = plan_match(ctx, job.spec.match_sql).schema()
    return schema.remove(schema.get_field_index(BARRIER_COLUMN))


def _call(job, bs: BallistaSettings, request: dict) -> dict:
    """Run the remote program; follow cancellation; return its result."""
    log_path = os.path.join(os.path.dirname(request["request_path"]), "client.log")
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([*bs.python, "-", "match", request["request_path"]],
                                    stdin=subprocess.PIPE, stdout=log, stderr=log,
                                    start_new_session=True)
    except OSError as exc:
        raise _not_runnable(bs, exc) from None
    try:
        proc.stdin.write(_program())
        proc.stdin.close()
        while proc.poll() is None:
            if job.cancel.is_set():
                raise JobCancelled("job was cancelled", stage="matching")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:      # cancelled, or this thread failed: stop the client
            _kill(proc)
    try:
        with open(request["result_path"], encoding="utf-8") as fh:
            result = json.load(fh)
    except (OSError, ValueError):
        with open(log_path, "rb") as fh:
            raise _no_result(bs, proc.returncode, fh.read()) from None
    if not result["ok"]:
        raise _failure(result, bs)
    return result


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(5)
    except (OSError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()


def _check_result(job, result: dict, bs: BallistaSettings, schema) -> None:
    """The cluster planned the columns Kalla planned, and its executors read as many rows
    as Kalla staged - else KALLA_SHARED_DIR is not what they see."""
    if result["matched_columns"] != schema.names:
        raise MatchError(f"the cluster's DataFusion names the match_sql columns "
                         f"{result['matched_columns']} where Kalla's names them {schema.names}; "
                         "give every column an explicit name (AS ...)")
    for alias, staged in job.source_rows.items():
        seen = result["counts"].get(alias.lower(), {}).get("rows")
        if seen != staged:
            raise MatchError(f"the Ballista executors read {seen} rows of source {alias!r} where "
                             f"Kalla staged {staged}: every executor must see KALLA_SHARED_DIR "
                             f"({bs.shared_dir}) at the same path")


def _publish_parts(job, request: dict, result: dict, schema) -> None:
    """Copy the executors' part files into the job's three output files (at once: Arrow
    decodes and encodes without the GIL), typed exactly as local mode types them."""
    import pyarrow.parquet as pq

    from ..unmatched import UnmatchedResult

    out = request["output_dir"]
    job.join_strategy = "ballista"
    total = sum(_rows(p) for p in _parts(os.path.join(out, "matched")))
    copies = {"matched": (schema, total)}
    for side in request["sides"]:
        alias = job.spec.left.alias if side["side"] == "left" else job.spec.right.alias
        copies[f"unmatched_{side['side']}"] = (pq.read_schema(job.staged[alias][0]), None)
    with ThreadPoolExecutor(len(copies)) as pool:
        rows = {name: pool.submit(_concat, job, os.path.join(out, name), target_schema,
                                  job.outputs.partial(name), expected)
                for name, (target_schema, expected) in copies.items()}
        rows = {name: future.result() for name, future in rows.items()}
    job.matched_count = rows["matched"]
    job.unmatched = {side["side"]: UnmatchedResult(rows[f"unmatched_{side['side']}"],
                                                   result["counts"][side["table"]]["null_keys"])
                     for side in request["sides"]}
    job.report({"stage": "matching", "progress": 1.0, "matched_count": job.matched_count})


def _parts(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    names = [n for n in os.listdir(directory) if n.endswith(".parquet")]
    return [os.path.join(directory, n) for n in sorted(names, key=_part_order)]


def _part_order(name: str) -> tuple:
    """Executors name parts <job>_<partition>.parquet: order them by partition number.

    >>> sorted(["j_10.parquet", "j_2.parquet"], key=_part_order)
    ['j_2.parquet', 'j_10.parquet']
    """
    stem = name[: -len(".parquet")]
    head, _, tail = stem.rpartition("_")
    return (head, int(tail)) if tail.isdigit() else (stem, -1)


def _batch_rows(parts: list[str], memory_bytes: int) -> int:
    """Rows per copied batch: large (each batch is one row group, and small row groups cost
    a third more time here), within a sixteenth of the job's memory budget per copy."""
    import pyarrow.parquet as pq
    rows = size = 0
    for path in parts:
        meta = pq.ParquetFile(path).metadata
        rows += meta.num_rows
        size += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    row_bytes = max(1, size // max(rows, 1))
    return max(MIN_COPY_ROWS, min(MAX_COPY_ROWS, memory_bytes // 16 // row_bytes))


def _rows(path: str) -> int:
    import pyarrow.parquet as pq
    return pq.ParquetFile(path).metadata.num_rows


def _concat(job, directory: str, schema, out_path: str, total: int | None = None) -> int:
    """Stream every part into one Parquet file of ``schema``; report matched progress."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, last = 0, time.monotonic()
    parts = _parts(directory)
    batch_rows = _batch_rows(parts, job.memory_bytes)
    with pq.ParquetWriter(out_path, schema, compression="snappy") as writer:
        for path in parts:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows,
                                                           columns=schema.names):
                job.check_cancelled()
                if not batch.num_rows:
                    continue
                try:
                    batch = pa.RecordBatch.from_arrays(
                        [batch.column(field.name).cast(field.type) for field in schema],
                        schema=schema)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise MatchError("the cluster's output does not fit the planned types: "
                                     f"{exc}") from None
                writer.write_batch(batch)
                rows += batch.num_rows
                if total is not None and time.monotonic() - last >= job.settings.progress_interval:
                    last = time.monotonic()
                    job.report({"stage": "matching", "matched_count": rows,
                                "progress": round(min(0.99, rows / max(total, 1)), 4)})
    return rows


# -- the remote program -----------------------------------------------------------------

def _program() -> bytes:
    with open(REMOTE_PROGRAM, "rb") as fh:
        return fh.read()


def _last_json(output: bytes) -> dict | None:
    for line in reversed(output.decode(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def _not_runnable(bs: BallistaSettings, exc: Exception) -> MatchError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return refuse(f"KALLA_BALLISTA_PYTHON={shlex.join(bs.python)!r} cannot be run: {reason}")


def _no_result(bs: BallistaSettings, status: int, output: bytes) -> MatchError:
    tail = " | ".join(output.decode(errors="replace").strip().splitlines()[-3:]) or "no output"
    return MatchError(f"the Ballista client ({shlex.join(bs.python)}) exited with status "
                      f"{status} without a result: {tail}")


def _failure(result: dict, bs: BallistaSettings) -> KallaError:
    kind, message = result.get("kind"), result.get("message", "unknown error")
    if kind == "environment":
        message += (" (KALLA_BALLISTA_PYTHON must run a Python with ballista==54.1.0; "
                    "see docs/ballista.md)")
    elif kind == "unreachable":
        message += " (KALLA_BALLISTA_URL)"
    elif kind == "failed":
        message = f"the match failed on the Ballista cluster: {message}"
    error = MatchError(message)
    error.retryable = kind in ("unreachable", "stalled")   # the cluster may come back
    return error


# -- kalla ballista-scheduler | ballista-executor ---------------------------------------

def launch_node(role: str, argv: list[str], settings, python: str | None = None) -> int:
    """Run a scheduler or executor in the Ballista Python until SIGTERM; return its status.

    A thin launcher: the child gets the remote program on stdin; SIGTERM and SIGINT are
    passed on, so systemd's stop reaches the node, which closes cleanly.
    """
    command = shlex.split(python or setting(settings, "KALLA_BALLISTA_PYTHON"))
    if not command:
        print("kalla: set KALLA_BALLISTA_PYTHON (or --ballista-python) to the command of a "
              "Python that has ballista==54.1.0; see docs/ballista.md", file=sys.stderr)
        return 2
    try:
        proc = subprocess.Popen([*command, "-", role, *argv], stdin=subprocess.PIPE,
                                preexec_fn=_die_with_parent())
    except OSError as exc:
        print(f"kalla: cannot run {shlex.join(command)}: {exc.strerror}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
    proc.stdin.write(_program())
    proc.stdin.close()
    return proc.wait()


def _die_with_parent():
    """Linux: the node gets SIGTERM if the launcher dies, even by SIGKILL - no orphan
    scheduler keeps its port. (The launcher is single-threaded, so preexec_fn is safe.)"""
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)
