"""Kalla's one function that is not a rewrite: jaro_winkler, vectorised with numpy.

DataFusion 55 has ``levenshtein`` but no Jaro-Winkler, and Jaro's greedy character
matching cannot be written as a native SQL expression (it needs a loop over positions).
So it is a scalar UDF over whole Arrow batches: the loops below run over character
positions, each step a numpy operation on every row of the batch at once - never a
Python call per row. sqltext rewrites ``jaro_winkler(a, b)`` to cast both arguments to
text first, so the UDF takes exactly two Utf8 arrays.

The other functions (tolerance_pct, date_within, normalize_ref) are rewrites to native
expressions in sqltext.py; this module only registers the UDF on a SessionContext.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datafusion import SessionContext, udf

PREFIX_SCALE = 0.1     # Winkler's p
PREFIX_MAX = 4         # Winkler's l is capped at four characters
BOOST_THRESHOLD = 0.7  # the prefix bonus applies only above this Jaro similarity
# Rows x characters per numpy step: bounds memory when a batch holds a few long strings.
CHUNK_CELLS = 1 << 20


def register_functions(ctx: SessionContext) -> None:
    """Register Kalla's UDFs (jaro_winkler) on a session; idempotent."""
    ctx.register_udf(udf(jaro_winkler_arrow, [pa.string(), pa.string()], pa.float64(),
                         "immutable", name="jaro_winkler"))


def jaro_winkler_arrow(a: pa.Array, b: pa.Array) -> pa.Array:
    """Element-wise Jaro-Winkler similarity of two text arrays; NULL in either gives NULL."""
    valid = pc.and_(pc.is_valid(a), pc.is_valid(b)).to_numpy(zero_copy_only=False)
    a, b = pc.fill_null(a, ""), pc.fill_null(b, "")
    longest = np.maximum(pc.utf8_length(a).to_numpy(), pc.utf8_length(b).to_numpy())
    left = a.to_numpy(zero_copy_only=False)
    right = b.to_numpy(zero_copy_only=False)
    out = np.zeros(len(left), dtype=np.float64)
    for rows in _chunks(longest):
        out[rows] = jaro_winkler(left[rows], right[rows])
    return pa.array(out, pa.float64(), mask=~valid)


def _chunks(longest: np.ndarray):
    """Row index groups of similar string length, each at most CHUNK_CELLS characters."""
    order = np.argsort(longest, kind="stable")
    widths = np.maximum(longest[order], 1)
    start = 0
    while start < len(order):
        # rows start..k cost (k - start + 1) * widths[k]: increasing in k, so searchable
        cost = np.arange(1, len(order) - start + 1) * widths[start:]
        stop = start + max(1, int(np.searchsorted(cost, CHUNK_CELLS, side="right")))
        yield order[start:stop]
        start = stop


def _codepoints(texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows x width) uint32 code points, zero padded, and each row's length."""
    fixed = texts.astype(str)
    width = max(1, fixed.dtype.itemsize // 4)
    points = np.ascontiguousarray(fixed.astype(f"<U{width}")).view(np.uint32).reshape(len(texts), width)
    return points, np.char.str_len(fixed)


def jaro_winkler(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Jaro-Winkler similarity of two equal-length arrays of str.

    >>> jaro_winkler(np.array(["MARTHA", "DIXON", "", "a"]),
    ...              np.array(["MARHTA", "DICKSONX", "", ""])).round(4).tolist()
    [0.9611, 0.8133, 1.0, 0.0]
    """
    a, la = _codepoints(left)
    b, lb = _codepoints(right)
    jaro = _jaro(a, la, b, lb)
    prefix = _common_prefix(a, la, b, lb)
    boosted = jaro + prefix * PREFIX_SCALE * (1.0 - jaro)
    return np.where(jaro > BOOST_THRESHOLD, boosted, jaro)


def _jaro(a, la, b, lb) -> np.ndarray:
    n, width_b = b.shape
    window = np.maximum(np.maximum(la, lb) // 2 - 1, 0)
    cols = np.arange(width_b)
    used_a = np.zeros(a.shape, dtype=bool)
    used_b = np.zeros(b.shape, dtype=bool)
    rows = np.arange(n)
    # Greedy, as in Jaro's definition: position i of a takes the first unused equal
    # character of b within the window. Sequential in i, vectorised over rows and j.
    for i in range(a.shape[1]):
        near = np.abs(cols[None, :] - i) <= window[:, None]
        candidate = (b == a[:, i:i + 1]) & ~used_b & near & (cols[None, :] < lb[:, None])
        candidate &= (i < la)[:, None]
        found = candidate.any(axis=1)
        first = candidate.argmax(axis=1)
        used_b[rows[found], first[found]] = True
        used_a[found, i] = True
    matches = used_a.sum(axis=1)
    half_transpositions = _mismatched_order(a, used_a, b, used_b, matches) // 2
    m = matches.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        jaro = (m / la + m / lb + (m - half_transpositions) / m) / 3.0
    jaro = np.where(matches > 0, jaro, 0.0)
    return np.where((la == 0) & (lb == 0), 1.0, jaro)   # two empty strings are identical


def _mismatched_order(a, used_a, b, used_b, matches) -> np.ndarray:
    """How many of the k-th matched characters of a and b differ (k over the matches)."""
    width = min(a.shape[1], b.shape[1])
    # A stable sort on "not used" moves the matched characters to the front, in order.
    picked_a = np.take_along_axis(a, np.argsort(~used_a, axis=1, kind="stable"), axis=1)[:, :width]
    picked_b = np.take_along_axis(b, np.argsort(~used_b, axis=1, kind="stable"), axis=1)[:, :width]
    within = np.arange(width)[None, :] < matches[:, None]
    return ((picked_a != picked_b) & within).sum(axis=1)


def _common_prefix(a, la, b, lb) -> np.ndarray:
    width = min(PREFIX_MAX, a.shape[1], b.shape[1])
    limit = np.minimum(np.minimum(la, lb), PREFIX_MAX)
    same = (a[:, :width] == b[:, :width]) & (np.arange(width)[None, :] < limit[:, None])
    return np.cumprod(same, axis=1).sum(axis=1)
