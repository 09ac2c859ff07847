"""Wall time of the command line against ``polygraphy`` and ``onnxslim`` on the same ONNX file.

One ONNX file per torchvision model (random weights) is exported first, untimed. Then every
command runs in a fresh process, interleaved (one of each per round), against the same-run
baseline ``python -c "import torch"``; medians and min-max are printed. A tool that is not
installed gets "not installed", never a number.

    python benchmarks/cli_tools.py --runs 3 --models resnet18,resnet50
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bnsurgery.tables import render_table  # noqa: E402


def _tool(name: str) -> str | None:
    """The tool next to this interpreter, else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _cases(model: str, onnx: Path, out: Path) -> dict[str, list[str] | None]:
    bns = [sys.executable, "-m", "bnsurgery"]
    poly, slim = _tool("polygraphy"), _tool("onnxslim")
    tv = f"torchvision:{model}"
    return {
        "python -c 'import torch' (baseline)": [sys.executable, "-c", "import torch"],
        "bnsurgery inspect FILE.onnx": [*bns, "inspect", str(onnx), "-q"],
        "bnsurgery validate FILE.onnx FILE.onnx": [*bns, "validate", str(onnx), str(onnx), "-q"],
        "bnsurgery fuse FILE.onnx -o OUT.onnx": [*bns, "fuse", str(onnx), "-o", str(out), "-q"],
        f"bnsurgery inspect {tv}": [*bns, "inspect", tv, "-q"],
        f"bnsurgery validate {tv} FILE.onnx": [*bns, "validate", tv, str(onnx), "-q"],
        "polygraphy run FILE.onnx --onnxrt": poly and [poly, "run", str(onnx), "--onnxrt"],
        "polygraphy inspect model FILE.onnx": poly and [poly, "inspect", "model", str(onnx)],
        "onnxslim FILE.onnx OUT.onnx": slim and [slim, str(onnx), str(out)],
    }


def _run(argv: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {result.returncode}:\n"
                         f"{result.stderr.decode()[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--json", action="store_true", help="print the samples as JSON too")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cli-tools-"))
    samples: dict[str, dict[str, list[float]]] = {}
    for model in args.models.split(","):
        onnx, out = work / f"{model}.onnx", work / f"{model}-out.onnx"
        _run([sys.executable, "-m", "bnsurgery", "export", f"torchvision:{model}", "-o",
              str(onnx), "--no-fuse", "-q"])
        cases = _cases(model, onnx, out)
        samples[model] = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, argv in cases.items():
                if argv:
                    samples[model][name].append(_run(argv))
        rows = []
        for name, argv in cases.items():
            got = samples[model][name]
            if not argv:
                rows.append((name, "not installed", "", ""))
                continue
            med = statistics.median(got)
            base = statistics.median(samples[model]["python -c 'import torch' (baseline)"])
            rows.append((name, f"{med:.2f}", f"{min(got):.2f}-{max(got):.2f}",
                         f"x{med / base:.2f}"))
        print(f"\n{model}: {args.runs} interleaved runs each, {os.cpu_count()} CPUs; seconds")
        for line in render_table(("command", "median", "min-max", "vs import torch"), rows,
                                 align="lrrr"):
            print(line)
    if args.json:
        print(json.dumps(samples, indent=1))
    print("rerun: python " + " ".join([str(Path(__file__).relative_to(ROOT)), *sys.argv[1:]]))


if __name__ == "__main__":
    main()
