"""JobRequest, sources, filters and recipes: parse, validate, to_dict.

Pure Python (the HTTP service imports this, and must not import the data stack).
Every problem raises InvalidInput naming the field, e.g. ``sources[1].filters[0].value``.
"""
from __future__ import annotations

import glob
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import parse_qs, quote_plus, unquote, urlsplit

from .errors import InvalidInput

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
FILTER_OPS = ("eq", "neq", "gt", "gte", "lt", "lte", "between", "in", "like")
SCALAR_OPS = ("eq", "neq", "gt", "gte", "lt", "lte")
MAX_SQL_CHARS = 100_000
# libpq parameters that name files on the runner's host (credentials, service definitions):
# a job must not be able to make the runner read them. TLS files (sslcert...) stay allowed.
FILE_PARAMS = ("passfile", "service", "servicefile")


@dataclass(frozen=True)
class FilterSpec:
    column: str
    op: str
    value: Any

    def to_dict(self) -> dict:
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        return {"column": self.column, "op": self.op, "value": value}


@dataclass(frozen=True, repr=False)
class SourceSpec:
    alias: str
    uri: str
    kind: str                      # "postgres" | "s3" | "csv" | "parquet"
    filters: tuple[FilterSpec, ...] = ()
    expected_columns: tuple[str, ...] | None = None   # from a Recipe's file source schema

    def to_dict(self) -> dict:
        out = {"alias": self.alias, "uri": self.uri,
               "filters": [f.to_dict() for f in self.filters]}
        if self.expected_columns is not None:
            out["expected_columns"] = list(self.expected_columns)
        return out

    def __repr__(self) -> str:   # never show a password in logs or tracebacks
        return f"SourceSpec({self.alias!r}, {redact_uri(self.uri)!r}, kind={self.kind!r})"

    @property
    def local_path(self) -> str:
        return self.uri[len("file://"):] if self.uri.startswith("file://") else self.uri


@dataclass(frozen=True)
class JobSpec:
    """A validated job. With ``rules``, ``match_sql`` is the first rule's SQL: the one the
    staging checks plan before any data is read (the matching stage plans every rule)."""
    run_id: str
    callback_url: str | None
    match_sql: str
    sources: tuple[SourceSpec, ...]
    output_path: str
    primary_keys: Mapping[str, tuple[str, ...]]
    extra: Mapping[str, Any] = field(default_factory=dict)
    rules: tuple = ()                          # of kalla.rules.RuleSpec, in pass order
    expect: Mapping[str, float] | None = None  # kalla.expectations checks
    explain: bool = False                      # add _kalla_* break explanations

    @property
    def left(self) -> SourceSpec:
        return self.sources[0]

    @property
    def right(self) -> SourceSpec:
        return self.sources[1]

    def to_dict(self) -> dict:
        out = {"run_id": self.run_id, "callback_url": self.callback_url,
               "match_sql": self.match_sql,
               "sources": [s.to_dict() for s in self.sources],
               "output_path": self.output_path,
               "primary_keys": {k: list(v) for k, v in self.primary_keys.items()}}
        if self.rules:       # exactly one of match_sql and rules, as parse_job demands
            del out["match_sql"]
            out["rules"] = [rule.to_dict() for rule in self.rules]
        if self.expect is not None:
            out["expect"] = dict(self.expect)
        if self.explain:
            out["explain"] = True
        out.update(self.extra)
        return out


# ---------------------------------------------------------------------------- helpers

def _require(data: Mapping, name: str, kind: type | tuple, where: str = "") -> Any:
    path = f"{where}{name}"
    if name not in data or data[name] is None:
        raise InvalidInput(path, "is required")
    value = data[name]
    if not isinstance(value, kind) or isinstance(value, bool) and bool not in _as_tuple(kind):
        raise InvalidInput(path, f"must be {_kind_name(kind)}, got {_json_type(value)}")
    return value


def _as_tuple(kind):
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind) -> str:
    names = {str: "a string", list: "an array", dict: "an object", int: "a number",
             float: "a number", bool: "a boolean"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in _as_tuple(kind)))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _non_empty_str(data: Mapping, name: str, where: str = "") -> str:
    value = _require(data, name, str, where)
    if not value.strip():
        raise InvalidInput(f"{where}{name}", "must not be empty")
    if "\x00" in value:
        raise InvalidInput(f"{where}{name}", "must not contain NUL characters")
    return value


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def redact_uri(uri: str) -> str:
    """Hide the password of a URI: ``postgres://u:secret@h/db`` -> ``postgres://u:***@h/db``.

    >>> redact_uri("postgres://kalla:s3cret@db:5432/fin?table=t")
    'postgres://kalla:***@db:5432/fin?table=t'
    """
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return uri.replace(parts.netloc, f"{user}:***@{netloc[1]}", 1)


# ---------------------------------------------------------------------------- parsing

def parse_filter(data: Any, where: str) -> FilterSpec:
    if not isinstance(data, dict):
        raise InvalidInput(where.rstrip("."), f"must be an object, got {_json_type(data)}")
    column = _non_empty_str(data, "column", where)
    op = _require(data, "op", str, where)
    if op not in FILTER_OPS:
        raise InvalidInput(f"{where}op", f"unknown operator {op!r}; use one of {', '.join(FILTER_OPS)}")
    if "value" not in data:
        raise InvalidInput(f"{where}value", "is required")
    value = data["value"]
    vwhere = f"{where}value"
    if op in SCALAR_OPS:
        if not _is_scalar(value):
            raise InvalidInput(vwhere, f"operator {op!r} needs a string or a number, got {_json_type(value)}")
    elif op == "like":
        if not isinstance(value, str):
            raise InvalidInput(vwhere, f"operator 'like' needs a string pattern, got {_json_type(value)}")
    elif op == "between":
        if not isinstance(value, list) or len(value) != 2:
            raise InvalidInput(vwhere, "operator 'between' needs an array of exactly two values [low, high]")
        if not all(_is_scalar(v) for v in value):
            raise InvalidInput(vwhere, "operator 'between' needs two strings or numbers")
        value = tuple(value)
    else:  # in
        if not isinstance(value, list) or not value:
            raise InvalidInput(vwhere, "operator 'in' needs a non-empty array of values")
        if not all(_is_scalar(v) for v in value):
            raise InvalidInput(vwhere, "operator 'in' needs an array of strings or numbers")
        value = tuple(value)
    return FilterSpec(column, op, value)


def classify_uri(uri: str, where: str) -> str:
    """Return the source kind of a URI, or raise InvalidInput for an unsupported one."""
    try:
        return _classify_uri(uri, where)
    except ValueError as exc:        # urlsplit: e.g. an unclosed '[' in the host
        raise InvalidInput(where, f"is not a valid URI ({exc})") from None


def _classify_uri(uri: str, where: str) -> str:
    scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
    if scheme in ("postgres", "postgresql"):
        query = parse_qs(urlsplit(uri).query)
        for name in FILE_PARAMS:
            if name in query:
                raise InvalidInput(where, f"the {name} parameter is not allowed: it would make the "
                                          "runner read a file of its own host")
        tables = query.get("table")
        if not tables or not tables[0].strip():
            raise InvalidInput(where, "a postgres:// URI needs ?table=NAME")
        if not urlsplit(uri).hostname and not urlsplit(uri).path.strip("/"):
            raise InvalidInput(where, "a postgres:// URI needs a host or a database")
        return "postgres"
    if scheme == "s3":
        parts = urlsplit(uri)
        if not parts.netloc or not parts.path.strip("/"):
            raise InvalidInput(where, "an s3:// URI needs a bucket and a key: s3://bucket/path/file.csv")
        return "s3"
    if scheme not in ("", "file"):
        raise InvalidInput(where, f"unsupported URI scheme {scheme!r}; use postgres://, "
                                  "postgresql://, s3://, file:// or a local path")
    path = uri[len("file://"):] if scheme == "file" else uri
    lowered = path.lower()
    return "csv" if lowered.endswith((".csv", ".csv.gz")) else "parquet"


MAX_GLOB_MATCHES = 10_000


def check_local_path(path: str, where: str, data_roots: tuple[str, ...] | None) -> None:
    def allowed(candidate: str) -> bool:
        resolved = os.path.realpath(candidate)
        return not data_roots or any(_inside(resolved, root) for root in data_roots)

    outside = "local path is outside the allowed data roots (KALLA_DATA_ROOTS)"
    if not glob.has_magic(path):
        if not allowed(path):
            raise InvalidInput(where, outside)
        if not os.path.exists(path):
            raise InvalidInput(where, f"file does not exist: {path}")
        return
    # The fixed part of a pattern must lie inside the roots before anything is listed, and
    # every match is checked (a symlink among them may point out); listing is bounded.
    prefix = path[:min(path.index(c) for c in "*?[" if c in path)]
    if not allowed(os.path.dirname(prefix) or "."):
        raise InvalidInput(where, outside)
    found = 0
    for match in glob.iglob(path):
        if not allowed(match):
            raise InvalidInput(where, f"{outside}: {match}")
        found += 1
        if found > MAX_GLOB_MATCHES:
            raise InvalidInput(where, f"matches more than {MAX_GLOB_MATCHES} files")
    if not found:
        raise InvalidInput(where, f"no file matches {path}")


def _inside(path: str, root: str) -> bool:
    root = os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def parse_source(data: Any, where: str, data_roots=None, check_files=True) -> SourceSpec:
    if not isinstance(data, dict):
        raise InvalidInput(where.rstrip("."), f"must be an object, got {_json_type(data)}")
    alias = _non_empty_str(data, "alias", where)
    if not IDENTIFIER.fullmatch(alias) or len(alias) > 63:
        raise InvalidInput(f"{where}alias", f"{alias!r} is not a plain SQL identifier "
                                            "(letters, digits and _, not starting with a digit)")
    uri = _non_empty_str(data, "uri", where)
    kind = classify_uri(uri, f"{where}uri")
    if kind in ("csv", "parquet") and check_files:
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        check_local_path(path, f"{where}uri", data_roots)
    raw_filters = data.get("filters")
    if raw_filters is None:
        raw_filters = []
    if not isinstance(raw_filters, list):
        raise InvalidInput(f"{where}filters", f"must be an array, got {_json_type(raw_filters)}")
    filters = tuple(parse_filter(f, f"{where}filters[{i}].") for i, f in enumerate(raw_filters))
    expected = data.get("expected_columns")
    if expected is not None and (not isinstance(expected, list) or
                                 not all(isinstance(c, str) and c for c in expected)):
        raise InvalidInput(f"{where}expected_columns", "must be an array of column names")
    return SourceSpec(alias, uri, kind, filters, tuple(expected) if expected else None)


def parse_primary_keys(data: Any, sources: tuple[SourceSpec, ...]) -> dict[str, tuple[str, ...]]:
    if not isinstance(data, dict):
        raise InvalidInput("primary_keys", f"must be an object mapping alias to columns, got {_json_type(data)}")
    aliases = {s.alias for s in sources}
    for alias in data:
        if alias not in aliases:
            raise InvalidInput(f"primary_keys.{alias}", f"names no source; sources are {', '.join(sorted(aliases))}")
    keys = {}
    for source in sources[:2]:
        if source.alias not in data:
            raise InvalidInput(f"primary_keys.{source.alias}",
                               "is required: the left and right sources need a primary key")
    for alias, cols in data.items():
        where = f"primary_keys.{alias}"
        if not isinstance(cols, list):
            raise InvalidInput(where, f"must be an array of column names, got {_json_type(cols)}")
        if not cols:
            raise InvalidInput(where, "must name at least one column")
        for i, col in enumerate(cols):
            if not isinstance(col, str) or not col.strip():
                raise InvalidInput(f"{where}[{i}]", "must be a non-empty column name")
        if len(set(cols)) != len(cols):
            raise InvalidInput(where, "names a column twice")
        keys[alias] = tuple(cols)
    return keys


def resolve_output_path(path: str, output_root: str | None) -> str:
    """Absolute output directory; confined to KALLA_OUTPUT_ROOT when that is set."""
    if output_root is None:
        return os.path.abspath(path)
    resolved = os.path.realpath(os.path.join(output_root, path))
    if not _inside(resolved, output_root):
        raise InvalidInput("output_path", "resolves outside KALLA_OUTPUT_ROOT")
    return resolved


def parse_job(data: Any, *, batch: bool = False, output_root: str | None = None,
              data_roots: tuple[str, ...] | None = None, check_files: bool = True) -> JobSpec:
    """Validate a JobRequest dict. In batch mode run_id and callback_url are optional."""
    if not isinstance(data, dict):
        raise InvalidInput("", f"request body must be a JSON object, got {_json_type(data)}")
    if batch and data.get("run_id") is None:
        run_id = str(uuid.uuid4())
    else:
        raw_id = _require(data, "run_id", str)
        try:
            run_id = str(uuid.UUID(raw_id))
        except ValueError:
            raise InvalidInput("run_id", f"must be a UUID, got {raw_id[:64]!r}") from None
    callback_url = data.get("callback_url")
    if callback_url is not None or not batch:
        callback_url = _non_empty_str(data, "callback_url")
        try:
            parts = urlsplit(callback_url)
            valid = parts.scheme in ("http", "https") and bool(parts.hostname)
            parts.port      # raises ValueError for a port out of range
        except ValueError as exc:
            raise InvalidInput("callback_url", f"is not a valid URL ({exc})") from None
        if not valid:
            raise InvalidInput("callback_url", "must be an http:// or https:// URL with a host")
    match_sql, rules = _parse_matching(data)
    raw_sources = _require(data, "sources", list)
    if len(raw_sources) < 2:
        raise InvalidInput("sources", "needs at least two sources (left and right)")
    sources = tuple(parse_source(s, f"sources[{i}].", data_roots, check_files)
                    for i, s in enumerate(raw_sources))
    seen: dict[str, int] = {}
    for i, s in enumerate(sources):
        if s.alias.lower() in seen:
            raise InvalidInput(f"sources[{i}].alias",
                               f"{s.alias!r} is already used by sources[{seen[s.alias.lower()]}]")
        seen[s.alias.lower()] = i
    output_path = resolve_output_path(_non_empty_str(data, "output_path"), output_root)
    primary_keys = parse_primary_keys(_require(data, "primary_keys", dict), sources)
    expect = _parse_expect(data)
    explain = data.get("explain", False)
    if explain is None:
        explain = False
    if not isinstance(explain, bool):
        raise InvalidInput("explain", f"must be true or false, got {_json_type(explain)}")
    return JobSpec(run_id, callback_url, match_sql, sources, output_path, primary_keys,
                   rules=rules, expect=expect, explain=explain)


def _parse_matching(data: Mapping) -> tuple[str, tuple]:
    """(match_sql, rules): a job gives exactly one of match_sql and rules."""
    if data.get("rules") is None:
        match_sql = _non_empty_str(data, "match_sql")
        if len(match_sql) > MAX_SQL_CHARS:
            raise InvalidInput("match_sql", f"is longer than {MAX_SQL_CHARS} characters")
        return match_sql, ()
    if data.get("match_sql") is not None:
        raise InvalidInput("rules", "give either match_sql or rules, not both")
    from .rules import parse_rules     # rules.py builds on this module's helpers
    rules = parse_rules(data["rules"])
    return rules[0].match_sql, rules


def _parse_expect(data: Mapping) -> dict | None:
    if data.get("expect") is None:
        return None
    from .expectations import parse_expect   # builds on this module's helpers
    return parse_expect(data["expect"])


# ---------------------------------------------------------------------------- recipes

def is_recipe(data: Any) -> bool:
    return isinstance(data, dict) and "recipe_id" in data


def recipe_to_job(recipe: Any, bindings: Mapping[str, str], output_path: str | None,
                  **kwargs) -> JobSpec:
    """Turn a Recipe (reference: Recipe/RecipeSource) plus file bindings into a JobSpec."""
    for name in ("recipe_id", "name", "description", "match_description"):
        _require(recipe, name, str)
    if recipe.get("rules") is None:      # a recipe, like a job, has match_sql or rules
        _require(recipe, "match_sql", str)
    srcs = _require(recipe, "sources", dict)
    sources, keys = [], {}
    for side in ("left", "right"):
        src = _require(srcs, side, dict, "sources.")
        where = f"sources.{side}."
        alias = _non_empty_str(src, "alias", where)
        kind = _non_empty_str(src, "type", where)
        if kind not in ("postgres", "file", "elasticsearch"):
            raise InvalidInput(f"{where}type", "must be postgres, elasticsearch or file")
        if kind == "elasticsearch":
            raise InvalidInput(f"{where}type", "elasticsearch sources are planned, not yet supported")
        pk = _require(src, "primary_key", list, where)
        entry: dict[str, Any] = {"alias": alias}
        if kind == "file":
            schema = _require(src, "schema", list, where)
            if alias not in bindings:
                raise InvalidInput(f"{where}alias", f"file source {alias!r} needs a binding: --source {alias}=PATH")
            entry["uri"] = bindings[alias]
            entry["expected_columns"] = [str(c) for c in schema]
        else:
            entry["uri"] = bindings.get(alias) or _non_empty_str(src, "uri", where)
        entry["filters"] = src.get("filters") or []
        sources.append(entry)
        keys[alias] = pk
    unknown = set(bindings) - set(keys)
    if unknown:
        raise InvalidInput("--source", f"binds {', '.join(sorted(unknown))}, which the recipe does not name")
    job = {"run_id": recipe.get("run_id"), "callback_url": recipe.get("callback_url"),
           "match_sql": recipe.get("match_sql"), "sources": sources,
           "output_path": output_path or recipe.get("output_path") or f"./kalla-output/{recipe['recipe_id']}",
           "primary_keys": keys, "rules": recipe.get("rules"), "expect": recipe.get("expect"),
           "explain": recipe.get("explain")}
    return parse_job(job, batch=True, **kwargs)


def secrets_of(spec: JobSpec) -> list[str]:
    """Every credential a job carries (URI passwords, AWS secrets), to scrub from text."""
    found = []
    for source in spec.sources:
        password = urlsplit(source.uri).password
        if password:
            found.append(password)
            found.append(quote_plus(password))
            found.append(unquote(password))
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if os.environ.get(name):
            found.append(os.environ[name])
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    """Replace every secret in text with ***.

    >>> scrub("password authentication failed: s3cr3t", ["s3cr3t"])
    'password authentication failed: ***'
    """
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
