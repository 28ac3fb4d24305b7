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
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["ColumnChunk", "iter_blocks", "lines_array", "crc32_utf8", "open_binary", "BLOCK_BYTES"]

#: Bytes read per block at most (a block always ends at a line end).
BLOCK_BYTES = 32 << 20


@dataclass
class ColumnChunk:
    """Parsed, validated rows in columns (``n`` rows), ready for the encoder.

    Attributes:
        labels: float32 ``[n]`` in {0, 1}; NaN for every row of a file without labels.
        cats: sparse column -> ``n`` Arrow strings (string or dictionary array); null or ``''`` = missing.
        nums: numeric/keep column -> float64 ``[n]`` (NaN = missing).
        weights: sparse column -> float32 ``[n]`` (libFM values).
        bags: multi_hot field -> (flat Arrow strings, int64 ``[n]`` tokens per row), row-major.
        bag_weights: multi_hot field -> float32 flat values (libFM only).
    """

    labels: np.ndarray
    cats: Dict[str, pa.Array]
    nums: Dict[str, np.ndarray]
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


def _read(fh: BinaryIO, n: int, path: Path) -> bytes:
    from .readers import DataFormatError

    try:
        return fh.read(n)
    except EOFError as e:  # gzip: "Compressed file ended before the end-of-stream marker was reached"
        raise DataFormatError(f"{path}: the gzip stream is cut short (truncated file?): {e}") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise DataFormatError(f"{path}: corrupt gzip data: {e}") from None


def iter_blocks(path: Path, chunk_rows: int, block_bytes: int = BLOCK_BYTES,
                skip_lines: int = 0) -> Iterator[Tuple[int, bytes]]:
    """Yield ``(first line number, block)``: whole lines (the last one maybe without ``\\n``).

    Line numbers count physical lines from 1; the first ``skip_lines`` lines (a header) are skipped.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    line = 1
    with open_binary(path) as fh:
        buf, pos, eof = bytearray(), 0, False
        while True:
            # bytearray.count is a C scan; the newline positions are found once per block below.
            have = buf.count(b"\n", pos)
            if not eof and have < chunk_rows + skip_lines:
                del buf[:pos]
                pos = 0
                piece = _read(fh, block_bytes, path)
                eof = not piece
                buf += piece
                continue
            if skip_lines:
                k = min(skip_lines, have)
                end = _nth_newline(buf, pos, k) if k else len(buf)  # a header without a line end
                pos, line, skip_lines = end, line + k, 0
                continue
            if len(buf) == pos:
                return
            if have >= chunk_rows:
                end, lines = _nth_newline(buf, pos, chunk_rows), chunk_rows
            else:  # end of file: the rest, with or without a final line end
                end, lines = len(buf), have + (buf[-1:] != b"\n")
            yield line, bytes(buf[pos:end])
            line += lines
            pos = end


def _nth_newline(buf: bytearray, pos: int, k: int) -> int:
    """The position just after the ``k``-th newline from ``pos`` (there are at least ``k``)."""
    nl = np.flatnonzero(np.frombuffer(buf, np.uint8, offset=pos) == 10)
    return pos + int(nl[k - 1]) + 1


def lines_array(block: bytes) -> pa.LargeStringArray:
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
    """(distinct strings, int64 index of every value into them; -1 = null)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if not pa.types.is_dictionary(values.type):
        values = pc.dictionary_encode(values)
    idx = values.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    dictionary = values.dictionary
    if dictionary.type != pa.string():
        dictionary = dictionary.cast(pa.string())
    return dictionary, idx
