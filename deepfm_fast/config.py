"""The run configuration of ``deepfm-fast train``: every option once, with its type, default and help.

:class:`RunConfig` declares each option as a dataclass field: the annotation is its type, the
default its default, the metadata its help text, its group in ``--help``, its allowed values (asked
of the module that defines them) and whether it is a path. Two sources fill it, to the same
object: the command line (:func:`add_arguments` builds the argparse options from the fields) and a
YAML or JSON file of the same names, with ``-`` or ``_`` (:meth:`RunConfig.from_mapping`; paths in
a file are relative to the file). :func:`resolve` layers them: defaults < config file < flags.

Example::

    cfg = RunConfig.from_file("run.yaml")                       # or resolve(parsed_args)
    cfg = dataclasses.replace(cfg, seed=3)
    deepfm_fast.run.train(cfg)
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

__all__ = ["RunConfig", "RunError", "add_arguments", "resolve", "hidden_units", "PROG", "SPLITS"]

PROG = "deepfm-fast"
SPLITS = ("random", "ordered")


class RunError(ValueError):
    """A usage or input problem, reported by the command line as one line without a traceback."""


def hidden_units(text: Any) -> List[int]:
    """``"400,400,400"``, ``"400x400"``, ``[400, 400]`` -> ``[400, 400, 400]``; ``""``/``"none"``/``"0"`` -> ``[]``."""
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


# The allowed values of the choice options, from the modules that define them (asked when a parser
# is built or a config checked, so that what a module adds shows up here).
def _models() -> Sequence[str]:
    from .models import MODELS

    return tuple(MODELS)


def _table_modes() -> Sequence[str]:
    from .models import TableMode

    return TableMode.names()


def _formats() -> Sequence[str]:
    from .data.formats import FORMATS

    return tuple(FORMATS)


def _monitors() -> Sequence[str]:
    from .train import MONITORS

    return MONITORS


def _l2_scopes() -> Sequence[str]:
    from .models import L2_SCOPES

    return L2_SCOPES


def _dnn_inits() -> Sequence[str]:
    from .models import DNN_INITS

    return DNN_INITS


def _table_optimizer_help() -> str:
    from .models import TableMode

    plain = [n for n in TableMode.names() if n not in TableMode.fused_names()]
    return ("how the embedding table (and first-order weights) is trained. Fused, updating the rows each batch "
            f"touches inside the backward: {', '.join(TableMode.fused_names())}; adam has the semantics of "
            "torch.optim.Adam on the dense gradient (rows no batch touched still move by their momentum, caught up "
            "in closed form), the best model quality at the cost of a sparse update (each optimizer's semantics: "
            "deepfm_fast.optim and the README; their model quality: benchmarks/results/quality.md). Plain PyTorch, "
            f"for comparison: {', '.join(plain)} (sparse_adam: sparse gradients + torch SparseAdam; dense: dense "
            "gradients + Adam, the slow baseline). The DNN, bias and batch norm always use torch Adam")


def _min_count_help() -> str:
    from .data.prepare import UNSEEN_VALUES_HELP

    return f"categorical values seen fewer times go to OOV. Unseen values: {UNSEEN_VALUES_HELP}"


def _hash_buckets_help() -> str:
    from .data.prepare import HASH_BUCKETS_HELP

    return HASH_BUCKETS_HELP


def _opt(default: Any, text: Any, group: str, *, choices: Optional[Callable[[], Sequence[str]]] = None,
         path: bool = False) -> Any:
    """A field of :class:`RunConfig`: its default, help (a text or a function giving it), ``--help`` group
    (``""``: none), allowed values and whether it is a path (relative to a config file)."""
    meta = {"help": text, "group": group, "choices": choices, "path": path}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunConfig:
    """Every option of ``deepfm-fast train`` (the flag ``--max-rows`` is the field ``max_rows``)."""

    model: str = _opt("deepfm", "model", "", choices=_models)
    # data
    format: Optional[str] = _opt(None, "criteo: label,I1..I13,C1..C26 (TSV or CSV with header); libfm: 'label id:value "
                                       "...'; csv: header CSV described by --schema", "data", choices=_formats)
    schema: Optional[str] = _opt(None, lambda: "csv: JSON/YAML file mapping column -> role, or a built-in schema: "
                                 + ", ".join(sorted(_builtin_schemas())), "data", path=True)
    skip_bad_lines: bool = _opt(False, "skip and count malformed rows instead of stopping", "data")
    cache_dir: Optional[str] = _opt(None, "cache the encoded arrays here and reuse them on the next run", "data",
                                    path=True)
    min_count: int = _opt(1, _min_count_help, "data")
    hash_buckets: Optional[int] = _opt(None, _hash_buckets_help, "data")
    # splits
    train: Optional[str] = _opt(None, "training file", "splits", path=True)
    valid: Optional[str] = _opt(None, "validation file for early stopping", "splits", path=True)
    valid_fraction: float = _opt(0.1, "without --valid: hold out this share of the training rows (0 = none)", "splits")
    test: Optional[str] = _opt(None, "test file for the final metrics", "splits", path=True)
    test_fraction: Optional[float] = _opt(None, "without --test: hold out this share of the training rows", "splits")
    split: str = _opt("random", "how hold-outs are taken: random rows or the tail in file/--split-by order", "splits",
                      choices=lambda: SPLITS)
    split_by: Optional[str] = _opt(None, "ordered split: an extra ('keep') column to sort by, e.g. timestamp",
                                   "splits")
    max_rows: Optional[int] = _opt(None, "use only the first N training rows (quick runs)", "splits")
    # model
    embedding_dim: int = _opt(10, "embedding size K", "model")
    hidden_units: List[int] = _opt([400, 400, 400], "DNN widths, e.g. 400,400,400", "model")
    activation: str = _opt("relu", "DNN activation", "model")
    dropout: float = _opt(0.0, "DNN dropout", "model")
    batch_norm: bool = _opt(False, "DNN batch norm", "model")
    l2_embedding: float = _opt(0.0, "L2 on the table rows used in each batch", "model")
    l2_scope: str = _opt("used", "rows the L2 covers: used (those of each batch, any table optimizer) or table "
                                 "(every row at every step, FuxiCTR's embedding_regularizer; --table-optimizer dense "
                                 "only)", "model", choices=_l2_scopes)
    dnn_init: str = _opt("default", "DNN weight init: default (PyTorch's) or xavier_normal (FuxiCTR's)", "model",
                         choices=_dnn_inits)
    table_optimizer: str = _opt("adam", _table_optimizer_help, "model", choices=_table_modes)
    table_lr: Optional[float] = _opt(None, "learning rate of the table optimizer (unset: --lr)", "model")
    table_file: Optional[str] = _opt(None, "keep the table and its optimizer state in this memory-mapped file (tables "
                                           "larger than RAM; a fused --table-optimizer): made when missing, else "
                                           "resumed from its last checkpoint; each epoch's checkpoint makes it "
                                           "crash-safe, the best epoch is not restored (the file holds the last): "
                                           "evaluate last.pt", "model", path=True)
    sparse: bool = _opt(False, "deprecated: the old spelling of --table-optimizer sparse_adam", "model")
    init_std: float = _opt(1e-2, "embedding init std (FuxiCTR uses 1e-4, which leaves the FM term inactive for many "
                                 "epochs when an epoch is only a few steps)", "model")
    # training
    epochs: int = _opt(10, "most epochs", "training")
    batch_size: int = _opt(4096, "rows per step (the global batch under torchrun)", "training")
    lr: float = _opt(1e-3, "Adam learning rate", "training")
    patience: int = _opt(2, "epochs without gain of the monitored validation score before stopping", "training")
    precise_bn_batches: int = _opt(16, "before each validation, recompute the batch-norm statistics over this many "
                                       "training batches with the current weights (PreciseBN; 0 = plain running "
                                       "averages, which lag badly with few steps per epoch)", "training")
    monitor: str = _opt("auc-logloss", "early-stopping score: auc-logloss (validation AUC - logloss, as the BARS "
                                       "configs' monitor {AUC: 1, logloss: -1}) or auc", "training", choices=_monitors)
    seed: int = _opt(2021, "seed; same seed, same result on CPU", "training")
    checkpoint_dir: Optional[str] = _opt(None, "write last.pt (resume) and best.pt (evaluate/predict) here", "training",
                                         path=True)
    resume: bool = _opt(False, "continue from --checkpoint-dir/last.pt", "training")
    sync_batch_norm: bool = _opt(False, "under torchrun: batch norms over the global batch of all ranks, so that N "
                                        "ranks train the model one process would (off: each rank's share)", "training")
    dist_timeout: float = _opt(1800.0, "under torchrun: seconds a collective waits for the other ranks before failing",
                               "training")
    metrics_out: Optional[str] = _opt(None, "write final metrics as JSON to this file, and the learning curves as a "
                                            "PNG beside it (same name, .png)", "training", path=True)
    curves_out: Optional[str] = _opt(None, "write the learning curves (train loss, valid AUC and logloss, learning "
                                           "rates per epoch; needs matplotlib) to this PNG instead", "training",
                                     path=True)
    threads: Optional[int] = _opt(None, "torch CPU threads", "training")
    device: str = _opt("cpu", "cpu or cuda", "training")
    progress: bool = _opt(True, "tqdm progress bars", "training")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = f.metadata["choices"]
            if value is not None and choices is not None and value not in choices():
                raise RunError(f"option {f.name!r} must be one of {list(choices())}, got {value!r}")

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any], *, base: Optional[Path] = None, source: str = "config",
                     defaults: Optional["RunConfig"] = None) -> "RunConfig":
        """``defaults`` (or the defaults) updated by ``options`` (names with ``-`` or ``_``), each value
        checked against its field's type; relative paths are taken from ``base``. A RunError names
        ``source`` and the option for an unknown name, a wrong type or a value not allowed."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        values: Dict[str, Any] = {}
        for key, value in options.items():
            name = str(key).replace("-", "_")
            if name not in known:
                near = difflib.get_close_matches(name, known, n=1)
                raise RunError(f"{source}: unknown option {key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
            try:
                value = _typed(value, hints[name])
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                raise RunError(f"{source}: option {key!r}: {exc}") from None
            if value is not None and known[name].metadata["path"] and base is not None and not _builtin(name, value):
                value = str(base / Path(os.path.expanduser(value)))
            values[name] = value
        try:
            return dataclasses.replace(defaults or cls(), **values)
        except RunError as exc:
            raise RunError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str, defaults: Optional["RunConfig"] = None) -> "RunConfig":
        """A YAML (``.yaml``/``.yml``) or JSON file of options; its relative paths are relative to it."""
        p = Path(path)
        if not p.is_file():
            raise RunError(f"config file {path} not found")
        try:
            if p.suffix.lower() in (".yaml", ".yml"):
                import yaml

                options = yaml.safe_load(p.read_text())
            else:
                options = json.loads(p.read_text())
        except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError
            raise RunError(f"config file {path}: cannot parse: {exc}") from None
        if not isinstance(options, (dict, type(None))):
            raise RunError(f"config file {path}: expected a mapping of option -> value, got {type(options).__name__}")
        return cls.from_mapping(options or {}, base=p.resolve().parent, source=f"config file {path}",
                                defaults=defaults)


def _builtin_schemas():
    from .data.formats import BUILTIN_SCHEMAS

    return BUILTIN_SCHEMAS


def _builtin(name: str, value: str) -> bool:
    """A built-in schema name, which is not a path."""
    return name == "schema" and value in _builtin_schemas()


def _typed(value: Any, hint: Any) -> Any:
    """``value`` (from YAML/JSON) as the type ``hint`` of its field; a TypeError/ValueError says why not."""
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise TypeError("may not be null")
    if type(None) in args:  # Optional[X]
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f"must be true or false, got {value!r}")
        return value
    if typing.get_origin(hint) in (list, List):
        return hidden_units(value)
    if isinstance(value, bool) or (hint is not str and not isinstance(value, (int, float, str))):
        raise TypeError(f"must be {hint.__name__}, got {value!r}")
    if hint is int:
        if isinstance(value, float) and not value.is_integer():
            raise TypeError(f"must be an integer, got {value!r}")
        return int(value)  # a ValueError for text that is no integer
    if hint is float:
        return float(value)
    if not isinstance(value, str):
        raise TypeError(f"must be text, got {value!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`RunConfig` field, in its group. Every default is None so that a config
    file can fill what the flags leave out (:func:`resolve`); the help gives the real default."""
    groups: Dict[str, Any] = {"": parser}
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        group = groups.get(f.metadata["group"])
        if group is None:
            group = groups[f.metadata["group"]] = parser.add_argument_group(f.metadata["group"])
        text = f.metadata["help"]
        text = text() if callable(text) else text
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if default is not None and default is not False:
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            text += f" (default {shown})"
        kwargs: Dict[str, Any] = {"help": text, "default": None}
        hint = hints[f.name]
        hint = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if type(None) in \
            typing.get_args(hint) else hint
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) in (list, List):
            kwargs["type"] = hidden_units
        elif hint in (int, float):
            kwargs["type"] = hint
        if f.metadata["choices"] is not None:
            kwargs["choices"] = f.metadata["choices"]()
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def resolve(args: argparse.Namespace) -> RunConfig:
    """Defaults < ``args.config`` (a YAML/JSON file) < the flags given in ``args``."""
    cfg = RunConfig.from_file(args.config) if getattr(args, "config", None) else RunConfig()
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)
             if getattr(args, f.name, None) is not None}
    return dataclasses.replace(cfg, **flags)
