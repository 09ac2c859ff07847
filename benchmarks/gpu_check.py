"""The one prepared GPU check: run it on a CUDA machine, it writes one JSON file.

Sections (each recorded even when it cannot run, with the reason):

1. ``batchnorm``: the from-scratch BatchNorm2d against torch's (cuDNN) in float32, float16 and
   bfloat16: forward and backward in training mode and forward in eval mode; largest differences
   of outputs, gradients and running statistics, and the time ratio (from-scratch / torch).
2. ``fused``: fused against original for several torchvision networks on CUDA with TF32 off:
   the equivalence report's numbers, the float64 accuracy of both, and eager latency of each.
3. ``onnxruntime_cuda``: export and validate with onnxruntime's CUDA provider, or
   "not installed" where this onnxruntime has no CUDA provider.
4. ``tensorrt``: TensorRT fp32 and fp16 through torch-tensorrt, or "not installed".

Without CUDA it writes ``{"cuda": false, "status": "no CUDA", ...}`` and exits 0 at once.
It finishes in well under five minutes on one H100.

Run:  python benchmarks/gpu_check.py --out gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnsurgery.files import atomic_output  # noqa: E402
from bnsurgery.report import collect_environment  # noqa: E402

NETWORKS = ("resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "densenet121",
            "regnet_y_400mf")


def _cuda_time(call: Callable[[], Any], repeats: int = 20, warmup: int = 5) -> float:
    """Median milliseconds per call, measured with CUDA events."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _guarded(section: Callable[[], Any]) -> Any:
    """Run one section; an exception becomes an entry instead of ending the whole check."""
    start = time.perf_counter()
    try:
        result = section()
    except Exception as exc:  # a benchmark records what broke and goes on with the rest
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc(limit=8)}
    if isinstance(result, dict):
        result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def check_batchnorm() -> dict:
    from bnsurgery.batchnorm import BatchNorm2d

    device = torch.device("cuda")
    shapes = [(32, 64, 56, 56), (64, 256, 14, 14)]
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape in shapes:
            channels = shape[1]
            ours = BatchNorm2d(channels).to(device=device, dtype=dtype)
            theirs = torch.nn.BatchNorm2d(channels).to(device=device, dtype=dtype)
            with torch.no_grad():
                weight = torch.rand(channels, device=device) + 0.5
                bias = torch.randn(channels, device=device) * 0.2
                for module in (ours, theirs):
                    module.weight.copy_(weight)
                    module.bias.copy_(bias)
            x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
            grad = torch.randn(shape, device=device).to(dtype)
            results = {}
            for label, module in (("ours", ours), ("torch", theirs)):
                module.train()
                xi = x.clone().requires_grad_(True)
                out = module(xi)
                out.backward(grad)
                results[label] = (out.detach().float(), xi.grad.float(),
                                  module.weight.grad.float(), module.running_mean.float(),
                                  module.running_var.float())
            names = ("output", "input_grad", "weight_grad", "running_mean", "running_var")
            diffs = {}
            for name, a, b in zip(names, results["ours"], results["torch"], strict=True):
                scale = float(b.abs().max()) or 1.0
                diffs[name] = float((a - b).abs().max()) / scale
            timings = {}
            for label, module in (("ours", ours), ("torch", theirs)):
                module.train()
                xi = x.clone().requires_grad_(True)

                def forward_backward(module=module, xi=xi, grad=grad):
                    module(xi).backward(grad)

                timings[f"{label}_train_fwd_bwd_ms"] = _cuda_time(forward_backward)
                module.eval()
                with torch.no_grad():
                    timings[f"{label}_eval_fwd_ms"] = _cuda_time(
                        lambda module=module, x=x: module(x))
            rows.append({
                "dtype": str(dtype).replace("torch.", ""), "shape": list(shape),
                "max_rel_diff_vs_torch": diffs, **timings,
                "train_ratio": timings["ours_train_fwd_bwd_ms"]
                / timings["torch_train_fwd_bwd_ms"],
                "eval_ratio": timings["ours_eval_fwd_ms"] / timings["torch_eval_fwd_ms"],
            })
    return {"status": "ran", "rows": rows}


def _calibrated(name: str, batch: int, side: int) -> torch.nn.Module:
    import torchvision

    from bnsurgery.calibrate import calibrate_batchnorm

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    return calibrate_batchnorm(model, torch.randn(batch, 3, side, side), steps=2).eval()


def check_fused(networks: tuple[str, ...], batch: int, side: int) -> dict:
    from bnsurgery.fuse import fuse_batchnorm, plan_fusion
    from bnsurgery.validate import compare_models

    rows = []
    for name in networks:
        model = _calibrated(name, batch, side).cuda()
        x = torch.randn(batch, 3, side, side, device="cuda")
        plan = plan_fusion(model, x)
        fused = fuse_batchnorm(model, x, plan=plan).eval()
        report = compare_models(model, fused, x, device="cuda")
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        with torch.no_grad():
            original_ms = _cuda_time(lambda model=model, x=x: model(x))
            fused_ms = _cuda_time(lambda fused=fused, x=x: fused(x))
        (output,) = report.outputs
        rows.append({
            "model": name, "status": report.status, "folded": len(plan.folded),
            "skipped": len(plan.skipped), "max_rel_error": output.max_rel_error,
            "fused_vs_float64": output.float64_error,
            "original_vs_float64": output.reference_float64_error,
            "tolerance": str(report.tolerance), "tf32": report.details["tf32_used"],
            "original_ms": original_ms, "fused_ms": fused_ms,
            "fused_vs_original_time": fused_ms / original_ms,
        })
        del model, fused
        torch.cuda.empty_cache()
    return {"status": "ran", "batch": batch, "input_side": side, "rows": rows}


def check_onnxruntime_cuda(side: int) -> dict:
    try:
        import onnxruntime
    except ImportError:
        return {"status": "not installed", "detail": "onnxruntime is not installed"}
    available = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        return {"status": "not installed",
                "detail": f"onnxruntime {onnxruntime.__version__} has no CUDA provider "
                          f"(available: {available}); pip install 'bnsurgery[gpu]'"}
    from bnsurgery.onnx_export import export_onnx
    from bnsurgery.validate import validate_onnx

    model = _calibrated("resnet18", 4, side)
    x = torch.randn(4, 3, side, side)
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(model, x, Path(folder) / "resnet18.onnx")
        report = validate_onnx(model, path, x, providers="cuda")
    return {"status": report.status, "report": report.to_dict()}


def check_tensorrt(side: int) -> dict:
    from bnsurgery.tensorrt import tensorrt_unavailable_reason, validate_tensorrt

    reason = tensorrt_unavailable_reason()
    if reason is not None:
        return {"status": "not installed" if "not installed" in reason else reason,
                "detail": reason}
    model = _calibrated("resnet18", 4, side)
    x = torch.randn(4, 3, side, side)
    reports = {p: validate_tensorrt(model, x, precision=p, repeats=20) for p in ("fp32", "fp16")}
    return {"status": "ran", "reports": {p: r.to_dict() for p, r in reports.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the JSON")
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--side", type=int, default=224)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    document: dict[str, Any] = {"cuda": torch.cuda.is_available(),
                                "environment": collect_environment()}
    if not torch.cuda.is_available():
        document["status"] = "no CUDA"
    else:
        document["device"] = torch.cuda.get_device_name(0)
        networks = tuple(n for n in args.networks.split(",") if n)
        document["batchnorm"] = _guarded(check_batchnorm)
        document["fused"] = _guarded(lambda: check_fused(networks, args.batch, args.side))
        document["onnxruntime_cuda"] = _guarded(lambda: check_onnxruntime_cuda(args.side))
        document["tensorrt"] = _guarded(lambda: check_tensorrt(args.side))
        document["status"] = "ran"
    document["seconds"] = round(time.perf_counter() - start, 1)
    with atomic_output(args.out) as temp:
        temp.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"gpu_check: {document['status']} in {document['seconds']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
