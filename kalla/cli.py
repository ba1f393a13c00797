"""kalla run | serve | check  (bin/kalla-run is a thin shim onto `kalla run`).

Exit status of `kalla run`: 0 every job succeeded, 1 a job failed, 2 bad input
(invalid job file, settings or arguments).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import orjson

from .config import load_settings
from .errors import ConfigError, InvalidInput, KallaError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


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
    check = sub.add_parser("check", help="validate job files without running them")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("--source", action="append", default=[], metavar="ALIAS=URI")
    sub.add_parser("serve", help="run the HTTP job runner (KALLA_* settings)")
    return parser


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
    from .runner import run_files     # imports the data stack; `serve` must not
    return run_files(args, settings)


def load_job_file(path: str, bindings: list[str], settings, output: str | None = None):
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
