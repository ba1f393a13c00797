"""No credential leaves the service: after jobs with PostgreSQL passwords (right, wrong,
unreachable host, bad table, password as a query parameter) and AWS secrets (a working and
failing S3 jobs, credentials pasted into an s3:// URI), a sweep of the server log (at DEBUG),
every callback, status responses, the job listing, metrics, error messages and summaries
finds none of them, in any encoding."""
from __future__ import annotations

import json
import secrets
from urllib.parse import quote, quote_plus

import psycopg
import pytest

from postgres.conftest import PASSWORD, with_password
from s3.conftest import ACCESS_KEY, SECRET_KEY, s3_client, s3_endpoint  # noqa: F401 (fixtures)
from security.hostile import free_port_closed

pytestmark = [pytest.mark.postgres, pytest.mark.s3]

QUERY_SECRET = "QrySecret-" + secrets.token_hex(6) + "&=+"
URI_AWS_SECRET = "UriAwsSecret/" + secrets.token_hex(8)


def forms(secret: str) -> set[str]:
    """A secret as it could appear: raw, percent-encoded, form-encoded, JSON-escaped."""
    return {secret, quote(secret, safe=""), quote(secret), quote_plus(secret),
            json.dumps(secret)[1:-1], secret.encode().hex()}


@pytest.fixture(scope="module")
def harness(harness_factory, s3_endpoint):
    aws = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint, "AWS_ALLOW_HTTP": "true"}
    return harness_factory({**aws, "KALLA_LOG_LEVEL": "DEBUG", "KALLA_CALLBACK_RETRIES": "2"},
                           name="secrets")


@pytest.fixture(scope="module")
def pg_table(password_server):
    """A table on a server that checks passwords, readable by the role with PASSWORD."""
    admin_url, role = password_server
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS public.kalla_secret_t (pid int, ref int)")
        conn.execute("TRUNCATE public.kalla_secret_t")
        conn.execute("INSERT INTO public.kalla_secret_t SELECT 1000 + g, CASE WHEN g % 10 = 0 "
                     "THEN 999 ELSE g END FROM generate_series(0, 99) g")
        conn.execute(f'GRANT SELECT ON public.kalla_secret_t TO "{role}"')
    yield admin_url, role
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS public.kalla_secret_t")


@pytest.fixture(scope="module")
def s3_sources(s3_client):
    bucket = f"kalla-secrets-{secrets.token_hex(4)}"
    s3_client.create_bucket(Bucket=bucket)
    body = "pid,ref\n" + "".join(f"{1000 + i},{i if i % 10 else 999}\n" for i in range(100))
    s3_client.put_object(Bucket=bucket, Key="right.csv", Body=body.encode())
    return bucket


@pytest.fixture(scope="module")
def finished(harness, pg_table, s3_sources):
    """Run every job once; return [(job, terminal callback)]."""
    admin_url, role = pg_table

    def pg_uri(password=PASSWORD, host=None, table="public.kalla_secret_t", extra=""):
        url = with_password(admin_url, role, password).split("?")[0]
        if host:
            url = url.replace(url.split("@")[1].split("/")[0], host)
        return f"{url}?table={quote(table, safe='')}{extra}"

    right_sources = {
        "pg_ok": pg_uri(),
        "pg_wrong_password": pg_uri(password="wrong-" + PASSWORD),
        "pg_unreachable": pg_uri(host=f"127.0.0.1:{free_port_closed()}"),
        "pg_bad_table": pg_uri(table="public.no_such_table"),
        "pg_query_password": pg_uri(password=None, extra=f"&password={quote(PASSWORD, safe='')}"),
        "pg_query_password_wrong": pg_uri(password=None,
                                          extra=f"&password={quote(QUERY_SECRET, safe='')}"),
        "pg_query_password_unreachable": pg_uri(password=None, host=f"127.0.0.1:{free_port_closed()}",
                                                extra=f"&password={quote(QUERY_SECRET, safe='')}"),
        "s3_ok": f"s3://{s3_sources}/right.csv",
        "s3_missing_key": f"s3://{s3_sources}/nope.csv",
        "s3_missing_bucket": "s3://kalla-no-such-bucket-x/right.csv",
        "s3_creds_in_uri": f"s3://{ACCESS_KEY}:{quote(URI_AWS_SECRET, safe='')}@{s3_sources}/right.csv",
    }
    jobs = {}
    for name, uri in right_sources.items():
        job = harness.jobs.make()
        job["sources"][1] = {"alias": "r", "uri": uri}
        jobs[name] = job
    for job in jobs.values():
        assert harness.server.submit(job).status == 200
    return {name: (job, harness.listener.terminal(job["run_id"], timeout=90))
            for name, job in jobs.items()}


def test_the_jobs_did_what_they_should(finished):
    ok = {name for name, (_, final) in finished.items() if "error" not in final}
    assert ok == {"pg_ok", "pg_query_password", "s3_ok"}, \
        {name: final.get("error") for name, (_, final) in finished.items()}
    for name, (_, final) in finished.items():
        if name in ok:
            assert final["matched_count"] == 90
    errors = {name: final["error"] for name, (_, final) in finished.items() if name not in ok}
    assert "rejected the password" in errors["pg_wrong_password"]
    assert "rejected the password" in errors["pg_query_password_wrong"]
    assert "cannot connect" in errors["pg_unreachable"]
    assert "no_such_table" in errors["pg_bad_table"]
    assert "AWS_ACCESS_KEY_ID" in errors["s3_creds_in_uri"]


def test_no_secret_anywhere(harness, finished):
    server = harness.server
    secrets_ = set()
    for secret in (PASSWORD, "wrong-" + PASSWORD, QUERY_SECRET, SECRET_KEY, URI_AWS_SECRET):
        secrets_ |= forms(secret)
    places = {"server log": server.log(),
              "callbacks": json.dumps([r["body"] for r in harness.listener.records]),
              "listing": server.get("/api/jobs?limit=1000").text,
              "metrics": server.get("/metrics").text,
              "ready": server.get("/ready").text}
    for name, (job, final) in finished.items():
        places[f"status of {name}"] = server.get(f"/api/jobs/{job['run_id']}").text
        places[f"error of {name}"] = final.get("error", "")
        if "summary_path" in final:
            places[f"summary of {name}"] = open(final["summary_path"]).read()
    assert "DEBUG" in places["server log"]           # the most talkative level was on
    leaks = [(place, secret) for place, text in places.items() for secret in secrets_
             if secret in text]
    assert not leaks, leaks


def test_journal_keeps_credentials_private(harness, finished):
    """The journal must hold the URIs to run a job again: it is the one place they are
    stored, readable by the service user only."""
    journal = harness.server.root / "state" / "journal.sqlite3"
    assert journal.stat().st_mode & 0o077 == 0
