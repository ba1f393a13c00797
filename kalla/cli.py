"""kalla run | serve | check  (bin/kalla-run is a thin shim onto `kalla run`).
`kalla ballista-scheduler` and `kalla ballista-executor` launch Apache Ballista nodes.

Exit status of `kalla run`: 0 every job succeeded, 1 a job failed, 2 bad input
(invalid job file, settings or arguments), 3 every job ran but one failed its ``expect``
checks. With several files the most severe status wins: 2, then 1, then 3, then 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import orjson

from .config import load_settings
from .errors import ConfigError, InvalidInput, KallaError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_EXPECTATIONS = 0, 1, 2, 3
# Severity, for several files: a job that could not run outranks one that missed a threshold.
EXIT_SEVERITY = {EXIT_OK: 0, EXIT_EXPECTATIONS: 1, EXIT_FAILED: 2, EXIT_BAD_INPUT: 3}


def worst(a: int, b: int) -> int:
    """The more severe of two exit statuses.

    >>> worst(EXIT_EXPECTATIONS, EXIT_FAILED), worst(EXIT_OK, EXIT_EXPECTATIONS)
    (1, 3)
    """
    return a if EXIT_SEVERITY[a] >= EXIT_SEVERITY[b] else b


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kalla", description="Kalla reconciliation engine")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run job (or recipe) files in-process")
    run.add_argument("files", nargs="+", metavar="FILE", help="JobRequest or Recipe JSON files")
    run.add_argument("--json", action="store_true", help="print each result as one JSON line")
    run.add_argument("--source", action="append", default=[], metavar="ALIAS=URI",
                     help="bind a recipe's file source to a path or URI (repeatable)")
    run.add_argument("--output", metavar="DIR", help="output directory (overrides output_path)")
    run.add_argument("--quiet", action="store_true", help="no progress on stderr")
    run.add_argument("--explain", action="store_true",
                     help="say why each unmatched record did not match (docs/explain.md)")
    check = sub.add_parser("check", help="validate job files without running them")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("--source", action="append", default=[], metavar="ALIAS=URI")
    sub.add_parser("serve", help="run the HTTP job runner (KALLA_* settings)")
    add_ballista_commands(sub)
    return parser


def add_ballista_commands(sub) -> None:
    """Thin launchers of Apache Ballista nodes, run by KALLA_BALLISTA_PYTHON (docs/ballista.md)."""
    python = {"metavar": "CMD", "help": "the Python that has ballista==54.1.0 "
                                         "(default: KALLA_BALLISTA_PYTHON)"}
    scheduler = sub.add_parser("ballista-scheduler", help="run an Apache Ballista scheduler")
    scheduler.add_argument("--bind", default="0.0.0.0:50050", metavar="HOST:PORT",
                           help="address to listen on (default 0.0.0.0:50050)")
    scheduler.add_argument("--ballista-python", **python)
    executor = sub.add_parser("ballista-executor", help="run an Apache Ballista executor")
    executor.add_argument("--scheduler", default="127.0.0.1:50050", metavar="HOST:PORT",
                          help="the scheduler to register with (default 127.0.0.1:50050)")
    executor.add_argument("--bind", default="0.0.0.0:50051", metavar="HOST:PORT",
                          help="address of its data (Flight) port; it also takes port 50052")
    executor.add_argument("--concurrent-tasks", type=int, default=0, metavar="N",
                          help="tasks run at once (default: the number of cores)")
    executor.add_argument("--ballista-python", **python)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"kalla: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        from .service.supervisor import serve
        return serve(settings)
    if args.command == "check":
        return check_files(args, settings)
    if args.command.startswith("ballista-"):
        return launch_ballista(args, settings)
    from .runner import run_files     # imports the data stack; `serve` must not
    return run_files(args, settings)


def launch_ballista(args, settings) -> int:
    from .engines.ballista import launch_node
    role = args.command.removeprefix("ballista-")
    argv = ["--bind", args.bind]
    if role == "executor":
        argv += ["--scheduler", args.scheduler, "--concurrent-tasks", str(args.concurrent_tasks)]
    return launch_node(role, argv, settings, args.ballista_python)


def load_job_file(path: str, bindings: list[str], settings, output: str | None = None,
                  explain: bool = False):
    """Parse a JobRequest or Recipe file into a JobSpec (raises InvalidInput)."""
    from .jobs import is_recipe, parse_job, recipe_to_job
    try:
        with open(path, "rb") as fh:
            data = orjson.loads(fh.read())
    except OSError as exc:
        raise InvalidInput(path, f"cannot read job file: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(path, f"not valid JSON: {exc}") from None
    # Relative paths in a job file resolve against the current directory, like any CLI.
    kwargs = {"output_root": settings.output_root, "data_roots": settings.data_roots}
    if explain and isinstance(data, dict):
        data = {**data, "explain": True}
    if is_recipe(data):
        return recipe_to_job(data, _bindings(bindings), output, **kwargs)
    if bindings:
        raise InvalidInput("--source", "only recipe files take --source bindings")
    if output and isinstance(data, dict):
        data = {**data, "output_path": output}
    return parse_job(data, batch=True, **kwargs)


def _bindings(items: list[str]) -> dict[str, str]:
    bindings = {}
    for item in items:
        alias, sep, uri = item.partition("=")
        if not sep or not alias or not uri:
            raise InvalidInput("--source", f"expected ALIAS=URI, got {item!r}")
        bindings[alias] = os.path.abspath(uri) if "://" not in uri else uri
    return bindings


def check_files(args, settings) -> int:
    status = EXIT_OK
    for path in args.files:
        try:
            spec = load_job_file(path, args.source, settings)
            print(f"{path}: ok ({len(spec.sources)} sources)")
        except KallaError as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            status = EXIT_BAD_INPUT
    return status
