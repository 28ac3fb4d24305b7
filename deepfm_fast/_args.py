"""Argument normalisation shared by the fused ops, their reference and the modules.

A ground-floor module: it imports no other part of deepfm_fast, so every floor may import it.
"""
import enum
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

MODES = {"field": 0, "feature": 1}


class Pooling(enum.IntEnum):
    """How a bag of embeddings is pooled; the value is the kernels' code (enum Pooling in
    csrc/checks.h). Everything that takes a pooling takes one of these or its name."""

    SUM = 0
    MEAN = 1

    @classmethod
    def parse(cls, pooling: Union["Pooling", str], owner: str = "embedding_fm") -> "Pooling":
        """``Pooling.MEAN`` or ``"mean"`` -> ``Pooling.MEAN``; a clear error naming ``owner`` otherwise."""
        if isinstance(pooling, cls):
            return pooling
        if isinstance(pooling, str) and pooling.upper() in cls.__members__ and pooling == pooling.lower():
            return cls[pooling.upper()]
        raise ValueError(f"{owner}: pooling must be one of {cls.names()}, got {pooling!r}")

    @classmethod
    def names(cls) -> tuple:
        """``("sum", "mean")``: the names the command line, configs and field specs use."""
        return tuple(p.name.lower() for p in cls)

    def __str__(self) -> str:
        return self.name.lower()


class EmbeddingFMOutput(NamedTuple):
    """What `embedding_fm` returns: ``fm [B]``, ``linear [B]`` and ``pooled [B, F, K]`` (or an empty
    tensor when ``return_pooled=False``)."""

    fm: Tensor
    linear: Tensor
    pooled: Tensor


def mode_code(mode: str) -> int:
    """``"field"`` -> 0, ``"feature"`` -> 1 (the ``mode`` argument of the compiled ops)."""
    if mode not in MODES:
        raise ValueError(f"embedding_fm: mode must be one of {tuple(MODES)}, got {mode!r}")
    return MODES[mode]


def pooling_codes(pooling: Union[str, Pooling, Sequence[Union[str, Pooling]]], num_fields: int) -> list:
    """A `Pooling` (or its name) for every field, or one per field -> list of ints (0 sum, 1 mean)."""
    if isinstance(pooling, (str, Pooling)):
        names = [pooling]
    else:
        names = list(pooling)
        if len(names) != num_fields:
            raise ValueError(f"embedding_fm: pooling must be a str or have one entry per field "
                             f"(num_fields = {num_fields}), got {len(names)} entries")
    return [int(Pooling.parse(name)) for name in names]


def as_csr(indices: Tensor, offsets: Optional[Tensor], per_sample_weights: Optional[Tensor],
           num_fields: Optional[int]):
    """Ids ``[B, F]`` (offsets None) or CSR -> (indices [nnz], offsets [B*F+1], weights [nnz] or None, F)."""
    if offsets is None:
        if indices.dim() != 2:
            raise ValueError(f"embedding_fm: without offsets, indices must be [batch, num_fields] (one id per "
                             f"field), got shape {tuple(indices.shape)}")
        batch, fields = indices.shape
        if num_fields is not None and num_fields != fields:
            raise ValueError(f"embedding_fm: num_fields = {num_fields} but indices has {fields} columns")
        offsets_dtype = indices.dtype if indices.dtype in (torch.int32, torch.int64) else torch.int64
        offsets = torch.arange(batch * fields + 1, dtype=offsets_dtype, device=indices.device)
        indices = indices.reshape(-1)
        if per_sample_weights is not None:
            if per_sample_weights.shape != (batch, fields) and per_sample_weights.shape != (batch * fields,):
                raise ValueError(f"embedding_fm: per_sample_weights must have shape [{batch}, {fields}] like "
                                 f"indices (or [{batch * fields}]), got {tuple(per_sample_weights.shape)}")
            per_sample_weights = per_sample_weights.reshape(-1)
        return indices, offsets, per_sample_weights, fields
    if num_fields is None:
        raise ValueError("embedding_fm: num_fields is required with CSR input (indices [nnz], offsets [B*F+1])")
    return indices, offsets, per_sample_weights, num_fields


def field_offsets(field_dims: Sequence[int]) -> Tensor:
    """int64 ``[F]``: the first row of each field in a table that stacks the fields' row blocks."""
    sizes = torch.tensor([int(d) for d in field_dims], dtype=torch.int64)
    return torch.cumsum(sizes, 0) - sizes
