"""DataFusion session factory: memory pool, spill directory, read-only SQL, Kalla functions.

One fresh SessionContext per job: it sees only that job's registered sources.
"""
from __future__ import annotations

import os

import pyarrow as pa
from datafusion import DataFrame, RuntimeEnvBuilder, SessionConfig, SessionContext, SQLOptions, lit

from .errors import MatchError
from .functions import register_functions
from .sqltext import rewrite_functions, strip_statement_end

# DataFusion 55.2's physical optimizer pushes a narrowing projection below a
# SortMergeJoinExec without remapping its join filter (apache/datafusion#24414, #24593):
# the join then panics or silently drops matches. A computed column in the top projection
# stops that rewrite; Kalla drops the column again when writing matched.parquet.
BARRIER_COLUMN = "__kalla_barrier"


def read_only_options() -> SQLOptions:
    """match_sql may only read: DDL, DML, COPY and SET-like statements are refused."""
    return SQLOptions().with_allow_ddl(False).with_allow_dml(False).with_allow_statements(False)


# Joins whose build side is at most this many rows (and a quarter of the pool) build one hash
# table that every partition probes, instead of repartitioning both inputs by key
# (DataFusion's own limits: 128k rows, 1 MB). Measured at 1M: the match 0.18-0.19 s instead
# of 0.20-0.22 s, the explained unmatched stage 0.26-0.34 s instead of 0.33-0.52 s (5
# alternating pairs each); at 10M the builds are larger and stay partitioned.
SINGLE_TABLE_JOIN_ROWS = 1_000_000


def make_context(*, memory_bytes: int, spill_dir: str, partitions: int | None = None,
                 hash_join: bool = True, batch_rows: int = 8192) -> SessionContext:
    os.makedirs(spill_dir, exist_ok=True)
    runtime = (RuntimeEnvBuilder()
               .with_disk_manager_specified(spill_dir)
               .with_fair_spill_pool(memory_bytes))
    config = (SessionConfig()
              .with_target_partitions(partitions or os.cpu_count() or 1)
              .with_batch_size(batch_rows)
              .with_information_schema(False)
              # Hash joins do not spill in DataFusion; sort-merge joins do. The pipeline
              # picks hash joins only when the smaller input fits the memory budget.
              .set("datafusion.optimizer.prefer_hash_join", "true" if hash_join else "false")
              # Plain Utf8 rather than Utf8View, so output strings keep the source's type.
              .set("datafusion.execution.parquet.schema_force_view_types", "false")
              .set("datafusion.sql_parser.map_string_types_to_utf8view", "false")
              # small build sides as one hash table (SINGLE_TABLE_JOIN_ROWS, above)
              .set("datafusion.optimizer.hash_join_single_partition_threshold", str(memory_bytes // 4))
              .set("datafusion.optimizer.hash_join_single_partition_threshold_rows",
                   str(SINGLE_TABLE_JOIN_ROWS)))
    ctx = SessionContext(config, runtime)
    register_functions(ctx)     # Kalla's UDFs (jaro_winkler) in every context, checks included
    return ctx


def register_parquet(ctx: SessionContext, alias: str, path: str) -> None:
    # Unquoted identifiers in SQL are lower-cased by DataFusion; register under the
    # lower-case name so `FROM Invoices` and `FROM invoices` both find source "Invoices".
    ctx.register_parquet(alias.lower(), path)


def plan_match(ctx: SessionContext, match_sql: str) -> DataFrame:
    """Plan match_sql under read-only options; return a DataFrame ready to stream."""
    sql = rewrite_functions(strip_statement_end(match_sql))
    try:
        df = ctx.sql_with_options(sql, read_only_options())
        schema = df.schema()
    except Exception as exc:  # datafusion raises plain Exceptions with its own text
        raise MatchError(f"match_sql was refused: {_clean(exc)}") from None
    if str(df.logical_plan()).lstrip().startswith(("Explain", "Analyze")):
        raise MatchError("match_sql was refused: EXPLAIN is not a matching query")
    _check_columns(schema)
    return df.with_column(BARRIER_COLUMN, lit(True))


def _check_columns(schema: pa.Schema) -> None:
    seen = set()
    for name in schema.names:
        if name in seen:
            raise MatchError(f"match_sql returns two columns named {name!r}; give them distinct "
                             f"names, e.g. l.{name} AS left_src__{name}, r.{name} AS right_src__{name}")
        seen.add(name)
    if BARRIER_COLUMN in seen:
        raise MatchError(f"match_sql may not return a column named {BARRIER_COLUMN}")


def explain(df: DataFrame) -> str:
    """The physical plan as text (used by tests and --explain-plan)."""
    return str(df.execution_plan().display_indent())


def _clean(exc: Exception) -> str:
    text = str(exc).strip()
    for prefix in ("DataFusion error: ", "Error during planning: ", "SQL error: "):
        text = text.replace(prefix, "")
    return text.splitlines()[0] if text else type(exc).__name__
