"""Export time and CPU latency: onnxruntime against PyTorch eager, original and fused.

For each network (torchvision, random weights with calibrated BatchNorm state) this measures the
time to fold and export one ONNX file (opset 18, torch.export-based exporter, checked and run at
two batch sizes before it is accepted), then the median latency of the original model in PyTorch
eager, the fused model in PyTorch eager and the exported file in onnxruntime (CPU provider) at
each batch size. The three are timed round-robin, one call of each per round, so a slow period on
a shared machine hits all of them alike. Ratios are printed next to the figures, and the command
that reproduces the run is printed at the end.

Run:  .venv/bin/python benchmarks/export_latency.py [--models resnet50,efficientnet_b0]
      [--batches 1,8] [--repeats 10] [--threads N] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnsurgery.calibrate import calibrate_batchnorm  # noqa: E402
from bnsurgery.fuse import fuse_batchnorm  # noqa: E402
from bnsurgery.onnx_export import export_onnx  # noqa: E402
from bnsurgery.tables import render_table  # noqa: E402
from bnsurgery.timing import interleaved_timings  # noqa: E402
from bnsurgery.validate import compare_models  # noqa: E402


def _session(path: Path, threads: int | None):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    # onnxruntime's idle threads spin by default; timed round-robin with PyTorch on the same
    # cores, the spinning would slow PyTorch's next call and flatter onnxruntime.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), sess_options=options,
                                        providers=["CPUExecutionProvider"])


def _round_robin(calls: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each entry, timed one call of each per round."""
    timings = interleaved_timings(calls, rounds=repeats, warmup=warmup)
    return {name: timing.median for name, timing in timings.items()}


def bench_model(name: str, batches: list[int], repeats: int, warmup: int, folder: Path,
                threads: int | None = None) -> dict:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    model = calibrate_batchnorm(model, torch.randn(4, 3, 224, 224), steps=2, seed=0).eval()
    example = torch.randn(1, 3, 224, 224)

    start = time.perf_counter()
    fused = fuse_batchnorm(model, example).eval()
    fuse_s = time.perf_counter() - start
    start = time.perf_counter()
    path = export_onnx(model, example, folder / f"{name}.onnx", fuse=True)
    export_s = time.perf_counter() - start
    session = _session(path, threads)
    input_name = session.get_inputs()[0].name
    check = compare_models(model, fused, torch.randn(2, 3, 224, 224), float64_baseline=False)

    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224)
        feed = {input_name: x.numpy()}
        with torch.no_grad():
            medians = _round_robin({
                "eager_original": lambda x=x: model(x),
                "eager_fused": lambda x=x: fused(x),
                "onnxruntime": lambda feed=feed: session.run(None, feed),
            }, repeats, warmup)
        rows.append({
            "batch": batch,
            "ms": {k: 1e3 * v for k, v in medians.items()},
            "fused_vs_original": medians["eager_fused"] / medians["eager_original"],
            "ort_vs_original": medians["onnxruntime"] / medians["eager_original"],
            "ort_vs_fused": medians["onnxruntime"] / medians["eager_fused"],
        })
    return {"model": name, "fuse_s": fuse_s, "export_s": export_s,
            "onnx_mb": path.stat().st_size / 1e6, "fused_max_rel_error": check.max_rel_error,
            "fused_check": check.status, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,efficientnet_b0")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for PyTorch and onnxruntime alike (default: their own)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    batches = [int(b) for b in args.batches.split(",") if b]

    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; load average before: "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name in models:
            result = bench_model(name, batches, args.repeats, args.warmup, Path(folder),
                                 args.threads)
            results.append(result)
            print(f"\n{name}: fold {result['fuse_s']:.2f} s, fold+export+check "
                  f"{result['export_s']:.1f} s, {result['onnx_mb']:.1f} MB, fused vs original "
                  f"{result['fused_check']} (max rel err {result['fused_max_rel_error']:.1e})")
            table = [(str(row["batch"]), *(f"{row['ms'][k]:.1f} ms" for k in
                                             ("eager_original", "eager_fused", "onnxruntime")),
                      *(f"{row[k]:.2f}x" for k in ("fused_vs_original", "ort_vs_original",
                                                   "ort_vs_fused")))
                     for row in result["rows"]]
            for line in render_table(("batch", "eager orig", "eager fused", "onnxruntime",
                                      "fused/orig", "ort/orig", "ort/fused"), table,
                                     align="r" * 7, rule=False, indent="  "):
                print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/export_latency.py",
                                                *(argv if argv is not None else sys.argv[1:])])
    print(f"\nmedian of {args.repeats} round-robin calls after {args.warmup} warm-up rounds; "
          f"ratios below 1 mean faster than the reference; load average after: "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} (figures from a busy machine "
          f"are noisy).\nrerun: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
