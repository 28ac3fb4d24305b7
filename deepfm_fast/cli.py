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

This module only parses: the train options are the fields of :class:`deepfm_fast.config.RunConfig`
(declared there once, with their types, defaults and help), and the commands run in
:mod:`deepfm_fast.run` (train, evaluate, predict) and :mod:`deepfm_fast.demo`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from . import config
from ._io import write_json
from .config import PROG, RunError, hidden_units

__all__ = ["main", "build_parser"]

def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .models import TableMode

    parser = argparse.ArgumentParser(prog=PROG, description="DeepFM / FM / LR for CTR prediction on fused kernels.",
                                     epilog=f"'{PROG} COMMAND --help' for the options of a command.")

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,prepare,evaluate,predict,demo}")
    sub.required = True
    p = sub.add_parser("train", help="train a model, evaluate every epoch, stop early, report metrics",
                       description="Train on --train, early stopping on --valid (or a --valid-fraction hold-out), "
                                   "final metrics on --test. Options may come from --config.")
    p.add_argument("--config", help="YAML or JSON file of options (same names as the flags); flags override it")
    config.add_arguments(p)
    from .data.prepare import add_prepare_parser

    add_prepare_parser(sub)

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
    p.add_argument("--hidden-units", type=hidden_units, default=DEMO_DEFAULTS["hidden_units"])
    p.add_argument("--dropout", type=float, default=DEMO_DEFAULTS["dropout"])
    p.add_argument("--table-optimizer", choices=TableMode.fused_names(), default="adam",
                   help="fused table optimizer of the trained model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timing-steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--timing-batch-size", type=int, default=4096, help="batch of the timed steps")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--metrics-out", help="write the demo numbers as JSON here")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from . import run

    return run.train(config.resolve(args))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import run

    run.set_threads(args.threads)
    run.evaluate_file(args.checkpoint, args.input, batch_size=args.batch_size, skip_bad_lines=args.skip_bad_lines,
                      metrics_out=args.metrics_out, table_file=args.table_file)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from . import run

    run.set_threads(args.threads)
    run.predict_file(args.checkpoint, args.input, args.output, batch_size=args.batch_size,
                     skip_bad_lines=args.skip_bad_lines, table_file=args.table_file)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .run import set_threads

    set_threads(args.threads)
    # The demo's flags are run_demo's parameters, by name.
    numbers = run_demo(**{k: v for k, v in vars(args).items() if k not in ("command", "threads", "metrics_out")})
    if args.metrics_out:
        write_json(args.metrics_out, numbers)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.prepare import cmd_prepare as prepare

    return prepare(args)


COMMANDS = {"train": cmd_train, "prepare": cmd_prepare, "evaluate": cmd_evaluate, "predict": cmd_predict,
            "demo": cmd_demo}


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
    except (RunError, DataFormatError, FileNotFoundError, ValueError, FloatingPointError) as exc:
        if os.environ.get("DEEPFM_FAST_DEBUG"):
            raise
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
