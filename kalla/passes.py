"""Multi-pass matching: ordered rules, each seeing only the records earlier rules left.

Every rule is planned first (a broken rule fails the job before any rule runs). Then,
rule by rule:

1. the rule's SQL runs (read-only, like match_sql); its pairs stream straight into
   matched.parquet, and the keys of the records they use into small per-side key files;
2. a ``one_to_one`` rule first lands in a scratch file: every pair whose left or right
   record is in more than one of its pairs is held back (those records stay available);
3. each side's alias is narrowed to the records so far minus this pass's keys: a view
   (a DataFusion anti-join with the key file, streamed and, with the sort-merge strategy,
   spilled) or, where later rules would scan more through views than a copy costs, a
   scratch copy of the leftovers (a Polars anti-join, as in the unmatched stage).

matched.parquet is the union of the passes by column name (a column a pass lacks is null)
plus ``match_rule``. Each source's key columns get the name the first rule gave them, so
the unmatched stage finds every pass's keys under one name.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .engine import plan_match, register_parquet
from .errors import MatchError
from .keys import resolve_key_columns
from .matching import execution_errors, output_schema, stream_batches
from .outputs import Background, RowGroups, row_group_bytes, writer_options
from .rules import MATCH_RULE_COLUMN, RuleSpec


@dataclass
class Pass:
    rule: RuleSpec
    index: int
    schema: pa.Schema                    # the rule's output, barrier dropped
    keys: dict[str, list[str]]           # alias -> the output columns holding its key
    renames: dict[str, str] = field(default_factory=dict)   # output -> matched.parquet name
    rows: int = 0
    ambiguous: int = 0

    @property
    def label(self) -> str:
        return f"rules[{self.index}] ({self.rule.name!r})"


@dataclass
class Side:
    """One source as the rules narrow it: the files that hold its records so far (its
    staged file, or the last copy of its leftovers) and the key files of the passes since."""
    schema: pa.Schema                    # the source's own schema
    files: list[str]
    rows: int                            # an estimate of the records so far
    key_files: list[str] = field(default_factory=list)


def run_rules(job, ctx) -> None:
    sides = [job.spec.left.alias, job.spec.right.alias]
    passes = [plan_pass(job, ctx, rule, i, sides) for i, rule in enumerate(job.spec.rules)]
    job.key_columns = canonical_keys(passes, sides)
    schema = union_schema(passes)
    writer = RowGroups(pq.ParquetWriter(job.outputs.partial("matched"), schema, **writer_options(schema)),
                       nbytes=row_group_bytes(job.memory_bytes))
    # One writer thread for every pass: a pass's last batches are encoded while the next
    # rule already runs. The queue holds (pass, batch) items; its depth bounds the memory.
    with execution_errors("rules"), \
            Background(lambda item: writer.write_batch(_conform(item[1], item[0], schema)),
                       writer.close, depth=16, abort=writer.abort) as union:
        state = {alias: Side(pq.read_schema(job.staged[alias][0]), list(job.staged[alias]),
                             job.source_rows.get(alias, 0)) for alias in sides}
        for p in passes:
            job.check_cancelled()
            sink = PassSink(job, p, union, state)
            run_pass(job, ctx, p, sink, len(passes))
            if p.rows:     # nothing matched: the next rule sees the same records
                narrow(ctx, job, p, sink.key_paths, state, later=len(passes) - 1 - p.index)
    # The unmatched stage anti-joins (Polars) each side's files with its key files since:
    # the records no rule took.
    job.leftovers = state
    job.matched_count = sum(p.rows for p in passes)
    job.report({"stage": "matching", "progress": 1.0, "matched_count": job.matched_count})


def plan_pass(job, ctx, rule: RuleSpec, index: int, sides: list[str]) -> Pass:
    """Plan one rule (on the full sources: the remaining ones have the same schema)."""
    label = f"rules[{index}] ({rule.name!r})"
    try:
        schema = output_schema(plan_match(ctx, rule.match_sql))
        keys = resolve_key_columns(schema.names, sides, job.spec.primary_keys)
    except MatchError as exc:
        raise MatchError(f"{label}: {exc}") from None
    if MATCH_RULE_COLUMN in schema.names:
        raise MatchError(f"{label}: returns a column named {MATCH_RULE_COLUMN!r}, which Kalla adds "
                         "to matched.parquet to name each row's rule; rename it")
    return Pass(rule, index, schema, keys)


def canonical_keys(passes: list[Pass], sides: list[str]) -> dict[str, list[str]]:
    """The first rule's key column names; later passes are renamed to them."""
    canonical = passes[0].keys
    for p in passes[1:]:
        for alias in sides:
            for own, name in zip(p.keys[alias], canonical[alias]):
                if own != name:
                    p.renames[own] = name
        clash = [n for n in p.renames.values() if n in p.schema.names and n not in p.renames]
        if clash:
            raise MatchError(f"{p.label}: returns a column {clash[0]!r} that is not the key it names "
                             f"in rule {passes[0].rule.name!r}; matched.parquet keeps each key "
                             "under one name, so rename that column or name the keys alike")
    return canonical


def union_schema(passes: list[Pass]) -> pa.Schema:
    """Columns of every pass by name, in order of first appearance, all nullable."""
    types: dict[str, pa.DataType] = {}
    owner: dict[str, Pass] = {}
    for p in passes:
        for f in p.schema:
            name = p.renames.get(f.name, f.name)
            if name not in types:
                types[name], owner[name] = f.type, p
            elif types[name] != f.type:
                types[name] = _common_type(name, types[name], owner[name], f.type, p)
    fields = [pa.field(n, t, nullable=True) for n, t in types.items()]
    return pa.schema(fields + [pa.field(MATCH_RULE_COLUMN, pa.string(), nullable=False)])


def _common_type(name: str, first: pa.DataType, first_pass: Pass, other: pa.DataType,
                 other_pass: Pass) -> pa.DataType:
    try:
        unified = pa.unify_schemas([pa.schema([pa.field(name, first)]), pa.schema([pa.field(name, other)])],
                                   promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, NotImplementedError):
        raise MatchError(f"column {name!r} is {first} in {first_pass.label} but {other} in "
                         f"{other_pass.label}; cast one so the passes can share matched.parquet") from None
    return unified.field(name).type


class PassSink:
    """Where a pass's pairs go: to matched.parquet's writer thread, and each side's key
    columns, under the source's own names and types, into a key file. Key files are
    scratch, read by narrow() and the unmatched stage: written plain and uncompressed right
    here (cheap), so they are complete as soon as the pass ends."""

    def __init__(self, job, p: Pass, union: Background, state: dict[str, Side]):
        self.p, self.union = p, union
        self.rows = 0
        self.key_paths = {alias: os.path.join(job.scratch, f"keys-{alias}-{p.index}.parquet")
                          for alias in state}
        self.key_columns = {alias: p.keys[alias] for alias in state}
        self.key_schemas = {alias: pa.schema([side.schema.field(name).with_nullable(True)
                                              for name in job.spec.primary_keys[alias]])
                            for alias, side in state.items()}
        self.key_writers = {alias: pq.ParquetWriter(path, self.key_schemas[alias], compression="none",
                                                    use_dictionary=False)
                            for alias, path in self.key_paths.items()}

    def write(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        self.union.write_batch((self.p, batch))
        for alias, writer in self.key_writers.items():
            schema = self.key_schemas[alias]
            columns = [batch.column(c) for c in self.key_columns[alias]]
            writer.write_batch(pa.RecordBatch.from_arrays(
                [c if c.type == f.type else c.cast(f.type) for c, f in zip(columns, schema)], schema=schema))

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb) -> None:
        for writer in self.key_writers.values():
            writer.close()


def run_pass(job, ctx, p: Pass, sink: PassSink, count: int) -> None:
    done_before = sum(job.rule_counts.values())
    expected = max(1, min(job.source_rows.values(), default=1) - done_before)

    def event(rows: int) -> dict:
        fraction = (p.index + min(0.99, rows / expected)) / count
        return {"stage": "matching", "rule": p.rule.name, "progress": round(min(0.99, fraction), 4),
                "matched_count": done_before + sink.rows}

    with execution_errors(f"rule {p.rule.name!r}"), sink:
        if p.rule.one_to_one:
            run_one_to_one(job, ctx, p, sink, event)
        else:
            stream_batches(job, plan_match(ctx, p.rule.match_sql), sink.write, event)
    p.rows = job.rule_counts[p.rule.name] = sink.rows
    job.report({**event(0), "progress": round(min(0.99, (p.index + 1) / count), 4)})


def run_one_to_one(job, ctx, p: Pass, sink: PassSink, event) -> None:
    """Land the rule's pairs in scratch, then pass on only the unambiguous ones.

    The scratch file is uncompressed: it is read back once, moments later.
    """
    df = plan_match(ctx, p.rule.match_sql)
    raw = os.path.join(job.scratch, f"pass-{p.index}.parquet")
    writer = pq.ParquetWriter(raw, output_schema(df), compression="none", use_dictionary=False)
    with Background(writer.write_batch, writer.close) as scratch:
        found = stream_batches(job, df, scratch.write_batch, event)
    copy_rows(raw, unambiguous_rows(raw, p.keys), sink.write)
    p.ambiguous = job.ambiguous[p.rule.name] = found - sink.rows
    os.remove(raw)


def unambiguous_rows(path: str, keys: dict[str, list[str]]) -> np.ndarray:
    """Row numbers of the pairs whose left and right records each appear in no other pair.

    Decided by key counts alone, so the result never depends on row order. Only the key
    columns go through Polars' streaming engine: memory holds keys, never the pairs. A key
    with a NULL identifies no record, so it never makes a pair ambiguous.
    """
    import polars as pl   # here, not at import: the pipeline loads Polars on a side thread

    from .unmatched import ROW
    columns = list(dict.fromkeys(c for cols in keys.values() for c in cols))
    pairs = pl.scan_parquet(path).select(columns).with_row_index(ROW)
    kept = pairs
    for cols in keys.values():
        repeated = (pairs.group_by(cols).agg(pl.len().alias("__kalla_n"))
                    .filter(pl.col("__kalla_n") > 1).drop("__kalla_n").drop_nulls())
        kept = kept.join(repeated, on=cols, how="anti", nulls_equal=False, maintain_order="left")
    rows = kept.select(ROW).collect(engine="streaming")[ROW].to_numpy().astype(np.int64)
    return rows if bool(np.all(rows[:-1] <= rows[1:])) else np.sort(rows)


def copy_rows(path: str, rows: np.ndarray, write) -> None:
    """Pass the given (sorted) row numbers of a Parquet file to write, row group by row group."""
    parquet, offset = pq.ParquetFile(path), 0
    for group in range(parquet.num_row_groups):
        size = parquet.metadata.row_group(group).num_rows
        lo, hi = np.searchsorted(rows, [offset, offset + size])
        if hi > lo:
            table = parquet.read_row_group(group)
            if hi - lo < size:          # all kept (the usual case): no copy
                table = table.take(pa.array(rows[lo:hi] - offset))
            for batch in table.to_batches():
                write(batch)
        offset += size


def narrow(ctx, job, p: Pass, key_paths: dict[str, str], state: dict[str, Side], later: int) -> None:
    """Make each side's alias the records it named before, minus this pass's keys.

    Either a view (the records so far, anti-joined with the key file: nothing copied, each
    later rule pays the anti-join over the records so far) or, where that costs more, a
    copy of the leftovers in a scratch file the alias is re-registered on (later rules read
    only the leftovers). Each side's state follows.
    """
    for alias, path in key_paths.items():
        state[alias].key_files.append(path)
    copy = [alias for alias in key_paths if worth_copying(state[alias].rows, p.rows, later)]
    with ThreadPoolExecutor(max(1, len(copy))) as pool:
        copied = {alias: pool.submit(_copy, job, p, alias, state[alias]) for alias in copy}
        written = {alias: future.result() for alias, future in copied.items()}
    for alias in key_paths:
        side = state[alias]
        if alias in written:
            path, side.rows = written[alias]
            ctx.deregister_table(alias.lower())
            register_parquet(ctx, alias, path)
            side.files, side.key_files = [path], []
            _drop_scratch(job, alias, keep=path)    # nothing reads earlier copies or key files
        else:
            remaining = _remaining(ctx, job, p, alias, key_paths[alias])
            ctx.deregister_table(alias.lower())
            ctx.register_view(alias.lower(), remaining)
            side.rows = max(0, side.rows - p.rows)


def worth_copying(rows: int, matched: int, later: int) -> bool:
    """Copy the leftovers when the later rules would scan more through views than the copy.

    Per row, an anti-join scan and a plain uncompressed write cost about the same (measured
    at 1M rows). Through views each of the ``later`` rules scans all ``rows``; with a copy
    the copy writes the ``rows - matched`` left and each later rule reads only those. So
    copy when ``later * matched`` exceeds ``rows - matched``: after an exact pass taking
    63 % with two rules to go, yes; after one taking 12 % with one rule to go, no.
    """
    matched = min(matched, rows)
    return later * matched > rows - matched


def _remaining(ctx, job, p: Pass, alias: str, key_path: str):
    keys = f"__kalla_keys_{alias.lower()}_{p.index}"
    ctx.register_parquet(keys, key_path)
    on = " AND ".join(f"s.{_quote(k)} = k.{_quote(k)}" for k in job.spec.primary_keys[alias])
    # An anti-join never pairs NULL keys, so records with a NULL key stay (unmatched).
    return ctx.sql(f"SELECT s.* FROM {_quote(alias.lower())} s LEFT ANTI JOIN {_quote(keys)} k ON {on}")


def _copy(job, p: Pass, alias: str, side: Side) -> tuple[str, int]:
    """The side's records so far minus the keys in its key files, into a scratch file.

    The same Polars anti-join as the unmatched stage (kalla/unmatched.py), written plain and
    uncompressed, under the source's exact schema, so later rules see the types they were
    planned with.
    """
    from .unmatched import derive_unmatched
    path = os.path.join(job.scratch, f"left-{alias}-{p.index}.parquet")
    keys = list(job.spec.primary_keys[alias])
    result = derive_unmatched(side.files, keys, side.key_files, keys, path, scratch=True,
                              schema=side.schema)
    return path, result.rows


def _drop_scratch(job, alias: str, keep: str) -> None:
    for entry in os.listdir(job.scratch):
        path = os.path.join(job.scratch, entry)
        if entry.startswith((f"left-{alias}-", f"keys-{alias}-")) and path != keep:
            os.remove(path)


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _conform(batch: pa.RecordBatch, p: Pass, schema: pa.Schema) -> pa.RecordBatch:
    own = {p.renames.get(name, name): batch.column(i) for i, name in enumerate(batch.schema.names)}
    arrays = []
    for f in schema:
        if f.name == MATCH_RULE_COLUMN:
            arrays.append(pa.repeat(pa.scalar(p.rule.name, pa.string()), batch.num_rows))
        elif f.name in own:
            column = own[f.name]
            arrays.append(column if column.type == f.type else column.cast(f.type))
        else:
            arrays.append(pa.nulls(batch.num_rows, f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
