"""KALLA_API_TOKEN: no spelling of a path, method or header reaches /api/* without it."""
from __future__ import annotations

import pytest

from security.hostile import wait_until

TOKEN = "t0ken-Zx81"


@pytest.fixture(scope="module")
def locked(harness_factory):
    return harness_factory({"KALLA_API_TOKEN": TOKEN, "KALLA_WORKERS": "1"}, name="auth")


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/jobs"), ("GET", "/api/jobs/"), ("GET", "/api/jobs?limit=1"),
    ("GET", "/api/jobs/a1b2c3d4-e5f6-7890-abcd-ef1234567890"), ("HEAD", "/api/jobs"),
    ("DELETE", "/api/jobs/a1b2c3d4-e5f6-7890-abcd-ef1234567890"), ("POST", "/api/jobs"),
    ("GET", "http://127.0.0.1/api/jobs"), ("GET", "/api/jobs#x"), ("OPTIONS", "/api/jobs"),
])
@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Bearer ", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}",
    TOKEN, f"Bearer  {TOKEN[::-1]}", "Bearer \u00e9",
])
def test_no_token_no_api(locked, method, path, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    body = b"{}" if method == "POST" else None
    resp = locked.server.request(method, path, body=body, headers=headers)
    assert resp.status == 401, (resp.status, resp.text)
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("path", ["//api/jobs", "/API/jobs", "/%61pi/jobs", "/api/../api/jobs",
                                  "/./api/jobs", "/health/../api/jobs"])
def test_other_spellings_of_the_path_reach_nothing(locked, path):
    resp = locked.server.get(path)
    assert resp.status in (401, 404), (resp.status, resp.text)
    assert not resp.text.lstrip().startswith("{"), resp.text


def test_the_right_token_works_and_open_routes_stay_open(locked):
    auth = {"Authorization": f"bearer   {TOKEN}  "}       # scheme is case-insensitive
    job = locked.jobs.make()
    assert locked.server.submit(job, headers=auth).status == 200
    locked.listener.terminal(job["run_id"])
    assert wait_until(lambda: locked.server.get(f"/api/jobs/{job['run_id']}",
                                                headers=auth).status == 200)
    for path in ("/health", "/ready", "/metrics"):
        assert locked.server.get(path).status == 200
