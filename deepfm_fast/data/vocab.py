"""Categorical vocabularies (counted or hashed) and numeric transforms, fitted on training data.

Local id layout of every categorical field, counted or hashed::

    0          OOV      value not in the vocabulary (rare in training, or unseen)
    1          MISSING  empty value
    2 ..       known values (counted: most frequent first, ties by value; hashed:
               2 + crc32(value) % buckets)

A value the training file never held (or held fewer than ``min_count`` times) gets the OOV row 0
of a counted field, the same row for every such value; a hashed field has no OOV: every value
goes to its bucket, seen or not. The hash is CRC-32 (IEEE, as ``zlib.crc32``) of the value's UTF-8
bytes: the same on every machine, run and Python version.

Numeric transforms (``NumericTransform.kind``):

* ``"log1p"``: ``log1p(max(x, 0))`` then standardised with the TRAINING mean and std.
* ``"standardize"``: ``x`` standardised with the training mean and std.
* ``"none"``: ``x`` as is.
* ``"log_square"`` is not a numeric transform but a bucketing (:func:`log_square_token`) that
  turns the value into a category, as the Criteo winning solutions did; the field is then sparse.

A missing numeric value becomes 0 after the transform (the training mean, when standardised).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Dict, Iterable, List, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .columnar import crc32_utf8, dictionary_parts

__all__ = [
    "OOV_ID",
    "MISSING_ID",
    "Vocabulary",
    "HashVocabulary",
    "NumericTransform",
    "log_square_token",
    "log_square_tokens",
    "ValueCounter",
    "vocabulary_from_dict",
]

OOV_ID = 0
MISSING_ID = 1
_FIRST_ID = 2


class Vocabulary:
    """Counted vocabulary: string value -> local id (see the module docstring for the layout).

    Args:
        tokens: known values (a sequence of str or an Arrow string array, kept as Arrow: a
            vocabulary of millions of values as Python strings would take gigabytes);
            ``tokens[i]`` gets id ``2 + i``.
    """

    def __init__(self, tokens: Union[Sequence[str], pa.Array]):
        self._known = tokens if isinstance(tokens, pa.Array) else pa.array(list(tokens), pa.string())
        if self._known.type != pa.string():
            self._known = self._known.cast(pa.string())

    @property
    def tokens(self) -> List[str]:
        """The known values, most frequent first, as Python strings."""
        return self._known.to_pylist()

    @classmethod
    def fit(cls, counts: Counter, min_count: int = 1) -> "Vocabulary":
        """Keep values seen at least ``min_count`` times, most frequent first (ties by value)."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        kept = [(c, t) for t, c in counts.items() if c >= min_count and t != ""]
        kept.sort(key=lambda ct: (-ct[0], ct[1]))
        return cls([t for _, t in kept])

    @property
    def size(self) -> int:
        return len(self._known) + _FIRST_ID

    @classmethod
    def from_counts(cls, values: pa.Array, counts: np.ndarray, min_count: int = 1) -> "Vocabulary":
        """:meth:`fit` from distinct ``values`` and their ``counts`` (Arrow sort, no Python loop)."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        table = pa.table({"v": values, "c": pa.array(counts, pa.int64())})
        table = table.filter(pc.and_(pc.greater_equal(table["c"], min_count), pc.not_equal(table["v"], "")))
        # Byte order of UTF-8 is code point order: the ties sort as Python's str comparison.
        table = table.sort_by([("c", "descending"), ("v", "ascending")])
        return cls(table["v"].combine_chunks())

    def encode(self, values: Iterable[str]) -> np.ndarray:
        """int64 ids of ``values`` (strings or an Arrow array); unknown -> OOV_ID, ``''``/null -> MISSING_ID."""
        distinct, idx = dictionary_parts(_as_arrow(values))
        return self.lookup(distinct)[idx]

    def lookup(self, distinct: pa.Array) -> np.ndarray:
        """int64 ids of ``distinct`` values, plus MISSING_ID at the end (position -1, for nulls)."""
        pos = pc.index_in(distinct, value_set=self._known).fill_null(-1).to_numpy(zero_copy_only=False)
        ids = np.where(pos < 0, OOV_ID, pos.astype(np.int64) + _FIRST_ID)
        ids[(pc.equal(distinct, "").to_numpy(zero_copy_only=False))] = MISSING_ID
        return np.append(ids, MISSING_ID)

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": "counted", "tokens": self._known.to_pylist()}


class HashVocabulary:
    """Hashed ids: ``2 + crc32(value) % buckets`` (stable across runs, unlike ``hash()``).

    Args:
        buckets: number of hash buckets; the field's vocab_size is ``buckets + 2``
            (id 0 stays unused so that both kinds share one layout).
    """

    def __init__(self, buckets: int):
        if buckets < 1:
            raise ValueError(f"hash_buckets must be >= 1, got {buckets}")
        self.buckets = int(buckets)

    @property
    def size(self) -> int:
        return self.buckets + _FIRST_ID

    def encode(self, values: Iterable[str]) -> np.ndarray:
        """int64 ids of ``values`` (strings or an Arrow array); ``''``/null -> MISSING_ID."""
        distinct, idx = dictionary_parts(_as_arrow(values))
        return self.lookup(distinct)[idx]

    def lookup(self, distinct: pa.Array) -> np.ndarray:
        """int64 ids of ``distinct`` values, plus MISSING_ID at the end (position -1, for nulls)."""
        ids = _FIRST_ID + (crc32_utf8(distinct) % np.uint32(self.buckets)).astype(np.int64)
        ids[pc.equal(distinct, "").to_numpy(zero_copy_only=False)] = MISSING_ID
        return np.append(ids, MISSING_ID)

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": "hashed", "buckets": self.buckets}


def _as_arrow(values) -> pa.Array:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    return pa.array(list(values), pa.string())


class ValueCounter:
    """Counts of string values over many chunks, in Arrow tables (memory: the distinct values)."""

    def __init__(self):
        self._parts = []
        self._pending = 0
        self._merged = 0

    def add(self, distinct: pa.Array, idx: np.ndarray) -> None:
        """Count the values ``distinct[idx]`` (``idx`` -1 = null, not counted)."""
        counts = np.bincount(idx + 1, minlength=len(distinct) + 1)[1:]  # -1 (missing) lands in bin 0
        self._parts.append(pa.table({"v": distinct, "c": pa.array(counts, pa.int64())}))
        self._pending += len(distinct)
        if self._pending > 2 * self._merged + (1 << 20):
            self._merge()

    def _merge(self) -> None:
        if len(self._parts) > 1:
            table = pa.concat_tables(self._parts).group_by("v").aggregate([("c", "sum")])
            self._parts = [table.rename_columns(["v", "c"])]
        self._merged = self._pending = sum(len(t) for t in self._parts)

    def result(self):
        """(distinct values, int64 counts)."""
        self._merge()
        if not self._parts:
            return pa.array([], pa.string()), np.zeros(0, np.int64)
        t = self._parts[0]
        return t["v"].combine_chunks(), t["c"].to_numpy()


def log_square_tokens(x: np.ndarray) -> pa.Array:
    """:func:`log_square_token` of every value, vectorised (NaN -> null: missing)."""
    big = x > 2
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(big, np.floor(np.log(np.where(big, x, 1.0)) ** 2), np.trunc(np.nan_to_num(x)))
    text = pc.cast(pa.array(k.astype(np.int64)), pa.string())
    text = pc.if_else(pa.array(big), pc.binary_join_element_wise("b", text, ""), text)
    return pc.if_else(pa.array(np.isnan(x)), pa.scalar(None, pa.string()), text)


def vocabulary_from_dict(d: Dict[str, Any]):
    """Inverse of ``to_dict`` for both vocabulary kinds."""
    if d["kind"] == "counted":
        return Vocabulary(d["tokens"])
    if d["kind"] == "hashed":
        return HashVocabulary(d["buckets"])
    raise ValueError(f"unknown vocabulary kind {d['kind']!r}")


def log_square_token(x: float) -> str:
    """Criteo-winning bucket of a count: ``floor(log(x)^2)`` for ``x > 2``, else ``int(x)``.

    NaN (missing) gives ``''``, which the vocabulary maps to MISSING_ID.
    """
    if math.isnan(x):
        return ""
    if x > 2:
        return "b" + str(int(math.floor(math.log(x) ** 2)))
    return str(int(x))


class NumericTransform:
    """A numeric transform fitted on training data (kinds in the module docstring).

    Use :meth:`update` on every training chunk, then :meth:`apply`.
    """

    KINDS = ("log1p", "standardize", "none")

    def __init__(self, kind: str = "log1p", mean: float = 0.0, std: float = 1.0):
        if kind not in self.KINDS:
            raise ValueError(f"numeric transform must be one of {self.KINDS}, got {kind!r}")
        self.kind = kind
        self.mean, self.std = float(mean), float(std)
        self._n = 0
        self._sum = 0.0
        self._sumsq = 0.0

    def prepared(self, x: np.ndarray) -> np.ndarray:
        """The values before standardisation: ``log1p(max(x, 0))`` for ``"log1p"``, else ``x``."""
        if self.kind != "log1p":
            return x
        y = np.maximum(x, 0.0)
        return np.log1p(y, out=y)

    def update(self, x: np.ndarray) -> None:
        """Accumulate training statistics over the non-missing (non-NaN) values of ``x``."""
        self.update_prepared(self.prepared(x))

    def update_prepared(self, y: np.ndarray) -> None:
        """:meth:`update` from ``prepared(x)``, for a caller that keeps those values."""
        y = y[~np.isnan(y)]
        self._n += y.size
        self._sum += float(y.sum())
        self._sumsq += float(np.square(y).sum())

    def update_counted(self, y: np.ndarray, counts: np.ndarray) -> None:
        """:meth:`update_prepared` of a column holding each ``y[i]`` ``counts[i]`` times."""
        ok = ~np.isnan(y)
        y, c = y[ok], counts[ok]
        self._n += int(c.sum())
        c = c.astype(np.float64)
        self._sum += float(c @ y)
        self._sumsq += float(c @ np.square(y))

    def finish(self) -> None:
        """Freeze mean and std from what :meth:`update` saw (std 1 when it is 0 or undefined)."""
        if self.kind == "none" or self._n == 0:
            return
        self.mean = self._sum / self._n
        var = max(self._sumsq / self._n - self.mean ** 2, 0.0)
        self.std = math.sqrt(var) if var > 1e-12 else 1.0

    def apply(self, x: np.ndarray) -> np.ndarray:
        """float32 transformed values; NaN (missing) -> 0."""
        return self.standardize(self.prepared(x))

    def standardize(self, y: np.ndarray) -> np.ndarray:
        """:meth:`apply` from ``prepared(x)``."""
        if self.kind != "none":
            y = (y - self.mean) / self.std
        out = y.astype(np.float32)
        out[np.isnan(out)] = 0.0  # (nan_to_num's other work, on infinities, float32 undoes)
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "NumericTransform":
        return cls(d["kind"], d["mean"], d["std"])

