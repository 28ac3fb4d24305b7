"""Fit vocabularies and numeric statistics on a training file, encode files into arrays.

:class:`FeatureEncoder` is the fitted state (vocabularies, hash settings, numeric statistics,
field specs); it is plain JSON, stored in the cache's ``meta.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional

import numpy as np

from ..features import FieldSpec, MultiHotField, NumericField, SparseField, fields_from_dicts, fields_to_dicts
from .columnar import ColumnChunk, dictionary_parts
from .readers import Column, RawChunk
from .vocab import HashVocabulary, NumericTransform, ValueCounter, Vocabulary, log_square_tokens, vocabulary_from_dict

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

    def fit(self, chunks: Iterable[Any]) -> "FeatureEncoder":
        """One streaming pass over the training chunks: value counts and numeric statistics."""
        self.begin_fit()
        n = 0
        for chunk in chunks:
            n += len(chunk)
            self.encode_chunk(chunk, fitting=True)
        return self.finish_fit(n)

    # -- encoding --------------------------------------------------------------------------
    def encode(self, chunk: Any) -> Dict[str, np.ndarray]:
        """Encode one chunk of ``n`` rows (fitted encoder) into named arrays.

        Returns:
            ``labels`` float32 [n]; ``sparse`` int64 [n, Fs]; ``sparse_weights`` float32 [n, Fs]
            (ones unless the reader gave values); ``numeric`` float32 [n, Fn]; per multi-hot
            field i: ``mh{i}_ids`` int64 [nnz] (flat, row-major), ``mh{i}_lengths`` int64 [n],
            ``mh{i}_weights`` float32 [nnz]; per keep column: ``extra_<name>`` float64 [n].
        """
        return self.encode_chunk(chunk)[0]

    def encode_chunk(self, chunk: Any, fitting: bool = False):
        """(arrays, distinct values per counted field).

        Fitted (``fitting=False``): the arrays of :meth:`encode` and ``{}``. While fitting: the
        counted fields hold int64 positions into their chunk's distinct values (-1 = missing)
        instead of ids, returned beside them; and ``numeric_raw`` (float64 [n, Fn], the values
        before the transform) replaces ``numeric``. The counts and statistics are updated.
        """
        if isinstance(chunk, RawChunk):
            chunk = ColumnChunk.from_raw(chunk)
        n = len(chunk)
        out: Dict[str, np.ndarray] = {"labels": chunk.labels.astype(np.float32)}
        n_sparse = sum(s.kind == "sparse" for s in self.slots)
        sparse = np.empty((n, n_sparse), np.int64)  # filled column by column: no stack copy
        sp_w, numeric, distinct = [], [], {}
        mh_i = sp_j = 0
        for s in self.slots:
            c = s.column
            if s.kind in ("sparse", "multi_hot"):
                if s.kind == "multi_hot":
                    values, lengths = chunk.bags[s.name]
                elif c.role == "numeric":
                    values = log_square_tokens(chunk.nums[c.name])
                else:
                    values = chunk.cats[c.name]
                d, idx = dictionary_parts(values)
                if fitting and self.counted(s):
                    self._counters[s.name].add(d, idx)
                    distinct[s.name], ids = d, idx
                else:
                    ids = self.vocabs[s.name].lookup(d)[idx]
                if s.kind == "sparse":
                    sparse[:, sp_j] = ids
                    sp_j += 1
                    w = chunk.weights.get(c.name)
                    sp_w.append(None if w is None else w.astype(np.float32))
                else:
                    out[f"mh{mh_i}_ids"] = ids
                    out[f"mh{mh_i}_lengths"] = lengths
                    wb = chunk.bag_weights.get(s.name)
                    out[f"mh{mh_i}_weights"] = np.ones(len(ids), np.float32) if wb is None else wb
                    mh_i += 1
            elif s.kind == "numeric":
                x = chunk.nums[c.name]
                if fitting:
                    self.numeric[s.name].update(x)
                numeric.append(x if fitting else self.numeric[s.name].apply(x))
            else:  # "<name>_missing" indicator
                numeric.append(np.isnan(chunk.nums[c.name]).astype(np.float64 if fitting else np.float32))
        out["sparse"] = sparse
        # No per-id values (Criteo, CSV): one broadcast row, not an [n, Fs] array of ones.
        out["sparse_weights"] = (np.stack([np.ones(n, np.float32) if w is None else w for w in sp_w], 1)
                                 if any(w is not None for w in sp_w) else
                                 np.broadcast_to(np.ones(n_sparse, np.float32), (n, n_sparse)))
        num_name, num_type = ("numeric_raw", np.float64) if fitting else ("numeric", np.float32)
        out[num_name] = np.stack(numeric, 1) if numeric else np.zeros((n, 0), num_type)
        for name in self.extra_columns:
            out[f"extra_{name}"] = chunk.nums[name]
        return out, distinct

    def finish_numeric(self, raw: np.ndarray) -> np.ndarray:
        """float32 ``numeric`` from the ``numeric_raw`` of :meth:`encode_chunk` (after fitting)."""
        cols = [self.numeric[s.name].apply(raw[:, j]) if s.kind == "numeric" else raw[:, j].astype(np.float32)
                for j, s in enumerate(s for s in self.slots if s.kind in ("numeric", "missing"))]
        return np.stack(cols, 1) if cols else np.zeros((raw.shape[0], 0), np.float32)

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
