"""The Criteo Kaggle / Terabyte format: ``label, I1..I13, C1..C26`` as TSV, or CSV with a header."""

from __future__ import annotations

import csv
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..readers import Column, DataFormatError, _check_not_empty, _DelimitedFormat, open_text

__all__ = ["CriteoFormat", "CRITEO_NUMERIC", "CRITEO_CATEGORICAL"]

CRITEO_NUMERIC = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))


class CriteoFormat(_DelimitedFormat):
    """Criteo Kaggle / Terabyte rows: ``label, I1..I13 (integers), C1..C26 (hex)``.

    A file without labels (``test.txt``: ``I1..I13, C1..C26``) is read too, with NaN labels.

    Args:
        layout: ``"tsv"`` (no header, tab-separated, the original ``train.txt``), ``"csv"``
            (comma-separated with the header ``label,I1..I13,C1..C26``) or ``"auto"``.
        numeric: transform of I1..I13: ``"log1p"`` (NumericFields, log1p + standardised),
            ``"log_square"`` (SparseFields of ``floor(log(x)^2)`` buckets), ``"standardize"``
            or ``"none"``.
        min_count: categorical values seen fewer times in training go to OOV.
        hash_buckets: hash C1..C26 (and bucketed I's) instead of counting.
        missing_indicator: add a 0/1 numeric field per I column.
    """

    def __init__(self, layout: str = "auto", numeric: str = "log1p", min_count: int = 1,
                 hash_buckets: Optional[int] = None, missing_indicator: bool = False):
        if layout not in ("auto", "tsv", "csv"):
            raise ValueError(f"CriteoFormat: layout must be 'auto', 'tsv' or 'csv', got {layout!r}")
        self.layout = layout
        # log_square columns are parsed as numbers; the encoder turns them into sparse fields.
        self._cols = (
            [Column("label", "label")]
            + [Column(n, "numeric", transform=numeric, min_count=min_count,
                      hash_buckets=hash_buckets, missing_indicator=missing_indicator)
               for n in CRITEO_NUMERIC]
            + [Column(n, "sparse", min_count=min_count, hash_buckets=hash_buckets)
               for n in CRITEO_CATEGORICAL]
        )

    _coded_numbers = True  # I1..I13 are counts: a few thousand distinct values per million rows

    def _layout(self, path: Path) -> Tuple[str, bool, List[Column]]:
        layout = self.layout
        with open_text(path, errors="replace") as fh:
            first = fh.readline()
        _check_not_empty(path, first)
        if layout == "auto":
            if "\t" in first:
                layout = "tsv"
            elif first.startswith(("label,", "I1,")):
                layout = "csv"
            else:
                raise DataFormatError(f"{path}, line 1: cannot tell the Criteo layout (no tab, no "
                                      "'label,' or 'I1,' header); pass layout='tsv' or 'csv'")
        unlabelled = self._cols[1:]
        if layout == "csv":
            head = next(csv.reader([first]))
            want = [c.name for c in self._cols]
            if head == want[1:]:
                return ",", True, unlabelled
            if head != want:
                missing = [c for c in want[1:] if c not in head]
                raise DataFormatError(f"{path}, line 1: expected the Criteo header label,I1..I13,C1..C26 "
                                      f"(label optional); got {len(head)} columns"
                                      + (f", missing {missing}" if missing else ""))
            return ",", True, self._cols
        if first.rstrip("\r\n").count("\t") == len(unlabelled) - 1:
            return "\t", False, unlabelled
        return "\t", False, self._cols

    _no_label = "no label column: 39 columns I1..I13, C1..C26, the layout of Criteo's test.txt"

    def options(self) -> Dict[str, Any]:
        return {"format": "criteo", "layout": self.layout, "columns": [asdict(c) for c in self._cols]}

    @classmethod
    def spec_kwargs(cls, *, schema=None, min_count: int = 1, hash_buckets: Optional[int] = None) -> Dict[str, Any]:
        """The constructor arguments of the command-line options (see ``format_spec``)."""
        if schema is not None:
            raise ValueError("--schema is for the csv format only")
        return {"min_count": min_count, "hash_buckets": hash_buckets}
