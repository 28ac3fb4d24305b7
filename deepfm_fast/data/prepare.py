"""``deepfm-fast prepare``: encode raw files once into the cache that train/evaluate/predict reuse.

::

    deepfm-fast prepare --format criteo --train train.txt --test test.txt --cache-dir .cache
    deepfm-fast train   --format criteo --train train.txt --test test.txt --cache-dir .cache ...

``train`` with the same data options (format, schema, --min-count, --hash-buckets,
--skip-bad-lines) and unchanged files finds the cache and parses nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Optional, Union

from ..features import MultiHotField, SparseField
from .cache import PreparedData, prepare_data
from .formats import BUILTIN_SCHEMAS, FORMATS, format_spec, make_format

__all__ = ["prepare", "add_prepare_parser", "cmd_prepare", "UNSEEN_VALUES_HELP", "HASH_BUCKETS_HELP"]

#: What happens to a value the training file did not hold: one text for the help and the README.
UNSEEN_VALUES_HELP = ("counted ids: a value seen fewer than --min-count times in the training file, or never "
                      "(e.g. new at evaluate/predict time), gets the field's shared OOV row 0; an empty value "
                      "gets the MISSING row 1")
HASH_BUCKETS_HELP = ("hash categorical values into N buckets per field instead of counting them (no "
                     "vocabulary, no counting; an unseen value goes to its bucket): id = 2 + CRC-32(UTF-8 "
                     "bytes) mod N, the same on every machine. criteo and libfm: every categorical field; "
                     "csv: every sparse/multi_hot column whose schema sets no hash_buckets")


def prepare(format: str, train: Union[str, Path], valid: Optional[Union[str, Path]] = None,
            test: Optional[Union[str, Path]] = None, *, schema: Optional[Union[str, Path]] = None,
            min_count: int = 1, hash_buckets: Optional[int] = None, cache_dir: Union[str, Path] = ".cache",
            skip_bad_lines: bool = False, chunk_rows: int = 1 << 18, progress: bool = True,
            say: Callable[[str], None] = print) -> PreparedData:
    """Encode ``train`` (and ``valid``/``test``) into ``cache_dir``; report rows/s and vocabulary sizes.

    Args are those of :func:`~deepfm_fast.data.formats.format_spec` and
    :func:`~deepfm_fast.data.prepare_data`; ``say`` receives the report lines.
    """
    spec = format_spec(format, schema=schema, min_count=min_count, hash_buckets=hash_buckets)
    fmt = make_format(spec)
    start = time.perf_counter()
    data = prepare_data(fmt, train, valid, test, cache_dir=cache_dir, chunk_rows=chunk_rows,
                        skip_bad_lines=skip_bad_lines, progress=progress)
    seconds = time.perf_counter() - start
    splits = {"train": data.train, "valid": data.valid, "test": data.test}
    rows = sum(len(d) for d in splits.values() if d is not None)
    state = "found in the cache (nothing parsed)" if data.from_cache else f"{rows / seconds:,.0f} rows/s"
    say(f"{rows:,} rows in {seconds:.1f} s: {state}; cache {data.cache_path}")
    for name, d in splits.items():
        if d is not None:
            bad = data.bad_lines.get(name, 0)
            say(f"  {name}: {len(d):,} rows" + (f", {bad:,} malformed rows skipped" if bad else ""))
    sizes = ", ".join(f"{f.name} {f.vocab_size:,}" for f in data.fields
                      if isinstance(f, (SparseField, MultiHotField)))
    say(f"vocabulary sizes (rows per field, OOV and MISSING included): {sizes or 'none'}")
    return data


def add_prepare_parser(sub) -> argparse.ArgumentParser:
    """Add the ``prepare`` subcommand to the subparsers ``sub`` of the ``deepfm-fast`` parser."""
    p = sub.add_parser(
        "prepare", help="encode the data files once into --cache-dir (train/evaluate/predict reuse it)",
        description="Encode --train (and --valid/--test) into the cache --cache-dir, print rows/s and the "
                    "vocabulary sizes, and exit. 'train' with the same data options and files reads the cache. "
                    f"Unseen values, {UNSEEN_VALUES_HELP}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="criteo: label,I1..I13,C1..C26 (TSV, or CSV with header); libfm: 'label id:value ...'; "
                        "csv: header CSV described by --schema")
    p.add_argument("--schema", help="csv: JSON/YAML file mapping column -> role, or a built-in schema: "
                                    + ", ".join(sorted(BUILTIN_SCHEMAS)))
    p.add_argument("--train", required=True, help="training file (plain or gzip): vocabularies and statistics")
    p.add_argument("--valid", help="validation file, encoded with the training vocabularies")
    p.add_argument("--test", help="test file, encoded with the training vocabularies")
    p.add_argument("--min-count", type=int, default=1, help=UNSEEN_VALUES_HELP)
    p.add_argument("--hash-buckets", type=int, metavar="N", help=HASH_BUCKETS_HELP)
    p.add_argument("--cache-dir", default=".cache", help="where the encoded arrays go")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count malformed rows instead of stopping at the first (file and line)")
    p.add_argument("--chunk-rows", type=int, default=1 << 18,
                   help="rows parsed per block at most (a block also holds at most 32 MB; memory: a few blocks)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    return p


def cmd_prepare(args: argparse.Namespace) -> int:
    for what in ("train", "valid", "test"):
        path = getattr(args, what)
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"--{what} {path}: file not found")
    if args.min_count < 1:
        raise ValueError(f"--min-count must be >= 1, got {args.min_count}")
    if args.hash_buckets is not None and args.hash_buckets < 1:
        raise ValueError(f"--hash-buckets must be >= 1, got {args.hash_buckets}")
    prepare(args.format, args.train, args.valid, args.test, schema=args.schema, min_count=args.min_count,
            hash_buckets=args.hash_buckets, cache_dir=args.cache_dir, skip_bad_lines=args.skip_bad_lines,
            chunk_rows=args.chunk_rows, progress=args.progress)
    return 0
