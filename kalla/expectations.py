"""Pass/fail thresholds (``expect``): the declared checks, their validation and evaluation.

Pure Python: the service validates ``expect`` at submission (400 for an unknown check),
the pipeline evaluates it on the finished counts. A job that ran but failed a check is
still a completed job; its results say ``passed: false`` and `bin/kalla-run` exits 3.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .errors import InvalidInput
from .jobs import _json_type


@dataclass(frozen=True)
class Facts:
    """The counts a finished job is judged on."""
    left_rows: int
    right_rows: int
    matched: int
    unmatched_left: int
    unmatched_right: int
    ambiguous: int = 0


def _rate(matched: int, total: int) -> float:
    # No records at all: nothing was left unmatched. Pair with min_matched to insist on data.
    return 1.0 if total == 0 else matched / total


# name -> (kind, bound, metric, help). "rate" values are fractions in [0, 1]; "count"
# values are non-negative integers. "min" passes when actual >= expected, "max" when <=.
CHECKS: dict[str, tuple[str, str, Callable[[Facts], float], str]] = {
    "min_match_rate": ("rate", "min", lambda f: _rate(
        f.left_rows - f.unmatched_left + f.right_rows - f.unmatched_right, f.left_rows + f.right_rows),
        "share of left and right records together that matched"),
    "min_match_rate_left": ("rate", "min", lambda f: _rate(f.left_rows - f.unmatched_left, f.left_rows),
                            "share of left records that matched"),
    "min_match_rate_right": ("rate", "min", lambda f: _rate(f.right_rows - f.unmatched_right, f.right_rows),
                             "share of right records that matched"),
    "max_unmatched_left": ("count", "max", lambda f: f.unmatched_left,
                           "unmatched left records (unmatched_left_count)"),
    "max_unmatched_right": ("count", "max", lambda f: f.unmatched_right,
                            "unmatched right records (unmatched_right_count)"),
    "min_matched": ("count", "min", lambda f: f.matched, "matched rows (matched_count)"),
    "max_ambiguous": ("count", "max", lambda f: f.ambiguous,
                      "pairs held back as ambiguous by one_to_one rules, all rules together"),
}


def parse_expect(data: Any, where: str = "expect") -> dict[str, float]:
    """Validate an ``expect`` object; unknown checks and out-of-range values are refused.

    >>> parse_expect({"min_match_rate": 0.95, "max_unmatched_left": 100})
    {'min_match_rate': 0.95, 'max_unmatched_left': 100}
    """
    if not isinstance(data, dict):
        raise InvalidInput(where, f"must be an object of checks, got {_json_type(data)}")
    out = {}
    for name, value in data.items():
        path = f"{where}.{name}"
        if name not in CHECKS:
            raise InvalidInput(path, f"unknown check; use one of {', '.join(CHECKS)}")
        kind = CHECKS[name][0]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInput(path, f"must be a number, got {_json_type(value)}")
        if kind == "rate" and not 0.0 <= value <= 1.0:
            raise InvalidInput(path, f"is a fraction between 0 and 1 (0.95 = 95 %), got {value}")
        if kind == "count" and (value < 0 or value != int(value)):
            raise InvalidInput(path, f"must be a whole number of at least 0, got {value}")
        out[name] = int(value) if kind == "count" else value
    return out


def evaluate(expect: Mapping[str, float], facts: Facts) -> list[dict]:
    """Every check of ``expect`` with its actual value and whether it passed.

    >>> evaluate({"max_unmatched_left": 1}, Facts(10, 10, 8, 2, 2))
    [{'check': 'max_unmatched_left', 'expected': 1, 'actual': 2, 'passed': False}]
    """
    results = []
    for name, expected in expect.items():
        kind, bound, metric, _ = CHECKS[name]
        actual = metric(facts)
        passed = actual >= expected if bound == "min" else actual <= expected
        shown = round(actual, 6) if kind == "rate" else actual
        results.append({"check": name, "expected": expected, "actual": shown, "passed": passed})
    return results
