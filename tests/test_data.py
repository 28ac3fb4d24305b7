"""Tests of the data pipeline: readers, vocabularies, cache, batches, CSR and synthetic data."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from deepfm_fast.data import (
    MISSING_ID,
    OOV_ID,
    SPARROW_MOVIELENS_SCHEMA,
    Batch,
    CriteoFormat,
    CSVFormat,
    DataFormatError,
    EncodedDataset,
    HashVocabulary,
    LibFMFormat,
    NumericTransform,
    Vocabulary,
    encode_file,
    iterate_batches,
    make_synthetic,
    prepare_data,
    to_csr,
)
from deepfm_fast.data import readers as readers_mod
from deepfm_fast.features import MultiHotField, NumericField, SparseField, field_from_dict, fields_from_dicts
from testing import shared_data_file


def criteo_row(label, ints, cats):
    return [str(label)] + [str(v) for v in ints] + list(cats)


def write_criteo(path: Path, rows, header=False, sep="\t", gz=False):
    lines = []
    if header:
        lines.append(",".join(["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]))
    lines += [sep.join(r) for r in rows]
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def tiny_criteo_rows():
    # C1 takes 'aa' 3x, 'bb' 1x, '' 1x; I1 holds counts with a missing value.
    c1 = ["aa", "aa", "bb", "aa", ""]
    i1 = [1, 3, "", 10, 0]
    rows = []
    for k in range(5):
        ints = [i1[k]] + [k] * 12
        cats = [c1[k]] + [f"{k % 2:08x}"] * 25
        rows.append(criteo_row(k % 2, ints, cats))
    return rows


# -- feature specs ------------------------------------------------------------------------
def test_field_specs_roundtrip_and_validation():
    fields = [SparseField("a", 10), MultiHotField("g", 5, "mean"), NumericField("x")]
    assert fields_from_dicts(json.loads(json.dumps([f.to_dict() for f in fields]))) == fields
    assert NumericField("x").vocab_size == 1
    with pytest.raises(ValueError, match="'a'.*vocab_size"):
        SparseField("a", 0)
    with pytest.raises(ValueError, match="'g'.*pooling"):
        MultiHotField("g", 3, pooling="max")
    with pytest.raises(ValueError, match="name"):
        NumericField("")
    with pytest.raises(ValueError, match="unknown type"):
        field_from_dict({"type": "dense", "name": "x"})
    with pytest.raises(ValueError, match="unique"):
        fields_from_dicts([{"type": "numeric", "name": "x"}] * 2)


# -- vocabularies and numeric transforms ---------------------------------------------------
def test_vocabulary_min_count_oov_missing():
    from collections import Counter

    v = Vocabulary.fit(Counter(["a", "a", "b", "c", "c", "c", ""]), min_count=2)
    assert v.tokens == ["c", "a"]            # most frequent first; 'b' is rare
    assert v.size == 4
    ids = v.encode(["c", "a", "b", "", "never"]).tolist()
    assert ids == [2, 3, OOV_ID, MISSING_ID, OOV_ID]


def test_hash_vocabulary_is_stable_and_in_range():
    h = HashVocabulary(7)
    ids = h.encode(["x", "y", "", "x"])
    assert ids[0] == ids[3] and ids[2] == MISSING_ID
    assert ((ids >= 2) | (ids == MISSING_ID)).all() and (ids < h.size).all()
    import zlib

    assert ids[0] == 2 + zlib.crc32(b"x") % 7  # stable across processes, unlike hash()


def test_numeric_transform_uses_training_statistics():
    t = NumericTransform("log1p")
    train = np.array([0.0, 1.0, 3.0, np.nan, -5.0])
    t.update(train)
    t.finish()
    y = np.log1p(np.maximum(train[~np.isnan(train)], 0))
    assert t.mean == pytest.approx(y.mean()) and t.std == pytest.approx(y.std())
    out = t.apply(np.array([3.0, np.nan]))  # test values use the TRAINING mean/std
    assert out[0] == pytest.approx((np.log1p(3.0) - y.mean()) / y.std(), rel=1e-6)
    assert out[1] == 0.0


# -- readers -------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,gz", [("tsv", False), ("csv", False), ("tsv", True), ("csv", True)])
def test_criteo_reader_layouts(tmp_path, layout, gz):
    rows = tiny_criteo_rows()
    path = write_criteo(tmp_path / ("c.txt.gz" if gz else "c.txt"), rows, header=layout == "csv",
                        sep="\t" if layout == "tsv" else ",", gz=gz)
    for fmt in (CriteoFormat(layout="auto"), CriteoFormat(layout=layout)):
        d = prepare_data(fmt, path)
        assert len(d.train) == 5
        assert d.train.labels.tolist() == [0, 1, 0, 1, 0]
        assert d.train.sparse.shape == (5, 26) and d.train.numeric.shape == (5, 13)
        c1 = d.train.sparse[:, 0].tolist()
        assert c1 == [2, 2, 3, 2, MISSING_ID]     # 'aa' most frequent -> id 2
        assert d.train.numeric[2, 0] == 0.0       # missing I1 -> 0 after standardisation


def test_criteo_log_square_buckets_and_missing_indicator(tmp_path):
    path = write_criteo(tmp_path / "c.txt", tiny_criteo_rows())
    d = prepare_data(CriteoFormat(numeric="log_square", missing_indicator=True), path)
    assert all(isinstance(f, SparseField) for f in d.fields)  # I's became categories
    i1 = d.encoder.vocab("I1")
    assert set(i1.tokens) == {"1", "b1", "b5", "0"}          # 3 -> floor(log(3)^2)=1; 10 -> 5
    assert d.train.sparse[2, 0] == MISSING_ID
    d2 = prepare_data(CriteoFormat(missing_indicator=True), path)
    names = [f.name for f in d2.fields]
    assert names[:2] == ["I1", "I1_missing"]
    assert d2.train.numeric[:, 1].tolist() == [0, 0, 1, 0, 0]


def test_unseen_categories_go_to_oov(tmp_path):
    train = write_criteo(tmp_path / "train.txt", tiny_criteo_rows())
    rows = tiny_criteo_rows()
    rows[0][14] = "zzzzzzzz"
    test = write_criteo(tmp_path / "test.txt", rows)
    d = prepare_data(CriteoFormat(), train, test=test)
    assert d.test.sparse[0, 0] == OOV_ID and d.test.sparse[1, 0] == 2
    assert d.train.numeric.shape == d.test.numeric.shape


def test_criteo_hashing(tmp_path):
    path = write_criteo(tmp_path / "c.txt", tiny_criteo_rows())
    d = prepare_data(CriteoFormat(hash_buckets=11), path)
    assert all(f.vocab_size == 13 for f in d.fields if isinstance(f, SparseField))
    assert d.train.sparse[0, 0] == d.train.sparse[1, 0] and d.train.sparse[4, 0] == MISSING_ID


def test_libfm_position_and_bag(tmp_path):
    p = tmp_path / "f.libfm"
    p.write_text("1 3:1 10:1 20:0.5\n-1 4:1 10:1 21:1\n0 3:1 11:1 20:1\n")
    d = prepare_data(LibFMFormat(), p)
    assert [f.name for f in d.fields] == ["f0", "f1", "f2"]
    assert d.train.labels.tolist() == [1, 0, 0]
    assert d.train.sparse[:, 0].tolist() == [2, 3, 2]       # '3' twice -> id 2
    assert d.train.sparse_weights[0, 2] == 0.5              # values kept as weights
    q = tmp_path / "g.libfm.gz"
    with gzip.open(q, "wt") as fh:
        fh.write("1 3:2 10:1\n-1 4:1\n1 3:1 10:1 20:1\n")
    d = prepare_data(LibFMFormat(fields="auto"), q)
    (field,) = d.fields
    assert isinstance(field, MultiHotField) and field.name == "features"
    mh, w = d.train.multi_hot[0], d.train.multi_hot_weights[0]
    assert mh.shape == (3, 3) and (mh[1, 1:] == -1).all()
    assert w[0, 0] == 2.0


def test_csv_schema_reader_multi_hot_and_keep(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("label,user,genres,g2,age,ts,junk\n"
                 "1,u1,a|b,c,30,5,x\n0,u2,,b,,3,y\n1,u1,a,,40,4,z\n")
    schema = {"label": "label", "user": "sparse",
              "genres": {"role": "multi_hot", "sep": "|", "field": "genres", "pooling": "mean"},
              "g2": {"role": "multi_hot", "field": "genres", "pooling": "mean"},
              "age": {"role": "numeric", "transform": "standardize"},
              "ts": "keep", "junk": "ignore"}
    d = prepare_data(CSVFormat(schema), p)
    assert [type(f).__name__ for f in d.fields] == ["SparseField", "MultiHotField", "NumericField"]
    bags = d.train.multi_hot[0]
    assert (bags >= 0).sum(1).tolist() == [3, 1, 1]          # 'a|b' + 'c'; '' + 'b'; 'a' + ''
    assert d.train.numeric[:, 0].tolist() == pytest.approx([-1, 0, 1])
    head, tail = d.train.ordered_split(1 / 3, by="ts")
    assert tail.extra["ts"].tolist() == [5.0] and head.extra["ts"].tolist() == [3.0, 4.0]
    yml = tmp_path / "schema.yaml"
    import yaml

    yml.write_text(yaml.safe_dump(schema))
    assert prepare_data(CSVFormat(yml), p).fields == d.fields


def test_format_specs_round_trip_through_json(tmp_path):
    """A spec (what a checkpoint stores) rebuilds a reader that reads files as training did."""
    from deepfm_fast.data import format_spec, make_format, trained_spec

    schema = {"label": "label", "user": "sparse", "age": {"role": "numeric", "transform": "standardize"}}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "s.csv").write_text("label,user,age\n1,u1,30\n0,u2,\n")
    spec = json.loads(json.dumps(format_spec("csv", schema=tmp_path / "schema.json")))
    (tmp_path / "schema.json").unlink()                    # the spec holds the schema itself
    assert prepare_data(make_format(spec), tmp_path / "s.csv").fields == prepare_data(
        CSVFormat(schema), tmp_path / "s.csv").fields
    assert make_format(format_spec("csv", schema="sparrow_movielens")).schema["movieGenre1"].pooling == "mean"
    p = tmp_path / "g.libfm"
    p.write_text("1 3:2 10:1\n-1 4:1\n")
    fmt = make_format(format_spec("libfm", min_count=2))
    prepare_data(fmt, p)
    spec = json.loads(json.dumps(trained_spec(format_spec("libfm"), fmt)))
    assert spec["kwargs"]["layout"] == ["bag", 2] and make_format(spec).layout == ("bag", 2)
    assert make_format(format_spec("criteo")).options()["format"] == "criteo"
    with pytest.raises(ValueError, match="unknown format 'parquet'"):
        format_spec("parquet")
    with pytest.raises(ValueError, match="needs a schema"):
        format_spec("csv")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        format_spec("csv", schema=tmp_path / "nope.yaml")


# -- bad input -----------------------------------------------------------------------------
BAD_CASES = [
    ("criteo", lambda r: r[:3] + [r[3][:-1]] + r[4:], 4, "columns"),          # wrong column count
    ("criteo", lambda r: r[:2] + [["x"] + r[2][1:]] + r[3:], 3, "label 'x'"),  # non-numeric label
    ("criteo", lambda r: r[:1] + [r[1][:1] + ["abc"] + r[1][2:]] + r[2:], 2, "'I1'"),  # bad numeric
]


@pytest.mark.parametrize("case", range(len(BAD_CASES)))
def test_criteo_bad_rows_name_file_and_line(tmp_path, case):
    _, mutate, line, what = BAD_CASES[case]
    rows = mutate(tiny_criteo_rows())
    path = write_criteo(tmp_path / "bad.txt", rows)
    with pytest.raises(DataFormatError, match=rf"bad\.txt, line {line}:.*{what}"):
        prepare_data(CriteoFormat(layout="tsv"), path)
    d = prepare_data(CriteoFormat(layout="tsv"), path, skip_bad_lines=True)
    assert len(d.train) == 4 and d.bad_lines["train"] == 1


def test_libfm_bad_tokens(tmp_path):
    p = tmp_path / "bad.libfm"
    p.write_text("1 3:1 4:1\n1 3:1 4:x\n-1 3:1 4:1\nfoo 3:1 4:1\n1 3:1 4\n")
    with pytest.raises(DataFormatError, match=r"bad\.libfm, line 2: bad libFM token '4:x'"):
        prepare_data(LibFMFormat(), p)
    d = prepare_data(LibFMFormat(), p, skip_bad_lines=True)
    assert len(d.train) == 2 and d.bad_lines["train"] == 3


def test_label_range_empty_file_and_missing_column(tmp_path):
    rows = tiny_criteo_rows()
    rows[1][0] = "2"
    with pytest.raises(DataFormatError, match=r"l\.txt, line 2: label 2 is outside \{0, 1\}"):
        prepare_data(CriteoFormat(), write_criteo(tmp_path / "l.txt", rows), skip_bad_lines=True)
    (tmp_path / "lf").write_text("3 1:1\n")
    with pytest.raises(DataFormatError, match=r"lf, line 1: label 3 is outside \{-1, 0, 1\}"):
        prepare_data(LibFMFormat(), tmp_path / "lf")
    (tmp_path / "empty.txt").write_text("")
    for fmt in (CriteoFormat(layout="tsv"), LibFMFormat(), CSVFormat({"label": "label"})):
        with pytest.raises(DataFormatError, match=r"empty\.txt: file is empty"):
            prepare_data(fmt, tmp_path / "empty.txt")
    (tmp_path / "h.csv").write_text("label,a\n")
    with pytest.raises(DataFormatError, match=r"h\.csv: file is empty"):
        prepare_data(CSVFormat({"label": "label", "a": "sparse"}), tmp_path / "h.csv")
    (tmp_path / "m.csv").write_text("label,a\n1,x\n")
    with pytest.raises(DataFormatError, match=r"m\.csv, line 1: schema column\(s\) \['b'\]"):
        prepare_data(CSVFormat({"label": "label", "a": "sparse", "b": "numeric"}), tmp_path / "m.csv")
    with pytest.raises(ValueError, match="exactly one label"):
        CSVFormat({"a": "sparse"})


# -- files without labels (to predict on) -------------------------------------------------
CRITEO_HEADER = [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]


@pytest.mark.parametrize("layout", ["tsv", "csv"])
def test_criteo_without_labels(tmp_path, layout):
    rows = tiny_criteo_rows()
    d = prepare_data(CriteoFormat(), write_criteo(tmp_path / "train.txt", rows))
    sep = "\t" if layout == "tsv" else ","
    head = [",".join(CRITEO_HEADER)] if layout == "csv" else []
    path = tmp_path / f"test.{layout}"                   # test.txt's layout: 13 ints + 26 cats, no label
    path.write_text("\n".join(head + [sep.join(r[1:]) for r in rows]) + "\n")
    fmt = CriteoFormat()
    assert "no label column" in fmt.no_label_reason(path) and fmt.no_label_reason(tmp_path / "train.txt") is None
    enc = encode_file(fmt, d.encoder, path)
    assert not enc.has_labels and torch.isnan(enc.labels).all() and d.train.has_labels
    assert torch.equal(enc.sparse, d.train.sparse) and torch.equal(enc.numeric, d.train.numeric)
    with pytest.raises(DataFormatError, match=rf"test\.{layout}: no label column.*need labels"):
        prepare_data(CriteoFormat(), tmp_path / "train.txt", test=path)
    # A labelled row inside a file without labels is a malformed row, named by file and line.
    lines = path.read_text().splitlines()
    lines[len(head) + 2] = sep.join(rows[2])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=rf"test\.{layout}, line {len(head) + 3}: expected 39 columns, got 40"):
        encode_file(fmt, d.encoder, path)
    assert len(encode_file(fmt, d.encoder, path, skip_bad_lines=True)) == 4


def test_libfm_without_labels(tmp_path):
    p = tmp_path / "f.libfm"
    p.write_text("1 3:1 10:1 20:0.5\n-1 4:1 10:1 21:1\n0 3:1 11:1 20:1\n")
    fmt = LibFMFormat()
    d = prepare_data(fmt, p)
    q = tmp_path / "q.libfm"                             # the same rows, starting with id:value
    q.write_text("3:1 10:1 20:0.5\n4:1 10:1 21:1\n3:1 11:1 20:1\n")
    assert "id:value" in fmt.no_label_reason(q) and fmt.no_label_reason(p) is None
    enc = encode_file(fmt, d.encoder, q)
    assert not enc.has_labels and torch.equal(enc.sparse, d.train.sparse)
    assert torch.equal(enc.sparse_weights, d.train.sparse_weights)
    q.write_text("3:1 10:1 20:0.5\n1 4:1 10:1 21:1\n")  # a label on line 2 only
    with pytest.raises(DataFormatError, match=r"q\.libfm, line 2: expected 3 id:value pairs, got 4"):
        encode_file(fmt, d.encoder, q)
    bag = prepare_data(LibFMFormat(fields="bag"), p)
    with pytest.raises(DataFormatError, match=r"q\.libfm, line 2: bad libFM token '1'.*no labels"):
        encode_file(LibFMFormat(fields="bag"), bag.encoder, q)
    with pytest.raises(DataFormatError, match=r"q\.libfm: no labels"):
        prepare_data(LibFMFormat(), q)


def test_csv_without_label_column(tmp_path):
    schema = {"label": "label", "user": "sparse", "age": {"role": "numeric", "transform": "standardize"}}
    train = tmp_path / "train.csv"
    train.write_text("label,user,age\n1,u1,30\n0,u2,\n1,u1,40\n")
    d = prepare_data(CSVFormat(schema), train)
    test = tmp_path / "test.csv"
    test.write_text("age,user\n30,u1\n40,u3\n")      # no label; column order does not matter
    fmt = CSVFormat(schema)
    assert fmt.no_label_reason(test) == "the header has no label column 'label'"
    enc = encode_file(fmt, d.encoder, test)
    assert not enc.has_labels and enc.sparse[:, 0].tolist() == [2, OOV_ID]
    assert enc.numeric[:, 0].tolist() == pytest.approx([-1, 1])
    test.write_text("age,user\n30,u1\nabc,u3\n")
    with pytest.raises(DataFormatError, match=r"test\.csv, line 3: column 'age': 'abc' is not a number"):
        encode_file(fmt, d.encoder, test)
    test.write_text("user\nu1\n")                      # other schema columns are still required
    with pytest.raises(DataFormatError, match=r"schema column\(s\) \['age'\]"):
        encode_file(fmt, d.encoder, test)


# -- cache ---------------------------------------------------------------------------------
def test_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    train = write_criteo(tmp_path / "train.txt", tiny_criteo_rows())
    test = write_criteo(tmp_path / "test.txt", tiny_criteo_rows()[:3])
    cache = tmp_path / "cache"
    first = prepare_data(CriteoFormat(), train, test=test, cache_dir=cache)
    assert not first.from_cache
    meta = json.loads((first.cache_path / "meta.json").read_text())
    assert meta["train_source"]["size"] == train.stat().st_size
    assert not list(first.cache_path.rglob("*.tmp"))        # every file moved into place

    parses = []
    real_read = readers_mod._DelimitedFormat.read_columns
    monkeypatch.setattr(readers_mod._DelimitedFormat, "read_columns",
                        lambda self, *a, **k: parses.append(1) or real_read(self, *a, **k))
    second = prepare_data(CriteoFormat(), train, test=test, cache_dir=cache)
    assert second.from_cache and parses == []
    assert torch.equal(second.train.sparse, first.train.sparse)
    assert torch.equal(second.test.numeric, first.test.numeric)
    assert second.fields == first.fields

    rows = tiny_criteo_rows() + [criteo_row(1, [7] * 13, ["cc"] * 26)]
    write_criteo(train, rows)
    os.utime(train, ns=(train.stat().st_atime_ns, train.stat().st_mtime_ns + 10**9))
    third = prepare_data(CriteoFormat(), train, test=test, cache_dir=cache)
    assert not third.from_cache and parses and len(third.train) == 6
    other = prepare_data(CriteoFormat(min_count=2), train, cache_dir=cache)   # options are part of the key
    assert not other.from_cache and other.cache_path != third.cache_path


def test_cache_leaves_nothing_half_written_on_error(tmp_path):
    train = write_criteo(tmp_path / "train.txt", tiny_criteo_rows())
    rows = tiny_criteo_rows()
    rows[3] = rows[3][:-1]                                   # a short row in the test file
    test = write_criteo(tmp_path / "test.txt", rows)
    cache = tmp_path / "cache"
    with pytest.raises(DataFormatError, match=r"test\.txt, line 4"):
        prepare_data(CriteoFormat(), train, test=test, cache_dir=cache)
    (root,) = cache.iterdir()
    # The finished train split stays; the test split's temporary directory and files are gone.
    assert sorted(p.name.split("-")[0] for p in root.iterdir()) == ["train"]
    assert not list(cache.rglob("*.tmp"))


def test_cache_matches_in_memory_with_weights_and_bags(tmp_path):
    p = tmp_path / "g.libfm"
    p.write_text("1 3:2 10:1\n-1 4:1\n1 3:1 10:1 20:1\n" * 5)
    mem = prepare_data(LibFMFormat(fields="bag"), p)
    disk = prepare_data(LibFMFormat(fields="bag"), p, cache_dir=tmp_path / "c", chunk_rows=4)
    again = prepare_data(LibFMFormat(fields="bag"), p, cache_dir=tmp_path / "c")
    assert again.from_cache
    for d in (disk, again):
        assert torch.equal(d.train.multi_hot[0], mem.train.multi_hot[0])
        assert torch.equal(d.train.multi_hot_weights[0], mem.train.multi_hot_weights[0])
    enc = encode_file(LibFMFormat(fields="bag"), mem.encoder, p)
    assert torch.equal(enc.multi_hot[0], mem.train.multi_hot[0])


def test_cache_hit_keeps_the_libfm_layout_of_the_training_file(tmp_path, monkeypatch):
    """The format spec a checkpoint stores holds the libFM layout, from the cache as after parsing,
    and a cache hit does not read the training file to find it."""
    from deepfm_fast.data import format_spec, make_format, trained_spec

    p = tmp_path / "g.libfm"
    p.write_text("1 3:2 10:1\n-1 4:1\n1 3:1 10:1 20:1\n")
    first_fmt = make_format(format_spec("libfm"))
    first = prepare_data(first_fmt, p, cache_dir=tmp_path / "c")
    monkeypatch.setattr(LibFMFormat, "_mode", lambda *a, **k: pytest.fail("a cache hit read the layout from the file"))
    second_fmt = make_format(format_spec("libfm"))
    second = prepare_data(second_fmt, p, cache_dir=tmp_path / "c")
    assert not first.from_cache and second.from_cache
    assert trained_spec(format_spec("libfm"), first_fmt)["kwargs"]["layout"] == ["bag", 3]
    assert trained_spec(format_spec("libfm"), second_fmt) == trained_spec(format_spec("libfm"), first_fmt)


# -- batches and CSR -----------------------------------------------------------------------
def small_dataset(r=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    fields = [SparseField("a", 5), MultiHotField("m", 4, "mean"), NumericField("x"), SparseField("b", 3)]
    mh = torch.randint(-1, 4, (r, 3), generator=g)
    return EncodedDataset(
        fields=fields,
        labels=torch.randint(0, 2, (r,), generator=g).float(),
        sparse=torch.stack([torch.randint(0, 5, (r,), generator=g), torch.randint(0, 3, (r,), generator=g)], 1),
        multi_hot=(mh,),
        numeric=torch.randn(r, 1, generator=g),
    )


def csr_loop(batch: Batch, fields):
    """Row-by-row oracle for to_csr."""
    indices, offsets, weights = [], [0], []
    for b in range(batch.labels.shape[0]):
        base = i_sp = i_mh = i_num = 0
        for f in fields:
            if isinstance(f, SparseField):
                indices.append(base + int(batch.sparse[b, i_sp]))
                weights.append(1.0 if batch.sparse_weights is None else float(batch.sparse_weights[b, i_sp]))
                i_sp += 1
            elif isinstance(f, MultiHotField):
                for j, v in enumerate(batch.multi_hot[i_mh][b].tolist()):
                    if v >= 0:
                        indices.append(base + v)
                        w = batch.multi_hot_weights[i_mh] if batch.multi_hot_weights else None
                        weights.append(1.0 if w is None else float(w[b, j]))
                i_mh += 1
            else:
                indices.append(base)
                weights.append(float(batch.numeric[b, i_num]))
                i_num += 1
            base += f.vocab_size
            offsets.append(len(indices))
    return torch.tensor(indices), torch.tensor(offsets), torch.tensor(weights)


def test_to_csr_matches_loop():
    ds = small_dataset()
    batch = next(iterate_batches(ds, 16, shuffle=True, seed=3))
    idx, off, w = to_csr(batch, ds.fields)
    ref_idx, ref_off, ref_w = csr_loop(batch, ds.fields)
    assert idx.dtype == torch.int64 and off.dtype == torch.int64 and w.dtype == torch.float32
    assert off.shape == (16 * 4 + 1,)
    assert torch.equal(idx, ref_idx) and torch.equal(off, ref_off)
    assert torch.allclose(w, ref_w.float())
    # Weighted multi-hot and sparse weights, and no weights at all when nothing needs them.
    ds.multi_hot_weights = (torch.rand(len(ds), 3),)
    ds.sparse_weights = torch.rand(len(ds), 2)
    batch = next(iterate_batches(ds, 16))
    assert torch.allclose(to_csr(batch, ds.fields)[2], csr_loop(batch, ds.fields)[2].float())
    only_ids = [SparseField("a", 5), SparseField("b", 3)]
    plain = Batch(ds.sparse[:4], (), torch.zeros(4, 0), ds.labels[:4])
    i2, o2, w2 = to_csr(plain, only_ids)
    assert w2 is None and o2.tolist() == list(range(9))
    assert torch.equal(i2, (ds.sparse[:4] + torch.tensor([0, 5])).flatten())


def test_iterate_batches_cover_and_are_deterministic():
    ds = small_dataset()
    seen = torch.cat([b.labels for b in iterate_batches(ds, 10)])
    assert torch.equal(seen, ds.labels)
    assert [len(b.labels) for b in iterate_batches(ds, 10, drop_last=True)] == [10, 10, 10]
    a = [b.sparse for b in iterate_batches(ds, 8, shuffle=True, seed=5)]
    b = [b.sparse for b in iterate_batches(ds, 8, shuffle=True, seed=5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    gen = torch.Generator().manual_seed(5)
    e1 = torch.cat([b.numeric for b in iterate_batches(ds, 8, shuffle=True, generator=gen)])
    e2 = torch.cat([b.numeric for b in iterate_batches(ds, 8, shuffle=True, generator=gen)])
    assert not torch.equal(e1, e2)                                # a new order per epoch
    assert torch.equal(e1.sort(0).values, ds.numeric.sort(0).values)  # each row exactly once


def test_splits_partition_rows():
    ds = small_dataset(100)
    tr, va = ds.random_split(0.2, seed=1)
    assert len(tr) == 80 and len(va) == 20
    tr2, _ = ds.random_split(0.2, seed=1)
    assert torch.equal(tr.sparse, tr2.sparse)
    both = torch.cat([tr.numeric, va.numeric]).sort(0).values
    assert torch.equal(both, ds.numeric.sort(0).values)
    head, tail = ds.ordered_split(0.25)
    assert torch.equal(tail.labels, ds.labels[75:])
    with pytest.raises(ValueError, match="fraction"):
        ds.random_split(1.5)
    with pytest.raises(ValueError, match="sparse must be"):
        EncodedDataset(ds.fields, ds.labels, ds.sparse[:, :1], ds.multi_hot, ds.numeric)


# -- synthetic -----------------------------------------------------------------------------
def test_synthetic_is_deterministic_and_learnable():
    a = make_synthetic(20000, seed=7)
    b = make_synthetic(20000, seed=7)
    c = make_synthetic(20000, seed=8)
    assert torch.equal(a.train.sparse, b.train.sparse) and torch.equal(a.test.labels, b.test.labels)
    assert a.best_auc == b.best_auc and not torch.equal(a.train.sparse, c.train.sparse)
    assert 0.75 < a.best_auc < 0.95 and 0.2 < a.best_logloss < 0.6
    assert 0.25 <= a.positive_rate <= 0.35
    assert len(a.train) + len(a.valid) + len(a.test) == 20000
    for i, f in enumerate(f for f in a.fields if isinstance(f, SparseField)):
        ids = a.train.sparse[:, i]
        assert ids.min() >= 0 and ids.max() < f.vocab_size
        # Zipf: the most frequent id is far above the uniform share.
        assert torch.bincount(ids).max() > 20 * len(ids) / f.vocab_size
    fm = make_synthetic(5000, model="fm", seed=1, fields=[SparseField("u", 100), SparseField("i", 200)])
    assert fm.train.sparse.shape[1] == 2 and fm.best_auc > 0.6
    idx, off, _ = to_csr(next(iterate_batches(a.train, 64)), a.fields)
    assert off[-1] == idx.numel()


# -- real data smoke tests -----------------------------------------------------------------
def test_real_criteo_sample():
    d = prepare_data(CriteoFormat(), shared_data_file("criteo_sample_10k/criteo_sampled_data_10k.csv.gz"))
    assert len(d.train) == 9999 and int(d.train.labels.sum()) == 2181       # SOURCE.md counts
    c3 = next(f for f in d.fields if f.name == "C3")
    assert c3.vocab_size == 5520 + 1   # 5,520 distinct incl. empty, + OOV
    small = prepare_data(CriteoFormat(layout="csv"), shared_data_file("deepctr_examples/criteo_sample.txt"))
    assert len(small.train) == 200 and int(small.train.labels.sum()) == 49


def test_real_frappe_libfm():
    valid = shared_data_file("frappe/frappe.validation.libfm")
    test = shared_data_file("frappe/frappe.test.libfm")
    d = prepare_data(LibFMFormat(), valid, test=test)
    assert len(d.train) == 57722 and int(d.train.labels.sum()) == 19063
    assert len(d.test) == 28860 and int(d.test.labels.sum()) == 9536
    assert [f.vocab_size - 2 for f in d.fields][:2] == [884, 4082]          # distinct users/items in valid
    assert d.train.sparse_weights is None                                   # all values are 1


def test_real_sparrow_movielens_time_split():
    d = prepare_data(CSVFormat(SPARROW_MOVIELENS_SCHEMA), shared_data_file("sparrow_movielens/samples.csv"))
    assert len(d.train) == 22440
    assert abs(d.train.positive_rate - 0.5608) < 1e-3
    genre = next(f for f in d.fields if f.name == "movieGenre")
    assert isinstance(genre, MultiHotField) and genre.pooling == "mean"
    train, test = d.train.ordered_split(0.2, by="timestamp")
    assert len(test) == 4488 and train.extra["timestamp"].max() <= test.extra["timestamp"].min()
