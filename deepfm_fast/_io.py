"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file this package writes for later use (checkpoints, metrics JSON, predictions CSV, the
cache's arrays and ``meta.json``, learning-curve plots) goes through :func:`atomic_write`::

    with atomic_write("runs/metrics.json") as fh:
        json.dump(metrics, fh)

The data goes to a temporary file in the same directory (``.<name>.<pid>.tmp``: same file
system, so ``os.replace`` is a rename) that replaces ``path`` only when the block ends without an
error; on an error the temporary file is removed and ``path`` is left as it was. There is no
``fsync``: this guards against crashes of the process (an interrupted run, a full disk), not
against power loss.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO, Any, Iterator, Union

__all__ = ["atomic_write", "write_json"]


@contextlib.contextmanager
def atomic_write(path: Union[str, Path], mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; move it onto ``path`` on success.

    Args:
        path: the file to create or replace; missing parent directories are created.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        **open_kwargs: passed to :func:`open` (``encoding``, ``newline``).

    Yields:
        the open temporary file. A seekable file: a writer may go back and fill in a header.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **open_kwargs) as fh:
            yield fh
        os.replace(tmp, path)
    finally:
        # Only there if the block (or the replace) failed.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_json(path: Union[str, Path], obj: Any, compact: bool = False) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically.

    Numbers that JSON does not know (numpy or torch scalars) are written as floats. ``compact``: no
    indentation, for large files read by programs (indenting takes json's pure-Python encoder, ~10x
    slower: 15 s for the 9.5 M values of a cache's vocabularies).
    """
    with atomic_write(path, encoding="utf-8") as fh:
        fh.write(json.dumps(obj, indent=None if compact else 2, sort_keys=True, default=float) + "\n")
