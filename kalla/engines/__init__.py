"""Where the match runs (KALLA_ENGINE).

``local`` - in-process DataFusion (kalla/matching.py), the default.
``ballista`` - an Apache Ballista cluster (kalla/engines/ballista.py): the staged Parquet
sits in KALLA_SHARED_DIR, the cluster runs the match and the key anti-joins and writes
Parquet there, and Kalla publishes the same files, counts and callbacks as in local mode.

This package imports no data library at import time: the service side may import it.
"""
from __future__ import annotations

import os

ENGINES = ("local", "ballista")


def setting(settings, name: str, default: str = "") -> str:
    """A KALLA_* value: the Settings attribute once kalla/config.py declares it, else the
    environment (the engine's settings were added after the settings table)."""
    value = getattr(settings, name.removeprefix("KALLA_").lower(), None)
    if value is None:
        value = os.environ.get(name, default)
    return value if isinstance(value, str) else str(value)


def engine_name(settings) -> str:
    """``local`` or ``ballista``.

    >>> class S: engine = "ballista"
    >>> engine_name(S())
    'ballista'
    """
    name = setting(settings, "KALLA_ENGINE", "local") or "local"
    if name not in ENGINES:
        from ..errors import ConfigError
        raise ConfigError(f"KALLA_ENGINE={name!r}: must be one of {', '.join(ENGINES)}")
    return name


def check_engine(job) -> None:
    """Refuse, before any heavy work, what the configured engine cannot run."""
    if engine_name(job.settings) == "ballista":
        from .ballista import check_job
        check_job(job)
