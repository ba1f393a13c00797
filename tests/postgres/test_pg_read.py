"""Partitioned, consistent, streaming reads against a real PostgreSQL."""
from __future__ import annotations

import secrets
import threading

import numpy as np
import psycopg
import pyarrow as pa
import pytest

MILLION = 1_000_000


@pytest.fixture(scope="module")
def big(pg):
    """A 1M-row table; never modified by the tests that share it."""
    table = pg.qualified("big")
    pg.execute(f"""CREATE TABLE {table} AS
        SELECT g::int8 AS id, 'REF-' || g AS ref, (g % 100000)::numeric(12,2) / 100 AS amount
        FROM generate_series(1, {MILLION}) g""")
    pg.execute(f"ALTER TABLE {table} ADD PRIMARY KEY (id)")
    pg.execute(f"VACUUM ANALYZE {table}")
    return table


def read_all(connector, progress=None):
    connector.schema()
    return list(connector.batches([], progress.append if progress is not None else (lambda f: None)))


def ids_of(batches) -> np.ndarray:
    return np.concatenate([b.column("id").to_numpy() for b in batches]) if batches else np.array([])


def test_million_rows_in_8_partitions_each_row_once(pg, big, make_connector):
    progress = []
    connector = make_connector(pg.uri(big), partitions=8)
    batches = read_all(connector, progress)
    ids = ids_of(batches)
    assert len(ids) == MILLION
    assert len(np.unique(ids)) == MILLION
    assert ids.min() == 1 and ids.max() == MILLION
    assert len(connector.queries) == 8
    assert all("ctid >=" in q and "LIMIT" not in q and "OFFSET" not in q
               for q in connector.queries)
    assert "ctid <" not in connector.queries[-1]          # the last range is open-ended
    assert progress[-1] == 1.0 and progress == sorted(progress) and len(progress) > 2
    assert max(b.num_rows for b in batches) <= connector.settings.batch_rows


def test_partition_queries_use_tid_range_scans_without_sorting(pg, big, make_connector):
    connector = make_connector(pg.uri(big), partitions=4)
    read_all(connector)
    plan = "\n".join(r[0] for r in pg.execute("EXPLAIN " + connector.queries[1]))
    assert "Tid Range Scan" in plan
    assert "Sort" not in plan and "Limit" not in plan


def test_snapshot_holds_while_rows_are_inserted_and_deleted(pg, make_connector):
    table = pg.qualified("moving")
    pg.execute(f"CREATE TABLE {table} AS SELECT g AS id FROM generate_series(1, 300000) g")
    connector = make_connector(pg.uri(table), partitions=4, batch_rows=1000)
    connector.schema()
    stream = connector.batches([], lambda f: None)
    first = next(stream)
    # Mid-read: delete rows of every partition, insert new ones, move some (UPDATE).
    pg.execute(f"DELETE FROM {table} WHERE id % 1000 = 0")
    pg.execute(f"INSERT INTO {table} SELECT g FROM generate_series(300001, 310000) g")
    pg.execute(f"UPDATE {table} SET id = -id WHERE id % 777 = 1")
    ids = ids_of([first, *stream])
    assert len(ids) == 300000
    assert set(ids.tolist()) == set(range(1, 300001))
    after = make_connector(pg.uri(table), partitions=4)
    assert len(ids_of(read_all(after))) == 300000 - 300 + 10000


def test_table_never_analyzed_is_read_whole(pg, make_connector):
    """relpages is 0 until VACUUM/ANALYZE: the page count comes from pg_relation_size."""
    table = pg.qualified("fresh")
    pg.execute(f"CREATE TABLE {table} (id int) WITH (autovacuum_enabled = false)")
    pg.execute(f"INSERT INTO {table} SELECT generate_series(1, 50000)")
    assert pg.execute("SELECT relpages FROM pg_class WHERE oid = %s::regclass",
                      [table])[0][0] == 0
    connector = make_connector(pg.uri(table), partitions=3)
    ids = ids_of(read_all(connector))
    assert sorted(ids.tolist()) == list(range(1, 50001))
    assert len(connector.queries) == 3


def test_empty_table(pg, make_connector):
    table = pg.qualified("empty")
    pg.execute(f"CREATE TABLE {table} (id int, name text)")
    connector = make_connector(pg.uri(table))
    progress = []
    assert read_all(connector, progress) == []
    assert connector.schema() == pa.schema([("id", pa.int32()), ("name", pa.string())])
    assert progress[-1] == 1.0


def test_view_is_read_as_one_stream(pg, big, make_connector):
    view = pg.qualified("big_even")
    pg.execute(f"CREATE VIEW {view} AS SELECT id, amount FROM {big} WHERE id % 2 = 0")
    connector = make_connector(pg.uri(view), partitions=4)
    ids = ids_of(read_all(connector))
    assert len(connector.queries) == 1 and "ctid" not in connector.queries[0]
    assert len(ids) == MILLION // 2 and len(np.unique(ids)) == MILLION // 2


def test_partitioned_table_and_materialized_view(pg, make_connector):
    parent = pg.qualified("parted")
    pg.execute(f"CREATE TABLE {parent} (id int, v text) PARTITION BY RANGE (id)")
    pg.execute(f"CREATE TABLE {parent}_a PARTITION OF {parent} FOR VALUES FROM (0) TO (1000)")
    pg.execute(f"CREATE TABLE {parent}_b PARTITION OF {parent} FOR VALUES FROM (1000) TO (MAXVALUE)")
    pg.execute(f"INSERT INTO {parent} SELECT g, 'v' || g FROM generate_series(1, 80000) g")
    connector = make_connector(pg.uri(parent), partitions=4)
    ids = ids_of(read_all(connector))
    assert sorted(ids.tolist()) == list(range(1, 80001))
    assert len(connector.queries) == 4                 # ctid ranges apply to every leaf
    pg.execute(f"CREATE MATERIALIZED VIEW {parent}_mv AS SELECT * FROM {parent}")
    connector = make_connector(pg.uri(f"{parent}_mv"), partitions=2)
    assert sorted(ids_of(read_all(connector)).tolist()) == list(range(1, 80001))


@pytest.mark.parametrize("how", ["close", "raise"])
def test_consumer_stopping_early_stops_readers_and_closes_connections(
        pg, big, make_connector, wait_until, how):
    app = f"kalla_early_{how}_{secrets.token_hex(3)}"   # other test sessions may run too
    connector = make_connector(pg.uri(big, application_name=app), partitions=4, batch_rows=1000)
    connector.schema()
    stream = connector.batches([], lambda f: None)
    if how == "close":
        next(stream)
        stream.close()
    else:
        with pytest.raises(RuntimeError):
            for _ in stream:
                raise RuntimeError("consumer failed")
        del stream

    def sessions():
        return pg.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                          [app])[0][0]
    assert wait_until(lambda: sessions() == 0)
    assert wait_until(lambda: not [t for t in threading.enumerate()
                                   if t.name.startswith("kalla-pg-")])


def test_readers_wait_for_a_slow_consumer(pg, big, make_connector, monkeypatch):
    """Backpressure: batches pass through a bounded queue, so while the consumer pauses the
    readers stop too, and memory does not grow with the table."""
    import time

    import kalla.connectors.postgres as module
    produced = []
    convert = module.convert_batch
    monkeypatch.setattr(module, "convert_batch",
                        lambda batch, *a: produced.append(batch.num_rows) or convert(batch, *a))
    connector = make_connector(pg.uri(big), partitions=2, batch_rows=1000)
    connector.schema()
    stream = connector.batches([], lambda f: None)
    next(stream)
    time.sleep(1.0)                   # unbounded readers would have read the whole table
    assert sum(produced) < MILLION / 2
    assert sum(b.num_rows for b in stream) + 1000 == MILLION


def test_other_uri_parameters_pass_through_to_libpq(pg, big, make_connector):
    uri = pg.uri("big", options=f"-c search_path={pg.schema}",
                 application_name="kalla_passthrough")
    connector = make_connector(uri.replace("postgresql://", "postgres://", 1))
    assert connector.schema().names == ["id", "ref", "amount"]
    with psycopg.connect(connector.target.conninfo) as conn:
        assert conn.execute("SHOW application_name").fetchone()[0] == "kalla_passthrough"
