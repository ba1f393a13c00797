"""A real S3-compatible server for the S3 tests: moto's ThreadedMotoServer on 127.0.0.1.

One server per test session, on a free port. Each test gets the AWS_* environment pointing
at it (restored afterwards, so other suites never see it) and a fresh bucket.
"""
from __future__ import annotations

import json
import logging
import socket
import urllib.request
import uuid

import pytest

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

ACCESS_KEY = "AKIAKALLATESTKEY0001"
SECRET_KEY = "kalla-test-secret-Zq9fW2xY"      # tests assert it never appears in errors


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    logging.getLogger("werkzeug").setLevel(logging.WARNING)    # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(),
                                           verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """The AWS_* variables Kalla reads, pointing at the test server."""
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint, "AWS_ALLOW_HTTP": "true"}
    for name in ("AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture(scope="session")
def s3_client(s3_endpoint):
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)


@pytest.fixture
def bucket(s3_client, s3_env):
    """A fresh bucket; ``bucket.put(key, data)`` uploads and returns the s3:// URI."""
    name = f"kalla-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return Bucket(s3_client, name)


class Bucket:
    def __init__(self, client, name: str):
        self.client, self.name = client, name

    def put(self, key: str, data: bytes) -> str:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)
        return f"s3://{self.name}/{key}"


@pytest.fixture
def moto_auth(s3_endpoint):
    """Turn on moto's IAM checks for one test; yields a function making a key pair with no
    permissions (so S3 answers AccessDenied, as for a real user without a policy)."""
    iam = boto3.client("iam", endpoint_url=s3_endpoint, region_name="us-east-1",
                       aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
    user = f"nobody-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    _reset_auth(s3_endpoint, "0")       # from now on every request is authorised by moto's IAM
    try:
        yield key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        _reset_auth(s3_endpoint, "inf")


def _reset_auth(endpoint: str, count: str) -> None:
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=count.encode(),
                                     method="POST", headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=10) as response:
        json.load(response)
