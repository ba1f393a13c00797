"""Shared fixtures: settings isolated per test, and helpers to run data-driven cases."""
from __future__ import annotations

import os

import pytest


@pytest.fixture
def settings(tmp_path):
    from kalla.config import load_settings
    work = tmp_path / "work"
    work.mkdir()
    return load_settings({"KALLA_WORK_DIR": str(work), "KALLA_WORKER_MEMORY": "512MiB",
                          "KALLA_PROGRESS_INTERVAL": "0"})


@pytest.fixture
def cli_env(tmp_path):
    """Environment for bin/kalla-run subprocesses: no stray KALLA_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KALLA_")}
    env["KALLA_WORK_DIR"] = str(tmp_path)
    return env
