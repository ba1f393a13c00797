"""The settings table: every KALLA_* variable is declared once, here.

Each row is (name, default, help, parser). `load_settings` reads the environment,
validates every value once at start-up and returns an immutable `Settings`.
docs/configuration.md and systemd/kalla.env.example are checked against this table.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .errors import ConfigError

_SIZE_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2,
               "G": 1000**3, "GB": 1000**3, "T": 1000**4, "TB": 1000**4,
               "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


def parse_size(text: str) -> int:
    """Parse a byte size such as ``512MiB``, ``1GiB``, ``2GB`` or ``1048576``.

    >>> parse_size("1GiB"), parse_size("512 MB"), parse_size("42")
    (1073741824, 512000000, 42)
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise ValueError("expected a size such as 1GiB, 512MiB, 2GB or a number of bytes")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be 1 or more")
    return value


def _cores(text: str) -> int:
    """A count, or ``auto`` for the number of cores."""
    return os.cpu_count() or 1 if text == "auto" else _positive_int(text)


def _partitions(text: str) -> int:
    return max(2, os.cpu_count() or 1) if text == "auto" else _positive_int(text)


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _bind(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:50050")
    return host.strip("[]"), int(port)


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return text
    return parse


def _optional_str(text: str) -> str | None:
    return text or None


def _path(text: str) -> str:
    return os.path.abspath(os.path.expanduser(text))


def _optional_path(text: str) -> str | None:
    return _path(text) if text else None


def _path_list(text: str) -> tuple[str, ...] | None:
    paths = tuple(_path(p) for p in text.split(":") if p)
    return paths or None


def _host_list(text: str) -> tuple[str, ...] | None:
    hosts = tuple(h.strip().lower() for h in text.split(",") if h.strip())
    return hosts or None


def _memory(text: str) -> int:
    if text == "auto":
        return _default_worker_memory()
    value = parse_size(text)
    if value < 64 * 1024**2:
        raise ValueError("must be at least 64MiB")
    return value


def _memory_cap(text: str) -> int | None:
    """``auto`` (None: derived from KALLA_WORKER_MEMORY by the supervisor), 0, or a size."""
    if text == "auto":
        return None
    value = parse_size(text)
    if value and value < 128 * 1024**2:
        raise ValueError("must be 0 (no cap) or at least 128MiB")
    return value


def _default_worker_memory() -> int:
    """Half the machine's RAM shared between the worker processes."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 4 * 1024**3
    workers = _cores(os.environ.get("KALLA_WORKERS") or "auto")
    return max(256 * 1024**2, total // 2 // workers)


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    help: str
    parse: Callable[[str], Any]

    @property
    def attr(self) -> str:
        return self.name.removeprefix("KALLA_").lower()


SETTINGS: tuple[Setting, ...] = (
    Setting("KALLA_BIND", "127.0.0.1:50050", "host:port the HTTP API listens on", _bind),
    Setting("KALLA_WORKERS", "auto",
            "worker processes running jobs; auto = the number of cores", _cores),
    Setting("KALLA_QUEUE_SIZE", "16",
            "jobs waiting for a worker; beyond it POST /api/jobs answers 500 with Retry-After",
            _positive_int),
    Setting("KALLA_STATE_DIR", "./state",
            "directory of the job journal (SQLite); /var/lib/kalla under systemd", _path),
    Setting("KALLA_WORK_DIR", "",
            "scratch space for staged data and DataFusion spill files (default: system temp)",
            _optional_path),
    Setting("KALLA_OUTPUT_ROOT", "",
            "when set, output_path must resolve inside it; relative paths resolve against it",
            _optional_path),
    Setting("KALLA_DATA_ROOTS", "",
            "when set (':'-separated), local source paths must resolve inside one of them",
            _path_list),
    Setting("KALLA_WORKER_MEMORY", "auto",
            "memory budget of one job (DataFusion pool and buffers), e.g. 1GiB; "
            "auto = half the RAM divided by KALLA_WORKERS", _memory),
    Setting("KALLA_WORKER_MEMORY_LIMIT", "auto",
            "hard cap on one worker process's resident memory: a worker above it is killed and "
            "its job fails; auto = 2 x KALLA_WORKER_MEMORY + 1GiB, 0 = no cap", _memory_cap),
    Setting("KALLA_JOIN_STRATEGY", "auto",
            "auto: hash joins when the smaller inputs fit the memory budget, else spilling "
            "sort-merge joins; hash or sort-merge forces one", _choice("auto", "hash", "sort-merge")),
    Setting("KALLA_CALLBACK_STYLE", "exact",
            "exact: POST every callback to callback_url; suffix: append /progress, "
            "/complete or /error", _choice("exact", "suffix")),
    Setting("KALLA_CALLBACK_TIMEOUT", "10",
            "seconds one callback POST may take before it counts as failed", _non_negative_float),
    Setting("KALLA_CALLBACK_RETRIES", "8",
            "attempts for completion and error callbacks (exponential backoff)", _positive_int),
    Setting("KALLA_CALLBACK_BACKOFF", "0.5",
            "seconds before the first retry of a completion or error callback; doubles up to 8 s",
            _non_negative_float),
    Setting("KALLA_CALLBACK_HOSTS", "",
            "when set (comma-separated), callback_url must name one of these hosts", _host_list),
    Setting("KALLA_API_TOKEN", "",
            "when set, /api/* requires 'Authorization: Bearer <token>'", _optional_str),
    Setting("KALLA_STOP_TIMEOUT", "30",
            "seconds SIGTERM waits for running jobs before re-queueing them", _non_negative_float),
    Setting("KALLA_MAX_BODY_BYTES", "1048576", "request body cap; larger bodies get 413",
            _positive_int),
    Setting("KALLA_READ_TIMEOUT", "10",
            "seconds the API waits for a client to send its request", _non_negative_float),
    Setting("KALLA_RETENTION_DAYS", "30",
            "finished jobs older than this are pruned from the journal", _non_negative_float),
    Setting("KALLA_PARTITIONS", "auto",
            "parallel partitions per PostgreSQL or S3 source; auto = the number of cores, "
            "at least 2", _partitions),
    Setting("KALLA_BATCH_ROWS", "65536", "rows per Arrow record batch read from a source",
            _positive_int),
    Setting("KALLA_PROGRESS_INTERVAL", "0.5",
            "minimum seconds between two progress callbacks of one stage", _non_negative_float),
    Setting("KALLA_ENGINE", "local",
            "where the match runs: local (in-process DataFusion) or ballista (an Apache Ballista "
            "cluster; docs/ballista.md)", _choice("local", "ballista")),
    Setting("KALLA_BALLISTA_URL", "",
            "the Ballista scheduler, df://HOST:PORT (KALLA_ENGINE=ballista)", _optional_str),
    Setting("KALLA_SHARED_DIR", "",
            "a directory every Ballista executor sees at the same path: staged Parquet and each "
            "job's cluster output (KALLA_ENGINE=ballista)", _optional_path),
    Setting("KALLA_BALLISTA_PYTHON", "",
            "command of a Python that has ballista==54.1.0, e.g. /opt/kalla-ballista/bin/python "
            "(KALLA_ENGINE=ballista; kalla ballista-scheduler and ballista-executor)", _optional_str),
    Setting("KALLA_BALLISTA_START_TIMEOUT", "60",
            "seconds the Ballista cluster may take to run a job's first query before Kalla "
            "decides no executor is registered", _non_negative_float),
    Setting("KALLA_LOG_LEVEL", "INFO", "log level: DEBUG, INFO, WARNING or ERROR",
            _choice("DEBUG", "INFO", "WARNING", "ERROR")),
)

SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


class Settings:
    """Validated settings; attribute names are the variable names without KALLA_, lower case."""

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, attr: str) -> Any:
        try:
            return self._values[attr]
        except KeyError:
            raise AttributeError(attr) from None

    def __setattr__(self, attr: str, value: Any) -> None:
        raise AttributeError("Settings are read-only; use replace()")

    def replace(self, **changes: Any) -> "Settings":
        unknown = set(changes) - set(self._values)
        if unknown:
            raise AttributeError(f"unknown settings: {sorted(unknown)}")
        return Settings({**self._values, **changes})

    def to_env(self) -> dict[str, str]:
        """The raw environment that reproduces these settings in another process."""
        return dict(self._values["_raw"])


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every KALLA_* setting; raise ConfigError naming each bad one."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    raw: dict[str, str] = {}
    problems = []
    for setting in SETTINGS:
        text = environ.get(setting.name)
        if text is None:
            text = setting.default
        else:
            raw[setting.name] = text
        try:
            values[setting.attr] = setting.parse(text.strip())
        except (ValueError, TypeError) as exc:
            problems.append(f"{setting.name}={text!r}: {exc} ({setting.help})")
    unknown = sorted(k for k in environ if k.startswith("KALLA_") and k not in SETTINGS_BY_NAME
                     and not k.startswith("KALLA_TEST_"))
    if unknown:
        problems.append(f"unknown settings {', '.join(unknown)}: see docs/configuration.md")
    if problems:
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems))
    values["_raw"] = raw
    return Settings(values)
