"""Ordered matching rules (``rules`` in a JobRequest or Recipe): parse and validate.

Pure Python, like jobs.py: the HTTP service validates requests with it. Running the
passes is kalla/passes.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InvalidInput
from .jobs import MAX_SQL_CHARS, _json_type, _non_empty_str

MAX_RULES = 32
MAX_NAME_CHARS = 100
RULE_FIELDS = ("name", "match_sql", "one_to_one")
# The column of matched.parquet that names the rule which matched each row.
MATCH_RULE_COLUMN = "match_rule"


@dataclass(frozen=True)
class RuleSpec:
    name: str
    match_sql: str
    one_to_one: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "match_sql": self.match_sql, "one_to_one": self.one_to_one}


def parse_rules(data: Any, where: str = "rules") -> tuple[RuleSpec, ...]:
    """Validate the ``rules`` array: 1..MAX_RULES rules with unique names.

    >>> parse_rules([{"name": "exact", "match_sql": "SELECT 1"}])
    (RuleSpec(name='exact', match_sql='SELECT 1', one_to_one=False),)
    """
    if not isinstance(data, list):
        raise InvalidInput(where, f"must be an array of rules, got {_json_type(data)}")
    if not data:
        raise InvalidInput(where, "must hold at least one rule")
    if len(data) > MAX_RULES:
        raise InvalidInput(where, f"holds {len(data)} rules; at most {MAX_RULES} are allowed")
    rules, seen = [], {}
    for i, item in enumerate(data):
        rule = parse_rule(item, f"{where}[{i}]")
        if rule.name in seen:
            raise InvalidInput(f"{where}[{i}].name",
                               f"{rule.name!r} is already the name of {where}[{seen[rule.name]}]")
        seen[rule.name] = i
        rules.append(rule)
    return tuple(rules)


def parse_rule(item: Any, where: str) -> RuleSpec:
    if not isinstance(item, dict):
        raise InvalidInput(where, f"must be an object, got {_json_type(item)}")
    unknown = sorted(set(item) - set(RULE_FIELDS))
    if unknown:
        # Strict on purpose: a misspelt "one_to_one" would silently change the results.
        raise InvalidInput(f"{where}.{unknown[0]}",
                           f"is not a rule field; a rule has {', '.join(RULE_FIELDS)}")
    name = _non_empty_str(item, "name", f"{where}.")
    if len(name) > MAX_NAME_CHARS or name != name.strip() or not name.isprintable():
        raise InvalidInput(f"{where}.name", f"must be printable text of at most {MAX_NAME_CHARS} "
                                            "characters without leading or trailing spaces")
    sql = _non_empty_str(item, "match_sql", f"{where}.")
    if len(sql) > MAX_SQL_CHARS:
        raise InvalidInput(f"{where}.match_sql", f"is longer than {MAX_SQL_CHARS} characters")
    one_to_one = item.get("one_to_one", False)
    if one_to_one is None:
        one_to_one = False
    if not isinstance(one_to_one, bool):
        raise InvalidInput(f"{where}.one_to_one", f"must be a boolean, got {_json_type(one_to_one)}")
    return RuleSpec(name, sql, one_to_one)
