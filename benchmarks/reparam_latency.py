"""Latency of re-parameterised RepVGG/MobileOne/RepGhost: bnsurgery against timm's own merge.

For each timm model (random weights, BatchNorm statistics calibrated on random images, eval
mode, CPU) three variants of the same weights run interleaved (A B C, B C A, ...):

* ``unmerged``: the training-time form, every branch separate;
* ``timm``: ``timm.utils.model.reparameterize_model`` (the model family's own merge);
* ``bnsurgery``: ``bnsurgery.reparameterize_branches`` (found from the dataflow).

Eager PyTorch and onnxruntime (CPU, one ONNX file per variant, exported with the dynamo
exporter) are timed; the ratios are medians from this one run. It also prints each variant's
conv count in the exported graph and its largest error against a float64 run of the original.

Rerun with::

    .venv/bin/python benchmarks/reparam_latency.py
    .venv/bin/python benchmarks/reparam_latency.py --models repvgg_a0 --rounds 30 --size 224
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnsurgery.calibrate import calibrate_batchnorm  # noqa: E402
from bnsurgery.reparam import reparameterize_branches  # noqa: E402
from bnsurgery.tables import render_table  # noqa: E402
from bnsurgery.timing import interleaved_timings  # noqa: E402

COMMAND = ".venv/bin/python benchmarks/reparam_latency.py"


def interleaved(runners: dict[str, object], rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each runner, called in rotating order each round."""
    timings = interleaved_timings(runners, rounds=rounds, warmup=warmup, rotate=True)
    return {name: timing.median for name, timing in timings.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+",
                        default=["repvgg_a0", "mobileone_s0", "repghostnet_050"])
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-onnx", action="store_true")
    args = parser.parse_args(argv)
    import timm
    from timm.utils.model import reparameterize_model

    torch.set_num_threads(args.threads)
    print(f"# {COMMAND} --models {' '.join(args.models)} --size {args.size} --batch "
          f"{args.batch} --rounds {args.rounds} --threads {args.threads}")
    print(f"# torch {torch.__version__}, timm {timm.__version__}, CPU threads {args.threads}")
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    for name in args.models:
        torch.manual_seed(0)
        model = calibrate_batchnorm(timm.create_model(name, pretrained=False), x[:2]).eval()
        variants: dict[str, nn.Module] = {
            "unmerged": model,
            "timm": reparameterize_model(copy.deepcopy(model)),
            "bnsurgery": reparameterize_branches(model, x[:2]),
        }
        with torch.no_grad():
            reference = copy.deepcopy(model).double()(x.double())
        scale = float(reference.abs().max())
        with torch.inference_mode():
            errors = {k: float((m(x).double() - reference).abs().max()) / scale
                      for k, m in variants.items()}
            eager = interleaved({k: (lambda m=m: m(x)) for k, m in variants.items()},
                                args.rounds, 3)
        convs = {k: sum(n.op == "call_function" and "conv" in str(n.target) for n in
                        torch.export.export(m, (x,)).graph.nodes) for k, m in variants.items()}
        print(f"\n{name} (batch {args.batch}, {args.size} px)")
        ort_times: dict[str, float] = {}
        if not args.no_onnx:
            import onnxruntime

            sessions = {}
            with tempfile.TemporaryDirectory() as folder:
                for k, m in variants.items():
                    path = Path(folder) / f"{k}.onnx"
                    torch.onnx.export(m, (x,), str(path), dynamo=True, verbose=False)
                    options = onnxruntime.SessionOptions()
                    options.intra_op_num_threads = args.threads
                    sessions[k] = onnxruntime.InferenceSession(
                        str(path), options, providers=["CPUExecutionProvider"])
            feed = x.numpy()
            runners = {k: (lambda s=s, feed=feed: s.run(None, {s.get_inputs()[0].name: feed}))
                       for k, s in sessions.items()}
            ort_times = interleaved(runners, args.rounds, 3)
        header = ("variant", "convs", "rel. error vs float64", "eager ms", "vs timm")
        table = [(k, str(convs[k]), f"{errors[k]:.2e}", f"{eager[k] * 1e3:.2f}",
                  f"{eager[k] / eager['timm']:.2f}") for k in variants]
        if ort_times:
            header += ("ort ms", "vs timm")
            table = [(*row, f"{ort_times[k] * 1e3:.2f}", f"{ort_times[k] / ort_times['timm']:.2f}")
                     for row, k in zip(table, variants, strict=True)]
        for line in render_table(header, table, align="l" + "r" * (len(header) - 1), rule=False,
                                 indent="  "):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
