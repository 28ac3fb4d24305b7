"""Format specs: a file format as plain JSON, so that a checkpoint reads new files as training did.

``deepfm-fast train`` stores the spec of its format in ``best.pt``; ``evaluate`` and ``predict``
rebuild the format from it, without the original flags or schema file::

    spec = format_spec("csv", schema="schema.yaml")       # {"format": "csv", "kwargs": {"schema": {...}}}
    fmt = make_format(spec)
    data = prepare_data(fmt, "train.csv")
    spec = trained_spec(spec, fmt)                         # + what reading the training file fixed
    ...
    fmt = make_format(spec)                                # later, in another process

The spec holds the parsed schema itself (not its path) and, for libFM, the layout (position or
bag, pairs per row) found in the training file, which every other file must then follow. The
readers themselves are in :mod:`deepfm_fast.data.readers`; this module only names and rebuilds
them.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Union

from .readers import SPARROW_MOVIELENS_SCHEMA, CriteoFormat, CSVFormat, LibFMFormat, parse_schema

__all__ = ["FORMATS", "BUILTIN_SCHEMAS", "Format", "format_spec", "make_format", "trained_spec"]

#: Format names, as ``--format`` takes them.
FORMATS = ("criteo", "libfm", "csv")
#: Schemas known by name, for ``--schema NAME`` instead of a file.
BUILTIN_SCHEMAS: Dict[str, Dict[str, Any]] = {"sparrow_movielens": SPARROW_MOVIELENS_SCHEMA}

Format = Union[CriteoFormat, LibFMFormat, CSVFormat]


def format_spec(kind: str, *, schema: Optional[Union[str, Path]] = None, min_count: int = 1) -> Dict[str, Any]:
    """The spec of format ``kind`` (one of :data:`FORMATS`).

    Args:
        kind: ``"criteo"``, ``"libfm"`` or ``"csv"``.
        schema: csv only (and required there): a JSON/YAML schema file or a name in
            :data:`BUILTIN_SCHEMAS`.
        min_count: criteo and libfm: categorical values seen fewer times in training go to OOV.
            (A csv schema sets ``min_count`` per column.)
    """
    if kind not in FORMATS:
        raise ValueError(f"unknown format {kind!r}; choose from {list(FORMATS)}")
    if kind != "csv":
        return {"format": kind, "kwargs": {"min_count": min_count}}
    if schema is None:
        raise ValueError("the csv format needs a schema (a JSON/YAML file, or one of "
                         f"{sorted(BUILTIN_SCHEMAS)})")
    if str(schema) in BUILTIN_SCHEMAS:
        return {"format": kind, "kwargs": {"schema": BUILTIN_SCHEMAS[str(schema)]}}
    if not Path(schema).is_file():
        raise FileNotFoundError(f"schema file {schema} not found")
    return {"format": kind, "kwargs": {"schema": {n: asdict(c) for n, c in parse_schema(schema).items()}}}


def make_format(spec: Dict[str, Any]) -> Format:
    """The reader described by ``spec`` (from :func:`format_spec` or :func:`trained_spec`)."""
    kind, kw = spec["format"], dict(spec["kwargs"])
    if kind == "criteo":
        return CriteoFormat(**kw)
    if kind == "libfm":
        layout = kw.pop("layout", None)
        fmt = LibFMFormat(**kw)
        if layout is not None:
            fmt.set_layout(*layout)
        return fmt
    if kind == "csv":
        return CSVFormat(**kw)
    raise ValueError(f"unknown format {kind!r} in the format spec; choose from {list(FORMATS)}")


def trained_spec(spec: Dict[str, Any], fmt: Format) -> Dict[str, Any]:
    """``spec`` plus what :func:`~deepfm_fast.data.prepare_data` fixed in ``fmt`` (the libFM layout)."""
    if isinstance(fmt, LibFMFormat) and fmt.layout is not None:
        return {"format": spec["format"], "kwargs": {**spec["kwargs"], "layout": list(fmt.layout)}}
    return spec
