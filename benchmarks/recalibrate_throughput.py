"""Throughput of recalibrate_batchnorm against torch.optim.swa_utils.update_bn.

Both re-estimate the BatchNorm statistics of the same model (random weights, CPU) from the same
batches; a plain ``torch.no_grad`` forward pass over the batches is the floor. The three run
interleaved for several rounds; the medians and their ratios are printed. ``update_bn`` gives a
momentum-free average of per-batch variances (and runs dropout in training mode);
``recalibrate_batchnorm`` computes the exact dataset statistics in float64, so some cost over
the forward pass is expected.

``--breakdown`` adds two rows that say where the cost over a forward pass goes: the forward with
the BatchNorms in training mode and nothing measured (what batch statistics cost by themselves),
and ``recalibrate_batchnorm(..., inplace=True)`` (the same without the deep copy of the model).

``--batches 4,16`` times both counts in the same interleaved rounds and adds a table of the cost
*per batch* (the difference between the two, over the difference in batches): what each further
batch costs once the one-off work (the deep copy, the report) is paid.

``--processes`` runs each row in a fresh process of its own (one per row and round, the rows'
order rotating from round to round; a warm-up run, then ``--repeats`` timed ones). In one
process the rows share a heap: whatever one leaves allocated or frees decides whether the next
one's large activations come from memory already mapped or page-fault their way in, which moved
the forward pass alone by 5-10% depending on its neighbours.

Rerun with::

    .venv/bin/python benchmarks/recalibrate_throughput.py
    .venv/bin/python benchmarks/recalibrate_throughput.py --breakdown --batches 4,16 --rounds 9
    .venv/bin/python benchmarks/recalibrate_throughput.py --breakdown --batches 4,16 --processes
    .venv/bin/python benchmarks/recalibrate_throughput.py --model resnet50 --batches 8
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnsurgery.recalibrate import recalibrate_batchnorm  # noqa: E402
from bnsurgery.tables import render_table  # noqa: E402
from bnsurgery.timing import Timing, interleaved_timings  # noqa: E402

COMMAND = ".venv/bin/python benchmarks/recalibrate_throughput.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batches", default="4",
                        help="batches per run; two counts (4,16) add the cost per batch")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--breakdown", action="store_true",
                        help="also time a training-mode BatchNorm forward and inplace=True")
    parser.add_argument("--processes", action="store_true",
                        help="time each row in fresh processes of its own")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per process with --processes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    counts = sorted({int(v) for v in args.batches.split(",")})
    import torchvision

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(args.batch, 3, args.size, args.size, generator=gen)
            for _ in range(max(counts))]
    training = copy.deepcopy(model)
    for module in training.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            module.train()
    in_place = copy.deepcopy(model)

    def runners_for(batches: list[torch.Tensor]) -> dict[str, Callable[[], object]]:
        def forward_only() -> None:
            with torch.no_grad():
                for x in batches:
                    model(x)

        def training_forward() -> None:
            with torch.no_grad():
                for x in batches:
                    training(x)

        runners: dict[str, Callable[[], object]] = {
            "forward only": forward_only,
            "update_bn": lambda: torch.optim.swa_utils.update_bn(batches, copy.deepcopy(model)),
            "recalibrate_batchnorm": lambda: recalibrate_batchnorm(model, batches)}
        if args.breakdown:
            runners["BatchNorms training"] = training_forward
            runners["recalibrate, inplace"] = lambda: recalibrate_batchnorm(in_place, batches,
                                                                            inplace=True)
        return runners

    runners = {f"{name} @{count}": run for count in counts
               for name, run in runners_for(data[:count]).items()}
    if args.child is not None:
        runners[args.child]()  # warm-up
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            runners[args.child]()
            seconds.append(time.perf_counter() - start)
        print(json.dumps(seconds))
        return 0
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if args.processes:
        timings = _in_processes(list(runners), argv if argv is not None else sys.argv[1:],
                                args.rounds)
    else:
        timings = interleaved_timings(runners, rounds=args.rounds, warmup=1, rotate=True)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {COMMAND} --model {args.model} --batches {args.batches} --batch {args.batch} "
          f"--size {args.size} --rounds {args.rounds} --threads {args.threads}"
          + (" --breakdown" if args.breakdown else "")
          + (f" --processes --repeats {args.repeats}" if args.processes else ""))
    print(f"# load average (1 min) before {load_before:.1f}, after {load_after:.1f}")
    names = list(runners_for(data[:1]))
    for count in counts:
        base = timings[f"forward only @{count}"].median
        images = count * args.batch
        print(f"{count} batches of {args.batch}:")
        medians = {name: timings[f"{name} @{count}"].median for name in names}
        rows = [(name, f"{medians[name] * 1e3:.1f} ms", f"{images / medians[name]:.1f} images/s",
                 f"x{medians[name] / base:.2f} of a forward pass")
                for name in names]
        for line in render_table(("", "median", "throughput", "cost"), rows, align="lrrl",
                                 rule=False, indent="  "):
            print(line)
    if len(counts) > 1:
        low, high = counts[0], counts[-1]

        def per_batch(name: str) -> float:
            return ((timings[f"{name} @{high}"].median - timings[f"{name} @{low}"].median)
                    / (high - low))

        base = per_batch("forward only")
        print(f"per batch (from {low} to {high} batches):")
        rows = [(name, f"{per_batch(name) * 1e3:.1f} ms",
                 f"x{per_batch(name) / base:.2f} of a forward pass") for name in names]
        for line in render_table(("", "per batch", "cost"), rows, align="lrl", rule=False,
                                 indent="  "):
            print(line)
    return 0


def _in_processes(keys: list[str], argv: list[str], rounds: int) -> dict[str, Timing]:
    """Each key timed in a fresh process per round, the order rotating; medians of all runs."""
    seconds: dict[str, list[float]] = {key: [] for key in keys}
    for round_ in range(rounds):
        shift = round_ % len(keys)
        for key in keys[shift:] + keys[:shift]:
            done = subprocess.run([sys.executable, __file__, *argv, "--child", key],
                                  check=True, capture_output=True, text=True)
            seconds[key] += json.loads(done.stdout.strip().splitlines()[-1])
    return {key: Timing.of(values) for key, values in seconds.items()}


if __name__ == "__main__":
    raise SystemExit(main())
