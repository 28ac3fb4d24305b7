"""Fit vocabularies and numeric statistics on a training file, encode files into arrays.

:class:`FeatureEncoder` is the fitted state (vocabularies, hash settings, numeric statistics,
field specs); it is plain JSON, stored in the cache's ``meta.json``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from typing import Any, Dict, Iterable, List, Optional

import numpy as np

from ..features import FieldSpec, MultiHotField, NumericField, SparseField, fields_from_dicts, fields_to_dicts
from .readers import Column, RawChunk
from .vocab import HashVocabulary, NumericTransform, Vocabulary, log_square_token, vocabulary_from_dict

__all__ = ["FeatureEncoder"]


class FeatureEncoder:
    """Turns :class:`RawChunk` s into encoded arrays, after fitting on the training chunks.

    Fields come in file column order; multi_hot columns sharing a field become one field at
    the position of their first column; a numeric column with ``missing_indicator`` is followed
    by the NumericField ``<name>_missing``.

    Args:
        columns: the columns of the training file (from a format's ``columns(path)``).
    """

    def __init__(self, columns: List[Column]):
        self.columns = list(columns)
        self.vocabs: Dict[str, Any] = {}
        self.numeric: Dict[str, NumericTransform] = {}
        self.fields: List[FieldSpec] = []
        self.extra_columns = [c.name for c in self.columns if c.role == "keep"]

    # -- fitting ---------------------------------------------------------------------------
    def fit(self, chunks: Iterable[RawChunk]) -> "FeatureEncoder":
        """One streaming pass over the training chunks: value counts and numeric statistics."""
        counts: Dict[str, Counter] = {}
        group: Dict[str, Column] = {}
        for c in self.columns:
            if c.role == "sparse" or (c.role == "numeric" and c.transform == "log_square"):
                counts[c.field_name] = Counter()
            elif c.role == "multi_hot":
                counts.setdefault(c.field_name, Counter())
                group.setdefault(c.field_name, c)
            elif c.role == "numeric":
                self.numeric[c.name] = NumericTransform(c.transform)
        n_rows = 0
        for chunk in chunks:
            n_rows += len(chunk)
            for c in self.columns:
                if c.role == "sparse" and c.hash_buckets is None:
                    counts[c.field_name].update(chunk.cats[c.name])
                elif c.role == "numeric" and c.transform == "log_square":
                    if c.hash_buckets is None:
                        counts[c.field_name].update(map(log_square_token, chunk.nums[c.name].tolist()))
                elif c.role == "numeric":
                    self.numeric[c.name].update(chunk.nums[c.name])
            for name, bags in chunk.bags.items():
                if group[name].hash_buckets is None:
                    cnt = counts[name]
                    for bag in bags:
                        cnt.update(bag)
        if n_rows == 0:
            raise ValueError("FeatureEncoder.fit: the training data has no rows")
        for t in self.numeric.values():
            t.finish()
        seen = set()
        for c in self.columns:
            name = c.field_name
            if c.role in ("sparse", "multi_hot") or (c.role == "numeric" and c.transform == "log_square"):
                if name in seen:
                    continue
                seen.add(name)
                vocab = (HashVocabulary(c.hash_buckets) if c.hash_buckets is not None
                         else Vocabulary.fit(counts[name], c.min_count))
                self.vocabs[name] = vocab
                if c.role == "multi_hot":
                    self.fields.append(MultiHotField(name, vocab.size, group[name].pooling))
                else:
                    self.fields.append(SparseField(name, vocab.size))
            elif c.role == "numeric":
                self.fields.append(NumericField(name))
                if c.missing_indicator:
                    self.fields.append(NumericField(f"{name}_missing"))
        if not self.fields:
            raise ValueError("FeatureEncoder.fit: no feature columns (every column is label/keep/ignore)")
        return self

    # -- encoding --------------------------------------------------------------------------
    def encode(self, chunk: RawChunk) -> Dict[str, np.ndarray]:
        """Encode one chunk of ``n`` rows into named arrays.

        Returns:
            ``labels`` float32 [n]; ``sparse`` int64 [n, Fs]; ``sparse_weights`` float32 [n, Fs]
            (ones unless the reader gave values); ``numeric`` float32 [n, Fn]; per multi-hot
            field i: ``mh{i}_ids`` int64 [nnz] (flat, row-major), ``mh{i}_lengths`` int64 [n],
            ``mh{i}_weights`` float32 [nnz]; per keep column: ``extra_<name>`` float64 [n].
        """
        n = len(chunk)
        sparse, sp_w, numeric = [], [], []
        out: Dict[str, np.ndarray] = {"labels": chunk.labels.astype(np.float32)}
        mh_i = 0
        by_field = {}
        for c in self.columns:
            by_field.setdefault(c.field_name, c)
        for f in self.fields:
            if isinstance(f, SparseField):
                c = by_field[f.name]
                if c.role == "numeric":
                    values = list(map(log_square_token, chunk.nums[c.name].tolist()))
                else:
                    values = chunk.cats[c.name]
                sparse.append(self.vocabs[f.name].encode(values))
                w = chunk.weights.get(c.name)
                sp_w.append(np.ones(n, np.float32) if w is None else w.astype(np.float32))
            elif isinstance(f, MultiHotField):
                bags = chunk.bags[f.name]
                lengths = np.fromiter((len(b) for b in bags), dtype=np.int64, count=n)
                flat = [t for b in bags for t in b]
                out[f"mh{mh_i}_ids"] = self.vocabs[f.name].encode(flat)
                out[f"mh{mh_i}_lengths"] = lengths
                wb = chunk.bag_weights.get(f.name)
                out[f"mh{mh_i}_weights"] = (np.ones(len(flat), np.float32) if wb is None else
                                            np.fromiter((v for b in wb for v in b), np.float32, len(flat)))
                mh_i += 1
            elif f.name in self.numeric:
                numeric.append(self.numeric[f.name].apply(chunk.nums[f.name]))
            else:  # "<name>_missing" indicator
                numeric.append(np.isnan(chunk.nums[f.name[: -len("_missing")]]).astype(np.float32))
        out["sparse"] = np.stack(sparse, 1) if sparse else np.zeros((n, 0), np.int64)
        out["sparse_weights"] = np.stack(sp_w, 1) if sp_w else np.zeros((n, 0), np.float32)
        out["numeric"] = np.stack(numeric, 1) if numeric else np.zeros((n, 0), np.float32)
        for name in self.extra_columns:
            out[f"extra_{name}"] = chunk.nums[name]
        return out

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
