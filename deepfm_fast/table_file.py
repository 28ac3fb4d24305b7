"""File-backed packed tables: a fused-optimizer EmbeddingFM's records in a memory-mapped file,
trained in place, with checkpoints that survive a crash (``EmbeddingFM(..., table_file=PATH)``).

Files (``PATH`` and three beside it):

- ``PATH``: a 4 KiB header (magic, format version, the table's layout as JSON: rows, K, dtype,
  record width, columns, optimizer, a random table id), then the packed records, mapped shared:
  the page cache holds the hot rows, the fused update writes each touched record in place.
- ``PATH-manifest``: the last checkpoint (generation, step counter, Adam's catch-up table, the
  caller's extra state), replaced atomically (write a temporary, fsync, rename, fsync the folder).
- ``PATH-journal``: an undo journal. Before a step first changes a row after checkpoint ``g``, the
  row's record as it was at ``g`` is appended (with a CRC) and the journal is fdatasync'ed, so the
  old record is on disk before the kernel can write the changed page back. A checkpoint msyncs
  the table, then renames the new manifest (the commit), then empties the journal for ``g + 1``.
  Opening the file after a crash writes the journal's records of generation ``g`` back (a torn last
  block, never acted on, fails its CRC and is dropped): the table is checkpoint ``g`` again.
  A checkpoint writes only the rows changed since the last one (msync), never the whole table.
- ``PATH-lock``: held with ``flock`` while the table is open: a second trainer is refused.

The creation streams the initialisation into a temporary file in chunks (no table-sized anonymous
memory), reserving the space first (``posix_fallocate``: a full disk fails there, cleanly, not as a
SIGBUS in a page fault later), and renames it into place only when whole.
"""
import errno
import fcntl
import io
import json
import mmap
import os
import struct
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from . import _packing

MAGIC = b"DFMTABLE"
FORMAT_VERSION = 1
HEADER_BYTES = 4096
_HEADER = struct.Struct("<8sIII")  # magic, version, JSON length, JSON crc32
JOURNAL_MAGIC = b"DFMJRNL1"
_JOURNAL_HEADER = struct.Struct("<8s16sQ")  # magic, table id, generation
_BLOCK = struct.Struct("<IIQ")  # block magic, crc32 of ids and records, row count
_BLOCK_MAGIC = 0x4B4C4244
_BIT = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


class TableFileError(ValueError):
    """A table file that cannot be used as asked: wrong layout, damaged, locked, or a failed write."""


def describe(columns, optimizer, catchup: Optional[Tensor]) -> Dict[str, Any]:
    """The layout a table file must have to hold ``columns`` for ``optimizer`` (checked on open)."""
    width, offsets = _packing.record_layout(columns)
    table = columns[0][1]
    dtype = next(t.dtype for _, t in columns if t.dtype != torch.int64)
    return {"optimizer": type(optimizer).__name__, "rows": table.shape[0], "embedding_dim": table.shape[1],
            "dtype": str(dtype).replace("torch.", ""), "record_width": width,
            "columns": [[name, offsets[name], list(t.shape[1:]), str(t.dtype).replace("torch.", "")]
                        for name, t in columns],
            "catchup_shape": list(catchup.shape) if catchup is not None else None}


def _write_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _fsync_folder(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _byte_view(t: Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy())


class TableFile:
    """An open table file (see the module docs); `EmbeddingFM` makes it from ``table_file=PATH``.

    ``columns``: the module's packed columns (shapes and dtypes); ``init(views)`` initialises a
    chunk of new records; ``catchup``: Adam's fresh catch-up table (None for the others). After
    opening, ``views`` are the columns as views of the mapped records, ``step``, ``catchup`` and
    ``extra`` those of the last checkpoint."""

    def __init__(self, path, columns, optimizer, init, catchup: Optional[Tensor] = None):
        self.path = os.fspath(path)
        self.layout = describe(columns, optimizer, catchup)
        self._columns = [(name, t) for name, t in columns]
        self.catch_up_window = getattr(optimizer, "catch_up_window", None) if catchup is not None else None
        self._closed = True
        self._fd = self._journal_fd = None
        self._lock_fd = self._lock()
        try:
            if not os.path.exists(self.path):
                self._create(init, catchup)
            self._open()
        except BaseException:
            self.close()
            raise
        self._closed = False

    # -- creation and opening -------------------------------------------------------------------
    def _lock(self) -> int:
        fd = os.open(self.path + "-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TableFileError(f"table file {self.path} is open in another trainer (it holds {self.path}-lock); "
                                 f"one process at a time trains a table file") from None
        return fd

    @property
    def _itemsize(self) -> int:
        return torch.empty((), dtype=getattr(torch, self.layout["dtype"])).element_size()

    @property
    def _record_bytes(self) -> int:
        return self.layout["record_width"] * self._itemsize

    def _create(self, init, catchup) -> None:
        rows, width = self.layout["rows"], self.layout["record_width"]
        dtype = getattr(torch, self.layout["dtype"])
        self.table_id = uuid.uuid4().hex
        text = json.dumps({**self.layout, "table_id": self.table_id}).encode()
        if _HEADER.size + len(text) > HEADER_BYTES:
            raise TableFileError(f"table file {self.path}: the layout does not fit the {HEADER_BYTES}-byte header")
        tmp = f"{self.path}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            # Reserve every block now: a full disk fails here, not as SIGBUS when a mapped page is written.
            os.posix_fallocate(fd, 0, HEADER_BYTES + rows * self._record_bytes)
            _write_all(fd, _HEADER.pack(MAGIC, FORMAT_VERSION, len(text), zlib.crc32(text)) + text, 0)
            scratch = torch.empty(_packing.CHUNK_ROWS + 16, width, dtype=dtype)
            for start, _, chunk in _packing.init_chunks(rows, self._columns, init,
                                                        lambda start, end: scratch[:end - start]):
                _write_all(fd, _byte_view(chunk), HEADER_BYTES + start * self._record_bytes)
            os.fsync(fd)
            self._write_manifest(0, 0, catchup, None)
            os.rename(tmp, self.path)
            _fsync_folder(self.path)
        except OSError as e:
            os.close(fd)
            os.unlink(tmp)
            raise TableFileError(f"could not create table file {self.path} ({rows} records of "
                                 f"{self._record_bytes} bytes): {e}; nothing was left behind") from e
        os.close(fd)

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        head = os.pread(self._fd, HEADER_BYTES, 0)
        magic, version, length, crc = _HEADER.unpack_from(head) if len(head) >= _HEADER.size else (b"", 0, 0, 0)
        if magic != MAGIC:
            raise TableFileError(f"{self.path} is not a deepfm_fast table file (no {MAGIC!r} header)")
        if version != FORMAT_VERSION:
            raise TableFileError(f"table file {self.path} has format version {version}; this deepfm_fast reads "
                                 f"version {FORMAT_VERSION}")
        text = head[_HEADER.size:_HEADER.size + length]
        if len(text) != length or zlib.crc32(text) != crc:
            raise TableFileError(f"table file {self.path}: its header is damaged (checksum mismatch)")
        found = json.loads(text)
        self.table_id = found.pop("table_id")
        for key, want in self.layout.items():
            if found.get(key) != want:
                raise TableFileError(f"table file {self.path} holds a table with {key} = {found.get(key)}, but this "
                                     f"module needs {key} = {want}: open it with the module it was made for, or "
                                     f"use another path")
        size = os.fstat(self._fd).st_size
        expected = HEADER_BYTES + self.layout["rows"] * self._record_bytes
        if size != expected:
            raise TableFileError(f"table file {self.path} is {size} bytes, its header says {expected}: the file is "
                                 f"truncated or damaged")
        self._read_manifest()
        # Drop the file's cached pages: those written or read in sequence sit in large folios (2 MB on
        # ext4), and one record changed in such a folio makes the kernel write the whole folio back
        # (measured: GB/s of writes for a few MB of records). Faulted in at random (MADV_RANDOM) they
        # come back as single pages. The cost: a reopened table starts cold.
        os.fsync(self._fd)
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self._map = mmap.mmap(self._fd, size)
        if hasattr(self._map, "madvise"):  # rows are read at random: no read-around of their neighbours
            self._map.madvise(mmap.MADV_RANDOM, HEADER_BYTES, size - HEADER_BYTES)
        rows, width = self.layout["rows"], self.layout["record_width"]
        self.records = torch.frombuffer(self._map, dtype=getattr(torch, self.layout["dtype"]), count=rows * width,
                                        offset=HEADER_BYTES).view(rows, width)
        self.views = _packing.column_views(self.records, self._columns)
        self.dirty = torch.zeros((rows + 7) // 8, dtype=torch.uint8)  # rows journaled since the checkpoint
        self._recover()
        self._reset_journal()

    # -- the manifest: the last checkpoint ------------------------------------------------------------
    def _write_manifest(self, generation: int, step: int, catchup: Optional[Tensor], extra: Any) -> None:
        buffer = io.BytesIO()
        torch.save({"table_id": self.table_id, "generation": generation, "step": step, "catchup": catchup,
                    "extra": extra}, buffer)
        path = self.path + "-manifest"
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)  # the commit point of a checkpoint
            _fsync_folder(path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _read_manifest(self) -> None:
        path = self.path + "-manifest"
        try:
            manifest = torch.load(path, weights_only=True)
        except FileNotFoundError:
            raise TableFileError(f"table file {self.path} has no {path}: its checkpoint is missing") from None
        except Exception as e:
            raise TableFileError(f"table file {self.path}: its checkpoint {path} is unreadable ({e})") from e
        if manifest.get("table_id") != self.table_id:
            raise TableFileError(f"{path} belongs to another table file than {self.path}")
        self.generation, self.step = manifest["generation"], manifest["step"]
        self.catchup, self.extra = manifest["catchup"], manifest["extra"]

    # -- the undo journal -------------------------------------------------------------------------
    def _journal_header(self, generation: int) -> bytes:
        return _JOURNAL_HEADER.pack(JOURNAL_MAGIC, bytes.fromhex(self.table_id), generation)

    def _recover(self) -> None:
        """Writes back the records journaled since the checkpoint: the table is the checkpoint again."""
        path = self.path + "-journal"
        if not os.path.exists(path):
            return
        with open(path, "rb") as f:
            if f.read(_JOURNAL_HEADER.size) != self._journal_header(self.generation):
                return  # empty, or of an earlier checkpoint (crashed after the manifest's commit)
            blocks = []
            while True:
                head = f.read(_BLOCK.size)
                if len(head) < _BLOCK.size:
                    break
                magic, crc, count = _BLOCK.unpack(head)
                body = f.read(count * (8 + self._record_bytes))
                if magic != _BLOCK_MAGIC or len(body) != count * (8 + self._record_bytes) or zlib.crc32(body) != crc:
                    break  # a torn last block: written, never acted on
                blocks.append((count, body))
        for count, body in reversed(blocks):  # the oldest record of a row last
            ids = torch.frombuffer(bytearray(body[:8 * count]), dtype=torch.int64)
            old = torch.frombuffer(bytearray(body[8 * count:]), dtype=self.records.dtype).view(count, -1)
            _gather(self.records, ids)  # fault the pages in from many threads, not one at a time
            self.records[ids] = old
        if blocks:
            self._map.flush()
            os.fsync(self._fd)

    def _reset_journal(self) -> None:
        if self._journal_fd is None:
            self._journal_fd = os.open(self.path + "-journal", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.ftruncate(self._journal_fd, 0)
        _write_all(self._journal_fd, self._journal_header(self.generation), 0)
        os.fsync(self._journal_fd)
        self._journal_end = _JOURNAL_HEADER.size
        self.dirty.zero_()

    def _check_open(self) -> None:
        if self._closed:
            raise TableFileError(f"table file {self.path} is closed")

    def journal(self, rows: Tensor) -> None:
        """Before rows change: saves the records of those of ``rows`` (global row numbers, any order,
        repeats allowed) not yet journaled since the checkpoint, durably."""
        self._check_open()
        rows = rows.reshape(-1).long()
        seen = (self.dirty[rows >> 3] & _BIT[rows & 7]) != 0
        fresh = torch.unique(rows[~seen])
        if fresh.numel() == 0:
            return
        old = _gather(self.records, fresh)  # the first touch of these rows since the checkpoint: faults ahead
        body = _byte_view(fresh).tobytes() + _byte_view(old).tobytes()
        block = _BLOCK.pack(_BLOCK_MAGIC, zlib.crc32(body), fresh.numel()) + body
        try:
            _write_all(self._journal_fd, block, self._journal_end)
            os.fdatasync(self._journal_fd)
        except OSError as e:
            try:  # drop the partial block: the rows stay unchanged and unjournaled
                os.ftruncate(self._journal_fd, self._journal_end)
            except OSError:
                pass
            raise TableFileError(f"table file {self.path}: could not journal {fresh.numel()} rows before the step "
                                 f"({e}); the step was not taken and the file still holds its last checkpoint"
                                 + (": free disk space, then continue or checkpoint" if e.errno == errno.ENOSPC
                                    else "")) from e
        self._journal_end += len(block)
        self.dirty.index_put_((fresh >> 3,), _BIT[fresh & 7], accumulate=True)  # fresh bits: sum = or

    def journal_all(self, keep=None) -> None:
        """`journal` of every row (``keep(start, end)``: a mask of the rows of that range to journal)."""
        rows = self.layout["rows"]
        for start in range(0, rows, _packing.CHUNK_ROWS):
            end = min(rows, start + _packing.CHUNK_ROWS)
            chunk = torch.arange(start, end)
            self.journal(chunk if keep is None else chunk[keep(start, end)])

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoint(self, step: int, catchup: Optional[Tensor] = None, extra: Any = None) -> None:
        """Makes the table as it is now the checkpoint: msync (the rows changed since the last one),
        the new manifest (atomic rename), an empty journal. ``extra``: anything ``torch.load(...,
        weights_only=True)`` reads back (e.g. the rest of the model's ``state_dict``), saved with it.
        Without a change since the last checkpoint it is that one (no new generation)."""
        self._check_open()
        unchanged = self._journal_end == _JOURNAL_HEADER.size and int(step) == self.step
        if unchanged and extra is None and self.extra is None:
            return  # nothing changed: the same generation (several state_dict() calls agree)
        try:
            self._map.flush()
            os.fsync(self._fd)
            self._write_manifest(self.generation + 1, int(step), catchup.clone() if catchup is not None else None,
                                 extra)
        except OSError as e:
            raise TableFileError(f"table file {self.path}: the checkpoint failed ({e}); the last checkpoint "
                                 f"(generation {self.generation}) stays whole and is what reopening gives") from e
        self.generation, self.step, self.extra = self.generation + 1, int(step), extra
        self._reset_journal()

    def close(self) -> None:
        """Releases the lock and the files. The records stay mapped while tensors view them; a closed
        table refuses further steps and checkpoints."""
        self._closed = True
        for name in ("_journal_fd", "_fd", "_lock_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def __del__(self):
        self.close()

    def __reduce__(self):
        raise TypeError(f"a file-backed table ({self.path}) cannot be copied or pickled: checkpoint() it and "
                        f"open the file in the other process")


# Reading the rows a step will change first (to journal them) in this many threads keeps as many
# page faults in flight: the disk serves them together instead of one at a time.
PREFETCH_THREADS = 16
_PARALLEL_ROWS = 4096
_pool: Optional[ThreadPoolExecutor] = None


def _gather(records: Tensor, rows: Tensor) -> Tensor:
    """``records[rows]``, its page faults spread over `PREFETCH_THREADS` threads (torch releases the GIL)."""
    global _pool
    if rows.numel() < _PARALLEL_ROWS:
        return records.index_select(0, rows)
    if _pool is None:
        _pool = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="deepfm_fast-table-prefetch")
    parts = rows.tensor_split(PREFETCH_THREADS)
    return torch.cat(list(_pool.map(lambda part: records.index_select(0, part), parts)))
