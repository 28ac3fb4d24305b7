"""Aggregate the metrics JSON files of benchmarks/quality.sh into benchmarks/results/quality.{json,md table}.

Usage: python benchmarks/quality_table.py RUNS_DIR [NAME]
Runs are named DATASET_MODEL_SEED.json (MODEL: a model, or an ablation's variant). Writes
benchmarks/results/NAME.json (per-run numbers, mean ± sample std over seeds, the BARS reference
values, the machine) and benchmarks/results/NAME_table.md (the table quoted in quality.md); NAME
defaults to "quality".
"""
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import recording

runs_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/quality_runs")
name = sys.argv[2] if len(sys.argv) > 2 else "quality"
results = Path(__file__).resolve().parent / "results"

# BARS leaderboard (FuxiCTR v1.1, one run, seed 2021; ../shared/data/RESULTS.md section 1a): test AUC / logloss.
# Frappe_x1 trains on 202,027 rows (we train on the 57,722-row validation file); MovielensLatest_x1 is
# 2M rows of (user, item, tag), not the seed's 22k-row MovieLens ratings sample: neither is comparable.
BARS = {("frappe", "deepfm"): (0.9842, 0.1482), ("frappe", "fm"): (0.9671, 0.2065), ("frappe", "lr"): (0.9356, 0.3076),
        ("movielens", "deepfm"): (0.9685, 0.2130), ("movielens", "fm"): (0.9434, 0.2729),
        ("movielens", "lr"): (0.9342, 0.3201)}
BARS_DATA = {"frappe": "Frappe_x1", "movielens": "MovielensLatest_x1"}

groups = defaultdict(list)
for p in sorted(runs_dir.glob("*.json")):
    dataset, rest = p.stem.split("_", 1)  # dataset names have no "_"; model and variant names may
    model, seed = rest.rsplit("_", 1)
    m = json.loads(p.read_text())
    groups[(dataset, model)].append({"seed": int(seed), "test_auc": m["test_auc"], "test_logloss": m["test_logloss"],
                                     "valid_auc": m["valid_auc"], "valid_logloss": m["valid_logloss"],
                                     "best_epoch": m["best_epoch"], "epochs_run": m["epochs_run"],
                                     "seconds_per_epoch": m["seconds_per_epoch"],
                                     "train_rows_per_second": m["train_rows_per_second"], "rows": m["rows"],
                                     "hparams": m["hparams"], "monitor": m.get("monitor"),
                                     "precise_bn_batches": m.get("precise_bn_batches"), "backend": m["backend"]})


def ms(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


summary = []
for (dataset, model), runs in sorted(groups.items()):
    auc, auc_sd = ms([r["test_auc"] for r in runs])
    ll, ll_sd = ms([r["test_logloss"] for r in runs])
    bars = BARS.get((dataset.split("-")[0], model))
    summary.append({"dataset": dataset, "model": model, "seeds": [r["seed"] for r in runs],
                    "test_auc_mean": auc, "test_auc_std": auc_sd, "test_logloss_mean": ll, "test_logloss_std": ll_sd,
                    "best_epochs": [r["best_epoch"] for r in runs], "epochs_run": [r["epochs_run"] for r in runs],
                    "seconds_per_epoch_mean": statistics.mean(r["seconds_per_epoch"] for r in runs),
                    "bars": None if bars is None else {"dataset": BARS_DATA[dataset.split("-")[0]], "test_auc": bars[0],
                                                       "test_logloss": bars[1], "comparable": False},
                    "runs": runs})
command = "benchmarks/quality.sh" if name == "quality" else f"benchmarks/{name}.sh"
(results / f"{name}.json").write_text(json.dumps({"machine": recording.machine(), "command": command,
                                                "summary": summary}, indent=1) + "\n")
lines = ["| dataset | model | test AUC (mean ± std) | test logloss (mean ± std) | best epochs (of run) | s/epoch "
         "| BARS x1 AUC / logloss (not comparable) |",
         "|---|---|---|---|---|---|---|"]
order = {"deepfm": 0, "fm": 1, "lr": 2}
best = {}
for s in summary:
    d = best.setdefault(s["dataset"], {"auc": -1.0, "ll": 9.0})
    d["auc"], d["ll"] = max(d["auc"], s["test_auc_mean"]), min(d["ll"], s["test_logloss_mean"])
for s in sorted(summary, key=lambda s: (s["dataset"], order.get(s["model"], 9))):
    b = best[s["dataset"]]
    auc = f"{s['test_auc_mean']:.4f} ± {s['test_auc_std']:.4f}"
    ll = f"{s['test_logloss_mean']:.4f} ± {s['test_logloss_std']:.4f}"
    auc = f"**{auc}**" if s["test_auc_mean"] == b["auc"] else auc
    ll = f"**{ll}**" if s["test_logloss_mean"] == b["ll"] else ll
    epochs = ", ".join(f"{e} ({n})" for e, n in zip(s["best_epochs"], s["epochs_run"]))
    bars = f"{s['bars']['test_auc']:.4f} / {s['bars']['test_logloss']:.4f}" if s["bars"] else "–"
    seconds = f"{s['seconds_per_epoch_mean']:.1f}"
    lines.append(f"| {s['dataset']} | {s['model']} | {auc} | {ll} | {epochs} | {seconds} | {bars} |")
table = "\n".join(lines)
(results / f"{name}_table.md").write_text(table + "\n")
print(table)
