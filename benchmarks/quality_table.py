"""Aggregate the metrics JSON files of benchmarks/quality.sh into benchmarks/results/quality.{json,md}."""
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

runs_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/quality_runs")
results = Path(__file__).resolve().parent / "results"
groups = defaultdict(list)
for p in sorted(runs_dir.glob("*.json")):
    dataset, model, seed = p.stem.rsplit("_", 2)
    m = json.loads(p.read_text())
    groups[(dataset, model)].append({"seed": int(seed), "test_auc": m["test_auc"], "test_logloss": m["test_logloss"],
                                     "valid_auc": m["valid_auc"], "best_epoch": m["best_epoch"],
                                     "epochs_run": m["epochs_run"], "seconds_per_epoch": m["seconds_per_epoch"],
                                     "train_rows_per_second": m["train_rows_per_second"], "rows": m["rows"],
                                     "hparams": m["hparams"], "backend": m["backend"]})


def ms(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


summary = []
for (dataset, model), runs in sorted(groups.items()):
    auc, auc_sd = ms([r["test_auc"] for r in runs])
    ll, ll_sd = ms([r["test_logloss"] for r in runs])
    summary.append({"dataset": dataset, "model": model, "seeds": [r["seed"] for r in runs],
                    "test_auc_mean": auc, "test_auc_std": auc_sd, "test_logloss_mean": ll, "test_logloss_std": ll_sd,
                    "best_epochs": [r["best_epoch"] for r in runs],
                    "seconds_per_epoch_mean": statistics.mean(r["seconds_per_epoch"] for r in runs),
                    "runs": runs})
(results / "quality.json").write_text(json.dumps(summary, indent=1) + "\n")
lines = ["| dataset | model | test AUC (mean ± std) | test logloss (mean ± std) | best epochs | s/epoch |",
         "|---|---|---|---|---|---|"]
order = {"deepfm": 0, "fm": 1, "lr": 2}
for s in sorted(summary, key=lambda s: (s["dataset"], order.get(s["model"], 9))):
    lines.append(f"| {s['dataset']} | {s['model']} | {s['test_auc_mean']:.4f} ± {s['test_auc_std']:.4f} | "
                 f"{s['test_logloss_mean']:.4f} ± {s['test_logloss_std']:.4f} | "
                 f"{','.join(map(str, s['best_epochs']))} | {s['seconds_per_epoch_mean']:.1f} |")
table = "\n".join(lines)
(results / "quality_table.md").write_text(table + "\n")
print(table)
