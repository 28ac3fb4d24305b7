"""Streaming readers: Criteo TSV/CSV, libFM/libSVM and schema-driven CSV, plain or gzip.

Each format object turns a file into :class:`RawChunk` s of at most ``chunk_rows`` rows, so
files larger than memory stream through. A malformed row (wrong column count, non-numeric
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

Formats:

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
import json
import os
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .._args import Pooling

__all__ = [
    "DataFormatError",
    "Column",
    "RawChunk",
    "ReadStats",
    "CriteoFormat",
    "LibFMFormat",
    "CSVFormat",
    "parse_schema",
    "SPARROW_MOVIELENS_SCHEMA",
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


def open_text(path: Union[str, Path]) -> io.TextIOBase:
    """Open a text file for reading, transparently gunzipping (detected by magic bytes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, "r", encoding="utf-8", newline="")


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


class _DelimitedFormat:
    """Shared engine of Criteo and schema CSV: delimited rows, fixed columns."""

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
        delim, header, cols = self._layout(path)
        ncols = len(cols)
        label_i = next((i for i, c in enumerate(cols) if c.role == "label"), None)
        with open_text(path) as fh:
            reader = csv.reader(fh, delimiter=delim)
            line = 1
            if header:
                next(reader)
                line = 2
            any_rows = False
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
                if not rows:
                    continue
                any_rows = True
                chunk = self._chunk(path, rows, lines, cols, ncols, label_i, skip_bad_lines, stats)
                if chunk is not None:
                    stats.rows += len(chunk)
                    yield chunk
            if not any_rows:
                raise DataFormatError(f"{path}: file is empty (no data rows)")

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


CRITEO_NUMERIC = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))


class CriteoFormat(_DelimitedFormat):
    """Criteo Kaggle / Terabyte rows: ``label, I1..I13 (integers), C1..C26 (hex)``.

    A file without labels (``test.txt``: ``I1..I13, C1..C26``) is read too, with NaN labels.

    Args:
        layout: ``"tsv"`` (no header, tab-separated, the original ``train.txt``), ``"csv"``
            (comma-separated with the header ``label,I1..I13,C1..C26``) or ``"auto"``.
        numeric: transform of I1..I13: ``"log1p"`` (NumericFields, log1p + standardised),
            ``"log_square"`` (SparseFields of ``floor(log(x)^2)`` buckets), ``"standardize"``
            or ``"none"``.
        min_count: categorical values seen fewer times in training go to OOV.
        hash_buckets: hash C1..C26 (and bucketed I's) instead of counting.
        missing_indicator: add a 0/1 numeric field per I column.
    """

    def __init__(self, layout: str = "auto", numeric: str = "log1p", min_count: int = 1,
                 hash_buckets: Optional[int] = None, missing_indicator: bool = False):
        if layout not in ("auto", "tsv", "csv"):
            raise ValueError(f"CriteoFormat: layout must be 'auto', 'tsv' or 'csv', got {layout!r}")
        self.layout = layout
        # log_square columns are parsed as numbers; the encoder turns them into sparse fields.
        self._cols = (
            [Column("label", "label")]
            + [Column(n, "numeric", transform=numeric, min_count=min_count,
                      hash_buckets=hash_buckets, missing_indicator=missing_indicator)
               for n in CRITEO_NUMERIC]
            + [Column(n, "sparse", min_count=min_count, hash_buckets=hash_buckets)
               for n in CRITEO_CATEGORICAL]
        )

    def _layout(self, path: Path) -> Tuple[str, bool, List[Column]]:
        layout = self.layout
        with open_text(path) as fh:
            first = fh.readline()
        _check_not_empty(path, first)
        if layout == "auto":
            if "\t" in first:
                layout = "tsv"
            elif first.startswith(("label,", "I1,")):
                layout = "csv"
            else:
                raise DataFormatError(f"{path}, line 1: cannot tell the Criteo layout (no tab, no "
                                      "'label,' or 'I1,' header); pass layout='tsv' or 'csv'")
        unlabelled = self._cols[1:]
        if layout == "csv":
            head = next(csv.reader([first]))
            want = [c.name for c in self._cols]
            if head == want[1:]:
                return ",", True, unlabelled
            if head != want:
                missing = [c for c in want[1:] if c not in head]
                raise DataFormatError(f"{path}, line 1: expected the Criteo header label,I1..I13,C1..C26 "
                                      f"(label optional); got {len(head)} columns"
                                      + (f", missing {missing}" if missing else ""))
            return ",", True, self._cols
        if first.rstrip("\r\n").count("\t") == len(unlabelled) - 1:
            return "\t", False, unlabelled
        return "\t", False, self._cols

    _no_label = "no label column: 39 columns I1..I13, C1..C26, the layout of Criteo's test.txt"

    def options(self) -> Dict[str, Any]:
        return {"format": "criteo", "layout": self.layout, "columns": [asdict(c) for c in self._cols]}


def parse_schema(schema: Union[Dict[str, Any], str, Path]) -> Dict[str, Column]:
    """Read a CSV schema: column -> role string or dict of :class:`Column` options.

    Args:
        schema: a dict, or the path of a ``.json`` / ``.yaml`` / ``.yml`` file holding one.
            Values are a role (``"sparse"``) or a dict (``{"role": "multi_hot", "sep": "|",
            "field": "genres", "pooling": "mean"}``; ``"type"`` is accepted for ``"role"``, and
            ``"name"`` if it is the column's, so a :class:`Column` as a dict reads back).
            Exactly one column must be the label. Columns of the file not in the schema are
            an error unless the schema holds ``"*": "ignore"``.
    """
    if isinstance(schema, (str, Path)):
        text = Path(schema).read_text()
        if str(schema).endswith((".yaml", ".yml")):
            import yaml

            schema = yaml.safe_load(text)
        else:
            schema = json.loads(text)
    if not isinstance(schema, dict) or not schema:
        raise ValueError(f"schema must be a non-empty mapping column -> role, got {schema!r}")
    out = {}
    for name, spec in schema.items():
        if isinstance(spec, str):
            spec = {"role": spec}
        spec = dict(spec)
        if "type" in spec:
            spec["role"] = spec.pop("type")
        if spec.pop("name", name) != name:  # a Column as a dict (asdict) names itself
            raise ValueError(f"schema column {name!r} holds another name: {spec!r}")
        out[name] = Column(name=name, **spec)
    labels = [n for n, c in out.items() if c.role == "label" and n != "*"]
    if len(labels) != 1:
        raise ValueError(f"schema must have exactly one label column, got {labels}")
    return out


#: Schema for ``shared/data/sparrow_movielens/samples.csv`` (the seed's MovieLens CTR sample):
#: ids as sparse fields, genre columns as two mean-pooled multi-hot bags, the seed's dense
#: features as numerics, ``timestamp`` kept for the time-ordered split, ``rating`` ignored
#: because it leaks the label.
SPARROW_MOVIELENS_SCHEMA: Dict[str, Any] = {
    "label": "label",
    "movieId": "sparse",
    "userId": "sparse",
    "rating": "ignore",
    "timestamp": "keep",
    "releaseYear": {"role": "numeric", "transform": "standardize"},
    **{f"movieGenre{i}": {"role": "multi_hot", "field": "movieGenre", "pooling": "mean"} for i in (1, 2, 3)},
    "movieRatingCount": "numeric",
    "movieAvgRating": {"role": "numeric", "transform": "standardize"},
    "movieRatingStddev": {"role": "numeric", "transform": "standardize"},
    **{f"userRatedMovie{i}": {"role": "multi_hot", "field": "userRatedMovie"} for i in range(1, 6)},
    "userRatingCount": "numeric",
    "userAvgReleaseYear": {"role": "numeric", "transform": "standardize"},
    "userReleaseYearStddev": {"role": "numeric", "transform": "standardize"},
    "userAvgRating": {"role": "numeric", "transform": "standardize"},
    "userRatingStddev": {"role": "numeric", "transform": "standardize"},
    **{f"userGenre{i}": {"role": "multi_hot", "field": "userGenre", "pooling": "mean"} for i in range(1, 6)},
}


class CSVFormat(_DelimitedFormat):
    """A CSV with a header, described by a schema (see :func:`parse_schema`).

    A file whose header lacks the schema's label column is read with NaN labels.

    Args:
        schema: dict or JSON/YAML path, e.g. :data:`SPARROW_MOVIELENS_SCHEMA`.
        delimiter: field separator.
    """

    def __init__(self, schema: Union[Dict[str, Any], str, Path], delimiter: str = ","):
        self.schema = parse_schema(schema)
        self.delimiter = delimiter

    def _layout(self, path: Path) -> Tuple[str, bool, List[Column]]:
        with open_text(path) as fh:
            first = fh.readline()
        _check_not_empty(path, first)
        head = next(csv.reader([first], delimiter=self.delimiter))
        missing = [n for n, c in self.schema.items() if n != "*" and c.role != "label" and n not in head]
        if missing:
            raise DataFormatError(f"{path}, line 1: schema column(s) {missing} not in the header {head}")
        default = self.schema.get("*")
        cols = []
        for name in head:
            col = self.schema.get(name)
            if col is None:
                if default is None:
                    raise DataFormatError(f"{path}, line 1: column {name!r} is not in the schema "
                                          "(add it, or '*': 'ignore')")
                col = Column(name, default.role)
            cols.append(col)
        return self.delimiter, True, cols

    @property
    def _no_label(self) -> str:
        label = next(n for n, c in self.schema.items() if c.role == "label")
        return f"the header has no label column {label!r}"

    def options(self) -> Dict[str, Any]:
        return {"format": "csv", "delimiter": self.delimiter,
                "schema": {n: asdict(c) for n, c in self.schema.items()}}


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
            with open_text(path) as fh:
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
            with open_text(path) as fh:
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
        path = Path(path)
        stats = stats if stats is not None else ReadStats()
        mode, pairs = self._mode(path, chunk_rows)
        labelled = self._has_labels(path)
        line = 1
        any_rows = False
        with open_text(path) as fh:
            while True:
                raw = list(islice(fh, chunk_rows))
                if not raw:
                    break
                first = line
                line += len(raw)
                chunk = self._chunk(path, raw, first, mode, pairs, labelled, skip_bad_lines, stats)
                if chunk is not None:
                    any_rows = True
                    stats.rows += len(chunk)
                    yield chunk
        if not any_rows and stats.bad_lines == 0:
            raise DataFormatError(f"{path}: file is empty (no rows)")

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


def file_signature(path: Union[str, Path]) -> Dict[str, Any]:
    """What identifies a source file for the cache: absolute path, size, mtime."""
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
