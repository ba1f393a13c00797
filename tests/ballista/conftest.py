"""A real Apache Ballista cluster for the tests in this folder: one scheduler and one
executor (tests/ballista/localcluster.py), started once per session.

Where this host can run neither a native ballista Python nor the Debian 13 userland, the
tests skip and say why - unless CI is set or KALLA_TEST_BALLISTA=required (as
`scripts/ballista-env.sh test` sets it): there they fail.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from localcluster import (
    LocalCluster,
    Unavailable,
    route_stages_through_engines,
    settings_with,  # noqa: E402
    stop,
)


def required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("KALLA_TEST_BALLISTA") == "required"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("ballista")
    (base / "shared").mkdir()
    try:
        with LocalCluster(shared_dir=str(base / "shared"), logs=str(base / "logs")) as running:
            print(f"\nBallista cluster up ({running.description})")
            yield running
    except Unavailable as exc:
        if required():
            pytest.fail(f"Ballista tests cannot run here, and CI/KALLA_TEST_BALLISTA=required "
                        f"demands them: {exc}", pytrace=False)
        pytest.skip(f"Ballista tests need root + debootstrap (scripts/ballista-env.sh) or "
                    f"KALLA_TEST_BALLISTA_PYTHON: {exc}")
    except RuntimeError as exc:
        pytest.fail(f"the Ballista cluster did not start: {exc}", pytrace=False)


@pytest.fixture
def stop_node():
    return stop


@pytest.fixture
def engine_settings(cluster, settings, monkeypatch):
    """make(**overrides) -> the root `settings` for a job on the cluster (KALLA_ENGINE=ballista)."""
    def make(**overrides) -> object:
        values = {"KALLA_ENGINE": "ballista", "KALLA_BALLISTA_URL": cluster.url,
                  "KALLA_SHARED_DIR": cluster.shared_dir, "KALLA_BALLISTA_PYTHON": cluster.python,
                  "KALLA_BALLISTA_START_TIMEOUT": "60", **overrides}
        return settings_with(settings, values, monkeypatch.setenv)
    return make


@pytest.fixture
def offline_settings(settings, monkeypatch):
    """make(**overrides) -> engine settings that need no cluster: refusals and settings
    problems are found before any contact (these tests run on every host)."""
    def make(**overrides) -> object:
        values = {"KALLA_ENGINE": "ballista", "KALLA_BALLISTA_URL": "df://127.0.0.1:9",
                  "KALLA_SHARED_DIR": os.path.dirname(settings.work_dir),
                  "KALLA_BALLISTA_PYTHON": sys.executable, **overrides}
        return settings_with(settings, values, monkeypatch.setenv)
    return make


@pytest.fixture(autouse=True)
def engine_in_pipeline(monkeypatch):
    """run_job's stages routed through kalla/engines (see route_stages_through_engines)."""
    from kalla import pipeline
    monkeypatch.setattr(pipeline, "STAGES", route_stages_through_engines(pipeline))
