"""Wall time of the command line itself: ``bnsurgery --help`` and ``bnsurgery inspect``.

Each command runs in a fresh interpreter (``python -m bnsurgery ...``), the way a user starts
it. Runs are interleaved (one of each per round) so a busy machine slows all alike; medians and
the min-max range are printed. The baseline in the same run is ``python -c "import torch"``:
what ``--help`` cost when it imported torch. ``--baseline-tree`` also times another checkout
(e.g. an older commit, unpacked with ``git archive``) in the same rounds.

    python benchmarks/cli_startup.py --runs 5
    python benchmarks/cli_startup.py --runs 5 --baseline-tree /tmp/old --inspect
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _timed(argv: list[str], tree: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree))
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=tree, env=env, capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed in {tree}:\n{result.stderr.decode()[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline-tree", type=Path, help="another checkout to time as well")
    parser.add_argument("--inspect", action="append", nargs="?", const="torchvision:resnet18",
                        metavar="MODEL", help="also time 'inspect MODEL -q' (resnet18 default)")
    args = parser.parse_args()
    python = sys.executable
    cases: dict[str, tuple[list[str], Path]] = {
        "python -c 'import torch' (baseline)": ([python, "-c", "import torch"], ROOT),
        "bnsurgery --help": ([python, "-m", "bnsurgery", "--help"], ROOT),
    }
    for model in args.inspect or []:
        cases[f"bnsurgery inspect {model}"] = ([python, "-m", "bnsurgery", "inspect", model,
                                                "-q"], ROOT)
    if args.baseline_tree:
        for name, (argv, _) in list(cases.items()):
            if "bnsurgery" in name:
                cases[f"{name} [{args.baseline_tree}]"] = (argv, args.baseline_tree)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, (argv, tree) in cases.items():
            times[name].append(_timed(argv, tree))
    print(f"{args.runs} interleaved runs each, {os.cpu_count()} CPUs; seconds:")
    for name, values in times.items():
        print(f"  {name:70s} median {statistics.median(values):6.2f}  "
              f"(min {min(values):.2f}, max {max(values):.2f})")
    print("rerun: python " + " ".join([str(Path(__file__).relative_to(ROOT)), *sys.argv[1:]]))


if __name__ == "__main__":
    main()
