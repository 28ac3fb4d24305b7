"""Encoded data held as whole tensors, batches by slicing them, and the CSR form of a batch.

Per-row ``Dataset.__getitem__`` plus a collate function costs microseconds per row, which at
B=4096 is tens of milliseconds: as long as a training step. Here a batch is a handful of
``index_select`` calls on column tensors, so the data path stays far below a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .. import _args
from ..features import FieldSpec, MultiHotField, NumericField, SparseField

__all__ = ["EncodedDataset", "Batch", "iterate_batches", "to_csr", "field_offsets"]


class Batch(NamedTuple):
    """One training batch. Shapes use ``B`` rows, ``Fs`` sparse and ``Fn`` numeric fields.

    Attributes:
        sparse: int64 ``[B, Fs]`` local ids of the SparseFields.
        multi_hot: one int64 ``[B, L_i]`` per MultiHotField, ``-1`` = padding.
        numeric: float32 ``[B, Fn]`` transformed values of the NumericFields.
        labels: float32 ``[B]`` in {0, 1}; NaN when unknown.
        sparse_weights: float32 ``[B, Fs]`` per-id values (libFM ``id:value``), or None (all 1).
        multi_hot_weights: one float32 ``[B, L_i]`` or None per MultiHotField.
    """

    sparse: torch.Tensor
    multi_hot: Tuple[torch.Tensor, ...]
    numeric: torch.Tensor
    labels: torch.Tensor
    sparse_weights: Optional[torch.Tensor] = None
    multi_hot_weights: Tuple[Optional[torch.Tensor], ...] = ()


@dataclass
class EncodedDataset:
    """A whole split as column tensors, ready to batch.

    The i-th SparseField in ``fields`` is column i of ``sparse``, the i-th MultiHotField is
    ``multi_hot[i]``, the i-th NumericField is column i of ``numeric``; ``fields`` itself fixes
    the order in which the model sees the fields (and the table layout of :func:`to_csr`).

    Attributes:
        fields: the specs, in model order.
        labels: float32 ``[R]``; NaN when unknown (a file read without labels, to predict on).
        sparse: int64 or int32 ``[R, Fs]`` (the cache stores int32), local ids ``0..vocab_size-1``;
            batches hold them as int64.
        multi_hot: tuple of int64 ``[R, L_i]``, ``-1``-padded bags.
        numeric: float32 ``[R, Fn]``.
        sparse_weights: optional float32 ``[R, Fs]`` (None means every weight is 1).
        multi_hot_weights: tuple (one per MultiHotField) of float32 ``[R, L_i]`` or None.
        extra: non-feature columns kept for splitting, e.g. ``{"timestamp": float64 [R]}``.
    """

    fields: List[FieldSpec]
    labels: torch.Tensor
    sparse: torch.Tensor
    multi_hot: Tuple[torch.Tensor, ...]
    numeric: torch.Tensor
    sparse_weights: Optional[torch.Tensor] = None
    multi_hot_weights: Tuple[Optional[torch.Tensor], ...] = ()
    extra: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fields = list(self.fields)
        self.multi_hot = tuple(self.multi_hot)
        n_mh = sum(isinstance(f, MultiHotField) for f in self.fields)
        if not self.multi_hot_weights:
            self.multi_hot_weights = (None,) * n_mh
        self.multi_hot_weights = tuple(self.multi_hot_weights)
        r = self.labels.shape[0]
        n_sp = sum(isinstance(f, SparseField) for f in self.fields)
        n_num = sum(isinstance(f, NumericField) for f in self.fields)

        def check(name: str, t: Optional[torch.Tensor], dtype: torch.dtype, rows: int,
                  cols: Optional[int] = None, dtypes: Tuple[torch.dtype, ...] = ()) -> None:
            want = f"{dtype} [{rows}, {'L' if cols is None else cols}]"
            if t is None:
                return
            if t.dtype not in (dtype, *dtypes) or t.dim() != 2 or t.shape[0] != rows or cols not in (None, t.shape[1]):
                raise ValueError(f"EncodedDataset: {name} must be {want}, got {t.dtype} {list(t.shape)}")

        if self.labels.dtype != torch.float32 or self.labels.dim() != 1:
            raise ValueError(f"EncodedDataset: labels must be float32 [R], got "
                             f"{self.labels.dtype} {tuple(self.labels.shape)}")
        check("sparse", self.sparse, torch.int64, r, n_sp, dtypes=(torch.int32,))
        check("numeric", self.numeric, torch.float32, r, n_num)
        check("sparse_weights", self.sparse_weights, torch.float32, r, n_sp)
        if len(self.multi_hot) != n_mh or len(self.multi_hot_weights) != n_mh:
            raise ValueError(f"EncodedDataset: {n_mh} MultiHotFields but {len(self.multi_hot)} "
                             f"multi_hot tensors and {len(self.multi_hot_weights)} weight entries")
        for i, (ids, w) in enumerate(zip(self.multi_hot, self.multi_hot_weights)):
            check(f"multi_hot[{i}]", ids, torch.int64, r)
            if w is not None:
                check(f"multi_hot_weights[{i}]", w, torch.float32, r, ids.shape[1])
        for k, v in self.extra.items():
            if v.shape[:1] != (r,):
                raise ValueError(f"EncodedDataset: extra[{k!r}] has {v.shape[0]} rows, expected {r}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def has_labels(self) -> bool:
        """False when some label is unknown (NaN): such a dataset can be predicted, not evaluated."""
        return not bool(torch.isnan(self.labels).any())

    @property
    def positive_rate(self) -> float:
        return float(self.labels.mean()) if len(self) else float("nan")

    def subset(self, index: torch.Tensor) -> "EncodedDataset":
        """Rows ``index`` (int64 ``[r]`` or a bool mask ``[R]``), copied into new tensors."""
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        index = index.to(torch.int64)

        def take(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.index_select(0, index)

        return EncodedDataset(
            fields=self.fields,
            labels=take(self.labels),
            sparse=take(self.sparse),
            multi_hot=tuple(take(t) for t in self.multi_hot),
            numeric=take(self.numeric),
            sparse_weights=take(self.sparse_weights),
            multi_hot_weights=tuple(take(t) for t in self.multi_hot_weights),
            extra={k: take(v) for k, v in self.extra.items()},
        )

    def random_split(self, fraction: float, seed: int = 0) -> Tuple["EncodedDataset", "EncodedDataset"]:
        """Random ``(1 - fraction, fraction)`` split, e.g. a validation hold-out.

        Args:
            fraction: share of rows in the second part, in (0, 1).
            seed: same seed, same split.
        """
        _check_fraction(fraction)
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self), generator=gen)
        n2 = int(round(len(self) * fraction))
        return self.subset(perm[n2:].sort().values), self.subset(perm[:n2].sort().values)

    def ordered_split(self, fraction: float, by: Optional[str] = None) -> Tuple["EncodedDataset", "EncodedDataset"]:
        """Head/tail split for time-ordered data: the last ``fraction`` of rows go second.

        Args:
            fraction: share of rows in the tail, in (0, 1).
            by: name of an ``extra`` column (e.g. ``"timestamp"``) to order by first (stable);
                None keeps file order.
        """
        _check_fraction(fraction)
        if by is None:
            order = torch.arange(len(self))
        else:
            if by not in self.extra:
                raise KeyError(f"ordered_split: no extra column {by!r}; have {sorted(self.extra)}")
            order = torch.sort(self.extra[by], stable=True).indices
        n1 = len(self) - int(round(len(self) * fraction))
        return self.subset(order[:n1]), self.subset(order[n1:])


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")


def iterate_batches(
    dataset: EncodedDataset,
    batch_size: int,
    shuffle: bool = False,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    drop_last: bool = False,
    shard: Optional[Tuple[int, int]] = None,
) -> Iterator[Batch]:
    """Yield :class:`Batch` es by slicing the dataset's tensors.

    Args:
        dataset: the split to iterate.
        batch_size: rows per batch (the last one may be smaller unless ``drop_last``).
        shuffle: draw a fresh permutation (one ``torch.randperm``) for this pass.
        generator: source of the permutation; keep one generator across epochs for a
            different but reproducible order per epoch.
        seed: alternative to ``generator``: a new generator seeded with it (same order each call).
        drop_last: skip a final short batch.
        shard: ``(rank, world_size)`` for data-parallel training: every batch of ``batch_size`` rows
            (the global batch) is split into ``world_size`` contiguous shares as equal as
            ``torch.tensor_split`` makes them, and this rank's share is yielded. With the same
            permutation on every rank (the same ``generator`` seed) the ranks see disjoint rows.

    Without shuffling the batches are views of the dataset's tensors; do not modify them in place.
    """
    if batch_size < 1:
        raise ValueError(f"iterate_batches: batch_size must be >= 1, got {batch_size}")
    n = len(dataset)
    perm = None
    if shuffle:
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else seed)
        perm = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if shard is not None:
            rank, world = shard
            stop_row = min(start + batch_size, n)
            global_rows = torch.arange(start, stop_row) if perm is None else perm[start:stop_row]
            idx = torch.tensor_split(global_rows, world)[rank]

            def take(t, idx=idx):
                return None if t is None else t.index_select(0, idx)
        elif perm is None:
            rows = slice(start, min(start + batch_size, n))

            def take(t, rows=rows):
                return None if t is None else t[rows]
        else:
            idx = perm[start:start + batch_size]

            def take(t, idx=idx):
                return None if t is None else t.index_select(0, idx)
        yield Batch(
            sparse=take(dataset.sparse).to(torch.int64),
            multi_hot=tuple(take(t) for t in dataset.multi_hot),
            numeric=take(dataset.numeric),
            labels=take(dataset.labels),
            sparse_weights=take(dataset.sparse_weights),
            multi_hot_weights=tuple(take(t) for t in dataset.multi_hot_weights),
        )


def field_offsets(fields: Sequence[FieldSpec]) -> torch.Tensor:
    """int64 ``[F]``: first row of each field in the shared table (exclusive cumsum of sizes)."""
    return _args.field_offsets([f.vocab_size for f in fields])


def to_csr(batch: Batch, fields: Sequence[FieldSpec]) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Turn a batch into the CSR bags the fused embedding+FM op takes, over ONE table.

    Field ``f`` owns table rows ``[off_f, off_f + vocab_size_f)`` with ``off_f`` the sum of the
    earlier fields' sizes; a NumericField owns one row and uses its value as the weight.
    Bags are sample-major: bag ``b * F + f`` is field ``f`` of sample ``b``.

    Args:
        batch: a :class:`Batch` whose tensors match ``fields``.
        fields: the specs, in model order.

    Returns:
        ``indices`` int64 ``[nnz]``, global rows; ``offsets`` int64 ``[B*F + 1]``, bag starts
        (``offsets[-1] == nnz``); ``per_sample_weights`` float32 ``[nnz]``, or None when every
        weight would be 1 (no numeric field, no weighted ids). Mean pooling is left to the
        kernel, so weights stay raw values. Padding (``-1``) is dropped; a bag may be empty.
    """
    b = batch.labels.shape[0]
    base = field_offsets(fields)
    id_blocks, w_blocks, widths = [], [], []
    weighted = False
    i_sp = i_mh = i_num = 0
    for f in fields:
        if isinstance(f, SparseField):
            ids = batch.sparse[:, i_sp:i_sp + 1]
            w = None if batch.sparse_weights is None else batch.sparse_weights[:, i_sp:i_sp + 1]
            i_sp += 1
        elif isinstance(f, MultiHotField):
            ids = batch.multi_hot[i_mh]
            w = batch.multi_hot_weights[i_mh] if batch.multi_hot_weights else None
            i_mh += 1
        else:
            ids = torch.zeros(b, 1, dtype=torch.int64)
            w = batch.numeric[:, i_num:i_num + 1]
            i_num += 1
        weighted |= w is not None
        id_blocks.append(ids)
        w_blocks.append(w)
        widths.append(ids.shape[1])
    ids = torch.cat(id_blocks, 1)                      # [B, W], fields side by side
    widths_t = torch.tensor(widths, dtype=torch.int64)
    col_field = torch.repeat_interleave(torch.arange(len(fields)), widths_t)  # [W]
    mask = ids >= 0
    # Row-major flattening of [B, W] is sample-major, then field order: exactly the bag order.
    indices = (ids + base[col_field])[mask]
    counts = torch.zeros(b, len(fields), dtype=torch.int64).index_add_(1, col_field, mask.long())
    offsets = torch.zeros(b * len(fields) + 1, dtype=torch.int64)
    torch.cumsum(counts.flatten(), 0, out=offsets[1:])
    weights = None
    if weighted:
        w_full = torch.cat([torch.ones(b, wd) if w is None else w for w, wd in zip(w_blocks, widths)], 1)
        weights = w_full[mask].to(torch.float32)
    return indices, offsets, weights
