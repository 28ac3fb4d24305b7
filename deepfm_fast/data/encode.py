"""Fit vocabularies and numeric statistics on a training file, encode files into arrays.

:class:`FeatureEncoder` is the fitted state (vocabularies, hash settings, numeric statistics,
field specs); it is plain JSON, stored in the cache's ``meta.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from ..features import FieldSpec, MultiHotField, NumericField, SparseField, fields_from_dicts, fields_to_dicts
from .columnar import CodedNumbers, ColumnChunk, dense_numbers, dictionary_parts
from .readers import Column, RawChunk
from .vocab import (
    MISSING_ID,
    HashVocabulary,
    NumericTransform,
    ValueCounter,
    Vocabulary,
    log_square_tokens,
    vocabulary_from_dict,
)

__all__ = ["FeatureEncoder"]


@dataclass(frozen=True)
class _Slot:
    """One output field before fitting: its kind, name and the column it comes from (for a
    multi_hot field, the first of its columns, which sets its pooling and hashing)."""

    kind: str  # "sparse", "multi_hot", "numeric" or "missing" (a numeric column's indicator)
    name: str
    column: Column


def _plan(columns: List[Column]) -> List[_Slot]:
    slots, seen = [], set()
    for c in columns:
        if c.role in ("sparse", "multi_hot") or (c.role == "numeric" and c.transform == "log_square"):
            if c.field_name not in seen:
                seen.add(c.field_name)
                slots.append(_Slot("multi_hot" if c.role == "multi_hot" else "sparse", c.field_name, c))
        elif c.role == "numeric":
            slots.append(_Slot("numeric", c.field_name, c))
            if c.missing_indicator:
                slots.append(_Slot("missing", f"{c.field_name}_missing", c))
    return slots


class FeatureEncoder:
    """Turns chunks of rows into encoded arrays, after fitting on the training chunks.

    Fields come in file column order; multi_hot columns sharing a field become one field at
    the position of their first column; a numeric column with ``missing_indicator`` is followed
    by the NumericField ``<name>_missing``.

    Fitting and encoding are vectorised (Arrow and numpy): a counted field is counted from each
    chunk's distinct values, and encoded by looking up each chunk's distinct values once.

    Args:
        columns: the columns of the training file (from a format's ``columns(path)``).
    """

    def __init__(self, columns: List[Column]):
        self.columns = list(columns)
        self.vocabs: Dict[str, Any] = {}
        self.numeric: Dict[str, NumericTransform] = {}
        self.fields: List[FieldSpec] = []
        self.extra_columns = [c.name for c in self.columns if c.role == "keep"]
        self.slots = _plan(self.columns)
        self._counters: Dict[str, ValueCounter] = {}

    # -- fitting ---------------------------------------------------------------------------
    def counted(self, slot: "_Slot") -> bool:
        """Whether ``slot`` is a categorical field whose vocabulary comes from counting."""
        return slot.kind in ("sparse", "multi_hot") and slot.column.hash_buckets is None

    def begin_fit(self) -> None:
        """Start fitting: empty counts and numeric statistics (see :meth:`finish_fit`)."""
        self._counters = {s.name: ValueCounter() for s in self.slots if self.counted(s)}
        self.numeric = {s.name: NumericTransform(s.column.transform) for s in self.slots if s.kind == "numeric"}
        self.vocabs = {s.name: HashVocabulary(s.column.hash_buckets) for s in self.slots
                       if s.kind in ("sparse", "multi_hot") and not self.counted(s)}
        self.fields = []

    def finish_fit(self, n_rows: int) -> "FeatureEncoder":
        """Freeze the vocabularies and statistics seen since :meth:`begin_fit`; build the fields."""
        if n_rows == 0:
            raise ValueError("FeatureEncoder.fit: the training data has no rows")
        for t in self.numeric.values():
            t.finish()
        for s in self.slots:
            if self.counted(s):
                values, counts = self._counters[s.name].result()
                self.vocabs[s.name] = Vocabulary.from_counts(values, counts, s.column.min_count)
            if s.kind == "multi_hot":
                self.fields.append(MultiHotField(s.name, self.vocabs[s.name].size, s.column.pooling))
            elif s.kind == "sparse":
                self.fields.append(SparseField(s.name, self.vocabs[s.name].size))
            else:
                self.fields.append(NumericField(s.name))
        self._counters = {}
        if not self.fields:
            raise ValueError("FeatureEncoder.fit: no feature columns (every column is label/keep/ignore)")
        return self

    def _id_dtype(self, slots: List[_Slot]) -> type:
        """The type of the ids of ``slots`` (fitted or hashed): int32 unless a field has 2^31+ rows."""
        rows = max((self.vocabs[s.name].size for s in slots), default=0)
        return np.int32 if rows <= np.iinfo(np.int32).max else np.int64

    def fit(self, chunks: Iterable[Any]) -> "FeatureEncoder":
        """One streaming pass over the training chunks: value counts and numeric statistics."""
        self.begin_fit()
        n = 0
        for chunk in chunks:
            n += len(chunk)
            self.fit_chunk(chunk)
        return self.finish_fit(n)

    # -- encoding --------------------------------------------------------------------------
    def encode(self, chunk: Any) -> Dict[str, np.ndarray]:
        """Encode one chunk of ``n`` rows (fitted encoder) into named arrays.

        Returns:
            ``labels`` float32 [n]; ``sparse`` int32 [n, Fs] (int64 if a field has 2^31+ rows);
            ``sparse_weights`` float32 [n, Fs] (ones unless the reader gave values); ``numeric``
            float32 [n, Fn]; per multi-hot field i: ``mh{i}_ids`` int32/int64 [nnz] (flat,
            row-major), ``mh{i}_lengths`` int64 [n], ``mh{i}_weights`` float32 [nnz]; per keep
            column: ``extra_<name>`` float64 [n].
        """
        return self._encode(chunk, fitting=False, defer=False)[0]

    def fit_chunk(self, chunk: Any) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray], Dict[str, pa.Array]]:
        """Count and take statistics of one training chunk; encode what needs no frozen fit.

        Returns ``(arrays, deferred, distinct)``: ``arrays`` are those of :meth:`encode` that the
        fit does not change (labels, lengths, weights, hashed ids, ...); ``deferred`` holds, per
        array that needs the frozen fit, its inputs in compact form (a counted field's positions
        into ``distinct[field]``, the chunk's distinct values, in the narrowest integer type; the
        numeric columns as parsed, float32 where that is exact), which :meth:`finish_deferred`
        turns into the missing arrays once :meth:`finish_fit` has run.
        """
        return self._encode(chunk, fitting=True, defer=True)

    def defer_chunk(self, chunk: Any) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray], Dict[str, pa.Array]]:
        """:meth:`fit_chunk` of a fitted encoder, which fits nothing: only the counted ids are
        deferred, so that many chunks' values can be looked up at once (see :meth:`finish_deferred`)."""
        return self._encode(chunk, fitting=False, defer=True)

    def finish_deferred(self, deferred: Dict[str, np.ndarray], ids: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """The arrays of :meth:`encode` that :meth:`fit_chunk` deferred.

        Args:
            deferred: the chunk's ``deferred`` of :meth:`fit_chunk`.
            ids: counted field -> int64 ids of the chunk's distinct values (``Vocabulary.lookup``
                without its trailing MISSING_ID).
        """
        out: Dict[str, np.ndarray] = {}
        sparse_slots = [s for s in self.slots if s.kind == "sparse"]
        if "sparse:0" in deferred:
            n = len(deferred["sparse:0"])
            out["sparse"] = sparse = np.empty((n, len(sparse_slots)), self._id_dtype(sparse_slots))
            for j, s in enumerate(sparse_slots):
                col = deferred[f"sparse:{j}"]
                if self.counted(s):
                    np.take(_position_table(ids[s.name], col.dtype, sparse.dtype), col, out=sparse[:, j])
                else:
                    sparse[:, j] = col
        for i, s in enumerate(s for s in self.slots if s.kind == "multi_hot"):
            pos = deferred.get(f"mh{i}_ids")
            if pos is not None:
                out[f"mh{i}_ids"] = _position_table(ids[s.name], pos.dtype, self._id_dtype([s]))[pos]
        numeric_slots = [s for s in self.slots if s.kind in ("numeric", "missing")]
        if "numeric:0" in deferred:
            out["numeric"] = numeric = np.empty((len(deferred["numeric:0"]), len(numeric_slots)), np.float32)
            for j, s in enumerate(numeric_slots):
                x = deferred[f"numeric:{j}"]
                values = deferred.get(f"numeric_values:{j}")
                if values is not None:  # positions into the chunk's distinct numbers
                    np.take(self._numeric_table(s, values, x.dtype), x, out=numeric[:, j])
                elif s.kind == "numeric":
                    numeric[:, j] = self._numeric(s, x.astype(np.float64, copy=False))
                else:  # the indicator itself
                    numeric[:, j] = x
        return out

    def _numeric(self, slot: _Slot, x: np.ndarray) -> np.ndarray:
        """The float32 feature of a numeric or missing-indicator slot from float64 numbers."""
        return self.numeric[slot.name].apply(x) if slot.kind == "numeric" else np.isnan(x).astype(np.float32)

    def _numeric_table(self, slot: _Slot, values: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """:func:`_position_table` of :meth:`_numeric` of distinct ``values`` (missing: 0, or 1 for an indicator)."""
        return _position_table(self._numeric(slot, values), dtype, np.float32, float(slot.kind == "missing"))

    def _encode(self, chunk: Any, fitting: bool, defer: bool):
        if isinstance(chunk, RawChunk):
            chunk = ColumnChunk.from_raw(chunk)
        n = len(chunk)
        out: Dict[str, np.ndarray] = {"labels": chunk.labels.astype(np.float32)}
        deferred: Dict[str, np.ndarray] = {}
        distinct: Dict[str, pa.Array] = {}
        sparse_slots = [s for s in self.slots if s.kind == "sparse"]
        defer_sparse = defer and any(self.counted(s) for s in sparse_slots)
        sparse = None if defer_sparse else np.empty((n, len(sparse_slots)), self._id_dtype(sparse_slots))
        sp_w = []
        mh_i = sp_j = 0
        for s in self.slots:
            c = s.column
            if s.kind not in ("sparse", "multi_hot"):
                continue
            if s.kind == "multi_hot":
                values, lengths = chunk.bags[s.name]
            elif c.role == "numeric":
                values = log_square_tokens(dense_numbers(chunk.nums[c.name]))
            else:
                values = chunk.cats[c.name]
            d, idx = dictionary_parts(values)
            counting = defer and self.counted(s)
            if counting:
                if fitting:
                    self._counters[s.name].add(d, idx)
                distinct[s.name] = d
                positions = _narrowest(idx, len(d))  # -1 = missing
            else:  # the ids of the distinct values, MISSING_ID last (position -1)
                table = self.vocabs[s.name].lookup(d).astype(self._id_dtype([s]))
            if s.kind == "sparse":
                if counting:
                    deferred[f"sparse:{sp_j}"] = positions
                elif defer_sparse:
                    deferred[f"sparse:{sp_j}"] = _narrowest(table[idx], self.vocabs[s.name].size)
                else:
                    sparse[:, sp_j] = table[idx]  # (a gather then a strided copy: faster than take into the column)
                sp_j += 1
                w = chunk.weights.get(c.name)
                sp_w.append(None if w is None else w.astype(np.float32))
            else:
                if counting:
                    deferred[f"mh{mh_i}_ids"] = positions
                else:
                    out[f"mh{mh_i}_ids"] = table[idx]
                out[f"mh{mh_i}_lengths"] = lengths
                wb = chunk.bag_weights.get(s.name)
                out[f"mh{mh_i}_weights"] = np.ones(len(idx), np.float32) if wb is None else wb
                mh_i += 1
        if sparse is not None:
            out["sparse"] = sparse
        # No per-id values (Criteo, CSV): one broadcast row, not an [n, Fs] array of ones.
        out["sparse_weights"] = (np.stack([np.ones(n, np.float32) if w is None else w for w in sp_w], 1)
                                 if any(w is not None for w in sp_w) else
                                 np.broadcast_to(np.ones(len(sp_w), np.float32), (n, len(sp_w))))
        numeric_slots = [s for s in self.slots if s.kind in ("numeric", "missing")]
        if fitting and numeric_slots:
            for j, s in enumerate(numeric_slots):
                x = chunk.nums[s.column.name]
                if isinstance(x, CodedNumbers):
                    if s.kind == "numeric":
                        counts = np.bincount(x.codes[x.codes >= 0], minlength=len(x.values))
                        t = self.numeric[s.name]
                        t.update_counted(t.prepared(x.values), counts)
                    deferred[f"numeric:{j}"] = _narrowest(x.codes, len(x.values))
                    deferred[f"numeric_values:{j}"] = x.values
                elif s.kind == "numeric":
                    self.numeric[s.name].update(x)
                    x32 = x.astype(np.float32)
                    # Exact in float32 when only the NaNs differ from themselves.
                    exact = np.count_nonzero(x32 != x) == np.count_nonzero(np.isnan(x32))
                    deferred[f"numeric:{j}"] = x32 if exact else x
                else:
                    deferred[f"numeric:{j}"] = np.isnan(x)
        else:
            out["numeric"] = numeric = np.empty((n, len(numeric_slots)), np.float32)
            for j, s in enumerate(numeric_slots):
                x = chunk.nums[s.column.name]
                if isinstance(x, CodedNumbers):
                    np.take(self._numeric_table(s, x.values, x.codes.dtype), x.codes, out=numeric[:, j])
                else:
                    numeric[:, j] = self._numeric(s, x)
        for name in self.extra_columns:
            out[f"extra_{name}"] = dense_numbers(chunk.nums[name])
        return out, deferred, distinct

    # -- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {
            "columns": [asdict(c) for c in self.columns],
            "fields": fields_to_dicts(self.fields),
            "vocabs": {k: v.to_dict() for k, v in self.vocabs.items()},
            "numeric": {k: v.to_dict() for k, v in self.numeric.items()},
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "FeatureEncoder":
        enc = cls([Column(**c) for c in d["columns"]])
        enc.fields = fields_from_dicts(d["fields"])
        enc.vocabs = {k: vocabulary_from_dict(v) for k, v in d["vocabs"].items()}
        enc.numeric = {k: NumericTransform.from_dict(v) for k, v in d["numeric"].items()}
        return enc

    def vocab(self, field: str) -> Optional[Any]:
        """The vocabulary of a categorical field (None for numeric fields)."""
        return self.vocabs.get(field)


def _narrowest(values: np.ndarray, bound: int) -> np.ndarray:
    """``values`` (all in ``[-1, bound)``) in the narrowest of uint8/uint16/int32/int64 that holds
    them, -1 wrapping to the type's largest value in the unsigned types (see :func:`_position_table`)."""
    for dtype in (np.uint8, np.uint16):
        if bound < np.iinfo(dtype).max:
            return values.astype(dtype)
    return values.astype(np.int32 if bound <= np.iinfo(np.int32).max else np.int64, copy=False)


def _position_table(ids: np.ndarray, dtype: np.dtype, id_dtype: np.dtype, missing: float = MISSING_ID) -> np.ndarray:
    """Lookup table (of ``id_dtype``) for positions of type ``dtype``: ``ids`` then ``missing`` for
    the position that stands for missing (-1, or the unsigned type's largest value)."""
    dtype = np.dtype(dtype)
    size = np.iinfo(dtype).max + 1 if dtype.kind == "u" else len(ids) + 1
    table = np.full(size, missing, id_dtype)
    table[:len(ids)] = ids
    return table
