"""Load data-driven case folders (tests/cases/NAME: job.json, inputs, expected.json)."""
from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

CASES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cases")


def case_names() -> list[str]:
    return sorted(d for d in os.listdir(CASES) if os.path.isdir(os.path.join(CASES, d)))


def load_case(name: str, workdir, variant: str = "csv") -> tuple[dict, dict]:
    """Copy a case into workdir; return (job dict with absolute paths, expected dict)."""
    src = os.path.join(CASES, name)
    dst = os.path.join(str(workdir), name)
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "job.json")) as fh:
        job = json.load(fh)
    with open(os.path.join(dst, "expected.json")) as fh:
        expected = json.load(fh)
    decimals = job.pop("decimal_variant", None)
    for source in job["sources"]:
        path = os.path.join(dst, source["uri"])
        if variant == "parquet":
            path = csv_to_parquet(path, (decimals or {}).get(source["alias"]))
        source["uri"] = path
    job["output_path"] = os.path.join(dst, "output")
    return job, expected


def csv_to_parquet(path: str, amount_type: str | None) -> str:
    table = pacsv.read_csv(path)
    if amount_type:
        precision, scale = (int(x) for x in amount_type[len("decimal128("):-1].split(","))
        index = table.schema.get_field_index("amount")
        table = table.set_column(index, "amount",
                                 table["amount"].cast(pa.string()).cast(pa.decimal128(precision, scale)))
    out = path[: -len(".csv")] + ".parquet"
    pq.write_table(table, out)
    return out


def has_decimal_variant(name: str) -> bool:
    with open(os.path.join(CASES, name, "job.json")) as fh:
        return "decimal_variant" in json.load(fh)


def rows(path: str, columns: list[str]) -> list[tuple]:
    table = pq.read_table(path, columns=columns)
    return sorted((tuple(r[c] for c in columns) for r in table.to_pylist()), key=_order)


def _order(row):
    return tuple((v is None, str(v)) for v in row)


def normalise(values: list) -> list[tuple]:
    return sorted((tuple(v) if isinstance(v, list) else (v,) for v in values), key=_order)


def assert_output_rows(paths: dict, expected: dict, job: dict) -> None:
    """The three output files hold the expected rows (matched columns; each side's keys)."""
    left, right = job["sources"][0]["alias"], job["sources"][1]["alias"]
    keys = job["primary_keys"]
    assert rows(paths["matched"], expected["matched_columns"]) == normalise(expected["matched"])
    assert rows(paths["unmatched_left"], keys[left]) == normalise(expected["unmatched_left"])
    assert rows(paths["unmatched_right"], keys[right]) == normalise(expected["unmatched_right"])
