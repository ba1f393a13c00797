"""S3 sources: byte-range partitioned CSV, streamed CSV (.csv.gz), Parquet objects and prefixes.

Credentials and endpoint come only from AWS_* environment variables (docs/s3.md). Every
request goes through pyarrow's S3 filesystem; errors a user can act on (no credentials,
missing bucket or key, access denied, endpoint unreachable) become SourceErrors naming the
source, with secrets scrubbed from any text that came back from the server.
"""
from __future__ import annotations

import math
import os
import re
from contextlib import closing
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence
from urllib.parse import parse_qsl, unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from ..errors import KallaError, SourceError, TransientSourceError
from ..filters import BoundFilter
from ..jobs import redact_uri, scrub
from .base import Connector
from .fanin import fan_in

MiB = 1 << 20
HEAD_BYTES = 8 * MiB        # the head: schema inference sample, and the first range's bytes
MIN_RANGE_BYTES = 8 * MiB   # moto (and S3 per-request latency) make small GETs expensive
MAX_RANGE_BYTES = 32 * MiB  # bounds memory: each partition thread holds one range and its table
STREAM_BLOCK_BYTES = 8 * MiB
# The AWS SDK's defaults (1 s connect, 3 attempts with backoff) still retry a refused
# connection for seconds; these keep a dead endpoint's failure under ~3 s.
CONNECT_TIMEOUT_S = 3.0
# On Linux the SDK applies this as a low-speed limit: an endpoint that accepts the connection
# but sends nothing fails after it (per attempt), instead of holding the worker for minutes.
REQUEST_TIMEOUT_S = 10.0
MAX_ATTEMPTS = 3
_TRUE = ("1", "true", "yes", "on")
_TRANSIENT = ("SLOW_DOWN", "THROTTLING", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE",
              "REQUEST_TIMEOUT")
_REJECTED = ("INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "INVALID_CLIENT_TOKEN_ID",
             "INVALID_SIGNATURE", "MISSING_AUTHENTICATION_TOKEN", "EXPIRED_TOKEN")


# ---------------------------------------------------------------------------- locations

@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str
    newlines_in_values: bool | None = None   # declared in the URI; None: decided from the head

    @property
    def path(self) -> str:
        return f"{self.bucket}/{self.key}"

    @property
    def format(self) -> str:
        """``csv``, ``csv.gz``, ``parquet`` (one object), ``glob`` or ``prefix``.

        >>> [parse_s3_uri(u).format for u in ("s3://b/a.CSV", "s3://b/a.csv.gz",
        ...  "s3://b/x/a.parquet", "s3://b/x/*.parquet", "s3://b/x/", "s3://b/x")]
        ['csv', 'csv.gz', 'parquet', 'glob', 'prefix', 'prefix']
        """
        key = self.key.lower()
        name = key.rsplit("/", 1)[-1]
        if key.endswith(".csv"):
            return "csv"
        if key.endswith(".csv.gz"):
            return "csv.gz"
        if any(c in self.key for c in "*?["):
            return "glob"
        if key.endswith((".parquet", ".parq", ".pq")):
            return "parquet"
        if key.endswith("/") or "." not in name:
            return "prefix"
        return "unknown"


def parse_s3_uri(uri: str) -> S3Location:
    """Bucket, key (percent-decoded) and options of an ``s3://`` URI.

    >>> parse_s3_uri("s3://fin/in%202024/ledger.csv?newlines_in_values=true")
    S3Location(bucket='fin', key='in 2024/ledger.csv', newlines_in_values=True)
    """
    parts = urlsplit(uri)
    if parts.username or parts.password:
        raise ValueError("put credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                         "not in the URI")
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(options) - {"newlines_in_values"})
    if unknown:
        raise ValueError(f"unknown URI option(s) {', '.join(unknown)}; "
                         "the only one is newlines_in_values=true|false")
    declared = options.get("newlines_in_values")
    newlines = None if declared is None else declared.strip().lower() in _TRUE
    return S3Location(parts.netloc, unquote(parts.path.lstrip("/")), newlines)


# ---------------------------------------------------------------------------- the filesystem

def s3_filesystem(environ: Mapping[str, str]) -> pafs.S3FileSystem:
    """An S3 filesystem from AWS_* variables; ValueError (without secrets) when incomplete."""
    key = environ.get("AWS_ACCESS_KEY_ID", "").strip()
    secret = environ.get("AWS_SECRET_ACCESS_KEY", "").strip()
    if not key or not secret:
        missing = [n for n, v in (("AWS_ACCESS_KEY_ID", key), ("AWS_SECRET_ACCESS_KEY", secret))
                   if not v]
        raise ValueError(f"no S3 credentials: set {' and '.join(missing)} in Kalla's environment")
    endpoint, scheme = endpoint_of(environ)
    return pafs.S3FileSystem(
        access_key=key, secret_key=secret,
        session_token=environ.get("AWS_SESSION_TOKEN") or None,
        region=environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        endpoint_override=endpoint, scheme=scheme,
        connect_timeout=CONNECT_TIMEOUT_S, request_timeout=REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS))


def endpoint_of(environ: Mapping[str, str]) -> tuple[str | None, str]:
    """``(host:port or None, scheme)`` from AWS_ENDPOINT_URL and AWS_ALLOW_HTTP.

    >>> endpoint_of({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000/"})
    ('127.0.0.1:9000', 'http')
    >>> endpoint_of({"AWS_ENDPOINT_URL": "minio:9000", "AWS_ALLOW_HTTP": "true"})
    ('minio:9000', 'http')
    >>> endpoint_of({})
    (None, 'https')
    """
    url = environ.get("AWS_ENDPOINT_URL", "").strip()
    allow_http = environ.get("AWS_ALLOW_HTTP", "").strip().lower() in _TRUE
    if not url:
        return None, "https"                  # AWS itself: allowing HTTP is not asking for it
    parts = urlsplit(url if "://" in url else f"//{url}")
    if parts.scheme not in ("", "http", "https") or not parts.hostname \
            or parts.path.strip("/") or parts.username:
        raise ValueError("AWS_ENDPOINT_URL must look like http://host:port or https://host")
    scheme = parts.scheme or ("http" if allow_http else "https")
    return parts.netloc, scheme


# ---------------------------------------------------------------------------- the connector

class S3Connector(Connector):
    """One ``s3://`` source; the key's extension picks the reader (see ``S3Location.format``)."""

    kind = "s3"

    def __init__(self, source, settings, *, environ: Mapping[str, str] | None = None,
                 head_bytes: int = HEAD_BYTES, range_bytes: int | None = None,
                 tail_bytes: int | None = None):
        super().__init__(source, settings)
        self.environ = os.environ if environ is None else environ
        # head/range/tail sizes are parameters so tests can cut a small object at every offset
        self.head_bytes, self.range_bytes, self.tail_bytes = head_bytes, range_bytes, tail_bytes
        self._fs: pafs.S3FileSystem | None = None
        self._reader = None
        try:
            self.location = parse_s3_uri(source.uri)
        except ValueError as exc:
            raise SourceError(f"{self.label}: {exc}") from None

    @property
    def label(self) -> str:
        return f"source {self.source.alias!r} ({redact_uri(self.source.uri)})"

    @property
    def pushes_down_filters(self) -> bool:
        return self.location.format in ("parquet", "glob", "prefix")

    @property
    def threads(self) -> int:
        return max(1, int(getattr(self.settings, "partitions", 1)))

    @property
    def fs(self) -> pafs.S3FileSystem:
        if self._fs is None:
            try:
                self._fs = s3_filesystem(self.environ)
            except ValueError as exc:
                raise SourceError(f"{self.label}: {exc}") from None
        return self._fs

    @property
    def reader(self):
        if self._reader is None:
            fmt = self.location.format
            if fmt == "unknown":
                raise SourceError(f"{self.label}: cannot tell the format from the key; use "
                                  ".csv, .csv.gz, .parquet, a prefix ending in / or a glob")
            if fmt in ("csv", "csv.gz"):
                from .s3_csv import S3Csv
                self._reader = S3Csv(self)
            else:
                from .s3_parquet import S3Parquet
                self._reader = S3Parquet(self)
        return self._reader

    def schema(self) -> pa.Schema:
        with self.errors():
            return self.reader.schema()

    def batches(self, filters: Sequence[BoundFilter],
                progress: Callable[[float], None]) -> Iterator[pa.RecordBatch]:
        done = 0
        with self.errors():
            tasks, work, total = self.reader.plan(filters)
            with closing(fan_in(tasks, work, self.threads)) as items:   # stops the threads
                for batch, credit in items:
                    if batch is not None and batch.num_rows:
                        yield batch
                    if credit:
                        done += credit
                        progress(min(done / max(total, 1), 0.99))
        progress(1.0)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        # pyarrow finalizes the AWS SDK at interpreter exit; a filesystem still alive then
        # is destroyed after it, which can abort the process
        self._fs = None

    # ------------------------------------------------------------------ errors

    def errors(self):
        return _Translate(self)

    def describe_endpoint(self) -> str:
        try:
            endpoint, scheme = endpoint_of(self.environ)
        except ValueError:
            return "the S3 endpoint"
        return f"{scheme}://{endpoint}" if endpoint else "AWS S3"

    def missing(self, what: str = "object") -> SourceError:
        """The error for a FileNotFoundError: a missing bucket, else a missing key."""
        try:
            bucket = self.fs.get_file_info(self.location.bucket)
        except OSError:                       # e.g. may read objects but not HEAD the bucket
            bucket = None
        if bucket is not None and bucket.type == pafs.FileType.NotFound:
            return SourceError(f"{self.label}: bucket {self.location.bucket!r} does not exist "
                               f"at {self.describe_endpoint()}")
        return SourceError(f"{self.label}: no {what} s3://{self.location.path}")

    def translate(self, exc: BaseException) -> BaseException:
        if isinstance(exc, KallaError) or not isinstance(exc, (OSError, pa.ArrowException,
                                                               ValueError, EOFError)):
            return exc
        text = scrub(str(exc), _secrets(self.environ))
        if isinstance(exc, FileNotFoundError):
            return self.missing()
        code = (re.search(r"AWS Error (\w+)", text) or [None, ""])[1]
        if code == "ACCESS_DENIED":
            return SourceError(
                f"{self.label}: access denied: the credentials in AWS_ACCESS_KEY_ID may not "
                "read this object (check the key pair and the bucket policy; S3 also answers "
                "403 for a missing key when the credentials may not list the bucket)")
        if code in _REJECTED:
            return SourceError(f"{self.label}: the S3 service rejected the credentials "
                               f"({code}); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        if code == "NO_SUCH_BUCKET":
            return SourceError(f"{self.label}: bucket {self.location.bucket!r} does not exist "
                               f"at {self.describe_endpoint()}")
        if code in ("NO_SUCH_KEY", "RESOURCE_NOT_FOUND"):
            return SourceError(f"{self.label}: no object s3://{self.location.path}")
        if code == "NETWORK_CONNECTION" or "curlCode" in text:
            return TransientSourceError(f"{self.label}: cannot reach {self.describe_endpoint()} "
                                        "(network error); is AWS_ENDPOINT_URL right?")
        if code in _TRANSIENT:
            return TransientSourceError(f"{self.label}: {self.describe_endpoint()} is busy or "
                                        f"unavailable ({code}); try again later")
        return self.reader.explain(exc, text) if self._reader else \
            SourceError(f"{self.label}: {text}")


class _Translate:
    """``with connector.errors():`` turns driver exceptions into SourceErrors, secrets scrubbed."""

    def __init__(self, connector: S3Connector):
        self.connector = connector

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None:
            return False
        translated = self.connector.translate(exc)
        if translated is exc:
            return False
        raise translated from None


def _secrets(environ: Mapping[str, str]) -> list[str]:
    found = [environ.get(n, "") for n in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def range_size(nbytes: int, threads: int) -> int:
    """Bytes per range: one range per thread, clamped to [MIN_RANGE_BYTES, MAX_RANGE_BYTES].

    >>> range_size(54 * MiB, 2) // MiB, range_size(1, 8) // MiB, range_size(10_000 * MiB, 4) // MiB
    (27, 8, 32)
    """
    return min(max(math.ceil(nbytes / max(threads, 1)), MIN_RANGE_BYTES), MAX_RANGE_BYTES)
