"""What every reader shares: columns, errors, counts, the row-by-row parser, the delimited engine.

The formats themselves are in :mod:`deepfm_fast.data.formats` (one module each). Each turns a
file into chunks of at most ``chunk_rows`` rows, so files larger than memory stream through:
``read_columns`` gives :class:`~deepfm_fast.data.columnar.ColumnChunk` s (the columnar path, see
:mod:`deepfm_fast.data.columnar`); ``read`` gives :class:`RawChunk` s row by row (the old path,
kept as the columnar path's fallback on blocks Arrow rejects, and as a reference in the tests).

A malformed row (wrong column count, non-numeric
label or numeric value, bad libFM token) raises :class:`DataFormatError` naming the file and
line, or with ``skip_bad_lines=True`` is dropped and counted in :class:`ReadStats`. An empty
file, a schema column missing from the header, or a label outside {0, 1} ({-1, 0, 1} for libFM)
is always an error. Line numbers count physical lines from 1 (header included) and assume no
quoted newlines inside a CSV cell.

Files without labels (to predict on) are recognised by their shape, decided once per file by
its first row or header; every later row must have the same shape, or it is a malformed row:

* Criteo TSV: 39 columns instead of 40 (no label first: the layout of Criteo's ``test.txt``);
  Criteo CSV: the header ``I1..I13,C1..C26`` without ``label``.
* libFM: the first row starts with an ``id:value`` pair (a label never holds a colon).
* CSV: the header lacks the schema's label column.

Their :class:`RawChunk` labels are NaN, and ``no_label_reason(path)`` says why a file has none.

Formats (:mod:`deepfm_fast.data.formats`):

* :class:`CriteoFormat`: ``label, I1..I13, C1..C26``, either the Kaggle/Terabyte TSV without a
  header or a CSV with that header; ``layout="auto"`` looks at the first line.
* :class:`LibFMFormat`: ``label id:value ...``. ``fields="position"``: one sparse field per
  position (every row has the same count, as Frappe's 10 fields); ``fields="bag"``: a single
  weighted multi-hot field; ``"auto"``: position when the first chunk's rows all have the same
  count. Values are kept as weights.
* :class:`CSVFormat`: a header CSV plus a schema, column -> role (see :func:`parse_schema`).
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv

from .._args import Pooling
from .columnar import PARSE_THREADS, CodedNumbers, ColumnChunk, dictionary_parts, iter_blocks, read_ahead

__all__ = [
    "DataFormatError",
    "Column",
    "RawChunk",
    "ReadStats",
    "open_text",
]

ROLES = ("label", "sparse", "multi_hot", "numeric", "keep", "ignore")
NUMERIC_TRANSFORMS = ("log1p", "standardize", "none", "log_square")


class DataFormatError(ValueError):
    """Bad input data; the message names the file and, for a row, the line."""


@dataclass(frozen=True)
class Column:
    """How one input column becomes (part of) a feature.

    Args:
        name: column name (header name for CSV; ``I1``/``C1`` for Criteo; ``f0``... for libFM).
        role: ``label``, ``sparse``, ``multi_hot``, ``numeric``, ``keep`` (kept as a float64
            ``extra`` column for splitting, e.g. a timestamp, not a feature) or ``ignore``.
        field: feature name; multi_hot columns with the same field form one bag (e.g.
            ``movieGenre1..3`` -> ``movieGenre``). Default: the column name.
        sep: multi_hot only: separator inside a cell (``"|"``); None = the cell is one value.
        pooling: multi_hot only: ``sum`` or ``mean``.
        transform: numeric only: ``log1p``, ``standardize``, ``none`` or ``log_square``
            (bucketed into a sparse field).
        min_count: sparse/multi_hot: values seen fewer times in training go to OOV.
        hash_buckets: sparse/multi_hot: hash into this many buckets instead of counting.
        missing_indicator: numeric only: add a 0/1 NumericField ``<field>_missing``.
    """

    name: str
    role: str
    field: Optional[str] = None
    sep: Optional[str] = None
    pooling: str = "sum"
    transform: str = "log1p"
    min_count: int = 1
    hash_buckets: Optional[int] = None
    missing_indicator: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"column {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        if self.transform not in NUMERIC_TRANSFORMS:
            raise ValueError(f"column {self.name!r}: transform must be one of "
                             f"{NUMERIC_TRANSFORMS}, got {self.transform!r}")
        object.__setattr__(self, "pooling", str(Pooling.parse(self.pooling, f"column {self.name!r}")))
        if self.min_count < 1:
            raise ValueError(f"column {self.name!r}: min_count must be >= 1, got {self.min_count}")
        if self.hash_buckets is not None and self.hash_buckets < 1:
            raise ValueError(f"column {self.name!r}: hash_buckets must be >= 1, got {self.hash_buckets}")

    @property
    def field_name(self) -> str:
        return self.field or self.name


@dataclass
class RawChunk:
    """Parsed, validated rows before encoding (``n`` rows).

    Attributes:
        labels: float32 ``[n]`` in {0, 1}; NaN for every row of a file without labels.
        cats: column -> ``n`` strings (``''`` = missing), for sparse columns.
        bags: multi_hot field -> ``n`` token lists.
        bag_weights: multi_hot field -> ``n`` value lists (libFM only).
        nums: column -> float64 ``[n]`` (NaN = missing), for numeric and keep columns.
        weights: sparse column -> float32 ``[n]`` (libFM values).
    """

    labels: np.ndarray
    cats: Dict[str, Sequence[str]]
    bags: Dict[str, List[List[str]]]
    nums: Dict[str, np.ndarray]
    bag_weights: Dict[str, List[List[float]]]
    weights: Dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class ReadStats:
    """Counts filled in while reading one file."""

    rows: int = 0
    bad_lines: int = 0


def open_text(path: Union[str, Path], errors: str = "strict") -> io.TextIOBase:
    """Open a text file for reading, transparently gunzipping (detected by magic bytes).

    ``errors="replace"`` where only the shape of the first lines matters (the columnar path
    reports invalid UTF-8 with its line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8", newline="", errors=errors)
    return open(path, "r", encoding="utf-8", newline="", errors=errors)


def counted_chunks(path: Path, chunks: Iterable[Any], stats: ReadStats) -> Iterator[Any]:
    """The non-empty ``chunks`` (None or 0 rows: skipped), their rows added to ``stats.rows``; a file
    that gave neither a row nor a bad line is empty, an error. The accounting of every reader."""
    any_rows = False
    for chunk in chunks:
        if chunk is not None and len(chunk):
            any_rows = True
            stats.rows += len(chunk)
            yield chunk
    if not any_rows and stats.bad_lines == 0:
        raise DataFormatError(f"{path}: file is empty (no data rows)")


def _check_not_empty(path: Path, first: Optional[str]) -> None:
    if first is None or first.strip() == "":
        raise DataFormatError(f"{path}: file is empty (no rows)")


def _parse_floats(values: Sequence[str], allow_empty: bool) -> Tuple[np.ndarray, List[int]]:
    """float64 array of ``values`` (``''`` -> NaN if allowed) and the indices that failed."""
    try:
        if allow_empty:
            return np.array([v if v else "nan" for v in values], dtype=np.float64), []
        return np.array(values, dtype=np.float64), []
    except ValueError:
        out = np.full(len(values), np.nan)
        bad = []
        for i, v in enumerate(values):
            if v == "" and allow_empty:
                continue
            try:
                out[i] = float(v)
            except ValueError:
                bad.append(i)
        return out, bad


class _Bad:
    """Collects malformed rows of a chunk: raise at the first, or drop and count them."""

    def __init__(self, path: Path, skip: bool, stats: ReadStats):
        self.path, self.skip, self.stats = path, skip, stats
        self.rows: Dict[int, str] = {}

    def add(self, i: int, line: int, why: str) -> None:
        if not self.skip:
            raise DataFormatError(f"{self.path}, line {line}: {why} "
                                  "(pass skip_bad_lines=True to skip such rows)")
        self.rows.setdefault(i, why)

    def keep_index(self, n: int) -> Optional[List[int]]:
        if not self.rows:
            return None
        self.stats.bad_lines += len(self.rows)
        return [i for i in range(n) if i not in self.rows]


def _check_labels(path: Path, labels: np.ndarray, lines: Sequence[int], allowed: Tuple[float, ...]) -> None:
    ok = np.isin(labels, allowed)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise DataFormatError(f"{path}, line {lines[i]}: label {labels[i]:g} is outside "
                              f"{{{', '.join(f'{a:g}' for a in allowed)}}}")


class _Reject(Exception):
    """Arrow's parse of a block found something the row-by-row parser must name or skip."""


def _decoded_lines(path: Path, first: int, block: bytes, skip: bool, stats: ReadStats) -> Tuple[List[str], List[int]]:
    """The lines of a block as text with their line numbers; invalid UTF-8 raises or is skipped."""
    block = bytes(block)  # a memoryview from iter_blocks
    texts, lines = [], []
    for k, raw in enumerate(block.split(b"\n")[: block.count(b"\n") + (not block.endswith(b"\n"))]):
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            if not skip:
                raise DataFormatError(f"{path}, line {first + k}: invalid UTF-8 ({e.reason} at byte {e.start} "
                                      "of the line; pass skip_bad_lines=True to skip such rows)") from None
            stats.bad_lines += 1
            continue
        lines.append(first + k)
    return texts, lines


_DICTIONARY = pa.dictionary(pa.int32(), pa.string())
_ARROW_TYPES = {"label": pa.float64(), "numeric": pa.float64(), "keep": pa.float64(), "sparse": _DICTIONARY}
#: Bytes of a block that one Arrow thread parses at a time: small enough to stay in the core's cache
#: (4 MB parsed 15% faster than the whole 32 MB block on one core), large enough to share a
#: block among threads.
_PARSE_BYTES = 4 << 20


def _float_column(col) -> np.ndarray:
    """float64 numpy of an Arrow string column (null -> NaN); _Reject when a value is not a number."""
    try:
        return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise _Reject from None


class _DelimitedFormat:
    """Shared engine of Criteo and schema CSV: delimited rows, fixed columns."""

    #: Numeric columns are read as :class:`CodedNumbers` (a format whose numbers repeat, like counts).
    _coded_numbers = False

    def _layout(self, path: Path) -> Tuple[str, bool, List[Column]]:
        """(delimiter, has_header, columns in file order); may read the first line."""
        raise NotImplementedError

    def columns(self, path: Union[str, Path]) -> List[Column]:
        return self._layout(Path(path))[2]

    def no_label_reason(self, path: Union[str, Path]) -> Optional[str]:
        """None when ``path`` has a label column; else why it has none (from its first line)."""
        if any(c.role == "label" for c in self.columns(path)):
            return None
        return self._no_label

    _no_label = "no label column"

    def read(self, path: Union[str, Path], chunk_rows: int = 65536, skip_bad_lines: bool = False,
             stats: Optional[ReadStats] = None) -> Iterator[RawChunk]:
        """Yield validated :class:`RawChunk` s of ``path``; counts go to ``stats``."""
        path = Path(path)
        stats = stats if stats is not None else ReadStats()
        return counted_chunks(path, self._row_chunks(path, chunk_rows, skip_bad_lines, stats), stats)

    def _row_chunks(self, path, chunk_rows, skip_bad_lines, stats):
        delim, header, cols = self._layout(path)
        ncols = len(cols)
        label_i = next((i for i, c in enumerate(cols) if c.role == "label"), None)
        with open_text(path) as fh:
            reader = csv.reader(fh, delimiter=delim)
            line = 1
            if header:
                next(reader)
                line = 2
            while True:
                rows = list(islice(reader, chunk_rows))
                if not rows:
                    break
                lines = range(line, line + len(rows))
                line += len(rows)
                # Blank lines parse as []; they carry no row.
                if [] in rows:
                    pairs = [(r, ln) for r, ln in zip(rows, lines) if r]
                    rows, lines = [p[0] for p in pairs], [p[1] for p in pairs]
                if rows:
                    yield self._chunk(path, rows, lines, cols, ncols, label_i, skip_bad_lines, stats)

    def read_columns(self, path: Union[str, Path], chunk_rows: int = 65536, skip_bad_lines: bool = False,
                     stats: Optional[ReadStats] = None) -> Iterator[ColumnChunk]:
        """Yield validated :class:`ColumnChunk` s of ``path`` (the columnar path); counts go to ``stats``."""
        path = Path(path)
        stats = stats if stats is not None else ReadStats()
        delim, header, cols = self._layout(path)
        # Numbers are parsed by the reader, categories dictionary-encoded as they are parsed (cheaper
        # than strings encoded afterwards); a value that is no number rejects the block.
        types = {c.name: _ARROW_TYPES.get(c.role, pa.string()) for c in cols}
        if self._coded_numbers:
            types.update({c.name: _DICTIONARY for c in cols if c.role == "numeric"})
        include = [c.name for c in cols if c.role != "ignore"]
        label_i = next((i for i, c in enumerate(cols) if c.role == "label"), None)
        read = pv.ReadOptions(column_names=[c.name for c in cols], block_size=_PARSE_BYTES, use_threads=PARSE_THREADS)
        parse = pv.ParseOptions(delimiter=delim)
        convert = pv.ConvertOptions(column_types=types, include_columns=include, strings_can_be_null=True,
                                    null_values=[""])

        def columns(numbered_block) -> Optional[ColumnChunk]:
            table = pv.read_csv(pa.py_buffer(numbered_block[1]), read_options=read, parse_options=parse,
                                convert_options=convert)
            return self._columns(table, cols) if table.num_rows else None

        def chunks():
            # Three read buffers in turn: the block being read, the one parsed ahead, the one being encoded.
            blocks = iter_blocks(path, chunk_rows, skip_lines=int(header), buffers=3)
            for (first, block), chunk in read_ahead(blocks, columns):
                if isinstance(chunk, (pa.ArrowInvalid, _Reject)):  # Arrow refused the block: the row-by-row parser
                    texts, lines = _decoded_lines(path, first, block, skip_bad_lines, stats)
                    rows = list(csv.reader(texts, delimiter=delim))
                    kept = [(r, ln) for r, ln in zip(rows, lines) if r]  # blank lines carry no row
                    raw = self._chunk(path, [r for r, _ in kept], [ln for _, ln in kept], cols, len(cols),
                                      label_i, skip_bad_lines, stats) if kept else None
                    chunk = None if raw is None else ColumnChunk.from_raw(raw)
                elif isinstance(chunk, Exception):
                    raise chunk
                yield chunk

        return counted_chunks(path, chunks(), stats)

    @staticmethod
    def _columns(table: "pa.Table", cols: List[Column]) -> ColumnChunk:
        """The chunk of an Arrow table of string columns; _Reject when a row needs the slow path."""
        n = table.num_rows
        labels = np.full(n, np.nan, np.float32)
        cats, nums, parts = {}, {}, {}
        for c in cols:
            if c.role == "ignore":
                continue
            col = table.column(c.name)
            if c.role == "label":
                if col.null_count:
                    raise _Reject
                y = _float_column(col)
                if not np.isin(y, (0.0, 1.0)).all():
                    raise _Reject
                labels = y.astype(np.float32)
            elif c.role in ("numeric", "keep"):
                if pa.types.is_dictionary(col.type):
                    values, codes = dictionary_parts(col)
                    nums[c.name] = CodedNumbers(_float_column(values), codes)
                else:
                    nums[c.name] = _float_column(col)
            elif c.role == "sparse":
                cats[c.name] = col
            elif c.role == "multi_hot":
                col = col.combine_chunks().fill_null("")
                if c.sep:
                    lists = pc.split_pattern(col, c.sep)
                    flat = pc.list_flatten(lists)
                    rows = pc.list_parent_indices(lists).to_numpy().astype(np.int64)
                else:
                    flat, rows = col, np.arange(n)
                keep = pc.not_equal(flat, "")
                parts.setdefault(c.field_name, []).append((flat.filter(keep),
                                                           rows[keep.to_numpy(zero_copy_only=False)]))
        bags = {}
        for name, pieces in parts.items():
            rows = np.concatenate([r for _, r in pieces])
            order = np.argsort(rows, kind="stable")  # row-major; a row's tokens in column order
            flat = pa.concat_arrays([f.cast(pa.string()) for f, _ in pieces]).take(pa.array(order))
            bags[name] = (flat, np.bincount(rows, minlength=n).astype(np.int64))
        return ColumnChunk(labels, cats, nums, {}, bags, {})

    def _chunk(self, path, rows, lines, cols, ncols, label_i, skip, stats) -> Optional[RawChunk]:
        bad = _Bad(path, skip, stats)
        if any(len(r) != ncols for r in rows):
            for i, r in enumerate(rows):
                if len(r) != ncols:
                    bad.add(i, lines[i], f"expected {ncols} columns, got {len(r)}")
            keep = bad.keep_index(len(rows))
            rows = [rows[i] for i in keep]
            lines = [lines[i] for i in keep]
            bad = _Bad(path, skip, stats)
            if not rows:
                return None
        columns = list(zip(*rows))
        if label_i is None:
            labels = np.full(len(rows), np.nan)
        else:
            labels, bad_idx = _parse_floats(columns[label_i], allow_empty=False)
            for i in bad_idx:
                bad.add(i, lines[i], f"label {columns[label_i][i]!r} is not a number")
        nums = {}
        for j, c in enumerate(cols):
            if c.role in ("numeric", "keep"):
                nums[c.name], bad_idx = _parse_floats(columns[j], allow_empty=True)
                for i in bad_idx:
                    bad.add(i, lines[i], f"column {c.name!r}: {columns[j][i]!r} is not a number")
        keep = bad.keep_index(len(rows))
        if keep is not None:
            if not keep:
                return None
            columns = [[col[i] for i in keep] for col in columns]
            labels = labels[keep]
            nums = {k: v[keep] for k, v in nums.items()}
            lines = [lines[i] for i in keep]
        if label_i is not None:
            _check_labels(path, labels, lines, (0.0, 1.0))
        cats, bags = {}, {}
        for j, c in enumerate(cols):
            if c.role == "sparse":
                cats[c.name] = columns[j]
            elif c.role == "multi_hot":
                bag = bags.setdefault(c.field_name, [[] for _ in range(len(labels))])
                if c.sep:
                    for b, v in zip(bag, columns[j]):
                        b.extend(t for t in v.split(c.sep) if t)
                else:
                    for b, v in zip(bag, columns[j]):
                        if v:
                            b.append(v)
        return RawChunk(labels.astype(np.float32), cats, bags, nums, {}, {})

    def options(self) -> Dict[str, Any]:
        raise NotImplementedError

    def fix_layout(self, train: Union[str, Path], chunk_rows: int = 65536, stored: Any = None) -> None:
        """Fix what reading the training file decides for every file (nothing: a header says it)."""

    def layout_state(self) -> Any:
        """What :meth:`fix_layout` fixed, JSON-ready, for the cache and checkpoints (None: nothing)."""
        return None


def file_signature(path: Union[str, Path]) -> Dict[str, Any]:
    """What identifies a source file for the cache: absolute path, size, mtime."""
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
