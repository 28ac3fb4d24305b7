"""``deepfm-fast``: train, evaluate and apply DeepFM / FM / LR models on CTR files; a demo.

Examples::

    deepfm-fast demo
    deepfm-fast train --format libfm --train frappe.validation.libfm --valid-fraction 0.1 \\
        --test frappe.test.libfm --model deepfm --embedding-dim 10 --hidden-units 400,400,400 \\
        --batch-norm --dropout 0.2 --l2-embedding 0.05 --epochs 100 --patience 2 \\
        --checkpoint-dir runs/frappe --metrics-out runs/frappe/metrics.json
    deepfm-fast train --config frappe.yaml --seed 3          # flags override the config file
    deepfm-fast evaluate --checkpoint runs/frappe --test frappe.test.libfm
    deepfm-fast predict --checkpoint runs/frappe --input frappe.test.libfm --output probs.csv

A config file (YAML or JSON) holds the same option names as the flags, with ``-`` or ``_``
(``hidden_units: [400, 400, 400]``, ``batch-norm: true``). Bad input data stops with a one-line
error naming the file and line (exit status 1), or is skipped and counted with
``--skip-bad-lines``. Set ``DEEPFM_FAST_DEBUG=1`` to see tracebacks.

``train --metrics-out runs/m.json`` also draws the learning curves into ``runs/m.png``
(``--curves-out`` to choose the file; needs matplotlib: ``pip install 'deepfm_fast[plot]'``).
``predict`` reads files without labels too (Criteo's ``test.txt``, libFM rows that start with
``id:value``, a CSV without the label column: see :mod:`deepfm_fast.data.readers`) and then
writes ``row,probability`` only.

This module parses and dispatches; the work is in :mod:`deepfm_fast.data` (formats and their
specs), :mod:`deepfm_fast.train`, :mod:`deepfm_fast.plots` and :mod:`deepfm_fast.demo`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ._io import atomic_write, write_json

__all__ = ["main", "build_parser"]

PROG = "deepfm-fast"


class CLIError(Exception):
    """A usage or input problem reported as one line, without a traceback."""


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------
def _hidden_units(text: Any) -> List[int]:
    if isinstance(text, (list, tuple)):
        units = list(text)
    else:
        text = str(text).strip()
        units = [] if text in ("", "none", "0") else text.replace("x", ",").split(",")
    try:
        out = [int(u) for u in units]
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"hidden units must be integers like 400,400,400, got {text!r}") from None
    if any(u < 1 for u in out):
        raise argparse.ArgumentTypeError(f"hidden units must be >= 1, got {text!r}")
    return out


# Every train option and its default; a config file may set any of them.
TRAIN_DEFAULTS: Dict[str, Any] = {
    "model": "deepfm", "format": None, "schema": None, "train": None, "valid": None,
    "valid_fraction": 0.1, "test": None, "test_fraction": None, "split": "random", "split_by": None,
    "epochs": 10, "batch_size": 4096, "lr": 1e-3, "embedding_dim": 10, "hidden_units": [400, 400, 400],
    "activation": "relu", "dropout": 0.0, "batch_norm": False, "l2_embedding": 0.0, "patience": 2,
    "seed": 2021, "checkpoint_dir": None, "resume": False, "metrics_out": None, "cache_dir": None,
    "skip_bad_lines": False, "threads": None, "max_rows": None, "min_count": 1, "sparse": False,
    "device": "cpu", "progress": True, "init_std": 1e-2, "table_optimizer": "adam", "table_lr": None,
    "monitor": "auc-logloss", "precise_bn_batches": 16, "curves_out": None, "l2_scope": "used",
    "dnn_init": "default", "sync_batch_norm": False, "dist_timeout": 1800.0,
    "table_file": None,  # bigtable: a file-backed table (EmbeddingFM(table_file=...))
}
SPLITS = ("random", "ordered")


def _choices() -> Dict[str, Sequence[str]]:
    """The allowed values of the choice options, from the modules that define them."""
    from .data.formats import FORMATS
    from .models import DNN_INITS, L2_SCOPES, MODELS, TABLE_OPTIMIZERS
    from .train import MONITORS

    return {"model": tuple(MODELS), "table_optimizer": TABLE_OPTIMIZERS, "monitor": MONITORS,
            "format": FORMATS, "split": SPLITS, "l2_scope": L2_SCOPES, "dnn_init": DNN_INITS}


_TYPES = {"valid_fraction": float, "test_fraction": float, "epochs": int, "batch_size": int, "lr": float,
          "table_lr": float, "precise_bn_batches": int,
          "embedding_dim": int, "hidden_units": _hidden_units, "dropout": float, "l2_embedding": float,
          "patience": int, "seed": int, "threads": int, "max_rows": int, "min_count": int,
          "init_std": float, "dist_timeout": float}
_BOOLS = ("batch_norm", "resume", "skip_bad_lines", "sparse", "progress", "sync_batch_norm")
_PATHS = ("schema", "train", "valid", "test", "checkpoint_dir", "metrics_out", "curves_out", "cache_dir", "table_file")


def _add_data_args(p: argparse.ArgumentParser, choices: Dict[str, Sequence[str]]) -> None:
    from .data.formats import BUILTIN_SCHEMAS

    g = p.add_argument_group("data")
    g.add_argument("--format", choices=choices["format"],
                   help="criteo: label,I1..I13,C1..C26 (TSV or CSV with header); libfm: 'label id:value ...'; "
                        "csv: header CSV described by --schema")
    g.add_argument("--schema", help="csv: JSON/YAML file mapping column -> role, or a built-in schema: "
                                    + ", ".join(sorted(BUILTIN_SCHEMAS)))
    g.add_argument("--skip-bad-lines", action=argparse.BooleanOptionalAction, default=None,
                   help="skip and count malformed rows instead of stopping")
    g.add_argument("--cache-dir", help="cache the encoded arrays here and reuse them on the next run")
    g.add_argument("--min-count", type=int, help="categorical values seen fewer times go to OOV (default 1)")


_TABLE_FILE_HELP = ("keep the table and its optimizer state in this memory-mapped file (tables larger than RAM; a "
                    "fused --table-optimizer): made when missing, else resumed from its last checkpoint; each "
                    "epoch's checkpoint makes it crash-safe, the best epoch is not restored (the file holds the "
                    "last): evaluate last.pt")

def _add_train_parser(sub, choices: Dict[str, Sequence[str]]) -> None:
    from .models import FUSED_TABLE_OPTIMIZERS

    # No ArgumentDefaultsHelpFormatter: every flag defaults to None (so a --config file can fill
    # it); the help texts name the real defaults (TRAIN_DEFAULTS).
    p = sub.add_parser("train", help="train a model, evaluate every epoch, stop early, report metrics",
                       description="Train on --train, early stopping on --valid (or a --valid-fraction hold-out), "
                                   "final metrics on --test. Options may come from --config.")
    p.add_argument("--config", help="YAML or JSON file of options (same names as the flags); flags override it")
    p.add_argument("--model", choices=choices["model"], help="model (default deepfm)")
    _add_data_args(p, choices)
    g = p.add_argument_group("splits")
    g.add_argument("--train", help="training file")
    g.add_argument("--valid", help="validation file for early stopping")
    g.add_argument("--valid-fraction", type=float,
                   help="without --valid: hold out this share of the training rows (default 0.1; 0 = none)")
    g.add_argument("--test", help="test file for the final metrics")
    g.add_argument("--test-fraction", type=float, help="without --test: hold out this share of the training rows")
    g.add_argument("--split", choices=choices["split"],
                   help="how hold-outs are taken: random rows (default) or the tail in file/--split-by order")
    g.add_argument("--split-by", help="ordered split: an extra ('keep') column to sort by, e.g. timestamp")
    g.add_argument("--max-rows", type=int, help="use only the first N training rows (quick runs)")
    g = p.add_argument_group("model")
    g.add_argument("--embedding-dim", type=int, help="embedding size K (default 10)")
    g.add_argument("--hidden-units", type=_hidden_units, help="DNN widths, e.g. 400,400,400 (default)")
    g.add_argument("--activation", help="DNN activation (default relu)")
    g.add_argument("--dropout", type=float, help="DNN dropout (default 0)")
    g.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=None, help="DNN batch norm")
    g.add_argument("--l2-embedding", type=float, help="L2 on the table rows used in each batch (default 0)")
    g.add_argument("--l2-scope", choices=choices["l2_scope"],
                   help="rows the L2 covers: used (default; those of each batch, any table optimizer) or table "
                        "(every row at every step, FuxiCTR's embedding_regularizer; --table-optimizer dense only)")
    g.add_argument("--dnn-init", choices=choices["dnn_init"],
                   help="DNN weight init: default (PyTorch's) or xavier_normal (FuxiCTR's)")
    plain = [o for o in choices["table_optimizer"] if o not in FUSED_TABLE_OPTIMIZERS]
    g.add_argument("--table-optimizer", choices=choices["table_optimizer"],
                   help="how the embedding table (and first-order weights) is trained. Fused, updating the rows "
                        f"each batch touches inside the backward: {', '.join(FUSED_TABLE_OPTIMIZERS)}. Default adam: "
                        "the semantics of torch.optim.Adam on the dense gradient (rows no batch touched still move "
                        "by their momentum, caught up in closed form), the best model quality at the cost of a "
                        "sparse update; lazy_adam: torch.optim.SparseAdam's semantics (untouched rows frozen), a "
                        "little faster, measurably worse models (benchmarks/results/quality.md). Plain PyTorch, "
                        f"for comparison: {', '.join(plain)} (sparse_adam: sparse gradients + torch SparseAdam; "
                        "dense: dense gradients + Adam, the slow baseline). The DNN, bias and batch norm always "
                        "use torch Adam")
    g.add_argument("--table-lr", type=float, help="learning rate of the table optimizer (default: --lr)")
    g.add_argument("--table-file", help=_TABLE_FILE_HELP)
    g.add_argument("--sparse", action=argparse.BooleanOptionalAction, default=None,
                   help="deprecated: the old spelling of --table-optimizer sparse_adam")
    g.add_argument("--init-std", type=float,
                   help="embedding init std (default 1e-2; FuxiCTR uses 1e-4, which leaves the FM term "
                        "inactive for many epochs when an epoch is only a few steps)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="most epochs (default 10)")
    g.add_argument("--batch-size", type=int, help="rows per step (default 4096)")
    g.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    g.add_argument("--patience", type=int,
                   help="epochs without gain of the monitored validation score before stopping (default 2)")
    g.add_argument("--precise-bn-batches", type=int,
                   help="before each validation, recompute the batch-norm statistics over this many training "
                        "batches with the current weights (PreciseBN; default 16; 0 = plain running averages, "
                        "which lag badly with few steps per epoch)")
    g.add_argument("--monitor", choices=choices["monitor"],
                   help="early-stopping score: auc-logloss (default; validation AUC - logloss, as the BARS "
                        "configs' monitor {AUC: 1, logloss: -1}) or auc")
    g.add_argument("--seed", type=int, help="seed (default 2021); same seed, same result on CPU")
    g.add_argument("--checkpoint-dir", help="write last.pt (resume) and best.pt (evaluate/predict) here")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="continue from --checkpoint-dir/last.pt")
    g.add_argument("--sync-batch-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="under torchrun: batch norms over the global batch of all ranks, so that N ranks train "
                        "the model one process would (default: each rank's share)")
    g.add_argument("--dist-timeout", type=float,
                   help="under torchrun: seconds a collective waits for the other ranks before failing "
                        "(default 1800)")
    g.add_argument("--metrics-out", help="write final metrics as JSON to this file, and the learning curves "
                                         "as a PNG beside it (same name, .png)")
    g.add_argument("--curves-out", help="write the learning curves (train loss, valid AUC and logloss, learning "
                                        "rates per epoch; needs matplotlib) to this PNG instead")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--device", help="cpu (default) or cuda")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="tqdm progress bars")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .models import FUSED_TABLE_OPTIMIZERS

    parser = argparse.ArgumentParser(prog=PROG, description="DeepFM / FM / LR for CTR prediction on fused kernels.",
                                     epilog=f"'{PROG} COMMAND --help' for the options of a command.")

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,evaluate,predict,demo}")
    sub.required = True
    choices = _choices()
    _add_train_parser(sub, choices)

    for name, helptext in (("evaluate", "AUC and logloss of a checkpoint on a labelled file"),
                           ("predict", "write the predicted click probabilities of a file, labelled or not, to CSV")):
        p = sub.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + "; the file is "
                           "read in the format of the training file (stored in the checkpoint).")
        p.add_argument("--checkpoint", required=True, help="best.pt, or the --checkpoint-dir of a train run")
        p.add_argument("--table-file", help="the table file of a --table-file run, where it has moved (default: "
                       "the path it was trained in)")
        if name == "evaluate":
            p.add_argument("--test", "--input", dest="input", required=True, help="labelled file to score")
            p.add_argument("--metrics-out", help="write the metrics as JSON here")
        else:
            p.add_argument("--input", "--test", dest="input", required=True,
                           help="file to score; without labels (Criteo test.txt: 39 columns; libFM rows starting "
                                "with id:value; CSV without the label column) it is scored all the same")
            p.add_argument("--output", required=True,
                           help="CSV to write: row,probability, and label when the input has labels")
        p.add_argument("--batch-size", type=int, default=16384, help="rows per forward pass (default 16384)")
        p.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed rows")
        p.add_argument("--threads", type=int, help="torch CPU threads")

    from .demo import DEMO_DEFAULTS

    p = sub.add_parser("demo", help="train DeepFM on planted-truth synthetic data; fused vs reference step time",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", type=int, default=DEMO_DEFAULTS["rows"], help="synthetic rows (train+valid+test)")
    p.add_argument("--epochs", type=int, default=DEMO_DEFAULTS["epochs"])
    p.add_argument("--batch-size", type=int, default=DEMO_DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEMO_DEFAULTS["lr"], help="Adam learning rate of the DNN and bias")
    p.add_argument("--table-lr", type=float, default=DEMO_DEFAULTS["table_lr"],
                   help="learning rate of the fused table optimizer")
    p.add_argument("--init-std", type=float, default=DEMO_DEFAULTS["init_std"], help="embedding init std")
    p.add_argument("--embedding-dim", type=int, default=DEMO_DEFAULTS["embedding_dim"])
    p.add_argument("--hidden-units", type=_hidden_units, default=DEMO_DEFAULTS["hidden_units"])
    p.add_argument("--dropout", type=float, default=DEMO_DEFAULTS["dropout"])
    p.add_argument("--table-optimizer", choices=FUSED_TABLE_OPTIMIZERS, default="adam",
                   help="fused table optimizer of the trained model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timing-steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--timing-batch-size", type=int, default=4096, help="batch of the timed steps")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--metrics-out", help="write the demo numbers as JSON here")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return parser


def _load_config(path: str) -> Dict[str, Any]:
    from .data.formats import BUILTIN_SCHEMAS

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"config file {path} not found")
    text = p.read_text()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            cfg = yaml.safe_load(text)
        else:
            cfg = json.loads(text)
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError
        raise CLIError(f"config file {path}: cannot parse: {exc}") from None
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise CLIError(f"config file {path}: expected a mapping of option -> value, got {type(cfg).__name__}")
    out = {}
    base = p.resolve().parent
    choices = _choices()
    for key, value in cfg.items():
        name = str(key).replace("-", "_")
        if name not in TRAIN_DEFAULTS:
            raise CLIError(f"config file {path}: unknown option {key!r}")
        if value is not None and name in _TYPES:
            try:
                value = _TYPES[name](value)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                raise CLIError(f"config file {path}: option {key!r}: {exc}") from None
        if value is not None and name in choices and value not in choices[name]:
            raise CLIError(f"config file {path}: option {key!r} must be one of {list(choices[name])}, got {value!r}")
        if value is not None and name in _BOOLS and not isinstance(value, bool):
            raise CLIError(f"config file {path}: option {key!r} must be true or false, got {value!r}")
        if value is not None and name in _PATHS and not (name == "schema" and value in BUILTIN_SCHEMAS):
            value = str(base / Path(os.path.expanduser(str(value))))  # relative to the config file
        out[name] = value
    return out


def resolve_train_options(args: argparse.Namespace) -> Dict[str, Any]:
    """Defaults < config file < flags."""
    opts = dict(TRAIN_DEFAULTS)
    if getattr(args, "config", None):
        opts.update(_load_config(args.config))
    for name in TRAIN_DEFAULTS:
        value = getattr(args, name, None)
        if value is not None:
            opts[name] = value
    return opts


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def _check_file(path: Optional[str], what: str) -> None:
    if path is not None and not Path(path).is_file():
        raise CLIError(f"{what} file {path} not found")


def _hold_out(ds, fraction: float, opts: Dict[str, Any]):
    if opts["split"] == "ordered":
        return ds.ordered_split(fraction, by=opts["split_by"])
    return ds.random_split(fraction, seed=opts["seed"])


def load_train_data(opts: Dict[str, Any]):
    """prepare_data + hold-outs; returns (prepared, train, valid, test, format spec)."""
    from .data import prepare_data
    from .data.formats import FORMATS, format_spec, make_format, trained_spec

    if opts["train"] is None:
        raise CLIError("--train is required")
    for what in ("train", "valid", "test"):
        _check_file(opts[what], what)
    if opts["format"] is None:
        raise CLIError(f"--format is required ({', '.join(FORMATS)})")
    if opts["format"] == "csv" and opts["schema"] is None:
        raise CLIError("--format csv needs --schema (a JSON/YAML file, or a built-in schema name)")
    spec = format_spec(opts["format"], schema=opts["schema"], min_count=opts["min_count"])
    fmt = make_format(spec)
    data = prepare_data(fmt, opts["train"], opts["valid"], opts["test"], cache_dir=opts["cache_dir"],
                        skip_bad_lines=opts["skip_bad_lines"], progress=opts["progress"])
    spec = trained_spec(spec, fmt)
    train, valid, test = data.train, data.valid, data.test
    if opts["max_rows"] is not None and len(train) > opts["max_rows"]:
        import torch

        train = train.subset(torch.arange(opts["max_rows"]))
    if test is None and opts["test_fraction"]:
        train, test = _hold_out(train, opts["test_fraction"], opts)
    if valid is None and opts["valid_fraction"]:
        train, valid = _hold_out(train, opts["valid_fraction"], opts)
    return data, train, valid, test, spec


# ----------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------
def _set_threads(n: Optional[int]) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _nan_to_none(x):
    return None if isinstance(x, float) and x != x else x


def _table_optimizer(opts: Dict[str, Any]) -> str:
    """--table-optimizer, or sparse_adam for the deprecated --sparse (with a warning)."""
    if not opts["sparse"]:
        return opts["table_optimizer"]
    print(f"{PROG} train: warning: --sparse is deprecated and will be removed; write --table-optimizer "
          "sparse_adam (in a config file: table_optimizer: sparse_adam)", file=sys.stderr)
    return "sparse_adam"


def _curves_path(opts: Dict[str, Any]) -> Optional[Path]:
    """--curves-out, else the --metrics-out file with the suffix .png, else None."""
    if opts["curves_out"]:
        return Path(opts["curves_out"])
    if opts["metrics_out"]:
        metrics = Path(opts["metrics_out"])
        return metrics.with_suffix(".png" if metrics.suffix != ".png" else ".curves.png")
    return None


def _write_curves(path: Path, result, title: str) -> None:
    from .plots import write_learning_curves

    try:
        write_learning_curves(result.history, path, best_epoch=result.best_epoch, title=title)
    except ImportError as exc:  # matplotlib is optional; the run itself succeeded
        print(f"{PROG} train: no learning-curve plot: {exc}", file=sys.stderr)
        return
    print(f"learning curves: {path}", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    """Train; under ``torchrun --nproc_per_node=N`` data parallel (see `_train`)."""
    from . import distributed

    opts = resolve_train_options(args)
    rank, world_size, device = distributed.init_from_environment(opts["device"], opts["dist_timeout"])
    try:
        return _train(opts, rank, world_size, device)
    finally:
        if world_size > 1:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _load_train_data_on_every_rank(opts: Dict[str, Any], rank: int, world_size: int):
    """`load_train_data` on each rank of a torchrun job. With --cache-dir rank 0 reads the files and
    fills the cache first, then the others read its cache; without, every rank parses them at once.
    After each turn the ranks share their errors: a rank that failed raises its own, the others a
    CLIError naming it, so that all stop at once instead of waiting for a rank that has left."""
    if world_size == 1:
        return load_train_data(opts)
    import torch.distributed

    turns = [rank == 0, rank > 0] if opts["cache_dir"] else [True]
    loaded = None
    for my_turn in turns:
        error = None
        if my_turn:
            try:
                loaded = load_train_data(opts if rank == 0 else {**opts, "progress": False})
            except Exception as exc:  # raised below, once the other ranks know
                error = exc
        errors: List[Optional[str]] = [None] * world_size
        torch.distributed.all_gather_object(errors, None if error is None else str(error))
        if error is not None:
            raise error
        failed = next((r for r, message in enumerate(errors) if message is not None), None)
        if failed is not None:
            raise CLIError(f"rank {failed} could not load the data: {errors[failed]}")
    return loaded


def _train(opts: Dict[str, Any], rank: int, world_size: int, device) -> int:
    """Every rank builds the same model and reads the same data; under torchrun each trains on its
    share of every global batch of --batch-size rows, and rank 0 alone evaluates, checkpoints,
    prints and writes the metrics (deepfm_fast.train.Trainer)."""
    from . import backend, distributed
    from .models import build_model
    from .train import TrainConfig, Trainer, evaluate, seed_everything

    def say(*what, **kw):
        if rank == 0:
            print(*what, **kw)

    _set_threads(opts["threads"])
    if opts["resume"] and not opts["checkpoint_dir"]:
        raise CLIError("--resume needs --checkpoint-dir")
    table_optimizer = _table_optimizer(opts)
    data, train, valid, test, spec = _load_train_data_on_every_rank(opts, rank, world_size)
    for split, n in data.bad_lines.items():
        if n:
            say(f"skipped {n} bad line(s) in {split}", file=sys.stderr)
    table_lr = opts["table_lr"] if opts["table_lr"] is not None else opts["lr"]
    hparams = {"embedding_dim": opts["embedding_dim"], "hidden_units": opts["hidden_units"],
               "activation": opts["activation"], "dropout": opts["dropout"], "batch_norm": opts["batch_norm"],
               "l2_embedding": opts["l2_embedding"], "l2_scope": opts["l2_scope"], "init_std": opts["init_std"],
               "table_optimizer": table_optimizer, "table_lr": table_lr, "dnn_init": opts["dnn_init"]}
    if opts["table_file"]:
        hparams["table_file"] = str(opts["table_file"])
    seed_everything(opts["seed"])
    model = build_model(opts["model"], data.fields, **hparams).to(device)
    meta = {"model": model.config(), "format": spec, "encoder": data.encoder.to_dict()}
    config = TrainConfig(epochs=opts["epochs"], batch_size=opts["batch_size"], lr=opts["lr"], table_lr=table_lr,
                         patience=opts["patience"], monitor=opts["monitor"], seed=opts["seed"],
                         precise_bn_batches=opts["precise_bn_batches"],
                         checkpoint_dir=opts["checkpoint_dir"], resume=opts["resume"], progress=opts["progress"])
    parallel = f", {world_size} ranks x {opts['batch_size'] // world_size} rows" if world_size > 1 else ""
    say(f"{opts['model']}: {len(data.fields)} fields, {sum(f.vocab_size for f in data.fields):,} table rows, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; train {len(train):,} rows, "
        f"valid {len(valid) if valid is not None else 0:,}, test {len(test) if test is not None else 0:,}; "
        f"backend {backend()}, table optimizer {table_optimizer} (lr {table_lr:g}), monitor {opts['monitor']}"
        f"{parallel}", file=sys.stderr)
    trained = model
    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        trained = distributed.wrap(model, sync_batch_norm=opts["sync_batch_norm"], device_ids=ids)
    trainer = Trainer(trained, config, meta)
    model = trainer.module  # synchronised batch norms, if asked, live in it
    result = trainer.fit(train, valid)
    if rank > 0:
        return 0
    metrics: Dict[str, Any] = {
        "model": opts["model"], "backend": backend(), "hparams": hparams, "seed": opts["seed"],
        "lr": opts["lr"], "batch_size": opts["batch_size"], "monitor": opts["monitor"],
        "precise_bn_batches": opts["precise_bn_batches"], "world_size": world_size,
        "sync_batch_norm": bool(opts["sync_batch_norm"]) and world_size > 1,
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "stopped_early": result.stopped_early,
        "seconds_per_epoch": result.seconds_per_epoch, "train_rows_per_second": result.train_rows_per_second,
        "valid_auc": result.best_valid.get("auc"), "valid_logloss": result.best_valid.get("logloss"),
        "rows": {"train": len(train), "valid": len(valid) if valid is not None else 0,
                 "test": len(test) if test is not None else 0},
        "bad_lines": data.bad_lines, "history": result.history,
        "test_auc": None, "test_logloss": None,
    }
    if test is not None and len(test):
        m = evaluate(model, test, config.eval_batch_size)
        metrics["test_auc"], metrics["test_logloss"] = _nan_to_none(m["auc"]), m["logloss"]
        print(f"test AUC {m['auc']:.4f}  logloss {m['logloss']:.4f}  (best epoch {result.best_epoch}, "
              f"{result.seconds_per_epoch:.1f} s/epoch, {result.train_rows_per_second:,.0f} rows/s)")
    else:
        print(f"no test set; best epoch {result.best_epoch}, valid {result.best_valid}")
    if opts["metrics_out"]:
        write_json(opts["metrics_out"], metrics)
    curves = _curves_path(opts)
    if curves is not None:
        _write_curves(curves, result, f"{opts['model']} on {Path(opts['train']).name}")
    return 0


def _load_for_inference(checkpoint: str, table_file: Optional[str] = None):
    from .data.encode import FeatureEncoder
    from .data.formats import make_format
    from .models import build_model
    from .train import load_checkpoint

    path = Path(checkpoint)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise CLIError(f"checkpoint {path} not found (train with --checkpoint-dir first)")
    ckpt = load_checkpoint(path)
    meta = ckpt.get("meta") or {}
    if "model" not in meta or "encoder" not in meta:
        raise CLIError(f"checkpoint {path} was not written by '{PROG} train' (no model/encoder metadata)")
    cfg = dict(meta["model"])
    if table_file:
        cfg["table_file"] = table_file
    model = build_model(cfg.pop("name"), cfg.pop("fields"), **cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, make_format(meta["format"]), FeatureEncoder.from_dict(meta["encoder"])


def _encode_input(fmt, encoder, path: str, skip: bool):
    from .data import encode_file

    _check_file(path, "input")
    return encode_file(fmt, encoder, path, skip_bad_lines=skip)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .train import evaluate

    _set_threads(args.threads)
    model, fmt, encoder = _load_for_inference(args.checkpoint, args.table_file)
    _check_file(args.input, "input")
    why = fmt.no_label_reason(args.input)
    if why is not None:
        raise CLIError(f"{args.input}: {why}; evaluate needs labels ('{PROG} predict' scores such a file)")
    ds = _encode_input(fmt, encoder, args.input, args.skip_bad_lines)
    m = evaluate(model, ds, args.batch_size)
    print(f"AUC {m['auc']:.6f}  logloss {m['logloss']:.6f}  rows {m['rows']}")
    if args.metrics_out:
        write_json(args.metrics_out, {"auc": _nan_to_none(m["auc"]), "logloss": m["logloss"], "rows": m["rows"],
                                      "input": str(args.input), "checkpoint": str(args.checkpoint)})
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .train import predict

    _set_threads(args.threads)
    model, fmt, encoder = _load_for_inference(args.checkpoint, args.table_file)
    ds = _encode_input(fmt, encoder, args.input, args.skip_bad_lines)
    probs = predict(model, ds, args.batch_size).numpy()
    labelled = ds.has_labels
    with atomic_write(args.output, newline="") as fh:
        if labelled:
            fh.write("row,probability,label\n")
            fh.writelines(f"{i},{p:.8f},{int(y)}\n" for i, (p, y) in enumerate(zip(probs, ds.labels.numpy())))
        else:
            fh.write("row,probability\n")
            fh.writelines(f"{i},{p:.8f}\n" for i, p in enumerate(probs))
    print(f"wrote {len(probs)} probabilities to {args.output}" + ("" if labelled else " (the input has no labels)"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _set_threads(args.threads)
    # The demo's flags are run_demo's parameters, by name.
    numbers = run_demo(**{k: v for k, v in vars(args).items() if k not in ("command", "threads", "metrics_out")})
    if args.metrics_out:
        write_json(args.metrics_out, numbers)
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "demo": cmd_demo}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``deepfm-fast`` and ``python -m deepfm_fast``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .data import DataFormatError

    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, DataFormatError, FileNotFoundError, ValueError, FloatingPointError) as exc:
        if os.environ.get("DEEPFM_FAST_DEBUG"):
            raise
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
