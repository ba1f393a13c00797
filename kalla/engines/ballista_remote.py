"""The Ballista side of Kalla: a self-contained program run by the Python that has the
``ballista`` wheel (KALLA_BALLISTA_PYTHON), never imported by Kalla itself.

Why a separate program: ballista 54.1.0 pins datafusion 54 and ships only a glibc >= 2.39
wheel, while Kalla runs on datafusion 55 (and on Debian 12, glibc 2.36). So this file uses
nothing but the standard library, ``datafusion`` and ``ballista`` - whatever ballista's own
environment has - and Kalla feeds it to that interpreter on standard input::

    python - scheduler [--bind HOST:PORT]
    python - executor --scheduler HOST:PORT [--bind HOST:PORT] [--concurrent-tasks N]
    python - ping URL
    python - match REQUEST.json

``match`` reads a request written by kalla/engines/ballista.py (staged Parquet paths,
match_sql already rewritten to native expressions, key columns), runs on the cluster:
a count of every source (proves the executors read the shared files), the match, and
one key anti-join per side, each written as Parquet by the executors themselves, then
writes its result as JSON next to the request. Exit status: 0 ok, 1 failed.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback

BARRIER_COLUMN = "__kalla_barrier"       # as in kalla/engine.py; Kalla drops it again
MATCHED_TABLE = "kalla matched"          # a space: no source alias can take this name
DEFAULT_PORT = 50050


def parse_url(url: str) -> tuple[str, int]:
    """``df://host:port`` -> (host, port).

    >>> parse_url("df://10.0.0.5:50050"), parse_url("df://[::1]:7000")
    (('10.0.0.5', 50050), ('::1', 7000))
    """
    rest = url[len("df://"):] if url.startswith("df://") else None
    host, sep, port = (rest or "").rpartition(":")
    if rest is None or not sep or not host or not port.isdigit():
        raise ValueError(f"expected df://HOST:PORT, got {url!r}")
    return host.strip("[]"), int(port)


def quote(name: str) -> str:
    """A SQL identifier, quoted.

    >>> quote('amount'), quote('a"b')
    ('"amount"', '"a""b"')
    """
    return '"' + name.replace('"', '""') + '"'


class Failure(Exception):
    """An outcome to report: ``kind`` tells Kalla what went wrong."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


def probe(url: str, timeout: float) -> None:
    """Fail fast and plainly when nothing listens at the scheduler's address."""
    host, port = parse_url(url)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise Failure("unreachable", f"cannot reach the Ballista scheduler at {url}: {reason}") from None


def connect(url: str, config: dict):
    try:
        from ballista import BallistaSessionContext
    except ImportError as exc:
        raise Failure("environment", f"this Python ({sys.executable}, {sys.version.split()[0]}) "
                      f"cannot import ballista: {exc}") from None
    return BallistaSessionContext(url, cluster_config=config)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for noise in ("DataFusion error: ", "Arrow error: ", "External error: ",
                  "Execution error: ", "Error during planning: "):
        text = text.replace(noise, "")
    return text.splitlines()[0] if text else type(exc).__name__


def within(seconds: float, what: str, work):
    """Run ``work()``; fail if it takes longer than ``seconds`` (e.g. no executor alive)."""
    box: dict = {}

    def run():
        try:
            box["value"] = work()
        except BaseException as exc:  # handed to the waiting thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise Failure("stalled", f"{what} did not finish within {seconds:g} s: is any Ballista "
                      "executor registered with the scheduler?")
    if "error" in box:
        raise box["error"]
    return box["value"]


def run_together(jobs) -> None:
    """Run callables on threads (the client waits with the GIL released); raise the first
    error."""
    errors: list[BaseException] = []

    def run(job):
        try:
            job()
        except BaseException as exc:  # handed to the waiting thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def parquet_parts(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".parquet"))


def count_sql(tables: list[str], keys: dict[str, list[str]]) -> str:
    """One query: the rows of every source, and of the left and right ones, how many have
    a NULL in their key. It reads the key columns, so it proves the executors see the files
    (a bare count(*) could be answered from Parquet statistics on the client)."""
    parts = []
    for i, table in enumerate(tables):
        nulls = " OR ".join(f"{quote(k)} IS NULL" for k in keys.get(table, [])) or "FALSE"
        parts.append(f"SELECT {i} AS source, count(*) AS n, "
                     f"sum(CASE WHEN {nulls} THEN 1 ELSE 0 END) AS null_keys FROM {quote(table)}")
    return " UNION ALL ".join(parts)


def anti_join_sql(table: str, keys: list[str], matched_columns: list[str]) -> str:
    """Source rows whose key is in no matched row; a NULL key part never equals anything.
    (No DISTINCT: an anti join only asks whether a key exists, and on a cluster every
    aggregation is one more shuffle.)

    >>> sql = anti_join_sql("l", ["id"], ["l__id"])
    >>> sql.startswith('SELECT s.* FROM "l" AS s LEFT ANTI JOIN (SELECT m."l__id" AS k0 ')
    True
    >>> sql.endswith('FROM "kalla matched" AS m) AS m ON s."id" = m.k0')
    True
    """
    picked = ", ".join(f"m.{quote(c)} AS k{i}" for i, c in enumerate(matched_columns))
    on = " AND ".join(f"s.{quote(k)} = m.k{i}" for i, k in enumerate(keys))
    return (f"SELECT s.* FROM {quote(table)} AS s LEFT ANTI JOIN "
            f"(SELECT {picked} FROM {quote(MATCHED_TABLE)} AS m) AS m ON {on}")


def run_match(request: dict) -> dict:
    """Match, then anti-join each side, all on the cluster; return the result to report."""
    from datafusion import SQLOptions, lit

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    ctx = connect(request["url"], request.get("config") or {})
    probe(request["url"], request.get("connect_timeout", 5.0))
    for table, path in request["sources"].items():
        ctx.register_parquet(table, path)
    keys = {side["table"]: side["keys"] for side in request["sides"]}
    tables = list(request["sources"])
    batches = within(request.get("start_timeout", 60.0), "a first query on the cluster",
                     lambda: ctx.sql(count_sql(tables, keys)).collect())
    counts = {table: {"rows": 0, "null_keys": 0} for table in tables}
    for batch in batches:
        for row in batch.to_pylist():
            counts[tables[row["source"]]] = {"rows": int(row["n"] or 0),
                                             "null_keys": int(row["null_keys"] or 0)}
    seconds["count"] = time.perf_counter() - started

    read_only = SQLOptions().with_allow_ddl(False).with_allow_dml(False).with_allow_statements(False)
    try:
        df = ctx.sql_with_options(request["sql"], read_only)
        names = df.schema().names
    except Exception as exc:  # datafusion raises plain Exceptions with its own text
        raise Failure("refused", "match_sql was refused by the cluster's planner: "
                      f"{first_line(exc)}") from None
    out = request["output_dir"]
    mark = time.perf_counter()
    df.with_column(BARRIER_COLUMN, lit(True)).write_parquet(os.path.join(out, "matched"),
                                                             compression="snappy")
    seconds["match"] = time.perf_counter() - mark

    mark = time.perf_counter()
    matched_parts = parquet_parts(os.path.join(out, "matched"))
    if matched_parts:
        ctx.register_parquet(MATCHED_TABLE, os.path.join(out, "matched"))
    jobs = []
    for side in request["sides"]:
        sql = (anti_join_sql(side["table"], side["keys"], side["matched_columns"]) if matched_parts
               else f"SELECT * FROM {quote(side['table'])}")      # nothing matched: every row
        path = os.path.join(out, f"unmatched_{side['side']}")
        jobs.append(lambda sql=sql, path=path: ctx.sql(sql).write_parquet(path, compression="snappy"))
    run_together(jobs)              # two cluster jobs at once: the executors share the work
    seconds["unmatched"] = time.perf_counter() - mark
    return {"ok": True, "matched_columns": names, "counts": counts,
            "seconds": {k: round(v, 4) for k, v in seconds.items()}}


def match_command(request_path: str) -> int:
    with open(request_path, encoding="utf-8") as fh:
        request = json.load(fh)
    try:
        result = run_match(request)
    except Failure as exc:
        result = {"ok": False, "kind": exc.kind, "message": exc.message}
    except Exception as exc:  # a cluster-side execution error: report its own words
        text = first_line(exc)
        kind = "unreachable" if "tcp connect error" in text or "Connection refused" in text else "failed"
        result = {"ok": False, "kind": kind, "message": text,
                  "detail": traceback.format_exc(limit=3)}
    tmp = request["result_path"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    os.replace(tmp, request["result_path"])
    sys.stdout.flush()
    # A stalled cluster call still runs in a daemon thread inside the Rust runtime:
    # leave without waiting for it.
    os._exit(0 if result["ok"] else 1)


def ping_command(url: str, timeout: float) -> int:
    try:
        connect(url, {})
        probe(url, timeout)
    except Failure as exc:
        print(json.dumps({"ok": False, "kind": exc.kind, "message": exc.message}))
        return 1
    print(json.dumps({"ok": True}))
    return 0


def host_port(text: str, default_host: str, default_port: int) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` or ``:PORT``.

    >>> host_port("0.0.0.0:50050", "127.0.0.1", 1), host_port(":7", "h", 1), host_port("h", "x", 9)
    (('0.0.0.0', 50050), ('h', 7), ('h', 9))
    """
    host, sep, port = text.rpartition(":")
    if not sep:
        return text or default_host, default_port
    return host.strip("[]") or default_host, int(port) if port else default_port


def serve(role: str, args) -> int:
    """Start a scheduler or an executor and block until SIGTERM/SIGINT."""
    import ballista
    if role == "scheduler":
        host, port = host_port(args.bind, "0.0.0.0", DEFAULT_PORT)
        node = ballista.BallistaScheduler(bind_host=host, bind_port=port)
    else:
        sched_host, sched_port = host_port(args.scheduler, "127.0.0.1", DEFAULT_PORT)
        host, port = host_port(args.bind, "0.0.0.0", 50051)
        node = ballista.BallistaExecutor(bind_port=port, bind_host=host, scheduler_host=sched_host,
                                         scheduler_port=sched_port,
                                         concurrent_tasks=args.concurrent_tasks or os.cpu_count() or 1)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())    # record only; the loop below acts
    node.start()
    print(f"kalla: ballista {role} {ballista.__version__} listening on {host}:{port}", flush=True)
    while not stop.wait(1.0):
        pass
    node.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ballista_remote")
    sub = parser.add_subparsers(dest="command", required=True)
    scheduler = sub.add_parser("scheduler")
    scheduler.add_argument("--bind", default=f"0.0.0.0:{DEFAULT_PORT}")
    executor = sub.add_parser("executor")
    executor.add_argument("--scheduler", default=f"127.0.0.1:{DEFAULT_PORT}")
    executor.add_argument("--bind", default="0.0.0.0:50051")
    executor.add_argument("--concurrent-tasks", type=int, default=0)
    ping = sub.add_parser("ping")
    ping.add_argument("url")
    ping.add_argument("--timeout", type=float, default=5.0)
    match = sub.add_parser("match")
    match.add_argument("request")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "match":
        return match_command(args.request)
    if args.command == "ping":
        return ping_command(args.url, args.timeout)
    return serve(args.command, args)


if __name__ == "__main__":
    sys.exit(main())
