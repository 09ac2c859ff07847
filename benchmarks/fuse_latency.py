"""Latency of BatchNorm-fused models, and the time fuse_batchnorm itself takes.

Compares, for each model at batch 8 on CPU (random weights, calibrated BatchNorm statistics):

* ``original``: the model as built, BatchNorms in eval mode;
* ``fused``: ``bnsurgery.fuse_batchnorm(model)``;
* ``bn_deleted``: every BatchNorm replaced by ``nn.Identity`` without folding: the speed limit
  (BatchNorm costing nothing); its outputs are wrong, it only bounds what folding can gain.

The variants run interleaved (A B C, B C A, ...) so load changes on the machine hit all of them,
and the ratios are medians measured in this one run. Then it times ``fuse_batchnorm(resnet152)``
against ``copy.deepcopy(resnet152)``, the least any non-inplace transformation costs.

Rerun with::

    .venv/bin/python benchmarks/fuse_latency.py
    .venv/bin/python benchmarks/fuse_latency.py --models resnet50 --rounds 30 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnsurgery._bn_registry import looks_like_batchnorm  # noqa: E402
from bnsurgery.calibrate import calibrate_batchnorm  # noqa: E402
from bnsurgery.fuse import fuse_batchnorm  # noqa: E402
from bnsurgery.tables import render_table  # noqa: E402
from bnsurgery.timing import interleaved_timings  # noqa: E402

COMMAND = ".venv/bin/python benchmarks/fuse_latency.py"


def build(name: str, size: int) -> nn.Module:
    """A torchvision model with random weights and BatchNorm statistics calibrated at ``size``."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    image = torch.randn(2, 3, size, size)
    return calibrate_batchnorm(model, image, steps=2, inplace=True).eval()


def delete_batchnorms(model: nn.Module) -> nn.Module:
    """A copy with every BatchNorm replaced by nn.Identity (no folding: the speed limit)."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if looks_like_batchnorm(child):
                setattr(parent, name, nn.Identity())
    return model


def interleaved_latency(variants: dict[str, nn.Module], x: torch.Tensor, rounds: int,
                        warmup: int) -> dict[str, float]:
    """Median milliseconds per forward of each variant, run in rotating order each round."""
    with torch.inference_mode():
        timings = interleaved_timings({name: (lambda m=m: m(x)) for name, m in variants.items()},
                                      rounds=rounds, warmup=warmup, rotate=True)
    return {name: timing.median * 1e3 for name, timing in timings.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+",
                        default=["resnet50", "efficientnet_b0", "mobilenet_v3_large"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--fuse-model", default="resnet152")
    parser.add_argument("--fuse-repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(f"bnsurgery fuse latency benchmark: torch {torch.__version__}, CPU, "
          f"{args.threads} threads, batch {args.batch}x3x{args.size}x{args.size}, "
          f"{args.rounds} interleaved rounds, medians")
    print("compares: original model / fuse_batchnorm(model) / every BatchNorm deleted (limit)")
    worst = 0.0
    rows = []
    for name in args.models:
        model = build(name, args.size)
        fused = fuse_batchnorm(model, strict=True)
        deleted = delete_batchnorms(model)
        x = torch.randn(args.batch, 3, args.size, args.size)
        with torch.inference_mode():
            reference, result = model(x), fused(x)
        error = ((result - reference).abs().max() / reference.abs().max()).item()
        med = interleaved_latency({"original": model, "fused": fused, "bn_deleted": deleted},
                                  x, args.rounds, args.warmup)
        ratio_limit = med["fused"] / med["bn_deleted"]
        worst = max(worst, ratio_limit)
        rows.append((name, f"{med['original']:.1f}", f"{med['fused']:.1f}",
                     f"{med['bn_deleted']:.1f}", f"{ratio_limit:.3f}x",
                     f"{med['fused'] / med['original']:.3f}x", f"{error:.1e}"))
    for line in render_table(("model", "original ms", "fused ms", "bn_deleted ms",
                              "fused/deleted", "fused/original", "max|fused-original|/scale"),
                             rows, align="lrrrrrl", rule=False):
        print(line)
    print(f"target fused/deleted <= 1.05x: {'met' if worst <= 1.05 else 'NOT met'} "
          f"(worst {worst:.3f}x)")

    model = build(args.fuse_model, 64)
    fuse_batchnorm(model)  # first call pays for imports and torch.fx warm-up
    timings = interleaved_timings({"copy": lambda: copy.deepcopy(model),
                                   "fuse": lambda: fuse_batchnorm(model)},
                                  rounds=args.fuse_repeats, warmup=0)
    fuse_s, copy_s = timings["fuse"].median, timings["copy"].median
    print(f"fuse_batchnorm({args.fuse_model}): {fuse_s:.3f} s median of {args.fuse_repeats} "
          f"(copy.deepcopy of the model: {copy_s:.3f} s; ratio {fuse_s / copy_s:.2f}x); "
          f"target <= 2 s: {'met' if fuse_s <= 2 else 'NOT met'}")
    print(f"rerun: {COMMAND} --rounds {args.rounds} --threads {args.threads}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
