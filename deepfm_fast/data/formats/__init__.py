"""The file formats, as a registry: one module per format, one protocol the cache and CLI rely on.

``--format NAME`` and the format specs a checkpoint stores look formats up in :data:`REGISTRY`;
a new format is one module with a class that follows :class:`Format`, registered with
:func:`register_format`. The cache asks a format (``options``, ``fix_layout``, ``layout_state``),
never its fields.

Format specs: a file format as plain JSON, so that a checkpoint reads new files as training did.
``deepfm-fast train`` stores the spec of its format in ``best.pt``; ``evaluate`` and ``predict``
rebuild the format from it, without the original flags or schema file::

    spec = format_spec("csv", schema="schema.yaml")       # {"format": "csv", "kwargs": {"schema": {...}}}
    fmt = make_format(spec)
    data = prepare_data(fmt, "train.csv")
    spec = trained_spec(spec, fmt)                         # + what reading the training file fixed
    ...
    fmt = make_format(spec)                                # later, in another process

The spec holds the parsed schema itself (not its path) and, for libFM, the layout (position or
bag, pairs per row) found in the training file, which every other file must then follow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Protocol, Union, runtime_checkable

from ..columnar import ColumnChunk
from ..readers import Column, RawChunk, ReadStats
from .criteo import CriteoFormat
from .csv import BUILTIN_SCHEMAS, CSVFormat
from .libfm import LibFMFormat

__all__ = ["FORMATS", "REGISTRY", "BUILTIN_SCHEMAS", "Format", "register_format", "format_spec", "make_format",
           "trained_spec"]


@runtime_checkable
class Format(Protocol):
    """What a file format provides (see :class:`CriteoFormat` for one)."""

    def columns(self, path: Union[str, Path]) -> List[Column]:
        """The columns of ``path`` (may read its first line)."""

    def no_label_reason(self, path: Union[str, Path]) -> Optional[str]:
        """None when ``path`` has labels; else why it has none."""

    def read_columns(self, path: Union[str, Path], chunk_rows: int = 65536, skip_bad_lines: bool = False,
                     stats: Optional[ReadStats] = None) -> Iterator[ColumnChunk]:
        """The columnar path: validated chunks of ``path``."""

    def read(self, path: Union[str, Path], chunk_rows: int = 65536, skip_bad_lines: bool = False,
             stats: Optional[ReadStats] = None) -> Iterator[RawChunk]:
        """The row-by-row path (fallback and reference)."""

    def options(self) -> Dict[str, Any]:
        """JSON-ready options: part of the cache key."""

    def fix_layout(self, train: Union[str, Path], chunk_rows: int = 65536, stored: Any = None) -> None:
        """Fix what the training file decides for every file (``stored``: from the cache)."""

    def layout_state(self) -> Any:
        """What :meth:`fix_layout` fixed, JSON-ready (None: nothing)."""

    @classmethod
    def spec_kwargs(cls, *, schema=None, min_count: int = 1, hash_buckets: Optional[int] = None) -> Dict[str, Any]:
        """Constructor arguments from the command-line options."""


#: Format name (as ``--format`` takes it) -> class.
REGISTRY: Dict[str, type] = {}


def register_format(name: str, cls: type) -> None:
    """Make ``cls`` available as ``--format name`` and in format specs."""
    REGISTRY[name] = cls
    global FORMATS
    FORMATS = tuple(REGISTRY)


register_format("criteo", CriteoFormat)
register_format("libfm", LibFMFormat)
register_format("csv", CSVFormat)
#: Format names, as ``--format`` takes them.
FORMATS = tuple(REGISTRY)


def _cls(kind: str) -> type:
    if kind not in REGISTRY:
        raise ValueError(f"unknown format {kind!r}; choose from {list(REGISTRY)}")
    return REGISTRY[kind]


def format_spec(kind: str, *, schema: Optional[Union[str, Path]] = None, min_count: int = 1,
                hash_buckets: Optional[int] = None) -> Dict[str, Any]:
    """The spec of format ``kind`` (one of :data:`FORMATS`).

    Args:
        kind: ``"criteo"``, ``"libfm"`` or ``"csv"``.
        schema: csv only (and required there): a JSON/YAML schema file or a name in
            :data:`BUILTIN_SCHEMAS`.
        min_count: criteo and libfm: categorical values seen fewer times in training go to OOV.
            (A csv schema sets ``min_count`` per column.)
        hash_buckets: hash categorical values into this many buckets instead of counting (csv:
            the columns whose schema sets none).
    """
    return {"format": kind, "kwargs": _cls(kind).spec_kwargs(schema=schema, min_count=min_count,
                                                             hash_buckets=hash_buckets)}


def make_format(spec: Dict[str, Any]) -> Format:
    """The reader described by ``spec`` (from :func:`format_spec` or :func:`trained_spec`)."""
    cls = _cls(spec["format"])
    from_spec = getattr(cls, "from_spec", None)
    return from_spec(spec["kwargs"]) if from_spec is not None else cls(**spec["kwargs"])


def trained_spec(spec: Dict[str, Any], fmt: Format) -> Dict[str, Any]:
    """``spec`` plus what :func:`~deepfm_fast.data.prepare_data` fixed in ``fmt`` (the libFM layout)."""
    state = fmt.layout_state()
    if state is None:
        return spec
    return {"format": spec["format"], "kwargs": {**spec["kwargs"], "layout": state}}
