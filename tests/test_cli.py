"""The deepfm-fast command: train/evaluate/predict/demo, metrics JSON, config files, clean errors."""

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from deepfm_fast.cli import main


def write_libfm(path, rows=600, seed=0, bad_line=None):
    """Three fields (ids 0-19, 20-49, 50-54); the label follows field 0 (learnable)."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(rows):
        a, b, c = rng.integers(0, 20), rng.integers(20, 50), rng.integers(50, 55)
        p = 0.85 if a < 10 else 0.15
        y = 1 if rng.random() < p else -1
        lines.append(f"{y} {a}:1 {b}:1 {c}:1")
    if bad_line is not None:
        lines[bad_line - 1] = "1 3:1 oops 51:1"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def files(tmp_path):
    return write_libfm(tmp_path / "train.libfm"), write_libfm(tmp_path / "test.libfm", 200, seed=1)


def train_args(train, test, tmp_path, *extra):
    return ["train", "--format", "libfm", "--train", str(train), "--test", str(test), "--valid-fraction", "0.2",
            "--epochs", "3", "--batch-size", "128", "--lr", "0.01", "--embedding-dim", "4", "--hidden-units", "16,16",
            "--seed", "1", "--no-progress", "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--metrics-out", str(tmp_path / "m.json"), *extra]


def test_train_evaluate_predict(files, tmp_path, capsys):
    train, test = files
    assert main(train_args(train, test, tmp_path, "--batch-norm", "--dropout", "0.1", "--l2-embedding", "1e-4")) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    for key in ("test_auc", "test_logloss", "best_epoch", "seconds_per_epoch", "train_rows_per_second",
                "valid_auc", "valid_logloss", "model", "hparams", "backend", "history"):
        assert key in m, key
    assert m["model"] == "deepfm" and m["hparams"]["hidden_units"] == [16, 16] and m["hparams"]["batch_norm"]
    assert m["hparams"]["table_optimizer"] == "adam" and m["hparams"]["table_lr"] == 0.01   # defaults: fused Adam, --lr
    assert m["monitor"] == "auc-logloss" and all("valid_score" in h for h in m["history"])
    assert m["rows"] == {"train": 480, "valid": 120, "test": 200}
    assert 0.6 < m["test_auc"] <= 1 and 1 <= m["best_epoch"] <= 3
    assert "test AUC" in capsys.readouterr().out

    assert main(["evaluate", "--checkpoint", str(tmp_path / "ckpt"), "--test", str(test),
                 "--metrics-out", str(tmp_path / "e.json")]) == 0
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["rows"] == 200 and e["auc"] == pytest.approx(m["test_auc"], abs=1e-9)
    assert "AUC" in capsys.readouterr().out

    out = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(tmp_path / "ckpt" / "best.pt"), "--input", str(test),
                 "--output", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "row,probability,label" and len(lines) == 201
    probs = np.array([float(x.split(",")[1]) for x in lines[1:]])
    assert ((probs > 0) & (probs < 1)).all()


def without_labels(path, out):
    """The rows of a libFM file without their label: what a test set to predict on looks like."""
    out.write_text("".join(line.split(" ", 1)[1] for line in path.read_text().splitlines(keepends=True)))
    return out


def test_predict_without_labels_and_evaluate_refuses(files, tmp_path, capsys):
    train, test = files
    assert main(train_args(train, test, tmp_path, "--epochs", "1", "--model", "fm")) == 0
    ckpt = str(tmp_path / "ckpt")
    assert main(["predict", "--checkpoint", ckpt, "--input", str(test), "--output", str(tmp_path / "a.csv")]) == 0
    bare = without_labels(test, tmp_path / "bare.libfm")
    assert main(["predict", "--checkpoint", ckpt, "--input", str(bare), "--output", str(tmp_path / "b.csv")]) == 0
    assert "no labels" in capsys.readouterr().out
    a, b = (tmp_path / "a.csv").read_text().splitlines(), (tmp_path / "b.csv").read_text().splitlines()
    assert a[0] == "row,probability,label" and b[0] == "row,probability" and len(b) == 201
    assert [x.rsplit(",", 1)[0] for x in a[1:]] == b[1:]          # same rows, same probabilities
    assert main(["evaluate", "--checkpoint", ckpt, "--test", str(bare)]) == 1
    err = capsys.readouterr().err
    assert "bare.libfm: no labels" in err and "predict" in err and "Traceback" not in err
    assert main(train_args(train, bare, tmp_path / "t")) == 1     # a test set must have labels
    assert "bare.libfm: no labels" in capsys.readouterr().err


def png_size(path):
    """(width, height) of a PNG file; fails unless it starts with the PNG signature and IHDR."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_train_writes_learning_curves(files, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the plot extra: pip install 'deepfm_fast[plot]'")
    train, test = files
    assert main(train_args(train, test, tmp_path, "--epochs", "2")) == 0
    width, height = png_size(tmp_path / "m.png")                  # beside m.json
    assert width > 300 and height > 100 and (tmp_path / "m.png").stat().st_size > 5000
    assert f"learning curves: {tmp_path / 'm.png'}" in capsys.readouterr().err


def test_train_without_matplotlib_says_how_to_get_the_plot(files, tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)              # import matplotlib fails
    train, test = files
    curves = tmp_path / "curves.png"
    assert main(train_args(train, test, tmp_path, "--epochs", "1", "--curves-out", str(curves))) == 0
    captured = capsys.readouterr()
    assert [ln for ln in captured.err.splitlines() if "plot" in ln] == [
        "deepfm-fast train: no learning-curve plot: matplotlib is not installed (pip install 'deepfm_fast[plot]')"]
    assert "test AUC" in captured.out and (tmp_path / "m.json").is_file()
    assert not curves.exists() and not list(tmp_path.rglob("*.tmp"))


def test_learning_curves_without_validation(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra: pip install 'deepfm_fast[plot]'")
    from deepfm_fast.plots import write_learning_curves

    history = [{"epoch": e, "loss": 0.6 - 0.1 * e, "lr": 1e-3, "table_lr": 1e-2} for e in (1, 2, 3)]
    assert png_size(write_learning_curves(history, tmp_path / "x" / "c.png", best_epoch=3))[0] > 300


def test_same_seed_same_metrics_and_resume(files, tmp_path):
    train, test = files
    for model in ("fm", "lr"):
        main(train_args(train, test, tmp_path / "a", "--model", model))
        main(train_args(train, test, tmp_path / "b", "--model", model))
        a = json.loads((tmp_path / "a" / "m.json").read_text())
        b = json.loads((tmp_path / "b" / "m.json").read_text())
        assert a["model"] == model and a["test_auc"] == b["test_auc"] and a["test_logloss"] == b["test_logloss"]
    # 1 epoch, then --resume to 3 == 3 straight.
    main(train_args(train, test, tmp_path / "c", "--model", "lr", "--epochs", "1"))
    main(train_args(train, test, tmp_path / "c", "--model", "lr", "--resume"))
    c = json.loads((tmp_path / "c" / "m.json").read_text())
    assert c["test_auc"] == b["test_auc"] and c["test_logloss"] == b["test_logloss"]


def test_table_optimizer_flags(files, tmp_path, capsys):
    """Each --table-optimizer trains and round-trips through the checkpoint; --table-lr defaults to --lr."""
    train, test = files
    aucs = {}
    for name, extra in (("sparse_adam", []), ("dense", []), ("rowwise_adagrad", ["--table-lr", "0.05"]),
                        ("sgd", ["--table-lr", "0.5", "--monitor", "auc"])):
        d = tmp_path / name
        assert main(train_args(train, test, d, "--table-optimizer", name, *extra)) == 0
        m = json.loads((d / "m.json").read_text())
        assert m["hparams"]["table_optimizer"] == name
        assert m["hparams"]["table_lr"] == (float(extra[1]) if extra else 0.01)
        aucs[name] = m["test_auc"]
        assert main(["evaluate", "--checkpoint", str(d / "ckpt"), "--test", str(test),
                     "--metrics-out", str(d / "e.json")]) == 0
        assert json.loads((d / "e.json").read_text())["auc"] == pytest.approx(m["test_auc"], abs=1e-9)
    assert all(a > 0.6 for a in aucs.values()), aucs
    capsys.readouterr()
    assert main(train_args(train, test, tmp_path / "x", "--sparse")) == 0   # old spelling of sparse_adam
    assert json.loads((tmp_path / "x" / "m.json").read_text())["hparams"]["table_optimizer"] == "sparse_adam"
    assert "--sparse is deprecated" in capsys.readouterr().err             # and it says the new one


def test_choices_come_from_the_modules_and_help_works(monkeypatch, capsys):
    """--model, --table-optimizer, --monitor, --format list what the library defines, nothing hard-coded."""
    from deepfm_fast import models, optim, train
    from deepfm_fast.cli import build_parser
    from deepfm_fast.data.formats import FORMATS

    def choices(parser, command, flag):
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        return list(next(a for a in sub._actions if flag in a.option_strings).choices)

    parser = build_parser()
    assert choices(parser, "train", "--model") == list(models.MODELS)
    assert choices(parser, "train", "--table-optimizer") == [*optim.NAMES, "sparse_adam", "dense"]
    assert choices(parser, "train", "--monitor") == list(train.MONITORS)
    assert choices(parser, "train", "--format") == list(FORMATS)
    assert choices(parser, "demo", "--table-optimizer") == list(optim.NAMES)
    # An optimizer added to the library shows up in the command and its help without a CLI change.
    monkeypatch.setitem(optim.NAMES, "lamb", optim.SGD)
    assert "lamb" in choices(build_parser(), "train", "--table-optimizer")
    assert "lamb" in choices(build_parser(), "demo", "--table-optimizer")
    assert models.TableMode.parse("lamb") == models.TableMode("fused", "lamb")
    for argv in ([], ["train"], ["evaluate"], ["predict"], ["demo"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv + ["--help"])
        assert exit_.value.code == 0
        assert "usage: deepfm-fast" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "lamb" in capsys.readouterr().out


def test_config_file_and_flag_override(files, tmp_path, capsys):
    train, test = files
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: fm\nformat: libfm\ntrain: {train}\ntest: {test}\nepochs: 2\nbatch-size: 100\n"
                   "embedding_dim: 6\nl2_embedding: 0.001\nprogress: false\nhidden_units: [8, 8]\n"
                   "table-optimizer: rowwise_adagrad\ntable_lr: 0.05\nmonitor: auc\n")
    assert main(["train", "--config", str(cfg), "--model", "deepfm", "--metrics-out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["model"] == "deepfm" and m["batch_size"] == 100 and len(m["history"]) <= 2
    assert m["hparams"]["embedding_dim"] == 6 and m["hparams"]["hidden_units"] == [8, 8]
    assert m["hparams"]["l2_embedding"] == 0.001 and m["monitor"] == "auc"
    assert m["hparams"]["table_optimizer"] == "rowwise_adagrad" and m["hparams"]["table_lr"] == 0.05
    (tmp_path / "bad.json").write_text(json.dumps({"epochz": 3}))
    assert main(["train", "--config", str(tmp_path / "bad.json")]) == 1
    (tmp_path / "bad2.json").write_text(json.dumps({"table_optimizer": "lamb"}))
    assert main(["train", "--config", str(tmp_path / "bad2.json")]) == 1
    (tmp_path / "bad3.json").write_text(json.dumps({"format": "parquet"}))
    assert main(["train", "--config", str(tmp_path / "bad3.json")]) == 1
    assert "'format' must be one of ['criteo', 'libfm', 'csv']" in capsys.readouterr().err


def test_bad_data_is_a_clean_error_or_skipped(tmp_path, capsys):
    train = write_libfm(tmp_path / "broken.libfm", 300, bad_line=7)
    test = write_libfm(tmp_path / "t.libfm", 50, seed=2)
    args = ["train", "--format", "libfm", "--train", str(train), "--test", str(test), "--epochs", "1",
            "--hidden-units", "8", "--no-progress", "--metrics-out", str(tmp_path / "m.json")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "broken.libfm, line 7" in err and "oops" in err and "Traceback" not in err
    assert main(args + ["--skip-bad-lines"]) == 0
    assert "skipped 1 bad line(s) in train" in capsys.readouterr().err
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["bad_lines"]["train"] == 1 and m["rows"]["train"] + m["rows"]["valid"] == 299
    assert main(["train", "--format", "libfm", "--train", str(tmp_path / "nope.libfm")]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["train", "--format", "csv", "--train", str(train)]) == 1
    assert "--schema" in capsys.readouterr().err


def test_python_m_and_demo(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "deepfm_fast", "demo", "--rows", "60000", "--epochs", "2",
                           "--batch-size", "1024", "--hidden-units", "64,64", "--timing-steps", "2",
                           "--timing-batch-size", "512", "--no-progress", "--metrics-out", str(tmp_path / "d.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for text in ("best achievable", "reference ops", "dense gradient + torch Adam", "fused adam", "speed-up"):
        assert text in proc.stdout, text
    d = json.loads((tmp_path / "d.json").read_text())
    assert d["step_ms_fused"] > 0 and d["step_ms_reference"] > 0 and d["timing_batch_size"] == 512
    assert d["table_optimizer_fused"] == "adam" and d["rows"]["train"] == 48000
    # Even this tiny run learns the planted model: clearly above chance, below the ceiling.
    assert 0.7 < d["test_auc"] <= d["best_auc"] + 0.01, d
    bad = subprocess.run([sys.executable, "-m", "deepfm_fast", "train", "--model", "nope"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_run_config_is_filled_alike_by_flags_and_a_file(tmp_path):
    """argparse and a YAML/JSON file fill one RunConfig: the same options give the same object, with the
    declared types; a file's relative paths are taken from the file's folder."""
    from deepfm_fast.cli import build_parser
    from deepfm_fast.config import RunConfig, resolve

    (tmp_path / "data").mkdir()
    flags = ["train", "--model", "fm", "--format", "libfm", "--train", str(tmp_path / "data" / "t.libfm"),
             "--epochs", "3", "--lr", "1e-2", "--hidden-units", "8x8", "--batch-norm", "--no-progress",
             "--table-optimizer", "sgd", "--max-rows", "100"]
    from_flags = resolve(build_parser().parse_args(flags))
    (tmp_path / "run.yaml").write_text("model: fm\nformat: libfm\ntrain: data/t.libfm\nepochs: 3\nlr: 1e-2\n"
                                       "hidden-units: 8x8\nbatch_norm: true\nprogress: false\n"
                                       "table_optimizer: sgd\nmax_rows: 100.0\n")
    from_yaml = RunConfig.from_file(str(tmp_path / "run.yaml"))
    assert from_yaml == from_flags
    assert from_yaml.lr == 0.01 and isinstance(from_yaml.lr, float)      # YAML reads "1e-2" as text
    assert from_yaml.max_rows == 100 and isinstance(from_yaml.max_rows, int)
    assert from_yaml.hidden_units == [8, 8] and from_yaml.seed == RunConfig().seed == 2021
    (tmp_path / "run.json").write_text(json.dumps({"model": "fm", "format": "libfm", "train": "data/t.libfm",
                                                   "epochs": 3, "lr": 0.01, "hidden_units": [8, 8],
                                                   "batch-norm": True, "progress": False, "table-optimizer": "sgd",
                                                   "max_rows": 100}))
    assert RunConfig.from_file(str(tmp_path / "run.json")) == from_flags
    # The flags override the file.
    again = resolve(build_parser().parse_args(["train", "--config", str(tmp_path / "run.yaml"), "--epochs", "5"]))
    assert again.epochs == 5 and again.model == "fm" and again.train == from_flags.train


@pytest.mark.parametrize("options, message", [
    ({"epochz": 3}, "unknown option 'epochz' (did you mean 'epochs'?)"),
    ({"epochs": "three"}, "option 'epochs': invalid literal for int()"),
    ({"epochs": 2.5}, "option 'epochs': must be an integer, got 2.5"),
    ({"lr": True}, "option 'lr': must be float, got True"),
    ({"lr": [0.1]}, "option 'lr': must be float, got [0.1]"),
    ({"batch_norm": "yes"}, "option 'batch_norm': must be true or false, got 'yes'"),
    ({"train": 7}, "option 'train': must be text, got 7"),
    ({"epochs": None}, "option 'epochs': may not be null"),
    ({"hidden_units": "4,a"}, "option 'hidden_units': hidden units must be integers"),
    ({"table_optimizer": "lamb"}, "option 'table_optimizer' must be one of ['adam'"),
])
def test_run_config_names_the_bad_option(tmp_path, capsys, options, message):
    from deepfm_fast.config import RunConfig, RunError

    with pytest.raises(RunError) as error:
        RunConfig.from_mapping(options, source="config file x.json")
    assert str(error.value).startswith("config file x.json: ") and message in str(error.value)
    (tmp_path / "bad.json").write_text(json.dumps(options))
    assert main(["train", "--config", str(tmp_path / "bad.json")]) == 1
    assert message in capsys.readouterr().err


def test_train_evaluate_and_resume_with_a_table_file(files, tmp_path):
    import gc

    train, test = files
    table = tmp_path / "t" / "table"
    table.parent.mkdir()
    assert main(train_args(train, test, tmp_path / "a", "--table-file", str(table), "--epochs", "2")) == 0
    gc.collect()  # the trainer's model releases the table file's lock
    m = json.loads((tmp_path / "a" / "m.json").read_text())
    assert m["hparams"]["table_file"] == str(table) and table.is_file()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "a" / "ckpt" / "last.pt"), "--test", str(test),
                 "--metrics-out", str(tmp_path / "e.json")]) == 0
    gc.collect()
    assert json.loads((tmp_path / "e.json").read_text())["auc"] == m["test_auc"]  # the table file's last epoch
    # 1 epoch, then --resume to 2 == 2 straight (another table file)
    moved = tmp_path / "t" / "resumed"
    main(train_args(train, test, tmp_path / "b", "--table-file", str(moved), "--epochs", "1"))
    gc.collect()
    main(train_args(train, test, tmp_path / "b", "--table-file", str(moved), "--epochs", "2", "--resume"))
    gc.collect()
    b = json.loads((tmp_path / "b" / "m.json").read_text())
    assert b["test_auc"] == m["test_auc"] and b["test_logloss"] == m["test_logloss"]
