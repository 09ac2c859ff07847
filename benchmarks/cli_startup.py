"""Wall time of the command line itself: ``bnsurgery --help`` and ``bnsurgery inspect``.

Each command runs in a fresh interpreter (``python -m bnsurgery ...``), the way a user starts
it. Runs are interleaved (one of each per round) so a busy machine slows all alike; medians and
the quartiles are printed. The baseline in the same run is ``python -c "import torch"``:
what ``--help`` cost when it imported torch. ``--baseline-tree`` also times another checkout
(e.g. an older commit, unpacked with ``git archive``) in the same rounds.

    python benchmarks/cli_startup.py --runs 5
    python benchmarks/cli_startup.py --runs 5 --baseline-tree /tmp/old --inspect
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bnsurgery.tables import render_table  # noqa: E402
from bnsurgery.timing import interleaved_timings  # noqa: E402


def _run(argv: list[str], tree: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree))
    result = subprocess.run(argv, cwd=tree, env=env, capture_output=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed in {tree}:\n{result.stderr.decode()[-2000:]}")


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
    timings = interleaved_timings({name: (lambda a=argv, t=tree: _run(a, t))
                                   for name, (argv, tree) in cases.items()},
                                  rounds=args.runs, warmup=0)
    print(f"{args.runs} interleaved runs each, {os.cpu_count()} CPUs; seconds:")
    for line in render_table(("command", "median", "quartiles"),
                             [(name, f"{t.median:.2f}",
                               f"{t.quartiles[0]:.2f}-{t.quartiles[1]:.2f}")
                              for name, t in timings.items()], align="lrr", indent="  "):
        print(line)
    print("rerun: python " + " ".join([str(Path(__file__).relative_to(ROOT)), *sys.argv[1:]]))


if __name__ == "__main__":
    main()
