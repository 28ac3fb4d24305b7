"""The packed row layout of a fused-optimizer table: one record per row.

A fused optimizer visits, for every id of a batch, that row of ``weight`` (V), of ``linear_weight``
(w) and of every optimizer state of both (Adam: six arrays and the row's last step). Stored apart,
that is one cache miss per array; packed, the row's record ``[V | V's states | w | w's states |
last step]`` is a few adjacent cache lines, read and written once. The module keeps exposing
``weight``, ``linear_weight`` and the state buffers, as views of the records with the names, shapes
and ``state_dict`` keys of separate tensors (checkpoints load both ways); the kernels read rows at
any stride.
"""
import ctypes
import sys
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

# Records and their D-wide columns start on 16 bytes: aligned vector loads (SSE/NEON, CUDA 16-byte
# loads). 64-byte padding would only cost memory at K=16: float32 records of 80 bytes (SGD, row-wise
# Adagrad) each span 2 cache lines, of 224 bytes (Adam) 4, as they fall in a 64-byte aligned table.
ALIGN_BYTES = 16

Columns = Sequence[Tuple[str, Tensor]]

HUGE_PAGE = 2 << 20  # x86-64 and arm64 (4 KiB base pages) transparent huge pages
_MADV_HUGEPAGE = 14


def advise_huge_pages(table: Tensor) -> bool:
    """Asks Linux to back a large CPU table with transparent huge pages before it is first written
    (effective where THP is "always" or "madvise"): random row accesses then miss the TLB far less
    (the forward's gather measured 1.6x faster on a 10.4 M-row table). False where not done."""
    if table.device.type != "cpu" or table.nbytes < 2 * HUGE_PAGE or not sys.platform.startswith("linux"):
        return False
    start = -(-table.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (table.data_ptr() + table.nbytes) // HUGE_PAGE * HUGE_PAGE
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):  # no libc symbol: not Linux/glibc-like
        return False


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def record_layout(columns: Columns) -> Optional[Tuple[int, Dict[str, int]]]:
    """``(record width, {name: offset})`` in elements of the columns' float dtype, or None when the
    columns cannot share a record (half/bfloat16 tables keep float32 state: two element sizes).

    ``columns``: ``[N, D]`` and ``[N]`` tensors of one float32/float64 dtype, and int64 ``[N]``
    columns (Adam's last step). The D-wide columns come first, each 16-byte aligned, then the
    one-value columns, then the int64 ones 8-byte aligned; the record is padded to 16 bytes."""
    floats = {t.dtype for _, t in columns if t.dtype != torch.int64}
    if len(floats) != 1 or floats.pop() not in (torch.float32, torch.float64):
        return None
    itemsize = next(t.element_size() for _, t in columns if t.dtype != torch.int64)
    align, int_width = ALIGN_BYTES // itemsize, 8 // itemsize
    offsets: Dict[str, int] = {}
    at = 0
    for name, t in columns:
        if t.dim() == 2:
            at = _round_up(at, align)
            offsets[name] = at
            at += t.shape[1]
    for name, t in columns:
        if t.dim() == 1 and t.dtype != torch.int64:
            offsets[name] = at
            at += 1
    for name, t in columns:
        if t.dtype == torch.int64:
            at = _round_up(at, int_width)
            offsets[name] = at
            at += int_width
    return _round_up(at, align), offsets


def _column_view(records: Tensor, offset: int, column: Tensor) -> Tensor:
    if column.dtype == torch.int64:
        return records.view(torch.int64)[:, offset * records.element_size() // 8]
    return records[:, offset:offset + column.shape[1]] if column.dim() == 2 else records[:, offset]


def is_packed(columns: Columns) -> bool:
    """The columns are already views of one record table laid out by `record_layout`."""
    layout = record_layout(columns)
    if layout is None:
        return False
    width, offsets = layout
    first = columns[0][1]
    storage = first.untyped_storage()
    itemsize = next(t.element_size() for _, t in columns if t.dtype != torch.int64)
    if storage.nbytes() != first.shape[0] * width * itemsize:
        return False
    for name, t in columns:
        if (t.untyped_storage().data_ptr() != storage.data_ptr() or t.storage_offset() * t.element_size()
                != offsets[name] * itemsize or t.stride(0) * t.element_size() != width * itemsize):
            return False
    return True


def pack(columns: Columns) -> Dict[str, Tensor]:
    """One record table holding a copy of ``columns``, as views of it by name (the columns themselves
    when they cannot be packed, see `record_layout`)."""
    layout = record_layout(columns)
    if layout is None:
        return dict(columns)
    width, offsets = layout
    first = columns[0][1]
    dtype = next(t.dtype for _, t in columns if t.dtype != torch.int64)
    records = torch.empty(first.shape[0], width, dtype=dtype, device=first.device)
    advise_huge_pages(records)  # before the first write, which allocates the pages
    views = column_views(records, columns)
    with torch.no_grad():
        records.zero_()  # the padding
        for name, t in columns:
            views[name].copy_(t)
    return views


def column_views(records: Tensor, columns: Columns) -> Dict[str, Tensor]:
    """The views of `records` [N, width] that stand for ``columns`` (laid out by `record_layout`)."""
    _, offsets = record_layout(columns)
    return {name: _column_view(records, offsets[name], t) for name, t in columns}


# Rows per chunk when a table is initialised piecewise: a multiple of 16 (see `row_chunks`).
CHUNK_ROWS = 1 << 16


def row_chunks(num_rows: int, dim: int, chunk_rows: Optional[int] = None):
    """``(start, end)`` row ranges covering ``num_rows`` rows of ``dim`` values in order, such that
    `normal_chunks_` draws the same numbers as one ``normal_`` of the whole table: CPU ``normal_``
    turns each contiguous block of 16 uniforms into normals (Box-Muller) and redraws the last 16
    when the size is not a multiple of 16, so every chunk but the last holds a multiple of 16 values
    and the last holds at least 16 (or the whole table)."""
    chunk_rows = max(16, (chunk_rows or CHUNK_ROWS) // 16 * 16)
    start = 0
    while start < num_rows:
        end = min(num_rows, start + chunk_rows)
        if 0 < (num_rows - end) * dim < 16:  # a too-short tail joins this chunk
            end = num_rows
        yield start, end
        start = end


def normal_chunk_(rows: Tensor, mean: float, std: float, scratch: Optional[Tensor] = None) -> None:
    """Draws ``rows`` (any strides) from Normal(mean, std) as a contiguous ``normal_`` of its shape would."""
    if rows.is_contiguous():
        rows.normal_(mean, std)
        return
    fresh = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device) if scratch is None else scratch
    rows.copy_(fresh.normal_(mean, std))


def normal_(table: Tensor, mean: float, std: float, chunk_rows: Optional[int] = None) -> None:
    """``table.normal_(mean, std)`` with the values of a contiguous table, in place in any strides
    (views of records), one chunk at a time: no table-sized temporary."""
    if table.device.type == "meta":
        return
    with torch.no_grad():
        if table.dim() != 2 or table.is_contiguous() or table.device.type != "cpu":
            normal_chunk_(table, mean, std)  # the chunks equal the whole only for CPU's normal_
            return
        for start, end in row_chunks(table.shape[0], table.shape[1], chunk_rows):
            normal_chunk_(table[start:end], mean, std)


RowInit = Callable[[Dict[str, Tensor]], None]


def init_chunks(num_rows: int, columns: Columns, init: RowInit, chunk_of: Callable[[int, int], Tensor]):
    """Zeroes and initialises records chunk by chunk in row order (`row_chunks` of the first column,
    the table): ``chunk_of(start, end)`` gives the records of rows ``[start, end)`` to fill, ``init``
    gets their column views. Yields each ``(start, end, chunk)`` once it is done (a file writer
    streams it out)."""
    dim = columns[0][1].shape[1] if columns[0][1].dim() == 2 else 1
    with torch.no_grad():
        for start, end in row_chunks(num_rows, dim):
            chunk = chunk_of(start, end)
            chunk.zero_()  # the padding and every zero-initialised state
            init(column_views(chunk, columns))
            yield start, end, chunk


def build(columns: Columns, device, init: RowInit) -> Dict[str, Tensor]:
    """A new record table for ``columns`` (shapes and dtypes only: meta tensors do), initialised in
    place by ``init`` (see `init_chunks`), as views by name: its peak memory is the table plus one
    chunk, where building the columns apart and packing them (`pack`) needs both."""
    width, _ = record_layout(columns)
    dtype = next(t.dtype for _, t in columns if t.dtype != torch.int64)
    num_rows = columns[0][1].shape[0]
    records = torch.empty(num_rows, width, dtype=dtype, device=device)
    advise_huge_pages(records)
    if records.device.type == "cpu":
        for _ in init_chunks(num_rows, columns, init, lambda start, end: records[start:end]):
            pass
    else:  # one chunk: other devices' normal_ draws differently in pieces
        records.zero_()
        init(column_views(records, columns))
    return column_views(records, columns)
