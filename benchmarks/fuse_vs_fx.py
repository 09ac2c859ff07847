"""bnsurgery.fuse_batchnorm side by side with torch.fx.experimental.optimization.fuse.

Two parts, both measured in this one run:

1. torchvision models at batch 8 on CPU (random weights, calibrated BatchNorm statistics): the
   time each fuser takes, the latency of each result relative to the original model (medians of
   interleaved runs), and how far each result is from the original's output.
2. The tiny-model suite (``tests/tiny_models.py``): for every case, whether each fuser's result
   computes what the original computes (judged against a float64 run of the original: at most
   twice the original's own error plus a few ulps), how many BatchNorms it folded, or the error
   it raised. torch's fuser always returns a ``GraphModule``, which loses the model's class and
   methods; that is noted but not counted as wrong.

Rerun with::

    .venv/bin/python benchmarks/fuse_vs_fx.py
    .venv/bin/python benchmarks/fuse_vs_fx.py --models resnet50 --rounds 10 --skip-models
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import CASES, make  # noqa: E402

from bnsurgery._bn_registry import looks_like_batchnorm  # noqa: E402
from bnsurgery.calibrate import calibrate_batchnorm  # noqa: E402
from bnsurgery.fuse import fuse_batchnorm, plan_fusion  # noqa: E402
from bnsurgery.tables import render_table  # noqa: E402
from bnsurgery.timing import interleaved_timings, time_call  # noqa: E402

COMMAND = ".venv/bin/python benchmarks/fuse_vs_fx.py"


def fx_fuse(model: nn.Module) -> nn.Module:
    from torch.fx.experimental.optimization import fuse

    return fuse(model, inplace=False)


def _first(output: object) -> torch.Tensor:
    while not isinstance(output, torch.Tensor):
        output = output[0] if isinstance(output, (tuple, list)) else next(iter(output.values()))
    return output


def _out(model: nn.Module, inputs: tuple, dtype: torch.dtype | None = None) -> torch.Tensor:
    if dtype is not None:
        inputs = tuple(t.to(dtype) for t in inputs)
    with torch.no_grad():
        return _first(model(*copy.deepcopy(inputs))).double()


def computes_the_same(original: nn.Module, fused: nn.Module, inputs: tuple) -> bool:
    """Fused error vs a float64 oracle <= 2x the original's error + 4 ulps of the scale."""
    oracle = _out(copy.deepcopy(original).double(), inputs, torch.float64)
    dtype = _first(original(*copy.deepcopy(inputs))).dtype
    scale = oracle.abs().max().item() or 1.0
    floor = 4 * torch.finfo(dtype).eps * scale
    err_original = (_out(original, inputs) - oracle).abs().max().item()
    err_fused = (_out(fused, inputs) - oracle).abs().max().item()
    return err_fused <= 2 * err_original + floor


def count_batchnorms(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if looks_like_batchnorm(m))


def fx_folded(model: nn.Module, fused: nn.Module) -> int:
    """BatchNorm calls torch's fuser removed: BatchNorm call_module nodes before minus after.

    (torch.fx inlines BatchNorm classes from outside ``torch.nn``, so counting modules would
    credit it with folds it did not do.)
    """
    def calls(graph_module: torch.fx.GraphModule) -> int:
        modules = dict(graph_module.named_modules())
        return sum(1 for node in graph_module.graph.nodes if node.op == "call_module"
                   and looks_like_batchnorm(modules[node.target]))

    return calls(torch.fx.symbolic_trace(model)) - calls(fused)


def judge_tiny_cases() -> tuple[list[tuple[str, str, str]], int, int]:
    rows, right_ours, right_fx = [], 0, 0
    cases = [case for case in CASES.values() if case.available()]
    for case in cases:
        verdicts = []
        for label in ("bnsurgery", "fx"):
            model, inputs = make(case)
            total = count_batchnorms(model)
            try:
                if label == "bnsurgery":
                    plan = plan_fusion(model, inputs)
                    fused = fuse_batchnorm(model, plan=plan)
                    folded = len(plan.folded)
                else:
                    fused = fx_fuse(model)
                    folded = fx_folded(model, fused)
                ok = all(computes_the_same(model, fused, x) for x in case.check_inputs())
            except Exception as exc:  # noqa: BLE001 - a fuser's failure is a result here
                verdicts.append(f"error: {type(exc).__name__}")
                continue
            verdicts.append(f"{'right' if ok else 'WRONG'} ({folded}/{total} folded)")
            if ok:
                right_ours += label == "bnsurgery"
                right_fx += label == "fx"
        rows.append((case.name, *verdicts))
    return rows, right_ours, right_fx


def compare_models(names: list[str], batch: int, size: int, rounds: int) -> None:
    import torchvision

    rows = []
    for name in names:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None)
        image = torch.randn(2, 3, size, size)
        model = calibrate_batchnorm(model, image, steps=2, inplace=True).eval()
        fused = {}
        fuse_seconds = {}
        for label, fuser in (("bnsurgery", fuse_batchnorm), ("torch.fx", fx_fuse)):
            fuser(model)  # warm-up: imports, first trace
            fused[label], timing = time_call(lambda fuser=fuser, model=model: fuser(model))
            fuse_seconds[label] = timing.median
        x = torch.randn(batch, 3, size, size)
        variants = {"original": model, **fused}
        with torch.inference_mode():
            reference = model(x)
            errors = {key: ((m(x) - reference).abs().max() / reference.abs().max()).item()
                      for key, m in fused.items()}
            calls = {key: (lambda m=m, x=x: m(x)) for key, m in variants.items()}
            timings = interleaved_timings(calls, rounds=rounds, warmup=2, rotate=True)
        med = {key: t.median * 1e3 for key, t in timings.items()}
        rows.append((name, "original", "", f"{med['original']:.1f}", f"{1.0:.3f}x", "", ""))
        for label in fused:
            rows.append(("", label, f"{fuse_seconds[label]:.3f}", f"{med[label]:.1f}",
                         f"{med[label] / med['original']:.3f}x", f"{errors[label]:.1e}",
                         str(type(fused[label]) is type(model))))
    print()
    for line in render_table(("model", "fuser", "fuse s", "latency ms", "vs original",
                              "max|out-original|/scale", "keeps class"), rows,
                             align="llrrrrl", rule=False):
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+",
                        default=["resnet50", "efficientnet_b0", "mobilenet_v3_large"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-models", action="store_true", help="only the tiny-model table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"bnsurgery.fuse_batchnorm vs torch.fx.experimental.optimization.fuse: torch "
          f"{torch.__version__}, CPU, {args.threads} threads")
    if not args.skip_models:
        compare_models(args.models, args.batch, args.size, args.rounds)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the forward-run fallback's advice; cases check it
        rows, right_ours, right_fx = judge_tiny_cases()
    print()
    for line in render_table(("tiny case", "bnsurgery", "torch.fx fuse"), rows, rule=False):
        print(line)
    print(f"computes what the original computes: bnsurgery {right_ours}/{len(rows)}, "
          f"torch.fx fuse {right_fx}/{len(rows)} (torch.fx fuse always returns a GraphModule)")
    print(f"rerun: {COMMAND} --rounds {args.rounds} --threads {args.threads}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
