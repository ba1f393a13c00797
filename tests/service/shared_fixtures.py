"""Fixtures for test modules that share one server per module (conftest's `shared`):
import them by name, e.g. ``from service.shared_fixtures import jobs, listener, server``."""
import pytest


@pytest.fixture
def server(shared):
    return shared[0]


@pytest.fixture
def listener(shared):
    return shared[1]


@pytest.fixture
def jobs(shared):
    return shared[2]
