"""The columnar path (Arrow) against the row-by-row path it replaced, and its bad-input handling.

The reference below is the encoding as it was before the columnar path: the row-by-row parser
(``fmt.read``, still the fallback for bad blocks) plus per-value Python (``collections.Counter``,
dict lookups, ``zlib.crc32``). The columnar arrays must equal it on every shared data set.
"""

import gzip
import math
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from deepfm_fast.data import (
    MISSING_ID,
    OOV_ID,
    SPARROW_MOVIELENS_SCHEMA,
    CriteoFormat,
    CSVFormat,
    DataFormatError,
    LibFMFormat,
    encode_file,
    prepare_data,
    readers,
)
from deepfm_fast.data.columnar import crc32_utf8
from deepfm_fast.data.vocab import NumericTransform, log_square_token
from deepfm_fast.features import SparseField
from test_data import write_criteo
from testing import shared_data_file


# -- the reference: per-value Python, as before the columnar path -------------------------------------
def reference(fmt, train, other=None, chunk_rows=65536):
    """(sparse, [(mh ids, lengths)], numeric, labels) of ``other`` (default: ``train``), fitted on ``train``."""
    cols = fmt.columns(train)
    cat_cols, groups, nums = [], {}, {}
    for c in cols:
        categorical = c.role == "sparse" or (c.role == "numeric" and c.transform == "log_square")
        if categorical or c.role == "multi_hot":
            if c.field_name not in groups:
                groups[c.field_name] = c
                cat_cols.append(c.field_name)
        elif c.role == "numeric":
            nums[c.name] = NumericTransform(c.transform)

    def values(chunk, name):
        c = groups[name]
        if c.role == "multi_hot":
            return [t for b in chunk.bags[name] for t in b]
        if c.role == "numeric":
            return [log_square_token(x) for x in chunk.nums[c.name].tolist()]
        return list(chunk.cats[c.name])

    counts = {n: Counter() for n in cat_cols}
    for chunk in fmt.read(train, chunk_rows):
        for n in cat_cols:
            counts[n].update(values(chunk, n))
        for n, t in nums.items():
            t.update(chunk.nums[n])
    for t in nums.values():
        t.finish()
    index = {}
    for n in cat_cols:
        kept = sorted(((c, v) for v, c in counts[n].items() if c >= groups[n].min_count and v != ""),
                      key=lambda cv: (-cv[0], cv[1]))
        index[n] = {v: i + 2 for i, (_, v) in enumerate(kept)}

    def ids(name, vals):
        b = groups[name].hash_buckets
        if b is not None:
            return [2 + zlib.crc32(v.encode()) % b if v else MISSING_ID for v in vals]
        return [MISSING_ID if v == "" else index[name].get(v, OOV_ID) for v in vals]

    sparse, bags, numeric, labels = [], {n: ([], []) for n in cat_cols if groups[n].role == "multi_hot"}, [], []
    for chunk in fmt.read(other or train, chunk_rows):
        labels.append(chunk.labels)
        sparse.append(np.array([ids(n, values(chunk, n)) for n in cat_cols if groups[n].role != "multi_hot"],
                               np.int64).reshape(-1, len(chunk)).T)
        for n, (flat, lengths) in bags.items():
            flat += ids(n, values(chunk, n))
            lengths += [len(b) for b in chunk.bags[n]]
        numeric.append(np.stack([nums[c.name].apply(chunk.nums[c.name]) for c in cols
                                 if c.role == "numeric" and c.name in nums] or [np.zeros(len(chunk))], 1))
    return (np.concatenate(sparse), [(np.array(f), np.array(ln)) for f, ln in bags.values()],
            np.concatenate(numeric), np.concatenate(labels))


def assert_matches_reference(fmt_factory, train, other=None, monkeypatch=None, **kw):
    """The columnar arrays equal the reference's; with ``monkeypatch``, Arrow parsed every block
    (none fell back to the row-by-row parser, which would make the comparison circular)."""
    fallbacks = []
    if monkeypatch is not None:
        for cls in (readers._DelimitedFormat, LibFMFormat):
            real = cls._chunk
            monkeypatch.setattr(cls, "_chunk", lambda *a, real=real: fallbacks.append(1) or real(*a))
    data = prepare_data(fmt_factory(), train, test=other, **kw)
    if monkeypatch is not None:
        monkeypatch.undo()
        assert fallbacks == [], "a block of a clean file went to the row-by-row parser"
    ds = data.test if other is not None else data.train
    sparse, bags, numeric, labels = reference(fmt_factory(), train, other)
    assert np.array_equal(ds.sparse.numpy(), sparse)
    assert np.array_equal(ds.labels.numpy(), labels)
    if numeric.shape[1] == ds.numeric.shape[1]:
        np.testing.assert_allclose(ds.numeric.numpy(), numeric, rtol=1e-6, atol=1e-6)
    for padded, (flat, lengths) in zip(ds.multi_hot, bags):
        got = padded.numpy()
        assert np.array_equal((got >= 0).sum(1), lengths)
        assert np.array_equal(got[got >= 0], flat)
    return data


AVAZU_SCHEMA = {"id": "ignore", "click": "label", "*": "sparse"}
DEEPCTR_MOVIELENS_SCHEMA = {"user_id": "sparse", "movie_id": "sparse", "rating": "label", "timestamp": "keep",
                            "title": "sparse", "genres": {"role": "multi_hot", "sep": "|"}, "gender": "sparse",
                            "age": "sparse", "occupation": "sparse", "zip": "sparse"}


def _avazu(rel):
    return lambda: CSVFormat(AVAZU_SCHEMA | {c: "sparse" for c in _header(shared_data_file(rel))
                                            if c not in AVAZU_SCHEMA})


def _header(path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        return fh.readline().strip().split(",")


@pytest.mark.parametrize("fmt_factory,rel,other", [
    (lambda: CriteoFormat(), "criteo_sample_10k/criteo_sampled_data_10k.csv.gz", None),
    (lambda: CriteoFormat(min_count=3, numeric="log_square", missing_indicator=True),
     "criteo_sample_10k/criteo_sampled_data_10k.csv.gz", None),
    (lambda: CriteoFormat(hash_buckets=1000), "criteo_sample_10k/criteo_sampled_data_10k.csv.gz", None),
    (lambda: CriteoFormat(), "deepctr_examples/criteo_sample.txt", None),
    (lambda: LibFMFormat(), "frappe/frappe.validation.libfm", "frappe/frappe.test.libfm"),
    (lambda: LibFMFormat(fields="bag", min_count=2), "frappe/frappe.train_positives.reconstructed.libfm.gz", None),
    (lambda: LibFMFormat(hash_buckets=997), "frappe/frappe.test.libfm", None),
    (lambda: CSVFormat(SPARROW_MOVIELENS_SCHEMA), "sparrow_movielens/samples.csv", None),
    (_avazu("avazu_sample_9k/train.csv.gz"), "avazu_sample_9k/train.csv.gz", None),
    (lambda: CSVFormat({"click": "label", "id": "ignore", "*": "sparse"}), "deepctr_examples/avazu_sample.txt", None),
    (lambda: CSVFormat(DEEPCTR_MOVIELENS_SCHEMA), "deepctr_examples/movielens_sample.txt", None),
])
def test_columnar_arrays_equal_the_row_by_row_reference(fmt_factory, rel, other, tmp_path, monkeypatch):
    train = shared_data_file(rel)
    if rel.endswith("movielens_sample.txt"):  # ratings 1..5: a click is a rating >= 4
        lines = train.read_text().splitlines()
        head = lines[0].split(",")
        r = head.index("rating")
        rows = [ln.split(",") for ln in lines[1:]]
        text = "\n".join([lines[0]] + [",".join(x[:r] + [str(int(int(x[r]) >= 4))] + x[r + 1:]) for x in rows])
        train = tmp_path / "movielens.csv"
        train.write_text(text + "\n")
    other_path = shared_data_file(other) if other else None
    data = assert_matches_reference(fmt_factory, train, other_path, monkeypatch=monkeypatch)
    cached = prepare_data(fmt_factory(), train, test=other_path, cache_dir=tmp_path / "cache", chunk_rows=4000)
    for name in ("train", "test"):
        a, b = getattr(data, name), getattr(cached, name)
        if a is not None:
            assert torch.equal(a.sparse, b.sparse) and torch.equal(a.labels, b.labels)
            assert torch.allclose(a.numeric, b.numeric, rtol=1e-6, atol=1e-6)
            assert all(torch.equal(x, y) for x, y in zip(a.multi_hot, b.multi_hot))


def test_vectorised_crc32_is_zlibs():
    import pyarrow as pa

    rng = np.random.default_rng(0)
    values = ["", "a", "68fd1e64", "héllo wörld", "\U0001f600" * 3] + [
        "".join(map(chr, rng.integers(32, 0x2FF, rng.integers(0, 40)))) for _ in range(500)]
    assert crc32_utf8(pa.array(values)).tolist() == [zlib.crc32(v.encode()) for v in values]


def _criteo_tsv(path, rows, gz=False):
    return write_criteo(path, rows, gz=gz)


def _row(label, ints, cats):
    return [str(label)] + [str(i) for i in ints] + list(cats)


def test_unseen_values_go_to_oov_counted_and_to_their_bucket_hashed(tmp_path):
    train = _criteo_tsv(tmp_path / "train.txt", [_row(k % 2, [k] * 13, [f"seen{k % 3}"] * 26) for k in range(30)])
    new = _criteo_tsv(tmp_path / "new.txt", [_row(1, [1] * 13, ["never"] * 25 + [""]),
                                             _row(0, [2] * 13, ["seen1"] * 26)])
    counted = prepare_data(CriteoFormat(), train)
    enc = encode_file(CriteoFormat(), counted.encoder, new)
    assert enc.sparse[0, :25].eq(OOV_ID).all() and enc.sparse[0, 25] == MISSING_ID
    assert enc.sparse[1].ge(2).all()
    hashed = prepare_data(CriteoFormat(hash_buckets=50), train)
    enc = encode_file(CriteoFormat(hash_buckets=50), hashed.encoder, new)
    assert enc.sparse[0, :25].eq(2 + zlib.crc32(b"never") % 50).all() and enc.sparse[0, 25] == MISSING_ID
    assert [f.vocab_size for f in hashed.fields if isinstance(f, SparseField)] == [52] * 26


# -- bad input ---------------------------------------------------------------------------------------
def _good_rows(n=20):
    return [_row(k % 2, [k] * 13, [f"{k % 5:08x}"] * 26) for k in range(n)]


@pytest.mark.parametrize("chunk_rows", [7, 65536])
def test_bad_rows_stop_with_file_and_line_or_are_skipped_and_counted(tmp_path, chunk_rows):
    rows = _good_rows()
    rows[11] = rows[11][:-1]                  # line 12: 39 columns in a labelled file
    rows[15][3] = "x1"                        # line 16: not a number
    path = _criteo_tsv(tmp_path / "bad.txt", rows)
    with pytest.raises(DataFormatError, match=r"bad\.txt, line 12: expected 40 columns, got 39"):
        prepare_data(CriteoFormat(), path, chunk_rows=chunk_rows)
    d = prepare_data(CriteoFormat(), path, skip_bad_lines=True, chunk_rows=chunk_rows)
    assert len(d.train) == 18 and d.bad_lines == {"train": 2}
    good = prepare_data(CriteoFormat(), _criteo_tsv(tmp_path / "good.txt", [r for i, r in enumerate(_good_rows())
                                                                           if i not in (11, 15)]))
    assert torch.equal(d.train.sparse, good.train.sparse)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "u.txt"
    lines = ["\t".join(r).encode() for r in _good_rows(5)]
    lines[3] = lines[3].replace(b"00000003", b"0000\xff\xfe03")
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataFormatError, match=r"u\.txt, line 4: invalid UTF-8"):
        prepare_data(CriteoFormat(), path)
    assert len(prepare_data(CriteoFormat(), path, skip_bad_lines=True).train) == 4
    lib = tmp_path / "u.libfm"
    lib.write_bytes(b"1 1:1 2:1\n0 3:1 4\xff:1\n")
    with pytest.raises(DataFormatError, match=r"u\.libfm, line 2: invalid UTF-8"):
        prepare_data(LibFMFormat(), lib)


def test_empty_file_and_truncated_gzip(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataFormatError, match="empty"):
        prepare_data(CriteoFormat(layout="tsv"), empty)
    blank = tmp_path / "blank.libfm"
    blank.write_text("\n\n")
    with pytest.raises(DataFormatError, match="empty"):
        prepare_data(LibFMFormat(), blank)
    whole = _criteo_tsv(tmp_path / "c.txt.gz", _good_rows(2000), gz=True)
    cut = tmp_path / "cut.txt.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(DataFormatError, match=r"cut\.txt\.gz: the gzip stream is cut short"):
        prepare_data(CriteoFormat(), cut, cache_dir=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_full_disk_while_writing_leaves_no_cache(tmp_path, monkeypatch):
    from deepfm_fast.data import cache as cache_mod

    path = _criteo_tsv(tmp_path / "c.txt", _good_rows(50))
    real_append, calls = cache_mod._NpyStreamWriter.append, []

    def failing_append(self, a):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        real_append(self, a)

    monkeypatch.setattr(cache_mod._NpyStreamWriter, "append", failing_append)
    with pytest.raises(OSError, match="No space left"):
        prepare_data(CriteoFormat(), path, cache_dir=tmp_path / "cache", chunk_rows=10)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]   # no half-written split or meta
    monkeypatch.undo()
    d = prepare_data(CriteoFormat(), path, cache_dir=tmp_path / "cache", chunk_rows=10)
    assert not d.from_cache and len(d.train) == 50
    assert prepare_data(CriteoFormat(), path, cache_dir=tmp_path / "cache").from_cache


def test_prepare_command_then_train_reads_its_cache(tmp_path, capsys, monkeypatch):
    from deepfm_fast.cli import main

    train = _criteo_tsv(tmp_path / "train.txt", _good_rows(300))
    cache = tmp_path / "cache"
    assert main(["prepare", "--format", "criteo", "--train", str(train), "--hash-buckets", "64",
                 "--cache-dir", str(cache), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "300 rows in" in out and "rows/s" in out and "C1 66" in out
    monkeypatch.setattr(readers._DelimitedFormat, "read_columns",
                        lambda *a, **k: pytest.fail("train parsed the file that prepare had cached"))
    assert main(["train", "--format", "criteo", "--train", str(train), "--hash-buckets", "64", "--cache-dir",
                 str(cache), "--epochs", "1", "--no-progress", "--hidden-units", "8", "--batch-size", "64"]) == 0
    assert main(["prepare", "--format", "criteo", "--train", str(train), "--hash-buckets", "64",
                 "--cache-dir", str(cache), "--no-progress"]) == 0
    assert "found in the cache" in capsys.readouterr().out
    assert main(["prepare", "--format", "criteo", "--train", str(tmp_path / "nope.txt")]) == 1
    assert "--train" in capsys.readouterr().err


def test_log_square_tokens_match_the_scalar_rule():
    from deepfm_fast.data.vocab import log_square_tokens

    x = np.array([math.nan, -3.7, -0.5, 0.0, 1.0, 2.0, 2.5, 3.0, 100.0, 1e9])
    assert log_square_tokens(x).to_pylist() == [log_square_token(v) or None for v in x.tolist()]


def test_cache_written_from_chunks_equals_in_memory(tmp_path):
    path = Path(tmp_path / "c.txt")
    _criteo_tsv(path, _good_rows(100))
    mem = prepare_data(CriteoFormat(min_count=2), path)
    disk = prepare_data(CriteoFormat(min_count=2), path, cache_dir=tmp_path / "cache", chunk_rows=7)
    assert torch.equal(mem.train.sparse, disk.train.sparse) and torch.equal(mem.train.numeric, disk.train.numeric)


@pytest.mark.parametrize("fields", ["bag", "position"])
def test_libfm_whitespace_runs_and_crlf_parse_as_str_split(tmp_path, monkeypatch, fields):
    path = tmp_path / "ws.libfm"
    path.write_bytes(b"1  3:1   4:2 \r\n\n  -1 3:1\t5:0.5\r\n1 6:1 3:1\n")
    assert_matches_reference(lambda: LibFMFormat(fields=fields), path, monkeypatch=monkeypatch)


# -- the fast path's parts: blocks, read-ahead, compact spill, coded numbers, id types ----------------
@pytest.mark.parametrize("gz", [False, True])
def test_blocks_hold_every_line_once_with_its_number(tmp_path, monkeypatch, gz):
    from deepfm_fast.data import columnar

    monkeypatch.setattr(columnar, "_SCAN", 3)  # the windowed newline searches cross windows
    rng = np.random.default_rng(0)
    for trial in range(300):
        lines = [b"x" * int(rng.integers(0, 12)) for _ in range(int(rng.integers(0, 30)))]
        data = b"\n".join(lines) + (b"\n" if rng.random() < 0.5 else b"")
        path = tmp_path / f"f{trial}"
        path.write_bytes(gzip.compress(data) if gz else data)
        chunk_rows, block_bytes = int(rng.integers(1, 9)), int(rng.integers(1, 40))
        skip = int(rng.integers(0, 3)) if lines else 0
        buffers = int(rng.integers(0, 4)) if trial % 2 else 0  # 1: each block used before the next is read
        blocks = [(first, bytes(b)) for first, b in columnar.iter_blocks(path, chunk_rows, block_bytes, skip, buffers)]
        physical = data.split(b"\n")[:data.count(b"\n") + (not data.endswith(b"\n"))]
        want = b"\n".join(physical[skip:]) + (b"\n" if data.endswith(b"\n") and len(physical) > skip else b"")
        assert b"".join(b for _, b in blocks) == want, (trial, chunk_rows, block_bytes, skip, buffers)
        line = skip + 1
        for first, block in blocks:
            n = block.count(b"\n") + (not block.endswith(b"\n"))
            assert first == line and 1 <= n <= chunk_rows
            line += n


@pytest.mark.parametrize("ahead", [False, True])
def test_read_ahead_keeps_order_and_hands_errors_over(ahead):
    from deepfm_fast.data.columnar import read_ahead

    def work(k):
        if k % 4 == 3:
            raise ValueError(f"bad {k}")
        return k * k

    got = list(read_ahead(range(10), work, ahead=ahead))
    assert [k for k, _ in got] == list(range(10))
    for k, r in got:
        assert (isinstance(r, ValueError) and str(r) == f"bad {k}") if k % 4 == 3 else r == k * k


@pytest.mark.parametrize("fmt_factory", [lambda: CriteoFormat(min_count=2), lambda: CriteoFormat(hash_buckets=5000),
                                         lambda: CriteoFormat(numeric="log_square", missing_indicator=True)])
def test_many_chunks_and_a_second_file_equal_the_reference(fmt_factory, tmp_path, monkeypatch):
    """Small chunks: the counted lookups run over groups of chunks (training and test file), the
    coded numbers' statistics add up over chunks."""
    sample = shared_data_file("criteo_sample_10k/criteo_sampled_data_10k.csv.gz")
    with gzip.open(sample, "rt") as fh:
        lines = fh.read().splitlines()[1:]
    train = tmp_path / "train.txt"
    train.write_text("\n".join(ln.replace(",", "\t") for ln in lines[:7000]) + "\n")
    test = tmp_path / "test.txt"
    test.write_text("\n".join(ln.replace(",", "\t") for ln in lines[7000:]) + "\n")
    assert_matches_reference(fmt_factory, train, test, monkeypatch=monkeypatch, chunk_rows=331)


def test_numbers_not_exact_in_float32_are_kept_in_float64(tmp_path):
    values = ["0.1", "1e-300", "123456789.123", "", "2.5", "16777217", "-7", "3"]
    path = tmp_path / "n.csv"
    path.write_text("y,x,c\n" + "".join(f"{k % 2},{v},c{k % 3}\n" for k, v in enumerate(values)))
    fmt = lambda: CSVFormat({"y": "label", "x": {"role": "numeric", "transform": "standardize"}, "c": "sparse"})  # noqa: E731
    d = prepare_data(fmt(), path, cache_dir=tmp_path / "cache", chunk_rows=3)
    x = np.array([float(v) if v else np.nan for v in values])
    t = NumericTransform("standardize")
    t.update(x)
    t.finish()
    np.testing.assert_allclose(d.train.numeric[:, 0].numpy(), t.apply(x), rtol=1e-6, atol=0)


def test_coded_numbers_encode_as_the_dense_numbers():
    from deepfm_fast.data.columnar import CodedNumbers, ColumnChunk
    from deepfm_fast.data.encode import FeatureEncoder
    from deepfm_fast.data.readers import Column

    rng = np.random.default_rng(1)
    values = np.array([0.0, 1.0, 7.0, 7.0, 250.0, np.nan, -3.0])
    codes = rng.integers(-1, len(values), 500).astype(np.int32)
    coded = CodedNumbers(values, codes)
    dense = coded.dense()
    assert np.array_equal(np.isnan(dense), (codes < 0) | np.isnan(values[codes]))
    cols = [Column("label", "label"), Column("x", "numeric", transform="log1p", missing_indicator=True)]
    out = []
    for nums in ({"x": coded}, {"x": dense}):
        chunk = ColumnChunk(np.zeros(len(codes), np.float32), {}, nums, {}, {}, {})
        enc = FeatureEncoder(cols)
        enc.begin_fit()
        arrays, deferred, _ = enc.fit_chunk(chunk)
        enc.finish_fit(len(codes))
        out.append((enc.numeric["x"].mean, enc.numeric["x"].std, enc.finish_deferred(deferred, {})["numeric"],
                    enc.encode(chunk)["numeric"]))
    (m1, s1, deferred1, direct1), (m2, s2, deferred2, direct2) = out
    assert m1 == pytest.approx(m2, rel=1e-12) and s1 == pytest.approx(s2, rel=1e-12)
    np.testing.assert_allclose(deferred1, deferred2, rtol=1e-6)
    assert np.array_equal(deferred1, direct1) and np.array_equal(deferred2, direct2)
    assert np.array_equal(direct1[:, 1], np.isnan(dense).astype(np.float32))


def test_cached_ids_are_int32_batches_int64_and_wide_hashes_int64(tmp_path):
    from deepfm_fast.data import iterate_batches

    path = _criteo_tsv(tmp_path / "t.txt", _good_rows(50))
    d = prepare_data(CriteoFormat(), path, cache_dir=tmp_path / "cache")
    assert d.train.sparse.dtype == torch.int32
    assert next(iterate_batches(d.train, 16)).sparse.dtype == torch.int64
    wide = prepare_data(CriteoFormat(hash_buckets=2 ** 31), path, cache_dir=tmp_path / "cache")
    assert wide.train.sparse.dtype == torch.int64
    ids = wide.train.sparse[:, 0].numpy()
    assert np.array_equal(ids, [2 + zlib.crc32(f"{k % 5:08x}".encode()) % 2 ** 31 for k in range(50)])
