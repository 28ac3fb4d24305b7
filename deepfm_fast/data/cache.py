"""Preprocess raw files once into memory-mappable ``.npy`` arrays, reuse them on the next run.

Cache layout (``cache_dir/<key>/``, ``key`` = hash of the format options and the training
file's path, size and mtime)::

    meta.json                    fitted FeatureEncoder (fields, vocabularies or hash settings,
                                 numeric statistics), options, training file signature, version,
                                 libFM layout of the training file
    <split>-<srckey>/            one per encoded file (train, valid, test, ...), srckey = hash
        split.json               of that file's signature; rows, bad_lines, arrays present
        labels.npy               float32 [R]
        sparse.npy               int32   [R, Fs]   (int64 if a field has 2^31+ rows)
        sparse_weights.npy       float32 [R, Fs]   (absent when every value is 1)
        numeric.npy              float32 [R, Fn]
        mh{i}_ids.npy            int32   [nnz_i]   multi-hot field i, flat, row-major (int64 as above)
        mh{i}_lengths.npy        int64   [R]
        mh{i}_weights.npy        float32 [nnz_i]   (absent when every value is 1)
        extra_<column>.npy       float64 [R]       keep columns (e.g. timestamp)

Every file is written under a temporary name and moved into place with ``os.replace``
(:func:`deepfm_fast._io.atomic_write`); a split is encoded in a temporary directory that is renamed
into place when complete, and ``meta.json`` is written last, so a crash never leaves a usable
half-cache.
Arrays stream to disk chunk by chunk (:class:`_NpyStreamWriter`), so encoding needs memory for
one chunk only. Loading maps them with ``np.load(mmap_mode="c")``: copy-on-write, so a tensor
from ``torch.from_numpy`` is writable in memory while the cache files stay untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

import numpy as np
import pyarrow as pa
import torch

from .._io import atomic_write, write_json
from ..features import MultiHotField
from .dataset import EncodedDataset
from .encode import FeatureEncoder
from .formats import Format
from .readers import DataFormatError, ReadStats, file_signature

__all__ = ["prepare_data", "PreparedData", "encode_file", "CACHE_VERSION"]

CACHE_VERSION = 1
_HEADER_BYTES = 128  # fixed .npy header size, so the final shape can be written in place


@dataclass
class PreparedData:
    """The result of :func:`prepare_data`.

    Attributes:
        train, valid, test: encoded splits (valid/test None when not given).
        encoder: the fitted :class:`FeatureEncoder`; ``encoder.fields`` are the model's specs.
        from_cache: True when everything was loaded from the cache without parsing.
        bad_lines: split name -> rows skipped as malformed (``skip_bad_lines=True``).
        cache_path: the cache directory used, or None.
    """

    train: EncodedDataset
    valid: Optional[EncodedDataset]
    test: Optional[EncodedDataset]
    encoder: FeatureEncoder
    from_cache: bool
    bad_lines: Dict[str, int] = field(default_factory=dict)
    cache_path: Optional[Path] = None

    @property
    def fields(self):
        return self.encoder.fields


class _NpyStreamWriter:
    """Append row blocks to an open ``.npy`` file whose final row count is unknown until the end.

    Rows go after a zeroed header of fixed size; :meth:`finish` writes the real header in place.
    """

    def __init__(self, fh, name: str, dtype: np.dtype, tail_shape: tuple, defer_ones: bool = False):
        self.fh, self.name, self.dtype, self.tail = fh, name, np.dtype(dtype), tuple(tail_shape)
        self.fh.write(b"\0" * _HEADER_BYTES)
        self.rows = 0
        self.all_one = True
        # Weights: a file of ones only is dropped by the caller, so its rows need not be written.
        self.defer_ones = defer_ones

    def append(self, a: np.ndarray) -> None:
        if a.shape[1:] != self.tail:
            raise ValueError(f"{self.name}: block shape {a.shape} does not end in {self.tail}")
        was_one = self.all_one
        # A broadcast block (stride 0: the ones of Criteo's weights) is checked by its one row.
        self.all_one = self.all_one and bool(((a[:1] if a.ndim and a.strides[0] == 0 else a) == 1).all())
        if self.all_one and self.defer_ones:  # written only if a later block holds something else
            self.rows += a.shape[0]
            return
        if was_one and self.defer_ones and self.rows:
            self._write(np.ones((self.rows,) + self.tail, self.dtype))
        self._write(a)
        self.rows += a.shape[0]

    def _write(self, a: np.ndarray) -> None:
        self.fh.write(np.ascontiguousarray(a, dtype=self.dtype).data)  # the buffer itself: no copy

    def finish(self) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.rows,) + self.tail}
        text = repr(header).encode("latin1")
        # magic(6) + version(2) + header length(2) + dict, space-padded, newline-terminated.
        pad = _HEADER_BYTES - 10 - len(text) - 1
        if pad < 0:
            raise ValueError(f"{self.name}: .npy header too long")
        self.fh.seek(0)
        self.fh.write(b"\x93NUMPY\x01\x00" + (_HEADER_BYTES - 10).to_bytes(2, "little")
                      + text + b" " * pad + b"\n")


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stream_chunks(fmt: Format, path: Path, chunk_rows: int, skip_bad_lines: bool, stats: ReadStats,
                   progress: Optional[str]):
    chunks = fmt.read_columns(path, chunk_rows=chunk_rows, skip_bad_lines=skip_bad_lines, stats=stats)
    if progress:
        from tqdm import tqdm

        size = os.path.getsize(path)
        bar = tqdm(total=None, desc=progress, unit=" rows", unit_scale=True, leave=False, smoothing=0.1,
                   postfix=f"{size / 1e6:,.0f} MB file")

        def counted():
            try:
                for chunk in chunks:
                    bar.update(len(chunk))
                    yield chunk
            finally:
                bar.close()

        return counted()
    return chunks


def _encode_to(encoder: FeatureEncoder, chunks: Iterable, out_dir: Path, fitting: bool = False) -> List[str]:
    """Encode all chunks into ``out_dir/*.npy``, chunk by chunk; returns the array names written.

    What needs a lookup in a vocabulary (counted ids) or, with ``fitting``, the frozen fit
    (standardised numbers) is deferred: its compact inputs go to a scratch file (:class:`_Spill`),
    and a second pass over that file (not over the text) writes the missing arrays, looking the
    values of many chunks up at once. ``fitting``: fit ``encoder`` in the same single pass.
    """
    writers: Dict[str, _NpyStreamWriter] = {}
    # Each .npy is written atomically; leaving the stack moves them all into place, or, on an
    # error, removes them all.
    with contextlib.ExitStack() as files:
        if fitting:
            encoder.begin_fit()
        spill = files.enter_context(_Spill(out_dir / ".deferred"))
        n_rows = 0
        for chunk in chunks:
            arrays, deferred, distinct = encoder.fit_chunk(chunk) if fitting else encoder.defer_chunk(chunk)
            spill.write(deferred, distinct)
            n_rows += len(chunk)
            _append(writers, files, out_dir, arrays)
        if not writers:
            raise DataFormatError("no rows to encode")
        if fitting:
            encoder.finish_fit(n_rows)
        # The second pass: its arrays join the same stack, so they too land only on success.
        for deferred, ids in _looked_up(encoder, spill):
            _append(writers, files, out_dir, encoder.finish_deferred(deferred, ids))
        for w in writers.values():
            w.finish()
    names = sorted(writers)
    # Weights that are all 1 carry nothing: drop them, so the model takes the unweighted path.
    for name, w in writers.items():
        if name.endswith("weights") and w.all_one:
            names.remove(name)
            (out_dir / f"{name}.npy").unlink()
    return names


def _append(writers: Dict[str, _NpyStreamWriter], files: contextlib.ExitStack, out_dir: Path,
            arrays: Dict[str, np.ndarray]) -> None:
    for name, a in arrays.items():
        if name not in writers:
            fh = files.enter_context(atomic_write(out_dir / f"{name}.npy", "wb"))
            writers[name] = _NpyStreamWriter(fh, f"{name}.npy", a.dtype, a.shape[1:],
                                             defer_ones=name.endswith("weights"))
        writers[name].append(a)


class _Spill:
    """Scratch file of the fitting pass: per chunk, its deferred arrays (raw bytes, each in its own
    type) and its distinct values (an Arrow IPC stream per counted field), read back by chunk.

    Everything written here is written and read once more; keeping it compact (positions in 1-2
    bytes, numbers in float32 where exact) is what makes the second pass cheap.
    """

    def __init__(self, path: Path):
        self.path = path
        self.fh = open(path, "w+b")
        # per chunk: (offset, [(name, dtype, shape)]) of its arrays, (offset, [(field, bytes)]) of its values
        self.chunks: List[Any] = []

    def __enter__(self) -> "_Spill":
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()
        self.path.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self.chunks)

    def write(self, deferred: Dict[str, np.ndarray], distinct: Dict[str, pa.Array]) -> None:
        arrays = (self.fh.tell(), [(name, a.dtype, a.shape) for name, a in deferred.items()])
        for a in deferred.values():
            self.fh.write(np.ascontiguousarray(a).data)
        values = (self.fh.tell(), [])
        for name, d in distinct.items():
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, pa.schema([("v", d.type)])) as w:
                w.write_batch(pa.record_batch([d], names=["v"]))
            buf = sink.getvalue()
            self.fh.write(buf)
            values[1].append((name, buf.size))
        self.chunks.append((arrays, values))

    def deferred(self, k: int) -> Dict[str, np.ndarray]:
        """The deferred arrays of chunk ``k``."""
        offset, arrays = self.chunks[k][0]
        self.fh.seek(offset)
        out = {}
        for name, dtype, shape in arrays:
            nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            out[name] = np.frombuffer(bytearray(self.fh.read(nbytes)), dtype).reshape(shape)
        return out

    def distinct(self, k: int) -> Dict[str, pa.Array]:
        """The distinct values of chunk ``k``, per counted field."""
        offset, values = self.chunks[k][1]
        self.fh.seek(offset)
        return {name: pa.ipc.open_stream(self.fh.read(size)).read_next_batch().column(0) for name, size in values}


def _looked_up(encoder: FeatureEncoder, spill: _Spill):
    """Yield ``(deferred arrays, counted field -> ids of the chunk's distinct values)`` per chunk.

    An Arrow lookup (``index_in``) hashes the whole vocabulary on every call, so the chunks are
    looked up in groups, one call per field and group, each group holding at least as many
    distinct values as the vocabularies: the cost grows with the values, not chunks x vocabulary,
    and memory holds one group's distinct values (about a vocabulary's worth).
    """
    spill.fh.flush()
    counted = [s.name for s in encoder.slots if encoder.counted(s)]
    vocab_rows = sum(encoder.vocabs[name].size for name in counted)
    first, group, probes = 0, [], 0
    for k in range(len(spill)):
        group.append(spill.distinct(k))
        probes += sum(len(d) for d in group[-1].values())
        if probes < vocab_rows and k + 1 < len(spill):
            continue
        found = {name: encoder.vocabs[name].lookup(pa.chunked_array([d[name] for d in group], pa.string()))
                 for name in counted}
        lo = dict.fromkeys(counted, 0)
        for j, distinct in enumerate(group):
            ids = {}
            for name in counted:
                hi = lo[name] + len(distinct[name])
                ids[name] = found[name][lo[name]:hi]
                lo[name] = hi
            yield spill.deferred(first + j), ids
        first, group, probes = k + 1, [], 0


def _assemble(encoder: FeatureEncoder, arrays: Dict[str, np.ndarray]) -> EncodedDataset:
    """Build an EncodedDataset from encoded arrays (pads the flat multi-hot bags)."""
    def t(a):
        return None if a is None else torch.from_numpy(a)

    labels = t(arrays["labels"])
    r = labels.shape[0]
    multi_hot, mh_w = [], []
    n_mh = sum(isinstance(f, MultiHotField) for f in encoder.fields)
    for i in range(n_mh):
        lengths = t(arrays[f"mh{i}_lengths"])
        ids = t(arrays[f"mh{i}_ids"])
        w = arrays.get(f"mh{i}_weights")
        width = max(int(lengths.max()) if r else 0, 1)
        row = torch.repeat_interleave(torch.arange(r), lengths)
        pos = torch.arange(ids.shape[0]) - (torch.cumsum(lengths, 0) - lengths)[row]
        padded = torch.full((r, width), -1, dtype=torch.int64)
        padded[row, pos] = ids.to(torch.int64)
        multi_hot.append(padded)
        if w is None:
            mh_w.append(None)
        else:
            pw = torch.zeros((r, width), dtype=torch.float32)
            pw[row, pos] = t(w)
            mh_w.append(pw)
    return EncodedDataset(
        fields=encoder.fields,
        labels=labels,
        sparse=t(arrays["sparse"]),
        multi_hot=tuple(multi_hot),
        numeric=t(arrays["numeric"]),
        sparse_weights=t(arrays.get("sparse_weights")),
        multi_hot_weights=tuple(mh_w),
        extra={k[len("extra_"):]: t(v) for k, v in arrays.items() if k.startswith("extra_")},
    )


def encode_file(fmt: Format, encoder: FeatureEncoder, path: Union[str, Path], *, chunk_rows: int = 65536,
                skip_bad_lines: bool = False) -> EncodedDataset:
    """Encode one more file (e.g. for ``predict``) with an already fitted encoder, in memory.

    The file may lack labels (see :mod:`deepfm_fast.data.readers`); the dataset's labels are then
    NaN and ``has_labels`` is False.
    """
    with tempfile.TemporaryDirectory(prefix="deepfm-fast-") as tmp:
        chunks = fmt.read_columns(Path(path), chunk_rows, skip_bad_lines, ReadStats())
        names = _encode_to(encoder, chunks, Path(tmp))
        return _assemble(encoder, _load_arrays(Path(tmp), names, mmap=False))


def _load_arrays(d: Path, names: List[str], mmap: bool = True) -> Dict[str, np.ndarray]:
    return {name: np.load(d / f"{name}.npy", mmap_mode="c" if mmap else None) for name in names}


def _load_split(encoder: FeatureEncoder, d: Path) -> EncodedDataset:
    info = json.loads((d / "split.json").read_text())
    return _assemble(encoder, _load_arrays(d, info["arrays"]))


def prepare_data(
    fmt: Format,
    train: Union[str, Path],
    valid: Optional[Union[str, Path]] = None,
    test: Optional[Union[str, Path]] = None,
    *,
    cache_dir: Optional[Union[str, Path]] = None,
    chunk_rows: int = 65536,
    skip_bad_lines: bool = False,
    progress: bool = False,
) -> PreparedData:
    """Fit on ``train`` and encode train/valid/test, through an on-disk cache when given.

    One streaming pass over each file: the training file is counted and encoded in the same pass
    (the counted ids are fixed from the written arrays afterwards); memory holds one chunk at a
    time plus the vocabularies. With ``cache_dir``, a second call with the same format options and
    unchanged files (same size and mtime) parses nothing. Without it, the arrays are written to a
    temporary directory and loaded into memory.

    Args:
        fmt: a format of :data:`~deepfm_fast.data.formats.FORMATS` (:class:`CriteoFormat`,
            :class:`LibFMFormat`, :class:`CSVFormat`).
        train: training file (vocabularies and numeric statistics come from it only).
        valid, test: optional files encoded with the training vocabularies (a value the training
            file did not hold, or held fewer than ``min_count`` times, goes to the OOV row 0 of a
            counted field; to its bucket in a hashed one). Every file must have labels
            (:class:`DataFormatError` otherwise).
        cache_dir: directory for the cache (created); None = encode in memory, no cache.
        chunk_rows: rows per parsed chunk.
        skip_bad_lines: drop malformed rows and count them instead of raising.
        progress: show tqdm bars while parsing.

    Example::

        data = prepare_data(CriteoFormat(), "train.txt.gz", test="test.txt.gz", cache_dir=".cache")
        for batch in iterate_batches(data.train, 4096, shuffle=True, seed=0):
            indices, offsets, weights = to_csr(batch, data.fields)
    """
    train = Path(train)
    files = {"train": train, "valid": valid, "test": test}
    files = {k: Path(v) for k, v in files.items() if v is not None}
    for path in files.values():
        why = fmt.no_label_reason(path)
        if why is not None:
            raise DataFormatError(f"{path}: {why}; training, validation and test files need labels")
    sigs = {k: file_signature(p) for k, p in files.items()}
    opts = {"version": CACHE_VERSION, "format": fmt.options(), "skip_bad_lines": skip_bad_lines}

    root, meta, split_dirs = None, None, {}
    if cache_dir is not None:
        root = Path(cache_dir) / _key({"options": opts, "train": sigs["train"]})
        meta_path = root / "meta.json"
        split_dirs = {k: root / f"{k}-{_key(s)}" for k, s in sigs.items()}
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        if meta is not None and all((d / "split.json").is_file() for d in split_dirs.values()):
            fmt.fix_layout(train, chunk_rows, meta.get("libfm_layout"))
            encoder = FeatureEncoder.from_dict(meta["encoder"])
            splits = {k: _load_split(encoder, d) for k, d in split_dirs.items()}
            bad = {k: json.loads((d / "split.json").read_text())["bad_lines"] for k, d in split_dirs.items()}
            return PreparedData(splits["train"], splits.get("valid"), splits.get("test"), encoder,
                                True, bad, root)
        root.mkdir(parents=True, exist_ok=True)

    fmt.fix_layout(train, chunk_rows, meta.get("libfm_layout") if meta is not None else None)
    # Same options and training file: reuse the fitted encoder; only new files get encoded.
    encoder = FeatureEncoder.from_dict(meta["encoder"]) if meta is not None else FeatureEncoder(fmt.columns(train))
    splits, bad, train_rows = {}, {}, None
    with contextlib.ExitStack() as stack:
        scratch = root if root is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="deepfm-fast-")))
        for name, path in files.items():
            fitting = name == "train" and meta is None
            d = split_dirs.get(name)
            if d is not None and not fitting and (d / "split.json").is_file():
                splits[name] = _load_split(encoder, d)
                bad[name] = json.loads((d / "split.json").read_text())["bad_lines"]
                continue
            stats = ReadStats()
            chunks = _stream_chunks(fmt, path, chunk_rows, skip_bad_lines, stats, name if progress else None)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=scratch))
            try:
                names = _encode_to(encoder, chunks, tmp, fitting)
                if d is None:  # in memory
                    splits[name] = _assemble(encoder, _load_arrays(tmp, names, mmap=False))
                    shutil.rmtree(tmp)
                else:
                    write_json(tmp / "split.json", {"rows": stats.rows, "bad_lines": stats.bad_lines,
                                                    "source": sigs[name], "arrays": names})
                    if d.exists():
                        shutil.rmtree(d)
                    os.replace(tmp, d)
                    splits[name] = _load_split(encoder, d)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # a bad row, a full disk or ^C leaves no half split
                raise
            bad[name] = stats.bad_lines
            if fitting:
                train_rows = stats.rows
    if root is not None and train_rows is not None:
        write_json(meta_path, {"version": CACHE_VERSION, "options": opts, "train_source": sigs["train"],
                               "train_rows": train_rows, "encoder": encoder.to_dict(),
                               "libfm_layout": fmt.layout_state()}, compact=True)
    return PreparedData(splits["train"], splits.get("valid"), splits.get("test"), encoder, False, bad, root)
