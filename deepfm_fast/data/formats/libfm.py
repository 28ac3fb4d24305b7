"""libFM / libSVM rows ``label id:value id:value ...``, one field per position or one weighted bag."""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..columnar import ColumnChunk, iter_blocks, lines_array
from ..readers import (
    Column,
    DataFormatError,
    RawChunk,
    ReadStats,
    _Bad,
    _check_labels,
    _decoded_lines,
    _float_column,
    _Reject,
    counted_chunks,
    open_text,
)

__all__ = ["LibFMFormat"]

class LibFMFormat:
    """libFM / libSVM rows ``label id:value id:value ...``; labels 1/-1 or 1/0 (-1 -> 0).

    A file whose first row starts with ``id:value`` has no labels: its rows are all pairs, read
    with NaN labels.

    Args:
        fields: ``"position"``: field ``f{i}`` = the i-th pair (every row must have the same
            count); ``"bag"``: one weighted multi-hot field ``features``; ``"auto"``: position
            when the first chunk's rows all have the same count.
        min_count: ids seen fewer times in training go to OOV (ids are vocabulary values,
            so each field gets compact local ids).
        hash_buckets: hash ids instead of counting.
        pooling: pooling of the ``bag`` field.
    """

    def __init__(self, fields: str = "auto", min_count: int = 1, hash_buckets: Optional[int] = None,
                 pooling: str = "sum"):
        if fields not in ("auto", "position", "bag"):
            raise ValueError(f"LibFMFormat: fields must be 'auto', 'position' or 'bag', got {fields!r}")
        self.fields = fields
        self.min_count, self.hash_buckets, self.pooling = min_count, hash_buckets, pooling
        self._resolved: Dict[Path, Tuple[str, int]] = {}
        self._fixed: Optional[Tuple[str, int]] = None
        self._labelled: Dict[Path, bool] = {}

    def _has_labels(self, path: Path) -> bool:
        """Whether the rows of ``path`` start with a label: decided by the first non-blank row."""
        if path not in self._labelled:
            with open_text(path, errors="replace") as fh:
                first = next((ln.split() for ln in fh if ln.strip()), None)
            if first is None:
                raise DataFormatError(f"{path}: file is empty (no rows)")
            self._labelled[path] = ":" not in first[0]
        return self._labelled[path]

    def no_label_reason(self, path: Union[str, Path]) -> Optional[str]:
        """None when the rows of ``path`` have labels; else why it has none."""
        if self._has_labels(Path(path)):
            return None
        return "no labels: the first row starts with an id:value pair"

    def _mode(self, path: Path, chunk_rows: int = 65536) -> Tuple[str, int]:
        """(mode, pairs per row) from the first chunk of ``path``."""
        if self._fixed is not None:
            return self._fixed
        if path not in self._resolved:
            with open_text(path, errors="replace") as fh:
                head = [ln.split() for ln in islice(fh, chunk_rows)]
            head = [p for p in head if p]
            if not head:
                raise DataFormatError(f"{path}: file is empty (no rows)")
            label = int(self._has_labels(path))
            counts = {len(p) - label for p in head}
            mode = self.fields
            if mode == "auto":
                mode = "position" if len(counts) == 1 else "bag"
            self._resolved[path] = (mode, max(counts))
        return self._resolved[path]

    def fix_layout(self, train: Union[str, Path], chunk_rows: int = 65536, stored: Any = None) -> None:
        """Every file is read with the layout (position/bag, pairs per row) of the training file:
        ``stored`` (kept by the cache, so that a cache hit need not read the file), else found in
        the first chunk of ``train``."""
        if self._fixed is None:
            self.set_layout(*(stored if stored is not None else self._mode(Path(train), chunk_rows)))

    def layout_state(self) -> Optional[List[Any]]:
        return None if self._fixed is None else list(self._fixed)

    def set_layout(self, mode: str, pairs: int) -> None:
        """Fix the layout fitted on the training file so every other file is read alike."""
        self._fixed = (mode, pairs)

    @property
    def layout(self) -> Optional[Tuple[str, int]]:
        """The layout fixed by :meth:`set_layout` (``(mode, pairs per row)``), or None."""
        return self._fixed

    def columns(self, path: Union[str, Path]) -> List[Column]:
        mode, pairs = self._mode(Path(path))
        if mode == "position":
            return [Column("label", "label")] + [
                Column(f"f{i}", "sparse", min_count=self.min_count, hash_buckets=self.hash_buckets)
                for i in range(pairs)
            ]
        return [Column("label", "label"),
                Column("features", "multi_hot", pooling=self.pooling, min_count=self.min_count,
                       hash_buckets=self.hash_buckets)]

    def read(self, path: Union[str, Path], chunk_rows: int = 65536, skip_bad_lines: bool = False,
             stats: Optional[ReadStats] = None) -> Iterator[RawChunk]:
        return self._read(self._row_chunks, path, chunk_rows, skip_bad_lines, stats)

    def read_columns(self, path: Union[str, Path], chunk_rows: int = 65536, skip_bad_lines: bool = False,
                     stats: Optional[ReadStats] = None) -> Iterator[ColumnChunk]:
        """Yield validated :class:`ColumnChunk` s of ``path`` (the columnar path); counts go to ``stats``."""
        return self._read(self._column_chunks, path, chunk_rows, skip_bad_lines, stats)

    def _read(self, chunks, path, chunk_rows, skip_bad_lines, stats):
        """What both paths share: the file's layout, then ``chunks``'s chunks counted into ``stats``."""
        path = Path(path)
        stats = stats if stats is not None else ReadStats()
        mode, pairs = self._mode(path, chunk_rows)
        parsed = chunks(path, chunk_rows, mode, pairs, self._has_labels(path), skip_bad_lines, stats)
        return counted_chunks(path, parsed, stats)

    def _row_chunks(self, path, chunk_rows, mode, pairs, labelled, skip_bad_lines, stats):
        line = 1
        with open_text(path) as fh:
            while raw := list(islice(fh, chunk_rows)):
                yield self._chunk(path, raw, line, mode, pairs, labelled, skip_bad_lines, stats)
                line += len(raw)

    def _column_chunks(self, path, chunk_rows, mode, pairs, labelled, skip_bad_lines, stats):
        for first, block in iter_blocks(path, chunk_rows):
            try:
                chunk = self._columns(block, mode, pairs, labelled)
            except (pa.ArrowInvalid, _Reject):
                texts, lines = _decoded_lines(path, first, block, skip_bad_lines, stats)
                # _chunk numbers lines from its first one: keep the positions of undecodable lines empty.
                raw_lines = [""] * (len(lines) and lines[-1] - first + 1)
                for t, ln in zip(texts, lines):
                    raw_lines[ln - first] = t
                raw = self._chunk(path, raw_lines, first, mode, pairs, labelled, skip_bad_lines, stats)
                chunk = None if raw is None else ColumnChunk.from_raw(raw)
            yield chunk

    @staticmethod
    def _columns(block: bytes, mode: str, pairs: int, labelled: bool) -> ColumnChunk:
        lines = lines_array(block)
        tokens = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(lines))
        # Arrow splits at every whitespace character: runs of them leave empty tokens, which
        # Python's str.split() (the row-by-row parser) drops; drop them too.
        flat = pc.list_flatten(tokens)
        keep = pc.not_equal(flat, "")
        if not pc.all(keep).as_py():
            parents = pc.list_parent_indices(tokens).to_numpy()[keep.to_numpy(zero_copy_only=False)]
            offsets = np.zeros(len(lines) + 1, np.int32)
            np.cumsum(np.bincount(parents, minlength=len(lines)), out=offsets[1:])
            tokens = pa.ListArray.from_arrays(pa.array(offsets), flat.filter(keep))
        counts = pc.list_value_length(tokens).to_numpy(zero_copy_only=False)
        if not counts.all():  # blank lines
            tokens = tokens.filter(pa.array(counts > 0))
            counts = counts[counts > 0]
        n = len(tokens)
        labels = np.full(n, np.nan, np.float32)
        if labelled and n:
            y = _float_column(pc.list_element(tokens, 0))
            if not np.isin(y, (-1.0, 0.0, 1.0)).all():
                raise _Reject
            labels = np.where(y < 0, 0.0, y).astype(np.float32)
            tokens = pc.list_slice(tokens, 1)
            counts = counts - 1
        if mode == "position" and (counts != pairs).any():
            raise _Reject
        kv = pc.split_pattern(pc.list_flatten(tokens), ":", max_splits=1)
        if len(kv) and pc.min(pc.list_value_length(kv)).as_py() != 2:
            raise _Reject
        ids, values = pc.list_element(kv, 0), pc.list_element(kv, 1)
        if len(ids) and not pc.all(pc.utf8_is_digit(ids)).as_py():
            raise _Reject
        w = _float_column(values).astype(np.float32)
        if mode == "position":
            cats = {f"f{i}": ids.take(pa.array(np.arange(i, n * pairs, pairs))) for i in range(pairs)}
            weights = {f"f{i}": w[i::pairs] for i in range(pairs)}
            return ColumnChunk(labels, cats, {}, weights, {}, {})
        return ColumnChunk(labels, {}, {}, {}, {"features": (ids, counts.astype(np.int64))}, {"features": w})

    def _chunk(self, path, raw, first, mode, pairs, labelled, skip, stats) -> Optional[RawChunk]:
        bad = _Bad(path, skip, stats)
        labels, ids, vals, lines = [], [], [], []
        # In a file without labels a leading number is a bad token, not a label.
        unlabelled = "" if labelled else "; this file has no labels, as its first row shows"
        for k, text in enumerate(raw):
            parts = text.split()
            if not parts:
                continue
            ln = first + k
            y = float("nan")
            if labelled:
                try:
                    y = float(parts[0])
                except ValueError:
                    bad.add(k, ln, f"label {parts[0]!r} is not a number")
                    continue
                parts = parts[1:]
            if mode == "position" and len(parts) != pairs:
                bad.add(k, ln, f"expected {pairs} id:value pairs, got {len(parts)}")
                continue
            row_ids, row_vals = [], []
            for tok in parts:
                fid, colon, v = tok.partition(":")
                try:
                    if not colon or not fid.isdigit():
                        raise ValueError
                    row_vals.append(float(v))
                except ValueError:
                    bad.add(k, ln, f"bad libFM token {tok!r} (want id:value{unlabelled})")
                    break
                row_ids.append(fid)
            else:
                labels.append(y)
                ids.append(row_ids)
                vals.append(row_vals)
                lines.append(ln)
        bad.keep_index(len(raw))  # counts the skipped rows
        if not labels:
            return None
        y = np.array(labels, dtype=np.float32)
        if labelled:
            _check_labels(path, y, lines, (-1.0, 0.0, 1.0))
            y[y < 0] = 0.0
        if mode == "position":
            cols = list(zip(*ids))
            wcols = np.array(vals, dtype=np.float32).T
            return RawChunk(y, {f"f{i}": cols[i] for i in range(pairs)}, {}, {}, {},
                            {f"f{i}": wcols[i] for i in range(pairs)})
        return RawChunk(y, {}, {"features": ids}, {}, {"features": vals}, {})

    def options(self) -> Dict[str, Any]:
        return {"format": "libfm", "fields": self.fields, "min_count": self.min_count,
                "hash_buckets": self.hash_buckets, "pooling": self.pooling}

    @classmethod
    def spec_kwargs(cls, *, schema=None, min_count: int = 1, hash_buckets: Optional[int] = None) -> Dict[str, Any]:
        """The constructor arguments of the command-line options (see ``format_spec``)."""
        if schema is not None:
            raise ValueError("--schema is for the csv format only")
        return {"min_count": min_count, "hash_buckets": hash_buckets}

    @classmethod
    def from_spec(cls, kwargs: Dict[str, Any]) -> "LibFMFormat":
        """The format of a spec's kwargs, with the layout of the training file when it holds one."""
        kwargs = dict(kwargs)
        layout = kwargs.pop("layout", None)
        fmt = cls(**kwargs)
        if layout is not None:
            fmt.set_layout(*layout)
        return fmt
