"""A header CSV described by a schema: column -> role (label, sparse, multi_hot, numeric, keep, ignore)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from ..readers import Column, DataFormatError, _check_not_empty, _DelimitedFormat, open_text

__all__ = ["CSVFormat", "parse_schema", "SPARROW_MOVIELENS_SCHEMA", "BUILTIN_SCHEMAS"]

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
        with open_text(path, errors="replace") as fh:
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

    @classmethod
    def spec_kwargs(cls, *, schema=None, min_count: int = 1, hash_buckets: Optional[int] = None) -> Dict[str, Any]:
        """The constructor arguments of the command-line options (see ``format_spec``): the parsed
        schema itself (not its path); ``hash_buckets`` hashes every sparse/multi_hot column whose
        schema sets none. (``min_count`` is set per column in the schema.)"""
        if schema is None:
            raise ValueError("the csv format needs a schema (a JSON/YAML file, or one of "
                             f"{sorted(BUILTIN_SCHEMAS)})")
        if str(schema) in BUILTIN_SCHEMAS:
            columns = parse_schema(BUILTIN_SCHEMAS[str(schema)])
        elif not Path(schema).is_file():
            raise FileNotFoundError(f"schema file {schema} not found")
        else:
            columns = parse_schema(schema)
        if hash_buckets is not None:
            columns = {n: replace(c, hash_buckets=hash_buckets)
                       if c.role in ("sparse", "multi_hot") and c.hash_buckets is None else c
                       for n, c in columns.items()}
        return {"schema": {n: asdict(c) for n, c in columns.items()}}


#: Schemas known by name, for ``--schema NAME`` instead of a file.
BUILTIN_SCHEMAS: Dict[str, Dict[str, Any]] = {"sparrow_movielens": SPARROW_MOVIELENS_SCHEMA}
