"""Which columns of the match output carry each source's primary key.

For source S and key column k: the output column ``S.k``, else ``S__k``, else a bare
``k`` - only if no other source among left/right also has a key column ``k`` and the
output has exactly one column ``k``. Names compare exactly first, then ignoring case
(DataFusion lower-cases unquoted aliases).
"""
from __future__ import annotations

from typing import Mapping, Sequence

from .errors import MatchError


def _find(names: Sequence[str], wanted: str) -> str | None:
    if wanted in names:
        return wanted
    folded = [n for n in names if n.lower() == wanted.lower()]
    return folded[0] if len(folded) == 1 else None


def resolve_key_columns(output_names: Sequence[str], sides: Sequence[str],
                        primary_keys: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Map each side's alias to the output columns holding its key, or raise MatchError.

    >>> resolve_key_columns(["invoice_id", "payment_id"], ["l", "r"],
    ...                     {"l": ["invoice_id"], "r": ["payment_id"]})
    {'l': ['invoice_id'], 'r': ['payment_id']}
    >>> resolve_key_columns(["l__id", "r.id"], ["l", "r"], {"l": ["id"], "r": ["id"]})
    {'l': ['l__id'], 'r': ['r.id']}
    """
    resolved, missing = {}, []
    for alias in sides:
        others = {k.lower() for other in sides if other != alias for k in primary_keys[other]}
        columns = []
        for key in primary_keys[alias]:
            found = _find(output_names, f"{alias}.{key}") or _find(output_names, f"{alias}__{key}")
            if found is None and key.lower() not in others:
                bare = [n for n in output_names if n.lower() == key.lower()]
                found = bare[0] if len(bare) == 1 else None
            if found is None:
                missing.append((alias, key, key.lower() in others))
            columns.append(found)
        resolved[alias] = columns
    if missing:
        raise MatchError(_missing_message(missing, output_names))
    return resolved


def _missing_message(missing, output_names) -> str:
    parts = []
    for alias, key, shared in missing:
        why = " (both sides have a key column of that name, so a bare name is ambiguous)" if shared else ""
        parts.append(f"source {alias!r} key column {key!r}{why}: add "
                     f"<{alias} table alias>.{key} AS {alias}__{key} to the SELECT list")
    return ("match_sql output has no column for " + "; ".join(parts)
            + f". Output columns are: {', '.join(output_names) or '(none)'}")
