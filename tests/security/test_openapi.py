"""docs/openapi.yaml describes the API that kalla/service/httpd.py serves: the same routes and
methods, the same fields and enums as the validators, and real answers match its schemas."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from kalla.expectations import CHECKS
from kalla.jobs import FILTER_OPS, parse_job
from kalla.rules import RULE_FIELDS
from kalla.service import httpd
from kalla.service.journal import JobStatus, render

REPO = Path(__file__).resolve().parents[2]
DOC = yaml.safe_load((REPO / "docs" / "openapi.yaml").read_text())
SCHEMAS = DOC["components"]["schemas"]
METHODS = {"get", "post", "delete", "head", "put", "patch", "options"}


def route_template(pattern: re.Pattern) -> str:
    """``/api/jobs/(?P<run_id>[^/]+)`` -> ``/api/jobs/{run_id}``."""
    return re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern.pattern)


def deref(node: dict) -> dict:
    while isinstance(node, dict) and "$ref" in node:
        target = DOC
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = target
    return node


def validate(value, schema: dict, where: str = "$") -> list[str]:
    """The subset of JSON Schema this document uses; returns the problems found."""
    schema = deref(schema)
    problems = []
    types = schema.get("type")
    if types is not None:
        allowed = types if isinstance(types, list) else [types]
        kinds = {"string": str, "integer": int, "number": (int, float), "object": dict,
                 "array": list, "boolean": bool, "null": type(None)}
        if not any(isinstance(value, kinds[t]) and not (isinstance(value, bool) and t != "boolean")
                   for t in allowed):
            return [f"{where}: {value!r} is not {allowed}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} not in {schema['enum']}")
    if "oneOf" in schema and all(validate(value, s, where) for s in schema["oneOf"]):
        problems.append(f"{where}: matches none of oneOf")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        problems.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{where}: {value} < {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{where}: {value} > {schema['maximum']}")
    if isinstance(value, dict):
        problems += [f"{where}.{k}: required" for k in schema.get("required", []) if k not in value]
        props = schema.get("properties", {})
        for key, item in value.items():
            if key in props:
                problems += validate(item, props[key], f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                problems.append(f"{where}.{key}: not allowed")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            problems += validate(item, schema["items"], f"{where}[{i}]")
    return problems


# ---------------------------------------------------------------------- against the code


def test_routes_and_methods_match_httpd():
    served = {route_template(pattern): {m.lower() for m in methods}
              for pattern, methods in httpd.ROUTES}
    documented = {path: {m for m in item if m in METHODS} for path, item in DOC["paths"].items()}
    assert documented == served


def test_every_error_answer_is_documented_as_plain_text():
    for path, item in DOC["paths"].items():
        for method, operation in item.items():
            if method not in METHODS:
                continue
            for status, response in operation["responses"].items():
                response = deref(response)
                if status.startswith(("4", "5")) and method != "head":
                    assert "text/plain" in response.get("content", {}), (path, method, status)


def test_enums_and_fields_match_the_validators():
    assert SCHEMAS["FilterCondition"]["properties"]["op"]["enum"] == list(FILTER_OPS)
    assert set(SCHEMAS["Expect"]["properties"]) == set(CHECKS)
    assert set(SCHEMAS["Rule"]["properties"]) == set(RULE_FIELDS)
    assert SCHEMAS["Status"]["enum"] == [s.value for s in JobStatus]
    example = DOC["paths"]["/api/jobs"]["post"]["requestBody"]["content"]["application/json"]["example"]
    spec = parse_job(example, check_files=False)
    fields = set(spec.to_dict()) | {"rules", "expect"}
    assert set(SCHEMAS["JobRequest"]["properties"]) == fields
    assert not validate(example, SCHEMAS["JobRequest"])


def test_job_status_schema_matches_what_the_journal_renders():
    row = {"run_id": "a1b2c3d4-e5f6-7890-abcd-ef1234567890", "status": "completed",
           "stage": "publish", "progress": 1.0, "matched_count": 1, "unmatched_left_count": 0,
           "unmatched_right_count": 0, "output_paths": '{"matched": "/x"}', "error": None,
           "created_at": 0.0, "started_at": 0.5, "finished_at": 1.0, "attempts": 1,
           "callback": '{"kind": "complete", "delivered": true, "attempts": 1, "status": 200, '
                       '"error": null}', "callback_state": "delivered", "terminal": None}
    rendered = render(row)
    assert validate({}, SCHEMAS["JobStatus"]) and validate({**rendered, "status": "odd"},
                                                             SCHEMAS["JobStatus"])  # it can fail
    assert set(rendered) <= set(SCHEMAS["JobStatus"]["properties"])
    assert not validate(rendered, SCHEMAS["JobStatus"])


# ---------------------------------------------------------------------- against a server


def test_real_answers_match_the_schemas(guarded):
    server, listener = guarded.server, guarded.listener
    example = DOC["paths"]["/api/jobs"]["post"]["requestBody"]["content"]["application/json"]["example"]
    job = guarded.jobs.make()
    job["sources"][0]["filters"] = [{"column": "amount", "op": "gte", "value": 0}]
    assert set(job) <= set(example) | {"rules", "expect"}
    resp = server.submit(job)
    assert resp.status == 200 and not validate(resp.json(), SCHEMAS["Accepted"])
    final = listener.terminal(job["run_id"])
    assert not validate(final, SCHEMAS["CompletionCallback"]), final
    for body in listener.bodies(job["run_id"])[:-1]:
        assert not validate(body, SCHEMAS["ProgressCallback"]), body
    status = server.wait_delivered(job["run_id"])
    assert not validate(status, SCHEMAS["JobStatus"]), validate(status, SCHEMAS["JobStatus"])
    listing = server.get("/api/jobs?limit=5").json()
    assert all(not validate(j, SCHEMAS["JobStatus"]) for j in listing["jobs"])

    failing = guarded.jobs.make(match_sql="SELECT nope FROM l")
    assert server.submit(failing).status == 200
    assert not validate(listener.terminal(failing["run_id"]), SCHEMAS["ErrorCallback"])

    for resp in (server.submit({"run_id": "x"}), server.get("/api/jobs?limit=0"),
                 server.get("/api/jobs/not-a-run"), server.request("PUT", "/api/jobs", body=b"")):
        assert resp.headers["Content-Type"].startswith("text/plain")
        assert not validate(resp.text, SCHEMAS["PlainTextError"]), resp.text
