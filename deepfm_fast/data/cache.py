"""Preprocess raw files once into memory-mappable ``.npy`` arrays, reuse them on the next run.

Cache layout (``cache_dir/<key>/``, ``key`` = hash of the format options and the training
file's path, size and mtime)::

    meta.json                    fitted FeatureEncoder (fields, vocabularies or hash settings,
                                 numeric statistics), options, training file signature, version,
                                 libFM layout of the training file
    <split>-<srckey>/            one per encoded file (train, valid, test, ...), srckey = hash
        split.json               of that file's signature; rows, bad_lines, arrays present
        labels.npy               float32 [R]
        sparse.npy               int64   [R, Fs]
        sparse_weights.npy       float32 [R, Fs]   (absent when every value is 1)
        numeric.npy              float32 [R, Fn]
        mh{i}_ids.npy            int64   [nnz_i]   multi-hot field i, flat, row-major
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
import torch

from .._io import atomic_write, write_json
from ..features import MultiHotField
from .dataset import EncodedDataset
from .encode import FeatureEncoder
from .formats import Format
from .readers import DataFormatError, LibFMFormat, ReadStats, file_signature

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

    def __init__(self, fh, name: str, dtype: np.dtype, tail_shape: tuple):
        self.fh, self.name, self.dtype, self.tail = fh, name, np.dtype(dtype), tuple(tail_shape)
        self.fh.write(b"\0" * _HEADER_BYTES)
        self.rows = 0
        self.all_one = True

    def append(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=self.dtype)
        if a.shape[1:] != self.tail:
            raise ValueError(f"{self.name}: block shape {a.shape} does not end in {self.tail}")
        self.all_one = self.all_one and bool((a == 1).all())
        self.fh.write(a.tobytes())
        self.rows += a.shape[0]

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
    chunks = fmt.read(path, chunk_rows=chunk_rows, skip_bad_lines=skip_bad_lines, stats=stats)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc=progress, unit="chunk", leave=False)
    return chunks


def _encode_to(encoder: FeatureEncoder, chunks: Iterable, out_dir: Optional[Path]) -> Dict[str, np.ndarray]:
    """Encode all chunks; stream to ``out_dir/*.npy`` when given, else keep them in memory."""
    writers: Dict[str, _NpyStreamWriter] = {}
    blocks: Dict[str, List[np.ndarray]] = {}
    all_one: Dict[str, bool] = {}
    # Each .npy is written atomically; leaving the stack moves them all into place, or, on an
    # error, removes them all.
    with contextlib.ExitStack() as files:
        for chunk in chunks:
            for name, a in encoder.encode(chunk).items():
                if out_dir is not None:
                    if name not in writers:
                        fh = files.enter_context(atomic_write(out_dir / f"{name}.npy", "wb"))
                        writers[name] = _NpyStreamWriter(fh, f"{name}.npy", a.dtype, a.shape[1:])
                    writers[name].append(a)
                else:
                    blocks.setdefault(name, []).append(a)
                    all_one[name] = all_one.get(name, True) and bool((a == 1).all())
        for w in writers.values():
            w.finish()
    if out_dir is not None:
        all_one = {name: w.all_one for name, w in writers.items()}
        arrays = {name: None for name in writers}
    else:
        arrays = {name: np.concatenate(b) for name, b in blocks.items()}
    # Weights that are all 1 carry nothing: drop them, so the model takes the unweighted path.
    for name in list(arrays):
        if name.endswith("weights") and all_one[name]:
            del arrays[name]
            if out_dir is not None:
                (out_dir / f"{name}.npy").unlink()
    return arrays


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
        padded[row, pos] = ids
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
    stats = ReadStats()
    arrays = _encode_to(encoder, fmt.read(Path(path), chunk_rows, skip_bad_lines, stats), None)
    return _assemble(encoder, arrays)


def _load_split(encoder: FeatureEncoder, d: Path) -> EncodedDataset:
    info = json.loads((d / "split.json").read_text())
    arrays = {name: np.load(d / f"{name}.npy", mmap_mode="c") for name in info["arrays"]}
    return _assemble(encoder, arrays)


def _fix_libfm_layout(fmt: Format, train: Path, chunk_rows: int, meta: Optional[Dict[str, Any]]) -> None:
    """libFM: every file is read with the layout (position/bag, pair count) of the training file,
    which the cache's meta.json keeps, so that a cache hit need not read the file to find it."""
    if not isinstance(fmt, LibFMFormat) or fmt.layout is not None:
        return
    stored = meta.get("libfm_layout") if meta is not None else None  # absent from caches made before it was kept
    fmt.set_layout(*(stored if stored is not None else fmt._mode(train, chunk_rows)))


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

    Two streaming passes over ``train`` (fit, then encode) and one over each other file; memory
    holds one chunk at a time plus the vocabularies. With ``cache_dir``, a second call with the
    same format options and unchanged files (same size and mtime) parses nothing.

    Args:
        fmt: a :class:`CriteoFormat`, :class:`LibFMFormat` or :class:`CSVFormat`.
        train: training file (vocabularies and numeric statistics come from it only).
        valid, test: optional files encoded with the training vocabularies (unseen -> OOV).
            Every file must have labels (:class:`DataFormatError` otherwise).
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

    root, meta = None, None
    if cache_dir is not None:
        root = Path(cache_dir) / _key({"options": opts, "train": sigs["train"]})
        meta_path = root / "meta.json"
        split_dirs = {k: root / f"{k}-{_key(s)}" for k, s in sigs.items()}
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        if meta is not None and all((d / "split.json").is_file() for d in split_dirs.values()):
            _fix_libfm_layout(fmt, train, chunk_rows, meta)
            encoder = FeatureEncoder.from_dict(meta["encoder"])
            splits = {k: _load_split(encoder, d) for k, d in split_dirs.items()}
            bad = {k: json.loads((d / "split.json").read_text())["bad_lines"] for k, d in split_dirs.items()}
            return PreparedData(splits["train"], splits.get("valid"), splits.get("test"), encoder,
                                True, bad, root)
        root.mkdir(parents=True, exist_ok=True)

    _fix_libfm_layout(fmt, train, chunk_rows, meta)
    if meta is not None:
        # Same options and training file: reuse the fitted encoder; only new files get encoded.
        encoder = FeatureEncoder.from_dict(meta["encoder"])
        fit_stats = None
    else:
        fit_stats = ReadStats()
        encoder = FeatureEncoder(fmt.columns(train)).fit(
            _stream_chunks(fmt, train, chunk_rows, skip_bad_lines, fit_stats, "fit" if progress else None))

    splits, bad = {}, {}
    for name, path in files.items():
        stats = ReadStats()
        chunks = _stream_chunks(fmt, path, chunk_rows, skip_bad_lines, stats, name if progress else None)
        if root is None:
            splits[name] = _assemble(encoder, _encode_to(encoder, chunks, None))
        else:
            d = split_dirs[name]
            if (d / "split.json").is_file():
                splits[name] = _load_split(encoder, d)
                bad[name] = json.loads((d / "split.json").read_text())["bad_lines"]
                continue
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
            try:
                arrays = _encode_to(encoder, chunks, tmp)
                write_json(tmp / "split.json", {"rows": stats.rows, "bad_lines": stats.bad_lines,
                                                "source": sigs[name], "arrays": sorted(arrays)})
                if d.exists():
                    shutil.rmtree(d)
                os.replace(tmp, d)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # a bad row or ^C leaves no half split behind
                raise
            splits[name] = _load_split(encoder, d)
        bad[name] = stats.bad_lines
    if root is not None and fit_stats is not None:
        write_json(meta_path, {"version": CACHE_VERSION, "options": opts, "train_source": sigs["train"],
                            "train_rows": fit_stats.rows, "encoder": encoder.to_dict(),
                            "libfm_layout": fmt.layout if isinstance(fmt, LibFMFormat) else None})
    return PreparedData(splits["train"], splits.get("valid"), splits.get("test"), encoder, False, bad, root)
