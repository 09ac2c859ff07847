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

Rerun with::

    .venv/bin/python benchmarks/recalibrate_throughput.py
    .venv/bin/python benchmarks/recalibrate_throughput.py --breakdown --rounds 9
    .venv/bin/python benchmarks/recalibrate_throughput.py --model resnet50 --batches 8
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnsurgery.recalibrate import recalibrate_batchnorm  # noqa: E402
from bnsurgery.tables import render_table  # noqa: E402
from bnsurgery.timing import interleaved_timings  # noqa: E402

COMMAND = ".venv/bin/python benchmarks/recalibrate_throughput.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--breakdown", action="store_true",
                        help="also time a training-mode BatchNorm forward and inplace=True")
    args = parser.parse_args(argv)
    import torchvision

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(args.batch, 3, args.size, args.size, generator=gen)
            for _ in range(args.batches)]

    def forward_only() -> None:
        with torch.no_grad():
            for x in data:
                model(x)

    def update_bn() -> None:
        torch.optim.swa_utils.update_bn(data, copy.deepcopy(model))

    def recalibrate() -> None:
        recalibrate_batchnorm(model, data)

    training = copy.deepcopy(model)
    for module in training.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            module.train()
    in_place = copy.deepcopy(model)

    def training_forward() -> None:
        with torch.no_grad():
            for x in data:
                training(x)

    runners = {"forward only": forward_only, "update_bn": update_bn,
               "recalibrate_batchnorm": recalibrate}
    if args.breakdown:
        runners["BatchNorms training"] = training_forward
        runners["recalibrate, inplace"] = lambda: recalibrate_batchnorm(in_place, data,
                                                                        inplace=True)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    timings = interleaved_timings(runners, rounds=args.rounds, warmup=1, rotate=True)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {COMMAND} --model {args.model} --batches {args.batches} --batch {args.batch} "
          f"--size {args.size} --rounds {args.rounds} --threads {args.threads}"
          + (" --breakdown" if args.breakdown else ""))
    print(f"# load average (1 min) before {load_before:.1f}, after {load_after:.1f}")
    base = timings["forward only"].median
    images = args.batches * args.batch
    rows = [(name, f"{t.median * 1e3:.1f} ms", f"{images / t.median:.1f} images/s",
             f"x{t.median / base:.2f} of a forward pass") for name, t in timings.items()]
    for line in render_table(("", "median", "throughput", "cost"), rows, align="lrrl",
                             rule=False, indent="  "):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
