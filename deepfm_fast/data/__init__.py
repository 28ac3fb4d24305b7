"""Data pipeline of ``deepfm_fast``: raw CTR files -> encoded tensors -> batches -> CSR bags.

Typical use::

    from deepfm_fast.data import CriteoFormat, prepare_data, iterate_batches, to_csr

    data = prepare_data(CriteoFormat(), "train.txt.gz", test="test.txt.gz", cache_dir=".cache")
    train, valid = data.train.random_split(0.1, seed=0)
    for batch in iterate_batches(train, 4096, shuffle=True, seed=epoch):
        indices, offsets, weights = to_csr(batch, data.fields)

or, with no files at all, :func:`make_synthetic` for data with a known best AUC.
"""

from .dataset import Batch, EncodedDataset, field_offsets, iterate_batches, to_csr
from .synthetic import SyntheticData, make_synthetic

# The readers need pyarrow; they load on first use, so that models and synthetic data do without it.
_LAZY = {
    "cache": ("PreparedData", "encode_file", "prepare_data"),
    "encode": ("FeatureEncoder",),
    "formats": ("FORMATS", "format_spec", "make_format", "trained_spec"),
    "formats.criteo": ("CriteoFormat",),
    "formats.csv": ("SPARROW_MOVIELENS_SCHEMA", "CSVFormat", "parse_schema"),
    "formats.libfm": ("LibFMFormat",),
    "readers": ("Column", "DataFormatError", "ReadStats"),
    "vocab": ("MISSING_ID", "OOV_ID", "HashVocabulary", "NumericTransform", "Vocabulary"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Batch",
    "Column",
    "CriteoFormat",
    "CSVFormat",
    "DataFormatError",
    "EncodedDataset",
    "FORMATS",
    "FeatureEncoder",
    "HashVocabulary",
    "LibFMFormat",
    "MISSING_ID",
    "NumericTransform",
    "OOV_ID",
    "PreparedData",
    "ReadStats",
    "SPARROW_MOVIELENS_SCHEMA",
    "SyntheticData",
    "Vocabulary",
    "encode_file",
    "field_offsets",
    "format_spec",
    "iterate_batches",
    "make_format",
    "make_synthetic",
    "parse_schema",
    "prepare_data",
    "to_csr",
    "trained_spec",
]
