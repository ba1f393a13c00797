"""S3 CSV read throughput: Kalla's connector vs pyarrow.csv.read_csv on one buffered stream.

    .venv/bin/python benchmarks/bench_s3.py [--mb 50] [--repeat 5] [--partitions N]

Starts moto's S3 server in its own process on 127.0.0.1 (serving requests must not compete
for the measured process's GIL), uploads one CSV object of about ``--mb`` MB, then times
each contender in a fresh subprocess, interleaved across repeats, against the same server.
Every contender ends with the whole object parsed into Arrow data in its process.

  kalla          S3Connector.schema() + batches(): byte ranges fetched and parsed on
                 KALLA_PARTITIONS threads; batches are counted, then dropped
  pyarrow-8MiB   pyarrow.csv.read_csv(fs.open_input_stream(key, buffer_size=8 MiB)):
                 one stream, one 8 MiB ranged GET per buffer fill (Kalla's smallest range)
  pyarrow-64MiB  the same with a 64 MiB buffer (a 50 MB object in one GET)

moto answers each ranged GET in time proportional to the object's size (it copies the
whole object per request), so the number of requests matters as much as their size.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET, KEY = "kalla-bench", "ledger.csv"
CONTENDERS = ("kalla", "pyarrow-8MiB", "pyarrow-64MiB")
ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
       "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}


def make_csv(megabytes: int) -> bytes:
    """A ledger: ints, codes, decimals, dates and a quoted free-text column with commas."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    rows = megabytes * 1_000_000 // 65      # about 65 bytes a line
    ids = range(rows)
    table = pa.table({
        "id": pa.array(ids, pa.int64()),
        "ref": [f"INV-{i:09d}" for i in ids],
        "amount": [round((i * 7919 % 1_000_003) / 100, 2) for i in ids],
        "booked": [f"2024-{i % 12 + 1:02d}-{i % 28 + 1:02d}" for i in ids],
        "memo": [f"net 30, order {i % 100_000}" for i in ids],
    })
    sink = io.BytesIO()
    pacsv.write_csv(table, sink)
    return sink.getvalue()


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=1).read()
            return server, endpoint
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("moto server did not start")


def upload(endpoint: str, data: bytes) -> None:
    import boto3
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench-secret")
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key=KEY, Body=data)


# ---------------------------------------------------------------------------- one run

def prepare_kalla(partitions: int):
    from kalla.config import load_settings
    from kalla.connectors.s3 import S3Connector
    from kalla.jobs import SourceSpec
    settings = load_settings({"KALLA_PARTITIONS": str(partitions)})

    def run() -> int:
        conn = S3Connector(SourceSpec("bench", f"s3://{BUCKET}/{KEY}", "s3"), settings)
        conn.schema()
        rows = sum(batch.num_rows for batch in conn.batches([], lambda fraction: None))
        conn.close()
        return rows
    return run


def prepare_pyarrow(buffer_size: int):
    import pyarrow.csv as pacsv
    import pyarrow.fs as pafs
    endpoint = os.environ["AWS_ENDPOINT_URL"].split("://", 1)[1]

    def run() -> int:
        fs = pafs.S3FileSystem(access_key="bench", secret_key="bench-secret",
                               region="us-east-1", endpoint_override=endpoint, scheme="http")
        with fs.open_input_stream(f"{BUCKET}/{KEY}", buffer_size=buffer_size) as stream:
            return pacsv.read_csv(stream).num_rows
    return run


def one_run(contender: str, partitions: int) -> None:
    """Time one read in this (fresh) process; imports happen before the clock starts."""
    if contender == "kalla":
        run = prepare_kalla(partitions)
    else:
        run = prepare_pyarrow((8 if contender == "pyarrow-8MiB" else 64) << 20)
    started = time.perf_counter()
    rows = run()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "rows": rows, "peak_rss_mib": peak}))


# ---------------------------------------------------------------------------- the table

def measure(contender: str, endpoint: str, partitions: int) -> dict:
    env = {**os.environ, **ENV, "AWS_ENDPOINT_URL": endpoint,
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, __file__, "--one", contender,
                          "--partitions", str(partitions)],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{contender} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(results: dict[str, list[dict]], size: int, partitions: int) -> None:
    base = statistics.median(r["seconds"] for r in results["pyarrow-8MiB"])
    print(f"\nS3 CSV read, {size / 1e6:.1f} MB object, moto server (own process), "
          f"{os.cpu_count()} cores, KALLA_PARTITIONS={partitions}, "
          f"{len(results['kalla'])} runs each (median)\n")
    print(f"{'contender':<15}{'median s':>10}{'best s':>9}{'MB/s':>9}{'vs 8MiB':>9}"
          f"{'peak RSS MiB':>14}{'rows':>11}")
    for name in CONTENDERS:
        runs = results[name]
        median = statistics.median(r["seconds"] for r in runs)
        print(f"{name:<15}{median:>10.3f}{min(r['seconds'] for r in runs):>9.3f}"
              f"{size / 1e6 / median:>9.1f}{base / median:>8.2f}x"
              f"{max(r['peak_rss_mib'] for r in runs):>14.0f}{runs[0]['rows']:>11,}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50, help="object size in MB (default 50)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--partitions", type=int, default=max(2, os.cpu_count() or 1))
    parser.add_argument("--one", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--upload", metavar="ENDPOINT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one_run(args.one, args.partitions)
        return 0
    if args.upload:
        data = make_csv(args.mb)
        upload(args.upload, data)
        print(len(data))
        return 0
    server, endpoint = start_server()
    try:
        # generated and uploaded by a child: on Linux a child's peak RSS starts at its
        # parent's, so this process must stay small for the contenders' figures to mean much
        size = int(subprocess.run([sys.executable, __file__, "--upload", endpoint, "--mb",
                                   str(args.mb)], check=True, capture_output=True,
                                  text=True).stdout.split()[-1])
        results: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
        for _ in range(args.repeat):
            for name in CONTENDERS:
                results[name].append(measure(name, endpoint, args.partitions))
        rows = {r["rows"] for runs in results.values() for r in runs}
        if len(rows) != 1:
            raise SystemExit(f"contenders disagree on the row count: {sorted(rows)}")
        report(results, size, args.partitions)
    finally:
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
