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
5. ``triton_kernel``: bnsurgery's Triton BatchNorm path (``BNSURGERY_KERNEL=triton``) against
   torch's default kernel (cuDNN where torch picks it; the kernel it ran is recorded from the
   aten operator called) and against torch's own CUDA kernel (cuDNN switched off), on
   (32, 64, 56, 56), (64, 256, 14, 14), (256, 512) and the 4-D shapes channels-last, in float32,
   float16 and bfloat16: evaluation forward, and training forward + backward. Timings are
   interleaved (each repeat runs every contender once, in turn) medians of CUDA-event times;
   ratios are Triton / baseline. Accuracy: largest differences from a float64 run, for the
   Triton path and for torch's default kernel.

Without CUDA it writes ``{"cuda": false, "status": "no CUDA", ...}`` and exits 0 at once.
It finishes in well under five minutes on one H100. ``--smoke`` runs section 5 alone on tiny
shapes on the CPU, through Triton's interpreter, to check the benchmark's own logic where no GPU
is available (its timings mean nothing).

Run:  python benchmarks/gpu_check.py --out gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnsurgery.files import atomic_output  # noqa: E402
from bnsurgery.report import collect_environment  # noqa: E402

NETWORKS = ("resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "densenet121",
            "regnet_y_400mf")


def _cuda_time(call: Callable[[], Any], repeats: int = 20, warmup: int = 5) -> float:
    """Median milliseconds per call, measured with CUDA events.

    Its own loop rather than ``bnsurgery.timing``: CUDA events time the work on the device
    between two points of the stream, which a host clock around the call cannot.
    """
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


TRITON_SHAPES = ((32, 64, 56, 56), (64, 256, 14, 14), (256, 512))
SMOKE_SHAPES = ((4, 3, 4, 2), (12, 5))


class _AtenNames(TorchDispatchMode):
    """Records which aten operators run: which batch-norm kernel torch chose."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def _torch_kernel(call: Callable[[], Any]) -> str:
    with _AtenNames() as recorder:
        call()
    return ",".join(sorted({n.removeprefix("aten::") for n in recorder.names
                            if "batch_norm" in n})) or "none"


def _interleaved(calls: dict[str, Callable[[], Any]], repeats: int, inner: int,
                 cuda: bool) -> dict[str, float]:
    """Median milliseconds per call of each contender, timed in turn within every repeat.

    CUDA events on a GPU, as in :func:`_cuda_time`, so its own loop too.
    """
    for call in calls.values():  # warm-up: compilation, autotuning caches, allocator
        for _ in range(3):
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for repeat in range(repeats):
        names = list(calls)
        names = names[repeat % len(names):] + names[:repeat % len(names)]  # rotate the order
        for name in names:
            if cuda:
                torch.cuda.synchronize()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    calls[name]()
                end.record()
                torch.cuda.synchronize()
                samples[name].append(start.elapsed_time(end) / inner)
            else:
                begin = time.perf_counter()
                for _ in range(inner):
                    calls[name]()
                samples[name].append((time.perf_counter() - begin) * 1e3 / inner)
    return {name: statistics.median(times) for name, times in samples.items()}


@contextlib.contextmanager
def _kernel(name: str):
    """Force a bnsurgery BatchNorm backend for the duration."""
    from bnsurgery.kernels import ENV_VAR

    before = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = before


def _float64_run(x, grad, weight, bias, stats, training):
    """Output and (training) gradients of input and weight, by torch in float64."""
    xs = x.detach().double().requires_grad_(training)
    ws = weight.detach().double().requires_grad_(training)
    with torch.no_grad() if not training else contextlib.nullcontext():
        y = torch.nn.functional.batch_norm(xs, stats["mean"].double(), stats["var"].double(), ws,
                                           bias.double(), training, 0.1, 1e-5)
        if training:
            y.backward(grad.double())
    return y, xs.grad, ws.grad


def _triton_row(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool,
                device: torch.device, repeats: int, inner: int) -> dict:
    from bnsurgery.functional import batch_norm

    channels = shape[1]
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=generator) * 2 + 0.5).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    grad = grad.contiguous(memory_format=torch.channels_last) if channels_last else grad
    weight = (torch.rand(channels, generator=generator) + 0.5).to(device)
    bias = (torch.randn(channels, generator=generator) * 0.2).to(device)
    stats = {"mean": torch.zeros(channels, device=device),
             "var": torch.ones(channels, device=device)}
    functions = {"triton": batch_norm, "torch": torch.nn.functional.batch_norm,
                 "torch_native": torch.nn.functional.batch_norm}

    def run(name, training, requires_grad):
        ws = weight.detach().requires_grad_(requires_grad)
        bs = bias.detach().requires_grad_(requires_grad)
        xs = x.detach().requires_grad_(requires_grad)
        cudnn = contextlib.nullcontext() if name != "torch_native" else (
            torch.backends.cudnn.flags(enabled=False))
        with _kernel("triton"), cudnn:
            y = functions[name](xs, stats["mean"], stats["var"], ws, bs, training, 0.1, 1e-5)
            if requires_grad:
                y.backward(grad)
        return y, xs.grad, ws.grad

    row: dict[str, Any] = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
                           "layout": "channels_last" if channels_last else "contiguous"}
    for mode, training in (("eval", False), ("train", True)):
        with torch.no_grad() if not training else contextlib.nullcontext():
            row[f"torch_kernel_{mode}"] = _torch_kernel(lambda training=training: run(
                "torch", training, training))
        # Accuracy against float64 (from the same rounded inputs), for Triton and for torch.
        exact = _float64_run(x, grad, weight, bias, stats, training)
        for name in ("triton", "torch"):
            got = run(name, training, training)
            for label, mine, truth in zip(("output", "grad_input", "grad_weight"), got, exact,
                                          strict=True):
                if truth is None:
                    continue
                truth, mine = truth.detach(), mine.detach().double()
                scale = float(truth.abs().max()) or 1.0
                row[f"{name}_{mode}_{label}_max_rel_err"] = (
                    float((mine - truth).abs().max()) / scale)
        with torch.no_grad() if not training else contextlib.nullcontext():
            times = _interleaved({name: (lambda name=name, training=training: run(
                name, training, training)) for name in functions}, repeats, inner,
                device.type == "cuda")
        for name, ms in times.items():
            row[f"{name}_{mode}_ms"] = ms
        row[f"{mode}_ratio_vs_torch"] = times["triton"] / times["torch"]
        row[f"{mode}_ratio_vs_torch_native"] = times["triton"] / times["torch_native"]
    return row


def check_triton_kernel(smoke: bool = False) -> dict:
    from bnsurgery.kernels import kernel_info

    device = torch.device("cpu" if smoke else "cuda")
    info = kernel_info(device)
    with _kernel("triton"):
        forced = kernel_info(device)
    rows = []
    shapes = SMOKE_SHAPES if smoke else TRITON_SHAPES
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape in shapes:
            for channels_last in ((False, True) if len(shape) == 4 else (False,)):
                try:
                    rows.append(_triton_row(shape, dtype, channels_last, device,
                                            repeats=3 if smoke else 30, inner=1 if smoke else 5))
                except Exception as exc:  # one failing case is recorded; the others still run
                    rows.append({"shape": list(shape), "dtype": str(dtype),
                                 "channels_last": channels_last, "status": "error",
                                 "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc(limit=8)})
    return {"status": "ran", "device": str(device), "auto_backend": info.to_dict(),
            "forced_backend": forced.to_dict(), "rows": rows}


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
    parser.add_argument("--smoke", action="store_true",
                        help="only the Triton section, tiny shapes, on the CPU interpreter")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.smoke:
        # Before triton is first imported: the interpreter runs CPU tensors.
        os.environ["TRITON_INTERPRET"] = "1"
        document = {"cuda": False, "status": "smoke", "environment": collect_environment(),
                    "triton_kernel": _guarded(lambda: check_triton_kernel(smoke=True))}
        document["seconds"] = round(time.perf_counter() - start, 1)
        with atomic_output(args.out) as temp:
            temp.write_text(json.dumps(document, indent=2, default=str) + "\n")
        print(f"gpu_check: smoke in {document['seconds']} s -> {args.out}")
        return 0
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
        document["triton_kernel"] = _guarded(check_triton_kernel)
        document["status"] = "ran"
    document["seconds"] = round(time.perf_counter() - start, 1)
    with atomic_output(args.out) as temp:
        temp.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"gpu_check: {document['status']} in {document['seconds']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
