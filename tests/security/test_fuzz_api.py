"""Hostile input to a real `kalla serve`: random, missing, mistyped, huge and unicode fields in
JobRequest, its sources and filters, and malformed HTTP around them.

Every answer must be a 4xx in plain text naming the field (or 200 when the mutation left a
valid job, which then fails or completes through its callback), never a 5xx or a hang;
and the server must keep serving. Examples are derandomized, so CI sees the same ones
every run; KALLA_TEST_FUZZ_RANDOM=1 draws new ones.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import socket
import time
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from security.hostile import server_traceback

FIELDS = ("run_id", "callback_url", "match_sql", "rules", "sources", "output_path",
          "primary_keys", "expect")
REQUIRED = ("run_id", "callback_url", "match_sql", "sources", "output_path", "primary_keys")
# "sources[0].filters[1].value: ..." - the answer starts with the field it is about.
FIELD_AT_START = re.compile(r"^(?:request body\b|(?:%s)(?:\[\d+\])?(?:[.\[]|: ))" % "|".join(FIELDS))
PER_REQUEST_SECONDS = 5.0
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
FUZZ = settings(max_examples=200, deadline=None, database=None,
                derandomize=os.environ.get("KALLA_TEST_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def harness(harness_factory):
    # A short read timeout: a request whose body never fully arrives is answered quickly.
    return harness_factory({"KALLA_READ_TIMEOUT": "2"}, name="fuzz")


KNOWN_CRASHES = ()    # every crash the fuzzer found has been fixed in kalla/jobs.py


@pytest.fixture(scope="module", autouse=True)
def still_serving_afterwards(harness):
    yield
    crashes = [line for line in server_traceback(harness.server)
               if "kalla.httpd: POST /api/jobs failed" not in line and line not in KNOWN_CRASHES]
    assert not crashes, crashes
    harness.assert_serving()


# ---------------------------------------------------------------------- strategies

# Any text: every plane, combining marks, RTL, zero-width and control characters, NUL.
texts = st.text(st.characters(codec="utf-8"), max_size=40)
huge_texts = st.tuples(st.sampled_from(["x", "é", "\u202e", "'", "\U0001f600", "\x00"]),
                       st.sampled_from([5_000, 70_000, 300_000])).map(lambda t: t[0] * t[1])
scalars = st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) \
    | st.floats(allow_nan=False, allow_infinity=False) | texts
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(texts, inner, max_size=4), max_leaves=12)
hostile_values = json_values | huge_texts


def base_job(harness) -> dict:
    return harness.jobs.make(sources=[
        {"alias": "l", "uri": harness.jobs.make()["sources"][0]["uri"],
         "filters": [{"column": "amount", "op": "gte", "value": 10},
                     {"column": "id", "op": "in", "value": [1, 2, 3]}]},
        {"alias": "r", "uri": harness.jobs.make()["sources"][1]["uri"]}])


# Places a mutation can land, as paths into the job.
PATHS = [(name,) for name in FIELDS] + [
    ("sources", 0), ("sources", 1), ("sources", 0, "alias"), ("sources", 0, "uri"),
    ("sources", 1, "uri"), ("sources", 0, "filters"), ("sources", 0, "filters", 0),
    ("sources", 0, "filters", 0, "column"), ("sources", 0, "filters", 0, "op"),
    ("sources", 0, "filters", 0, "value"), ("sources", 0, "filters", 1, "value"),
    ("primary_keys", "l"), ("primary_keys", "r"), ("primary_keys", "l", 0), ("rules", 0),
    ("expect", "min_match_rate")]


def path_text(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def put(job: dict, path: tuple, value) -> None:
    """Set job[path] = value, creating containers on the way; value None deletes."""
    node = job
    for i, part in enumerate(path[:-1]):
        if isinstance(node, dict):
            if not isinstance(node.get(part), (dict, list)):
                node[part] = [] if isinstance(path[i + 1], int) else {}
            node = node[part]
        else:
            while len(node) <= part:
                node.append({})
            node = node[part]
    last = path[-1]
    if isinstance(node, list):
        while len(node) <= last:
            node.append({})
        node[last] = value
    elif value is None:
        node.pop(last, None)
    else:
        node[last] = value


def send(server, body: bytes, headers: dict | None = None):
    started = time.monotonic()
    resp = server.request("POST", "/api/jobs", body=body, timeout=PER_REQUEST_SECONDS + 5,
                          headers={"Content-Type": "application/json", **(headers or {})})
    assert time.monotonic() - started < PER_REQUEST_SECONDS, "the server took too long"
    return resp


def assert_clean_answer(resp, mutated: str | None = None) -> None:
    """200 (still a valid job), or a 4xx in plain text that names a field."""
    assert resp.status < 500, (resp.status, resp.text[:500])
    if resp.status == 200:
        assert resp.json()["status"] == "accepted"
        return
    assert resp.headers["Content-Type"].startswith("text/plain"), resp.headers
    text = resp.text
    assert text.endswith("\n") and text.count("\n") == 1, repr(text[:500])
    if resp.status in (400, 413):
        found = FIELD_AT_START.match(text)
        assert found, f"no field named at the start of {text[:300]!r}"
        if mutated and resp.status == 400:
            assert related(found.group(0), mutated), (mutated, text[:300])


def related(reported: str, mutated: str) -> bool:
    """The answer is about the mutated field, or a field that must agree with it."""
    top = lambda p: re.split(r"[.\[:]", p, 1)[0]
    if top(reported) == top(mutated):
        return True
    # a changed or removed source or alias leaves primary_keys naming no source
    return top(mutated) == "sources" and top(reported) == "primary_keys"


# ---------------------------------------------------------------------- JobRequest fields


@pytest.mark.parametrize("path", [*PATHS, ("sources", 0, "expected_columns")], ids=path_text)
@settings(FUZZ, max_examples=30)
@given(value=hostile_values | st.just(None) | st.integers() | st.lists(scalars, max_size=3))
def test_one_hostile_field(harness, path, value):
    job = base_job(harness)
    put(job, path, value)
    resp = send(harness.server, json.dumps(job).encode())
    assert_clean_answer(resp, path_text(path))


@FUZZ
@given(missing=st.sets(st.sampled_from(REQUIRED), min_size=1))
def test_missing_fields_are_named(harness, missing):
    job = {k: v for k, v in base_job(harness).items() if k not in missing}
    resp = send(harness.server, json.dumps(job).encode())
    assert resp.status == 400, resp.text
    assert any(resp.text.startswith(f"{name}: is required") for name in missing), resp.text


@FUZZ
@given(extra=st.dictionaries(texts, json_values, min_size=1, max_size=3),
       where=st.sampled_from([(), ("sources", 0), ("sources", 0, "filters", 0), ("rules", 0)]))
def test_unknown_keys(harness, extra, where):
    job = base_job(harness)
    if where == ("rules", 0):
        del job["match_sql"]
        job["rules"] = [{"name": "exact", "match_sql": "SELECT l.id, r.pid FROM l JOIN r "
                                                      "ON l.id = r.ref"}]
    node = job
    for part in where:
        node = node[part]
    for key, value in extra.items():
        node.setdefault(key, value)
    assert_clean_answer(send(harness.server, json.dumps(job).encode()))


@FUZZ
@given(body=json_values)
def test_any_json_value_as_body(harness, body):
    assert_clean_answer(send(harness.server, json.dumps(body).encode()))


@FUZZ
@given(body=st.binary(max_size=300) | texts.map(str.encode)
       | st.sampled_from([b"", b"{", b"[" * 5000 + b"]" * 5000, b'{"a":' * 2000,
                          b"\xff\xfe{}", b'{"run_id": NaN}', b'{"x": 1e999}',
                          b'{"s": "\\ud800"}', b'{"a": 1, "a": 2}', b"\x00" * 100]))
def test_malformed_bodies(harness, body):
    resp = send(harness.server, body)
    assert_clean_answer(resp)
    if body[:1] != b"{" and resp.status == 400:
        assert resp.text.startswith("request body"), resp.text




@pytest.mark.parametrize("path,value", [
    (("sources", 0, "uri"), "/etc/passwd"),
    (("sources", 0, "uri"), "../../../../../../etc/passwd.csv"),
    (("sources", 0, "uri"), "file:///etc/hosts"),
    (("sources", 0, "uri"), "postgres://u:p@127.0.0.1:99999/db?table=t"),
    (("sources", 0, "uri"), "s3://b/k.csv?newlines_in_values=%00"),
    (("sources", 0, "uri"), "mysql://h/db?table=t"),
    (("sources", 0, "uri"), "postgres://[::1/db?table=t"),
    (("sources", 1, "uri"), "s3://[bucket/k.csv"),
    (("callback_url",), "http://[::1/cb"),
    (("callback_url",), "http://127.0.0.1:99999/cb"),
    (("callback_url",), "http://127.0.0.1/c b\r\nX-Injected: 1"),
    (("output_path",), "../../../../etc"),
    (("output_path",), "a\x00b"),
    (("sources", 0, "alias"), "l; DROP TABLE r"),
    (("sources", 0, "filters", 0, "column"), "amount\"; DROP TABLE l; --"),
    (("primary_keys", "l", 0), "id\" OR 1=1 --"),
], ids=lambda v: v if isinstance(v, str) else path_text(v))
def test_tricky_values(harness, path, value):
    """Values that once crashed a parser somewhere, or look like an attack."""
    job = base_job(harness)
    put(job, path, value)
    resp = send(harness.server, json.dumps(job).encode())
    assert_clean_answer(resp, path_text(path))
    if resp.status == 200:        # accepted: the worker then fails it cleanly
        final = harness.listener.terminal(job["run_id"])
        assert "error" in final and final["stage"], final


@pytest.mark.parametrize("field", ["match_sql", "output_path", "callback_url", "run_id"])
def test_body_over_the_cap_is_413(harness, field):
    job = base_job(harness)
    job[field] = "x" * (1 << 20)
    resp = send(harness.server, json.dumps(job).encode())
    assert resp.status == 413 and "KALLA_MAX_BODY_BYTES" in resp.text, resp.text[:200]


# ---------------------------------------------------------------------- other routes


@FUZZ
@given(run_id=texts | st.uuids().map(str), method=st.sampled_from(["GET", "DELETE"]))
def test_job_routes_with_any_run_id(harness, run_id, method):
    path = "/api/jobs/" + urllib.parse.quote(run_id, safe="")
    resp = harness.server.request(method, path, timeout=PER_REQUEST_SECONDS)
    assert resp.status in (404, 405, 200, 409), (resp.status, resp.text)
    assert resp.headers["Content-Type"].startswith(("text/plain", "application/json"))


@FUZZ
@given(query=st.dictionaries(st.sampled_from(["limit", "status", "x"]), texts, max_size=3))
def test_job_listing_with_any_query(harness, query):
    resp = harness.server.get("/api/jobs?" + urllib.parse.urlencode(query),
                              timeout=PER_REQUEST_SECONDS)
    assert resp.status in (200, 400), (resp.status, resp.text)
    if resp.status == 400:
        assert resp.text.split(":")[0] in ("limit", "status"), resp.text


# ---------------------------------------------------------------------- raw HTTP


def raw_exchange(port: int, data: bytes, timeout: float = 8.0, half_close: bool = True) -> bytes:
    """Send raw bytes, then read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    return received


tokens = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12)


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "HEAD"]) | tokens,
       path=st.sampled_from(["/api/jobs", "/health", "/metrics", "/ready", "/api/jobs/x"])
       | texts.map(lambda t: "/" + urllib.parse.quote(t)),
       version=st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/9", "FOO"]),
       headers=st.lists(st.tuples(tokens, texts.map(lambda t: t.replace("\r", "").replace("\n", ""))),
                        max_size=4),
       body=st.binary(max_size=200),
       length=st.sampled_from(["exact", "missing", "negative", "junk", "huge"]))
def test_malformed_http(harness, method, path, version, headers, body, length):
    lines = [f"{method} {path} {version}", "Host: x", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers
              if name.lower() not in ("content-length", "transfer-encoding", "expect")]
    lines.append({"exact": f"Content-Length: {len(body)}", "missing": "",
                  "negative": "Content-Length: -5", "junk": "Content-Length: 12abc",
                  "huge": "Content-Length: 99999999999"}[length])
    request = "\r\n".join(line for line in lines if line).encode("utf-8", "surrogatepass")
    started = time.monotonic()
    answer = raw_exchange(harness.server.port, request + b"\r\n\r\n" + body)
    assert time.monotonic() - started < 6, "no answer in time"
    if not answer:
        return                      # closed without an answer: acceptable for garbage
    status_line = answer.split(b"\r\n", 1)[0]
    assert re.fullmatch(rb"HTTP/1\.1 \d{3} .*", status_line), answer[:300]
    status = int(status_line.split()[1])
    # 501 (unknown method) and 505 (unsupported HTTP version) are HTTP's own answers to
    # protocol garbage; any other 5xx is a bug.
    assert status < 500 or status in (501, 505), status_line
    assert b"Content-Type: text/plain" in answer or status < 300, answer[:300]


def test_truncated_body_gets_408_quickly(harness):
    """A body shorter than its Content-Length: 408 after KALLA_READ_TIMEOUT, not a hang."""
    started = time.monotonic()
    answer = raw_exchange(harness.server.port, b"POST /api/jobs HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: 500\r\n\r\n{\"run_id\":", timeout=10,
                          half_close=False)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < 4


def test_a_client_that_closes_mid_request_gets_400(harness):
    answer = raw_exchange(harness.server.port, b"POST /api/jobs HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: 500\r\n\r\n{\"run_id\":")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]


def test_expect_continue_with_oversized_body_is_refused_before_it_is_sent(harness):
    conn = http.client.HTTPConnection("127.0.0.1", harness.server.port, timeout=5)
    conn.putrequest("POST", "/api/jobs")
    conn.putheader("Content-Length", str(50 << 20))
    conn.putheader("Expect", "100-continue")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and b"KALLA_MAX_BODY_BYTES" in resp.read()
    conn.close()


def test_expect_continue_with_a_valid_job(harness):
    job = base_job(harness)
    body = json.dumps(job).encode()
    with socket.create_connection(("127.0.0.1", harness.server.port), timeout=5) as sock:
        sock.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(4096).startswith(b"HTTP/1.1 100")
        sock.sendall(body)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert "error" not in harness.listener.terminal(job["run_id"])


def test_pipelined_requests_are_answered_in_order(harness):
    job = base_job(harness)
    body = json.dumps(job).encode()
    burst = (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
             b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
             b"GET /api/jobs/%s HTTP/1.1\r\nHost: x\r\n\r\n"
             b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
             % (len(body), body, job["run_id"].encode()))
    answer = raw_exchange(harness.server.port, burst)
    statuses = re.findall(rb"HTTP/1.1 (\d{3}) ", answer)
    assert statuses == [b"200", b"200", b"200", b"404"], answer[:1000]
    harness.listener.terminal(job["run_id"])


def test_answers_and_logs_stay_one_line(harness):
    """A field name or value carrying a newline cannot forge a second line, in an answer or
    in the server log."""
    forged = "\n2026-01-01 00:00:00,000 ERROR kalla.forged: pwned"
    job = base_job(harness)
    job["expect"] = {"x" + forged: 1}
    resp = send(harness.server, json.dumps(job).encode())
    assert resp.status == 400 and resp.text.count("\n") == 1 and "\\n2026" in resp.text, resp.text
    job = base_job(harness)
    job["sources"][0]["filters"] = [{"column": "nope" + forged, "op": "eq", "value": 1}]
    resp = send(harness.server, json.dumps(job).encode())
    assert resp.status == 200, resp.text                  # columns are checked by the worker
    assert "has no column" in harness.listener.terminal(job["run_id"])["error"]
    assert not any(line.startswith("2026-01-01") for line in harness.server.log().splitlines())
