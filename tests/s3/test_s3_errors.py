"""Errors a user can act on: each names the source, none carries a secret, none hangs."""
from __future__ import annotations

import time

import pytest

from kalla.connectors.s3 import S3Connector
from kalla.errors import KallaError, SourceError, TransientSourceError
from kalla.jobs import SourceSpec

from .conftest import SECRET_KEY, free_port

pytestmark = pytest.mark.s3


def open_source(uri: str, settings) -> S3Connector:
    return S3Connector(SourceSpec("bank", uri, "s3"), settings)


def failure(uri: str, settings) -> KallaError:
    """The error of a whole read (schema, then every batch)."""
    conn = open_source(uri, settings)
    with pytest.raises(KallaError) as caught:
        conn.schema()
        list(conn.batches([], lambda f: None))
    error = caught.value
    text = f"{error} {error!r} {error.to_dict()}"
    assert SECRET_KEY not in text and "bank" in str(error)
    return error


def test_missing_credentials(bucket, settings, monkeypatch):
    uri = bucket.put("a.csv", b"id\n1\n")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    error = failure(uri, settings)
    assert isinstance(error, SourceError)
    assert "AWS_SECRET_ACCESS_KEY" in str(error) and uri in str(error)


def test_missing_bucket(bucket, settings):
    error = failure("s3://no-such-bucket-kalla/a.csv", settings)
    assert "bucket 'no-such-bucket-kalla' does not exist" in str(error)


@pytest.mark.parametrize("key", ["missing.csv", "missing.csv.gz", "missing.parquet"])
def test_missing_key(bucket, settings, key):
    bucket.put("present.csv", b"id\n1\n")
    error = failure(f"s3://{bucket.name}/{key}", settings)
    assert f"no object s3://{bucket.name}/{key}" in str(error)


def test_missing_prefix(bucket, settings):
    error = failure(f"s3://{bucket.name}/nothing/", settings)
    assert "no objects under" in str(error)


@pytest.mark.parametrize("key", ["a.csv", "p.parquet"])
def test_access_denied(bucket, settings, moto_auth, monkeypatch, key):
    uri = f"s3://{bucket.name}/{key}"
    access_key, secret = moto_auth          # a real IAM user with no permissions
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    conn = open_source(uri, settings)
    with pytest.raises(SourceError, match="access denied") as caught:
        conn.schema()
    assert secret not in f"{caught.value!r} {caught.value.to_dict()}"
    assert not caught.value.retryable


def test_unreachable_endpoint_fails_fast(bucket, settings, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    error = failure("s3://kalla/a.csv", settings)
    assert time.monotonic() - started < 10
    assert isinstance(error, TransientSourceError) and error.retryable
    assert "cannot reach http://127.0.0.1:" in str(error)


def test_a_bad_endpoint_setting_is_named(bucket, settings, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "ftp://minio:9000")
    error = failure(f"s3://{bucket.name}/a.csv", settings)
    assert "AWS_ENDPOINT_URL" in str(error)


def test_an_unknown_format_is_named(bucket, settings):
    error = failure(bucket.put("data.json", b"{}"), settings)
    assert "cannot tell the format" in str(error)


def test_credentials_in_the_uri_are_refused_without_echoing_them(settings):
    with pytest.raises(SourceError) as caught:
        open_source("s3://AKIAX:topsecretvalue@bucket/a.csv", settings)
    assert "topsecretvalue" not in f"{caught.value} {caught.value!r}"
    assert "AWS_ACCESS_KEY_ID" in str(caught.value)


def test_an_unknown_uri_option_is_named(bucket, settings):
    with pytest.raises(SourceError, match="unknown URI option.*delimiter"):
        open_source(f"s3://{bucket.name}/a.csv?delimiter=;", settings)
