"""Feature specs: the small objects that tell the data pipeline and the model what each field is.

A DeepFM sees a sample as ``F`` fields. Each field owns a block of rows in one shared embedding
table and contributes one pooled vector ``e_f`` to the FM and to the DNN input:

=================  ===================================  =========================================
spec               what a row holds                     table rows it uses
=================  ===================================  =========================================
``SparseField``    one id in ``0..vocab_size-1``        ``vocab_size``
``MultiHotField``  a bag of ids (e.g. a genre list),    ``vocab_size``; the bag is pooled by
                   possibly empty                       ``"sum"`` or ``"mean"``
``NumericField``   one float value                      1 (the row is scaled by the value)
=================  ===================================  =========================================

Example::

    >>> fields = [SparseField("user", 1000), MultiHotField("genres", 20, pooling="mean"),
    ...           NumericField("age")]
    >>> [field_from_dict(f.to_dict()) for f in fields] == fields
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Union

from ._args import Pooling

__all__ = [
    "SparseField",
    "MultiHotField",
    "NumericField",
    "FieldSpec",
    "field_from_dict",
    "fields_to_dicts",
    "fields_from_dicts",
    "table_size",
]



def _check_name(kind: str, name: object) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind}: name must be a non-empty string, got {name!r}")


def _check_vocab(kind: str, name: str, vocab_size: object) -> None:
    # bool is an int subclass; True as a vocabulary size is always a mistake.
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"{kind} {name!r}: vocab_size must be an int >= 1, got {vocab_size!r}")


@dataclass(frozen=True)
class SparseField:
    """A categorical field with exactly one id per row.

    Args:
        name: field name, unique among the fields of a model.
        vocab_size: number of local ids; a row's id is in ``0..vocab_size-1``.
    """

    name: str
    vocab_size: int

    def __post_init__(self) -> None:
        _check_name("SparseField", self.name)
        _check_vocab("SparseField", self.name, self.vocab_size)

    def to_dict(self) -> Dict[str, Any]:
        return {"type": "sparse", "name": self.name, "vocab_size": self.vocab_size}


@dataclass(frozen=True)
class MultiHotField:
    """A categorical field with a bag of ids per row (genre lists, tags, libFM rows).

    Args:
        name: field name.
        vocab_size: number of local ids.
        pooling: ``"sum"`` or ``"mean"`` of the bag's (weighted) embeddings. An empty bag
            pools to the zero vector.
    """

    name: str
    vocab_size: int
    pooling: str = "sum"

    def __post_init__(self) -> None:
        _check_name("MultiHotField", self.name)
        _check_vocab("MultiHotField", self.name, self.vocab_size)
        # Stored by name ("sum" / "mean"), as to_dict writes it.
        object.__setattr__(self, "pooling", str(Pooling.parse(self.pooling, f"MultiHotField {self.name!r}")))

    def to_dict(self) -> Dict[str, Any]:
        return {
            "type": "multi_hot",
            "name": self.name,
            "vocab_size": self.vocab_size,
            "pooling": self.pooling,
        }


@dataclass(frozen=True)
class NumericField:
    """A dense field: one float per row. It enters the FM as one table row times the value.

    Args:
        name: field name.
    """

    name: str

    def __post_init__(self) -> None:
        _check_name("NumericField", self.name)

    @property
    def vocab_size(self) -> int:
        """Rows this field occupies in the shared table (always 1)."""
        return 1

    def to_dict(self) -> Dict[str, Any]:
        return {"type": "numeric", "name": self.name}


FieldSpec = Union[SparseField, MultiHotField, NumericField]


def field_from_dict(d: Dict[str, Any]) -> FieldSpec:
    """Rebuild a spec from ``spec.to_dict()`` (e.g. read back from JSON)."""
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError(f"field_from_dict: expected a dict with a 'type' key, got {d!r}")
    kind = d["type"]
    args = {k: v for k, v in d.items() if k != "type"}
    cls = {"sparse": SparseField, "multi_hot": MultiHotField, "numeric": NumericField}.get(kind)
    if cls is None:
        raise ValueError(
            f"field_from_dict: unknown type {kind!r} in {d!r}; "
            "expected 'sparse', 'multi_hot' or 'numeric'"
        )
    try:
        return cls(**args)
    except TypeError as exc:
        raise ValueError(f"field_from_dict: bad keys for a {kind} field in {d!r}: {exc}") from None


def fields_to_dicts(fields: Sequence[FieldSpec]) -> List[Dict[str, Any]]:
    """JSON-ready list of field dicts, in order."""
    return [f.to_dict() for f in fields]


def fields_from_dicts(dicts: Sequence[Dict[str, Any]]) -> List[FieldSpec]:
    """Inverse of :func:`fields_to_dicts`; also checks that names are unique."""
    fields = [field_from_dict(d) for d in dicts]
    names = [f.name for f in fields]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"field names must be unique, repeated: {dup}")
    return fields


def table_size(fields: Sequence[FieldSpec]) -> int:
    """Rows of the one shared table that holds every field (numeric fields take one row)."""
    return sum(f.vocab_size for f in fields)
