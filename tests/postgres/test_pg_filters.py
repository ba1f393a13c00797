"""Filters are pushed into every partition query as bound, typed literals with quoted
identifiers, and select exactly the rows the same filter selects on any other source."""
from __future__ import annotations

import pyarrow as pa
import pytest

from kalla.errors import InvalidInput
from kalla.filters import apply_filters, bind_filters
from kalla.jobs import FilterSpec


@pytest.fixture(scope="module")
def ledger(pg):
    table = pg.qualified("ledger")
    pg.execute(f"""CREATE TABLE {table} AS SELECT
        g AS id, 'REF-' || g AS ref, (g * 1.25)::numeric(10,2) AS amount,
        DATE '2024-01-01' + g % 60 AS booked,
        TIMESTAMPTZ '2024-01-01 00:00:00+00' + g * INTERVAL '1 hour' AS at,
        (g % 10) / 10.0::float8 AS score,
        md5(g::text)::uuid AS code,
        CASE WHEN g % 7 = 0 THEN NULL ELSE g % 3 END AS bucket,
        g % 2 = 0 AS even
        FROM generate_series(1, 20000) g""")
    return table


@pytest.fixture(scope="module")
def everything(ledger, pg):
    """The whole table, read without filters: the reference for every filter."""
    from kalla.config import load_settings
    from kalla.connectors import connector_for
    from kalla.jobs import SourceSpec
    connector = connector_for(SourceSpec("ledger", pg.uri(ledger), "postgres"),
                              load_settings({"KALLA_PARTITIONS": "1"}))
    schema = connector.schema()
    return pa.Table.from_batches(list(connector.batches([], lambda f: None)), schema=schema)


CASES = [
    # (column, op, value, the SQL fragment sent to the server)
    ("id", "eq", 5, '"id" = 5'),
    ("ref", "neq", "REF-7", "\"ref\" <> 'REF-7'"),
    ("amount", "gt", "100.5", '"amount" > 100.5'),
    ("booked", "gte", "2024-02-15", "\"booked\" >= '2024-02-15'::date"),
    ("at", "lt", "2024-01-03T00:00:00Z", "\"at\" < '2024-01-03 00:00:00+00:00'::timestamptz"),
    ("score", "lte", 0.3, '"score" <= 0.3'),
    ("amount", "between", ["10", "20.25"], '"amount" BETWEEN 10 AND 20.25'),
    ("ref", "in", ["REF-1", "REF-2", "REF-x'y"], "\"ref\" = ANY('{REF-1,REF-2,REF-x''y}')"),
    ("id", "in", [1, 2, 3], "\"id\" = ANY('{1,2,3}'::int2[])"),
    ("ref", "like", "REF-1_", "\"ref\" LIKE 'REF-1_'"),
    ("code", "eq", "c4ca4238-a0b9-2382-0dcc-509a6f75849b",
     "\"code\"::text = 'c4ca4238-a0b9-2382-0dcc-509a6f75849b'"),
    ("bucket", "neq", 1, '"bucket" <> 1'),
    ("id", "gt", 19999.5, '"id" > 19999.5'),
    ("even", "eq", "true", '"even" = true'),
    ("booked", "between", ["2024-01-10", "2024-01-11"],
     "\"booked\" BETWEEN '2024-01-10'::date AND '2024-01-11'::date"),
]


@pytest.mark.parametrize("column, op, value, fragment", CASES,
                         ids=[f"{c[1]}-{c[0]}" for c in CASES])
def test_filter_is_pushed_down_and_matches_arrow(pg, ledger, everything, make_connector,
                                                 column, op, value, fragment):
    connector = make_connector(pg.uri(ledger), partitions=3)
    assert connector.pushes_down_filters
    filters = bind_filters("ledger", connector.schema(), [FilterSpec(column, op, value)])
    got = pa.Table.from_batches(list(connector.batches(filters, lambda f: None)),
                                schema=connector.schema())
    assert len(connector.queries) == 3
    for query in connector.queries:
        assert fragment in query
        assert "ctid" in query
    expected = apply_filters(everything.combine_chunks().to_batches()[0], filters)
    assert sorted(got.column("id").to_pylist()) == sorted(expected.column("id").to_pylist())
    assert 0 < got.num_rows < everything.num_rows


def test_several_filters_are_anded(pg, ledger, make_connector):
    connector = make_connector(pg.uri(ledger))
    specs = [FilterSpec("amount", "gte", 100), FilterSpec("amount", "lt", 110),
             FilterSpec("ref", "like", "REF-8%")]
    filters = bind_filters("ledger", connector.schema(), specs)
    ids = sorted(i for b in connector.batches(filters, lambda f: None)
                 for i in b.column("id").to_pylist())
    assert ids == [80, 81, 82, 83, 84, 85, 86, 87]
    assert ' AND "amount" < 110 AND "ref" LIKE ' in connector.queries[0]


def test_values_are_literals_never_sql(pg, ledger, make_connector):
    connector = make_connector(pg.uri(ledger))
    evil = "x'; DROP TABLE " + ledger + "; --"
    filters = bind_filters("ledger", connector.schema(), [FilterSpec("ref", "eq", evil)])
    assert list(connector.batches(filters, lambda f: None)) == []
    assert pg.execute(f"SELECT count(*) FROM {ledger}")[0][0] == 20000


def test_quoted_column_names(pg, make_connector):
    table = pg.qualified('"Odd Cols"')
    pg.execute(f'CREATE TABLE {table} ("Amount ""€""" numeric(8,2), "select" text)')
    pg.execute(f"INSERT INTO {table} VALUES (1.50, 'a'), (2.50, 'b')")
    connector = make_connector(pg.uri(table))
    assert connector.schema().names == ['Amount "€"', "select"]
    filters = bind_filters("odd", connector.schema(), [FilterSpec('Amount "€"', "gt", 2),
                                                       FilterSpec("select", "in", ["b"])])
    rows = [r for b in connector.batches(filters, lambda f: None) for r in b.to_pylist()]
    assert [r["select"] for r in rows] == ["b"]
    assert '"Amount ""€""" > 2' in connector.queries[0]


def test_unknown_column_fails_before_any_read(pg, ledger, make_connector):
    connector = make_connector(pg.uri(ledger))
    with pytest.raises(InvalidInput) as info:
        bind_filters("ledger", connector.schema(), [FilterSpec("amount; --", "eq", 1)])
    assert "has no column 'amount; --'" in str(info.value)
    assert connector.queries == []
