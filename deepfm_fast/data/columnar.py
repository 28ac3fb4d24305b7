"""The columnar reading path: raw bytes -> blocks of whole lines -> Arrow columns, no per-value Python.

A file is read in blocks of whole lines (:func:`iter_blocks`; at most ``chunk_rows`` lines and about
``block_bytes`` bytes each, gzip detected by its magic bytes). A format parses a block with Arrow
(``pyarrow.csv.read_csv`` on the block, multi-threaded; or Arrow's string kernels for libFM) into a
:class:`ColumnChunk`. When Arrow rejects a block (a malformed row, invalid UTF-8, a value that is not
a number), the format re-reads that block alone through its row-by-row parser, which names the file
and line of the bad row or skips and counts it: the slow path runs only on bad blocks.

Categorical values stay Arrow strings (or dictionary arrays) up to the vocabulary, which counts and
looks them up with Arrow kernels (:mod:`deepfm_fast.data.vocab`); hashed ids use :func:`crc32_utf8`,
a vectorised CRC-32 equal to ``zlib.crc32`` of the UTF-8 bytes.
"""

from __future__ import annotations

import gzip
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterable, Iterator, Tuple, TypeVar, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

T = TypeVar("T")

__all__ = ["ColumnChunk", "CodedNumbers", "dense_numbers", "iter_blocks", "read_ahead", "lines_array", "crc32_utf8",
           "open_binary", "BLOCK_BYTES", "PARSE_THREADS"]

#: Bytes read per block at most (a block always ends at a line end).
BLOCK_BYTES = 32 << 20


@dataclass
class CodedNumbers:
    """A numeric column as its distinct numbers and a code per row: what a dictionary parse gives,
    and far less work than the numbers row by row when they repeat (a count column of Criteo holds
    a few hundred distinct values in a million rows): transforms run on ``values`` only.

    Attributes:
        values: float64 ``[d]`` (NaN = missing; two codes may hold the same number).
        codes: int32 ``[n]`` into ``values``; -1 = missing.
    """

    values: np.ndarray
    codes: np.ndarray

    def __len__(self) -> int:
        return len(self.codes)

    def dense(self) -> np.ndarray:
        """float64 ``[n]``, NaN = missing."""
        return np.append(self.values, np.nan)[self.codes]


def dense_numbers(x) -> np.ndarray:
    """float64 ``[n]`` of a numeric column in either form (``np.ndarray`` or :class:`CodedNumbers`)."""
    return x.dense() if isinstance(x, CodedNumbers) else x


@dataclass
class ColumnChunk:
    """Parsed, validated rows in columns (``n`` rows), ready for the encoder.

    Attributes:
        labels: float32 ``[n]`` in {0, 1}; NaN for every row of a file without labels.
        cats: sparse column -> ``n`` Arrow strings (string or dictionary array); null or ``''`` = missing.
        nums: numeric/keep column -> float64 ``[n]`` (NaN = missing) or :class:`CodedNumbers`.
        weights: sparse column -> float32 ``[n]`` (libFM values).
        bags: multi_hot field -> (flat Arrow strings, int64 ``[n]`` tokens per row), row-major.
        bag_weights: multi_hot field -> float32 flat values (libFM only).
    """

    labels: np.ndarray
    cats: Dict[str, pa.Array]
    nums: Dict[str, Union[np.ndarray, CodedNumbers]]
    weights: Dict[str, np.ndarray]
    bags: Dict[str, Tuple[pa.Array, np.ndarray]]
    bag_weights: Dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def from_raw(cls, raw) -> "ColumnChunk":
        """The columns of a row-by-row :class:`~deepfm_fast.data.readers.RawChunk` (the slow path)."""
        bags = {}
        for name, lists in raw.bags.items():
            lengths = np.fromiter((len(b) for b in lists), np.int64, len(lists))
            bags[name] = (pa.array([t for b in lists for t in b], pa.string()), lengths)
        bag_w = {name: np.fromiter((v for b in lists for v in b), np.float32)
                 for name, lists in raw.bag_weights.items()}
        return cls(raw.labels, {k: pa.array(list(v), pa.string()) for k, v in raw.cats.items()},
                   dict(raw.nums), dict(raw.weights), bags, bag_w)


def open_binary(path: Path) -> BinaryIO:
    """``path`` opened for binary reading, gunzipped when it starts with the gzip magic bytes."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _read_into(fh: BinaryIO, buf: memoryview, path: Path) -> int:
    """Fill ``buf`` from ``fh`` (fewer bytes only at the end of the file); the bytes read."""
    from .readers import DataFormatError

    try:
        got = 0
        while got < len(buf) and (n := fh.readinto(buf[got:])):
            got += n
        return got
    except EOFError as e:  # gzip: "Compressed file ended before the end-of-stream marker was reached"
        raise DataFormatError(f"{path}: the gzip stream is cut short (truncated file?): {e}") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise DataFormatError(f"{path}: corrupt gzip data: {e}") from None


def iter_blocks(path: Path, chunk_rows: int, block_bytes: int = BLOCK_BYTES, skip_lines: int = 0,
                buffers: int = 0) -> Iterator[Tuple[int, memoryview]]:
    """Yield ``(first line number, block)``: whole lines (the last one maybe without ``\\n``).

    A block holds at most ``chunk_rows`` lines and about ``block_bytes`` bytes (more only for a
    line longer than that). Line numbers count physical lines from 1; the first ``skip_lines``
    lines (a header) are skipped. The file is read into uninitialised buffers (a zeroed one costs
    as much again) and each byte is copied once more only if it belongs to a line cut by a read.

    ``buffers``: reuse this many read buffers in turn (a fresh one per read costs page faults as
    large as the read), for a consumer that keeps no reference into a block after asking for the
    ``buffers - 1``-th block after it (Arrow's CSV reader copies what it parses). 0: a fresh
    buffer per read, for consumers that keep zero-copy views of the blocks.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    line = 1
    ring = [np.empty(0, np.uint8)] * buffers
    with open_binary(path) as fh:
        carry, eof, slot = np.empty(0, np.uint8), False, 0
        while not eof:
            size = len(carry) + block_bytes
            if buffers:
                if len(ring[slot]) < size:
                    ring[slot] = np.empty(size, np.uint8)
                buf = ring[slot][:size]
            else:
                buf = np.empty(size, np.uint8)
            buf[:len(carry)] = carry
            got = _read_into(fh, memoryview(buf)[len(carry):], path)
            eof = got == 0
            buf = buf[:len(carry) + got]
            while skip_lines and (nl := _find_newline(buf)) >= 0:
                buf, line, skip_lines = buf[nl + 1:], line + 1, skip_lines - 1
            if skip_lines and eof:  # a header without a line end
                buf, line, skip_lines = buf[:0], line + 1, 0
            cut = len(buf) if eof else _find_newline(buf, last=True) + 1
            if cut == 0:  # no line end yet: a line longer than block_bytes, or a header still being skipped
                carry = buf.copy()  # (the same buffer is read into again)
                continue
            carry = buf[cut:]  # a view: read into the next buffer, not this one
            slot = (slot + 1) % buffers if buffers else 0
            block = buf[:cut]
            lines = _count_newlines(block) + (eof and block[-1] != 10)
            if lines <= chunk_rows:
                yield line, memoryview(block)
                line += lines
                continue
            ends = np.flatnonzero(block == 10)[chunk_rows - 1::chunk_rows] + 1
            for lo, hi in zip(np.concatenate([[0], ends]), np.append(ends, cut)):
                if hi > lo:
                    yield line, memoryview(block[lo:hi])
                    line += min(chunk_rows, lines)
                    lines -= chunk_rows


_SCAN = 1 << 20  # bytes compared at a time: the comparison's temporary stays small and reused


def _count_newlines(buf: np.ndarray) -> int:
    return sum(int(np.count_nonzero(buf[i:i + _SCAN] == 10)) for i in range(0, len(buf), _SCAN))


def _find_newline(buf: np.ndarray, last: bool = False) -> int:
    """Position of the first (or ``last``) ``\\n`` in ``buf``, or -1; scans from that end outwards."""
    n = len(buf)
    for i in range(0, n, _SCAN):
        window = buf[max(n - i - _SCAN, 0):n - i] if last else buf[i:i + _SCAN]
        hits = np.flatnonzero(window == 10)
        if len(hits):
            return max(n - i - _SCAN, 0) + int(hits[-1]) if last else i + int(hits[0])
    return -1


#: Parse with threads (Arrow's, and one ahead of the encoder) only where there is more than one CPU:
#: on one, Arrow's serial reader is ~9% faster than a pool of one thread.
PARSE_THREADS = pa.cpu_count() > 1


def read_ahead(items: Iterable[T], work: Callable[[T], Any], ahead: bool = PARSE_THREADS) -> Iterator[Tuple[T, Any]]:
    """Yield ``(item, work(item))`` in order, ``work`` of the next item running in a thread while
    the caller uses this one (``ahead``; Arrow's parsing releases the GIL). An exception raised by
    ``work`` is yielded in place of its result, for the caller to handle.
    """
    def safe(item):
        try:
            return work(item)
        except Exception as e:  # handed to the caller, who decides (a bad block goes to the slow path)
            return e

    if not ahead:
        for item in items:
            yield item, safe(item)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="deepfm-fast-parse") as pool:
        pending = None
        for item in items:
            future = pool.submit(safe, item)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (item, future)
        if pending is not None:
            yield pending[0], pending[1].result()


def lines_array(block) -> pa.LargeStringArray:
    """The lines of ``block`` as one Arrow string array (each keeps its line end); UTF-8 checked."""
    data = np.frombuffer(block, np.uint8)
    ends = np.flatnonzero(data == 10) + 1
    if len(data) and data[-1] != 10:
        ends = np.append(ends, len(data))
    offsets = np.concatenate([[0], ends]).astype(np.int64)
    arr = pa.LargeStringArray.from_buffers(len(ends), pa.py_buffer(offsets), pa.py_buffer(block))
    arr.validate(full=True)
    return arr


# CRC-32 (IEEE 802.3, reflected, as zlib) lookup table.
_POLY = np.uint32(0xEDB88320)


def _crc_table() -> np.ndarray:
    c = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        c = np.where(c & 1, _POLY ^ (c >> 1), c >> 1).astype(np.uint32)
    return c


_CRC = _crc_table()


def crc32_utf8(values: pa.Array) -> np.ndarray:
    """uint32 ``zlib.crc32(v.encode())`` of every string (null -> crc of ``''``), vectorised.

    One numpy step per byte position, over the strings still that long: no loop over values.
    """
    values = values.cast(pa.large_string()) if values.type != pa.large_string() else values
    n = len(values)
    if n == 0:
        return np.zeros(0, np.uint32)
    _, off_buf, data_buf = values.buffers()
    offsets = np.frombuffer(off_buf, np.int64, count=n + 1, offset=values.offset * 8)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    if values.null_count:
        lengths = np.where(values.is_null().to_numpy(zero_copy_only=False), 0, lengths)
    order = np.argsort(-lengths, kind="stable")
    sorted_len = lengths[order]
    starts = offsets[:-1][order]
    crc = np.full(n, 0xFFFFFFFF, np.uint32)
    for j in range(int(sorted_len[0]) if n else 0):
        live = int(np.searchsorted(-sorted_len, -j, side="left"))  # strings longer than j
        c = crc[:live]
        crc[:live] = _CRC[(c ^ data[starts[:live] + j]) & 0xFF] ^ (c >> 8)
    out = np.empty(n, np.uint32)
    out[order] = crc ^ np.uint32(0xFFFFFFFF)
    return out


def dictionary_parts(values: pa.Array) -> Tuple[pa.Array, np.ndarray]:
    """(distinct strings, index of every value into them (int32 or int64 as Arrow gives it); -1 = null)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if not pa.types.is_dictionary(values.type):
        values = pc.dictionary_encode(values)
    idx = values.indices.fill_null(-1).to_numpy(zero_copy_only=False)
    dictionary = values.dictionary
    if dictionary.type != pa.string():
        dictionary = dictionary.cast(pa.string())
    return dictionary, idx
