"""The adversarial suite's fixtures: real `kalla serve` processes with every guard on, a real
callback listener, real PostgreSQL and a real S3-compatible server, and hostile peers.

The server and listener helpers are the service suite's (tests/service/conftest.py), the
PostgreSQL fixtures the connector suite's (tests/postgres/conftest.py): the same harness,
aimed at what an attacker or a failing machine would do.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from postgres.conftest import password_server, pg, pg_server  # noqa: F401  (fixtures)
from security.hostile import (Harness, HangingReceiver, JobMaker, RawReceiver, guard_env)
from service.conftest import Listener, Server, free_port, write_csv


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/security/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.service)


# ---------------------------------------------------------------------- data


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """The only directory local sources may come from (KALLA_DATA_ROOTS) in these tests."""
    root = tmp_path_factory.mktemp("data-root")
    n = 100
    write_csv(root / "left.csv", "id,amount", (f"{i},{i * 1.5}\n" for i in range(n)))
    write_csv(root / "right.csv", "pid,ref,paid",
              (f"{1000 + i},{i if i % 10 else 999},{i * 1.5}\n" for i in range(n)))
    write_csv(root / "slow_l.csv", "id,g", (f"{i},1\n" for i in range(7000)))
    write_csv(root / "slow_r.csv", "pid,g", (f"{i},1\n" for i in range(7000)))
    write_csv(root / "medium_l.csv", "id,g", (f"{i},1\n" for i in range(3000)))
    write_csv(root / "medium_r.csv", "pid,g", (f"{i},1\n" for i in range(3000)))
    return root


@pytest.fixture(scope="module")
def harness_factory(tmp_path_factory, data_root):
    """make(env=None, workers=2, guarded=True) -> a started Harness; all stopped at module end."""
    made: list[Harness] = []

    def make(env: dict | None = None, guarded: bool = True, name: str = "srv") -> Harness:
        root = tmp_path_factory.mktemp(name)
        out_root = Path((env or {}).get("KALLA_OUTPUT_ROOT") or root / "out")
        out_root.mkdir(exist_ok=True)
        listener = Listener()
        base = guard_env(data_root, out_root) if guarded else {"KALLA_QUEUE_SIZE": "256"}
        server = Server(root, {**base, **(env or {})})
        harness = Harness(server, listener, JobMaker(data_root, out_root, listener.url(),
                                                      relative=guarded), out_root)
        made.append(harness)
        server.start()
        return harness

    yield make
    for harness in made:
        harness.server.close()
        harness.listener.close()


@pytest.fixture(scope="module")
def guarded(harness_factory) -> Harness:
    """One server per module with every guard on."""
    return harness_factory()


@pytest.fixture
def hostile():
    """Factory for hostile receivers; all closed at the end of the test."""
    made = []

    def make(kind: str, *args):
        peer = {"hang": HangingReceiver, "raw": RawReceiver}[kind](*args)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


@pytest.fixture
def unused_port() -> int:
    return free_port()
