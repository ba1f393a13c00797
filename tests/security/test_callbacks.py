"""Callback URLs are chosen by whoever submits a job, so the receiver is untrusted: http and
https only, KALLA_CALLBACK_HOSTS enforced (at submit and again at every send), redirects
never followed, and a receiver that hangs, trickles or speaks garbage cannot hold a worker
nor leave a job's delivery pending forever."""
from __future__ import annotations

import time

import pytest

from security.hostile import assert_plain_400, wait_until

FAST_CALLBACKS = {"KALLA_WORKERS": "1", "KALLA_CALLBACK_TIMEOUT": "1",
                  "KALLA_CALLBACK_RETRIES": "2", "KALLA_CALLBACK_BACKOFF": "0.1"}


@pytest.fixture(scope="module")
def fast(harness_factory):
    """One worker, 1 s callback timeout, 2 attempts: a stuck worker would show at once."""
    return harness_factory(FAST_CALLBACKS, name="callbacks")


@pytest.mark.parametrize("url", [
    "ftp://127.0.0.1/cb", "file:///etc/passwd", "javascript:alert(1)", "gopher://127.0.0.1:25/x",
    "dict://127.0.0.1:11211/stat", "http:///no-host", "//127.0.0.1/cb", "127.0.0.1/cb",
    "http://127.0.0.1:99999/cb", "http://127.0.0.1:0/cb", "http://[::1/cb",
    "http://127.0.0.1/c b", "http://127.0.0.1/cb\r\nX-Injected: 1", "http://127.0.0.1/\x00",
    "http://user:pw@127.0.0.1/cb", "http://127.0.0.1@evil.example/cb", "",
])
def test_bad_callback_urls_are_400(fast, url):
    assert_plain_400(fast.server.submit(fast.jobs.make(callback_url=url)), "callback_url")


@pytest.mark.parametrize("host", [
    "evil.example", "127.0.0.2", "127.0.0.1.nip.io", "localhost.evil.example", "0x7f000001",
    "2130706433", "[::1]", "127.1", "xn--80ak6aa92e.com",
])
def test_hosts_off_the_allow_list_are_400(fast, host):
    resp = fast.server.submit(fast.jobs.make(callback_url=f"http://{host}:80/cb"))
    assert_plain_400(resp, "callback_url")
    assert "KALLA_CALLBACK_HOSTS" in resp.text


@pytest.mark.parametrize("host", ["LOCALHOST", "127.0.0.1"])
def test_allowed_hosts_match_whatever_the_case(fast, host):
    job = fast.jobs.make(callback_url=f"http://{host}:{fast.listener.port}/cb")
    assert fast.run(job).get("matched_count") == 90


def test_redirects_are_not_followed(fast, hostile):
    """A 3xx could send the service to a host the allow-list does not name."""
    target = f"http://127.0.0.1:{fast.listener.port}/stolen"
    redirector = hostile("raw", b"HTTP/1.1 307 Temporary Redirect\r\nLocation: " + target.encode()
                         + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    job = fast.jobs.make(callback_url=redirector.url())
    assert fast.server.submit(job).status == 200
    status = fast.server.wait_delivered(job["run_id"], timeout=30)
    assert status["status"] == "completed"
    assert status["callback"]["state"] == "failed" and status["callback"]["http_status"] == 307
    assert "redirects are not followed" in status["callback"]["error"]
    assert status["callback"]["attempts"] == 1                 # a 3xx is final, not retried
    assert not [r for r in fast.listener.records if r["path"] == "/stolen"]


@pytest.mark.parametrize("kind", ["hang", "trickle", "garbage"])
def test_a_bad_receiver_holds_neither_the_worker_nor_the_delivery(fast, hostile, kind):
    """One worker: if a receiver could hold it, the next job would wait. Each delivery
    attempt has one deadline for the whole exchange (1 s here), so even a receiver that
    trickles bytes forever ends as a failed delivery within the retry budget."""
    receiver = {"hang": lambda: hostile("hang"),
                "trickle": lambda: hostile("hang", b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 100),
                "garbage": lambda: hostile("raw", b"SSH-2.0-OpenSSH_9.6\r\n\r\n")}[kind]()
    stuck = fast.jobs.make(callback_url=receiver.url())
    started = time.monotonic()
    assert fast.server.submit(stuck).status == 200
    after = fast.jobs.make()
    assert fast.server.submit(after).status == 200
    assert fast.listener.terminal(after["run_id"], timeout=15).get("matched_count") == 90
    assert time.monotonic() - started < 8, "the next job waited for a hanging receiver"

    status = fast.server.wait_delivered(stuck["run_id"], timeout=30)
    assert status["status"] == "completed"                    # the job itself was fine
    callback = status["callback"]
    assert callback["state"] == "failed" and callback["attempts"] == 2, callback
    expected = "not an HTTP answer" if kind == "garbage" else "timeout"
    assert expected in callback["error"], callback
    # progress (1 attempt) + complete (2 attempts, 1 s each, 0.1 s backoff), with margin
    assert time.monotonic() - started < 12
    assert fast.server.get("/health").status == 200


def test_allow_list_tightened_across_a_restart_applies_to_redelivery(harness_factory,
                                                                     unused_port):
    """A terminal callback left pending by a stop is sent again at start - only if the
    allow-list in force then still names its host."""
    harness = harness_factory({**FAST_CALLBACKS, "KALLA_CALLBACK_RETRIES": "30",
                               "KALLA_CALLBACK_BACKOFF": "0.5", "KALLA_STOP_TIMEOUT": "1"},
                              name="tighten")
    server = harness.server
    job = harness.jobs.make(callback_url=f"http://127.0.0.1:{unused_port}/cb")   # nobody there
    assert server.submit(job).status == 200
    assert wait_until(lambda: server.status(job["run_id"])["status"] == "completed", 30)
    assert server.status(job["run_id"])["callback"]["state"] == "pending"
    assert server.stop() == 0
    server.env["KALLA_CALLBACK_HOSTS"] = "localhost"
    server.start()
    status = server.wait_delivered(job["run_id"], timeout=30)
    assert status["callback"]["state"] == "failed", status
    assert "not allowed (KALLA_CALLBACK_HOSTS)" in status["callback"]["error"]
    assert status["callback"]["attempts"] == 1
