"""JobRequest validation: every invalid input names its field and the problem."""
from __future__ import annotations

import copy

import pytest

from kalla.errors import InvalidInput
from kalla.jobs import parse_job, recipe_to_job, redact_uri

RUN_ID = "a1b2c3d4-e5f6-7890-abcd-ef1234567890"


@pytest.fixture
def job(tmp_path):
    left = tmp_path / "left.csv"
    right = tmp_path / "right.parquet"
    left.write_text("id,amount\n1,2\n")
    right.write_bytes(b"PAR1")
    return {"run_id": RUN_ID, "callback_url": "http://localhost:3001/cb",
            "match_sql": "SELECT l.id FROM l JOIN r ON l.id = r.id",
            "sources": [{"alias": "l", "uri": str(left)}, {"alias": "r", "uri": str(right)}],
            "output_path": str(tmp_path / "out"),
            "primary_keys": {"l": ["id"], "r": ["id"]}}


def mutate(job, path, value):
    job = copy.deepcopy(job)
    target = job
    for part in path[:-1]:
        target = target[part]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return job


DELETE = object()

INVALID = [
    (("run_id",), DELETE, "run_id", "is required"),
    (("run_id",), "not-a-uuid", "run_id", "must be a UUID"),
    (("run_id",), 42, "run_id", "must be a string"),
    (("callback_url",), DELETE, "callback_url", "is required"),
    (("callback_url",), "ftp://example.com/x", "callback_url", "http:// or https://"),
    (("callback_url",), "http://example.com:99999/x", "callback_url", "is not a valid URL"),
    (("match_sql",), DELETE, "match_sql", "is required"),
    (("match_sql",), "   ", "match_sql", "must not be empty"),
    (("match_sql",), ["SELECT 1"], "match_sql", "must be a string, got an array"),
    (("sources",), DELETE, "sources", "is required"),
    (("sources",), {"alias": "l"}, "sources", "must be an array"),
    (("sources",), [], "sources", "at least two sources"),
    (("sources", 0), "left.csv", "sources[0]", "must be an object"),
    (("sources", 0, "alias"), DELETE, "sources[0].alias", "is required"),
    (("sources", 0, "alias"), "", "sources[0].alias", "must not be empty"),
    (("sources", 0, "alias"), "left src", "sources[0].alias", "not a plain SQL identifier"),
    (("sources", 0, "alias"), "1left", "sources[0].alias", "not a plain SQL identifier"),
    (("sources", 0, "alias"), "l; DROP TABLE x", "sources[0].alias", "not a plain SQL identifier"),
    (("sources", 1, "alias"), "l", "sources[1].alias", "already used by sources[0]"),
    (("sources", 1, "alias"), "L", "sources[1].alias", "already used by sources[0]"),
    (("sources", 0, "uri"), DELETE, "sources[0].uri", "is required"),
    (("sources", 0, "uri"), "mysql://h/db?table=t", "sources[0].uri", "unsupported URI scheme 'mysql'"),
    (("sources", 0, "uri"), "/nonexistent/left.csv", "sources[0].uri", "file does not exist"),
    (("sources", 0, "uri"), "/nonexistent/*.parquet", "sources[0].uri", "no file matches"),
    (("sources", 0, "uri"), "postgres://u:p@localhost/db", "sources[0].uri", "needs ?table=NAME"),
    (("sources", 0, "uri"), "s3://bucket-only", "sources[0].uri", "needs a bucket and a key"),
    (("sources", 0, "uri"), "postgres://h/db?table=t&passfile=/root/.pgpass", "sources[0].uri",
     "passfile parameter is not allowed"),
    (("sources", 0, "uri"), "postgres://h/db?table=t&service=prod", "sources[0].uri",
     "service parameter is not allowed"),
    (("sources", 0, "uri"), "postgres://[::1/db?table=t", "sources[0].uri", "is not a valid URI"),
    (("sources", 0, "filters"), {"column": "a"}, "sources[0].filters", "must be an array"),
    (("sources", 0, "filters"), [{"op": "eq", "value": 1}], "sources[0].filters[0].column", "is required"),
    (("sources", 0, "filters"), [{"column": "a", "op": "approx", "value": 1}],
     "sources[0].filters[0].op", "unknown operator 'approx'"),
    (("sources", 0, "filters"), [{"column": "a", "op": "eq"}], "sources[0].filters[0].value", "is required"),
    (("sources", 0, "filters"), [{"column": "a", "op": "eq", "value": [1]}],
     "sources[0].filters[0].value", "needs a string or a number"),
    (("sources", 0, "filters"), [{"column": "a", "op": "eq", "value": True}],
     "sources[0].filters[0].value", "needs a string or a number"),
    (("sources", 0, "filters"), [{"column": "a", "op": "between", "value": [1]}],
     "sources[0].filters[0].value", "exactly two values"),
    (("sources", 0, "filters"), [{"column": "a", "op": "between", "value": "1,2"}],
     "sources[0].filters[0].value", "exactly two values"),
    (("sources", 0, "filters"), [{"column": "a", "op": "in", "value": "x"}],
     "sources[0].filters[0].value", "non-empty array"),
    (("sources", 0, "filters"), [{"column": "a", "op": "in", "value": []}],
     "sources[0].filters[0].value", "non-empty array"),
    (("sources", 0, "filters"), [{"column": "a", "op": "like", "value": 5}],
     "sources[0].filters[0].value", "needs a string pattern"),
    (("output_path",), DELETE, "output_path", "is required"),
    (("primary_keys",), DELETE, "primary_keys", "is required"),
    (("primary_keys",), ["id"], "primary_keys", "must be an object"),
    (("primary_keys", "r"), DELETE, "primary_keys.r", "left and right sources need a primary key"),
    (("primary_keys", "r"), [], "primary_keys.r", "at least one column"),
    (("primary_keys", "r"), "id", "primary_keys.r", "must be an array"),
    (("primary_keys", "r"), ["id", "id"], "primary_keys.r", "names a column twice"),
    (("primary_keys", "r"), [""], "primary_keys.r[0]", "non-empty column name"),
    (("primary_keys", "x"), ["id"], "primary_keys.x", "names no source"),
]


@pytest.mark.parametrize("path,value,field,problem", INVALID,
                         ids=[f"{'.'.join(map(str, p))}={v if v is not DELETE else 'missing'}"
                              for p, v, _, _ in INVALID])
def test_invalid_input_names_field(job, path, value, field, problem):
    with pytest.raises(InvalidInput) as info:
        parse_job(mutate(job, path, value))
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert problem in str(info.value)
    assert info.value.status == 400 and info.value.exit_code == 2


def test_not_an_object():
    with pytest.raises(InvalidInput, match="must be a JSON object"):
        parse_job(["not", "a", "job"])


def test_valid_job_round_trips(job):
    spec = parse_job(job)
    assert spec.run_id == RUN_ID
    assert [s.kind for s in spec.sources] == ["csv", "parquet"]
    again = parse_job(spec.to_dict())
    assert again == spec


def test_batch_mode_makes_run_id_and_callback_optional(job):
    del job["run_id"], job["callback_url"]
    spec = parse_job(job, batch=True)
    assert spec.callback_url is None and len(spec.run_id) == 36


def test_output_root_confines_output_path(job, tmp_path):
    root = tmp_path / "outputs"
    root.mkdir()
    assert parse_job({**job, "output_path": "run1"}, output_root=str(root)).output_path == str(root / "run1")
    for escape in ("../elsewhere", "/etc", "run1/../../x"):
        with pytest.raises(InvalidInput, match="output_path: resolves outside KALLA_OUTPUT_ROOT"):
            parse_job({**job, "output_path": escape}, output_root=str(root))


def test_data_roots_check_every_glob_match(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (outside / "secret.parquet").write_bytes(b"PAR1")
    (root / "a.parquet").write_bytes(b"PAR1")
    (root / "b.parquet").symlink_to(outside / "secret.parquet")
    job = {"match_sql": "SELECT 1", "output_path": str(tmp_path / "out"),
           "sources": [{"alias": "a", "uri": f"{root}/*.parquet"}, {"alias": "b", "uri": str(root / "a.parquet")}],
           "primary_keys": {"a": ["id"], "b": ["id"]}}
    with pytest.raises(InvalidInput, match="outside the allowed data roots.*b.parquet"):
        parse_job(job, batch=True, data_roots=(str(root),))
    with pytest.raises(InvalidInput, match="outside the allowed data roots"):
        parse_job({**job, "sources": [{"alias": "a", "uri": "/*/*.parquet"}, job["sources"][1]]},
                  batch=True, data_roots=(str(root),))


def test_data_roots_confine_local_sources(job, tmp_path):
    with pytest.raises(InvalidInput, match="outside the allowed data roots"):
        parse_job({**job, "sources": [{"alias": "l", "uri": "/etc/passwd.csv"}, job["sources"][1]]},
                  data_roots=(str(tmp_path),))
    assert parse_job(job, data_roots=(str(tmp_path),))


def test_password_never_in_repr():
    uri = "postgres://kalla:hunter2@db:5432/fin?table=t"
    spec = parse_job({"match_sql": "SELECT 1", "output_path": "/tmp/x",
                      "sources": [{"alias": "a", "uri": uri}, {"alias": "b", "uri": uri}],
                      "primary_keys": {"a": ["id"], "b": ["id"]}}, batch=True)
    assert "hunter2" not in repr(spec)
    assert redact_uri(uri) == "postgres://kalla:***@db:5432/fin?table=t"


def test_recipe_with_file_bindings(tmp_path):
    payments = tmp_path / "payments.csv"
    payments.write_text("payment_id,reference_number,amount\n")
    recipe = {"recipe_id": "inv-pay", "name": "n", "description": "d", "match_description": "m",
              "match_sql": "SELECT 1",
              "sources": {"left": {"alias": "invoices", "type": "postgres",
                                   "uri": "postgres://h/db?table=invoices", "primary_key": ["invoice_id"]},
                          "right": {"alias": "payments", "type": "file",
                                    "schema": ["payment_id", "reference_number", "amount"],
                                    "primary_key": ["payment_id"]}}}
    spec = recipe_to_job(recipe, {"payments": str(payments)}, str(tmp_path / "out"))
    assert [s.alias for s in spec.sources] == ["invoices", "payments"]
    assert spec.sources[1].expected_columns == ("payment_id", "reference_number", "amount")
    assert spec.primary_keys == {"invoices": ("invoice_id",), "payments": ("payment_id",)}
    with pytest.raises(InvalidInput, match="needs a binding: --source payments=PATH"):
        recipe_to_job(recipe, {}, None)
    with pytest.raises(InvalidInput, match="binds nobody"):
        recipe_to_job(recipe, {"payments": str(payments), "nobody": "x.csv"}, None)
