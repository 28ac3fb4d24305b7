"""Batch inference on the CPU, one thread, by each serving route of a DeepFM (README "Serving").

Routes: eager PyTorch, torch.compile, the AOTInductor package loaded in Python and served from C++
(examples/aoti_serve, built here with its build time recorded), and onnxruntime on the models of
both ONNX exporters. Every route's predictions are checked against eager on the timed batch.
In-process routes are timed in alternating rounds (median of the rounds' per-batch times); the C++
server times its own loop in its own process.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/serving_cpu.py            # writes results/serving_cpu.{json,md}
    OMP_WAIT_POLICY=PASSIVE python benchmarks/serving_cpu.py --quick    # small check, writes nothing
"""
import argparse
import datetime
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import deepfm_fast
from deepfm_fast.export import ServingModel
from deepfm_fast.features import SparseField
from deepfm_fast.models import DeepFM
from recording import command, machine, machine_line

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def build_cpp(build_dir: Path) -> float:
    """Configures and builds examples/aoti_serve; returns the seconds it took."""
    start = time.perf_counter()
    prefix = torch.utils.cmake_prefix_path
    subprocess.run(["cmake", "-S", str(ROOT / "examples" / "aoti_serve"), "-B", str(build_dir),
                    f"-DCMAKE_PREFIX_PATH={prefix}"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build_dir), "-j2"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def onnx_session(serving, ids, dynamo):
    import onnxruntime

    if dynamo:
        batch = torch.export.Dim("batch", min=2)
        proto = torch.onnx.export(serving, (ids,), dynamo=True, dynamic_shapes=({0: batch},),
                                  verbose=False).model_proto.SerializeToString()
    else:
        f = io.BytesIO()
        torch.onnx.export(serving, (ids,), f, dynamo=False, input_names=["ids"], dynamic_axes={"ids": {0: "batch"}})
        proto = f.getvalue()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--fields", type=int, default=39)
    parser.add_argument("--vocab", type=int, default=100_000, help="rows per field")
    parser.add_argument("--dim", type=int, default=10)
    parser.add_argument("--hidden", type=int, nargs="+", default=[400, 400, 400])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5, help="batches per route and round")
    parser.add_argument("--build-dir", default=str(ROOT / "build" / "aoti_serve"))
    parser.add_argument("--quick", action="store_true", help="a small model and batch; writes no results")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.fields, args.vocab, args.hidden, args.rounds, args.calls = 256, 8, 1000, [32], 2, 2
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # the C++ server and Inductor's OpenMP kernels
    torch.manual_seed(0)
    fields = [SparseField(f"f{i}", args.vocab) for i in range(args.fields)]
    model = DeepFM(fields, args.dim, hidden_units=args.hidden, batch_norm=True, init_std=0.1)
    serving = ServingModel(model)
    ids = torch.randint(0, args.vocab, (args.batch, args.fields))  # uniform ids
    with torch.no_grad():
        expected = serving(ids)
    work = Path(tempfile.mkdtemp(prefix="serving_cpu-"))
    setup_s = {}

    routes = {"eager": serving}
    start = time.perf_counter()
    compiled = torch.compile(serving)
    with torch.no_grad():
        compiled(ids)
    setup_s["torch.compile"] = time.perf_counter() - start
    routes["torch.compile"] = compiled
    start = time.perf_counter()
    program = torch.export.export(serving, (ids,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(work / "deepfm.pt2"))
    setup_s["aoti_compile_and_package"] = time.perf_counter() - start
    routes["AOTInductor (Python)"] = torch._inductor.aoti_load_package(package)
    for dynamo in (False, True):
        start = time.perf_counter()
        routes[f"onnxruntime ({'dynamo' if dynamo else 'TorchScript'} exporter)"] = onnx_session(serving, ids, dynamo)
        setup_s[f"onnx export ({'dynamo' if dynamo else 'TorchScript'})"] = time.perf_counter() - start

    max_diff = {}
    with torch.no_grad():
        for name, fn in routes.items():
            max_diff[name] = float((fn(ids) - expected).abs().max())
        times = {name: [] for name in routes}
        for _ in range(args.rounds):
            for name, fn in routes.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    fn(ids)
                times[name].append((time.perf_counter() - start) / args.calls)
    rows_per_s = {name: args.batch / statistics.median(t) for name, t in times.items()}

    build_s = build_cpp(Path(args.build_dir))
    ids.numpy().tofile(work / "ids.bin")
    expected.numpy().tofile(work / "expected.bin")
    served = subprocess.run([str(Path(args.build_dir) / "aoti_serve"), package, str(work / "ids.bin"),
                             str(args.fields), str(work / "expected.bin"), "--bench", str(args.rounds * args.calls)],
                            capture_output=True, text=True, check=True)
    out = served.stdout
    rows_per_s["AOTInductor (C++ aoti_serve)"] = float(out.split("bench:")[1].split(",")[1].split()[0])
    max_diff["AOTInductor (C++ aoti_serve)"] = float(out.split("max |C++ - Python| =")[1].split()[0])
    wrong = {name: diff for name, diff in max_diff.items() if not diff <= 1e-5}
    if wrong:
        raise SystemExit(f"serving_cpu: these routes' predictions differ from eager's by more than 1e-5: {wrong}")
    for name in rows_per_s:
        print(f"{name:40s} {rows_per_s[name]:12.0f} rows/s   max |diff| vs eager {max_diff[name]:.2g}")
    print(f"C++ example build: {build_s:.0f} s")
    if args.quick:
        return

    versions = {"deepfm_fast_backend": deepfm_fast.backend()}
    for module in ("onnx", "onnxscript", "onnxruntime"):
        versions[module] = __import__(module).__version__
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "versions": versions, "command": command(sys.argv, "python"),
              "note": "A shared 2-core machine: other jobs ran during the measurement",
              "config": {k: v for k, v in vars(args).items() if k not in ("build_dir", "quick")},
              "threads": 1, "rows_per_s": {k: round(v) for k, v in rows_per_s.items()},
              "max_abs_diff_vs_eager": max_diff, "setup_s": {k: round(v, 1) for k, v in setup_s.items()},
              "cpp_example_build_s": round(build_s, 1)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving_cpu.json").write_text(json.dumps(record, indent=2) + "\n")
    eager = rows_per_s["eager"]
    lines = ["# Serving a DeepFM on the CPU: batch inference, one thread", "",
             machine_line({**record["machine"], "command": record["command"]}, record["date"]), "",
             f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}. {record['note']}: the figures "
             f"are noisy; compare them as ratios.", "",
             f"Model: DeepFM, {args.fields} single-id fields of {args.vocab} rows, K = {args.dim}, DNN "
             f"{'-'.join(map(str, args.hidden))} with batch norm, eval mode; batch {args.batch} uniform ids; "
             f"median of {args.rounds} alternating rounds of {args.calls} batches (the C++ server: its own loop of "
             f"{args.rounds * args.calls} batches).", "",
             "| route | rows/s | vs eager | max abs diff vs eager |", "|---|---:|---:|---:|"]
    for name, value in rows_per_s.items():
        lines.append(f"| {name} | {value:,.0f} | {value / eager:.2f}x | {max_diff[name]:.1e} |")
    lines += ["", f"Setup: {', '.join(f'{k} {v:.0f} s' for k, v in setup_s.items())}; building "
              f"examples/aoti_serve (its op library and server, `cmake --build -j2`): {build_s:.0f} s.", ""]
    (RESULTS / "serving_cpu.md").write_text("\n".join(lines))
    print(f"wrote {RESULTS / 'serving_cpu.md'}")


if __name__ == "__main__":
    main()
