"""Speed and memory of bnsurgery's BatchNorm against torch's native kernel, as ratios.

Each configuration is timed interleaved with its baseline in the same run (the median of many
repetitions), so a noisy machine moves both. Timed: ``bnsurgery`` (the backend chosen
automatically: the compiled kernel on CPU where it builds), ``reference`` (the pure-tensor
backend, forced through ``BNSURGERY_KERNEL``) and, with ``--naive``, the formula of the classic
"BatchNorm from scratch" write-up (mean/var with keepdim, then ``(x - mean) / sqrt(var + eps)``
and the running-stat update left to autograd).

Allocator: every call allocates fresh outputs (13-26 MB at the large shapes). With glibc's
default thresholds such blocks are mmap'ed and returned to the system on free, so each call
page-faults its output in again, and which implementation runs just before another changes what
the allocator has cached: on a 2-core machine that moves a ratio by about 0.3. The timings here
are what a user gets with the default malloc settings: each round runs every implementation once
untimed before its timed calls, so it meets the allocator in its own steady state.
Setting ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` (e.g. to 1000000000) keeps
freed blocks cached for everyone and shows the kernels without page faults.

Rerun with:  .venv/bin/python benchmarks/bn_kernel.py [--threads 1,2] [--device cuda]
             [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from bnsurgery.functional import batch_norm
from bnsurgery.kernels import ENV_VAR, kernel_info
from bnsurgery.timing import interleaved_timings

#: (shape, channels_last); (4, 8) measures the per-call overhead.
SHAPES = [((32, 64, 56, 56), False), ((64, 256, 14, 14), False), ((256, 512), False),
          ((32, 64, 56, 56), True), ((64, 256, 14, 14), True), ((4, 8), False)]


def reference_batch_norm(*args):
    """bnsurgery's BatchNorm on the pure-tensor backend, forced as a user would force it."""
    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = "reference"
    try:
        return batch_norm(*args)
    finally:
        if previous is None:
            del os.environ[ENV_VAR]
        else:
            os.environ[ENV_VAR] = previous


def naive_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """The textbook formula, written the obvious way (a baseline, not a reference)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if training:
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        with torch.no_grad():
            count = x.numel() / x.shape[1]
            running_mean.mul_(1 - momentum).add_(momentum * mean.view(-1))
            running_var.mul_(1 - momentum).add_(momentum * var.view(-1) * count / (count - 1))
    else:
        mean, var = running_mean.view(shape), running_var.view(shape)
    x_hat = (x - mean) / torch.sqrt(var + eps)
    return weight.view(shape) * x_hat + bias.view(shape)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict, device, repeats: int, warmup: int = 3, burst: int = 3
                     ) -> dict[str, float]:
    """Median seconds per call of each function, in interleaved rounds.

    Rounds alternate between the functions so that machine noise hits all alike. Within a round
    each function runs once untimed, then ``burst`` timed calls: the untimed call absorbs the
    cost of the memory allocator adapting to the previous function's allocation pattern (on
    glibc, large blocks freed by one implementation can be returned to the system and then
    page-faulted in again by the next), which is an artefact of interleaving, not of either
    implementation.
    """
    timings = interleaved_timings(fns, rounds=repeats, warmup=warmup, burst=burst, settle=1,
                                  before=lambda: _sync(device), after=lambda: _sync(device))
    return {name: timing.median for name, timing in timings.items()}


def make_case(shape, device, dtype, channels_last=False):
    gen = torch.Generator().manual_seed(0)
    channels = shape[1]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device, dtype, memory_format=fmt)
    grad = torch.randn(shape, generator=gen).to(device, dtype, memory_format=fmt)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    weight = (torch.rand(channels, generator=gen) + 0.5).to(device, param_dtype)
    bias = torch.randn(channels, generator=gen).to(device, param_dtype)
    mean = torch.randn(channels, generator=gen).to(device, param_dtype)
    var = (torch.rand(channels, generator=gen) + 0.5).to(device, param_dtype)
    return x, grad, weight, bias, mean, var


def bench_shape(shape, device, dtype, repeats, channels_last=False, naive=False):
    x, grad, weight, bias, mean, var = make_case(shape, device, dtype, channels_last)
    impls = {"torch": F.batch_norm, "bnsurgery": batch_norm, "reference": reference_batch_norm}
    if naive and dtype in (torch.float32, torch.float64):  # no mixed-precision path there
        impls["naive"] = naive_batch_norm
    if x.numel() < 10_000:
        repeats *= 20  # microseconds per call: many more samples for a stable median

    def eval_fn(impl):
        def run():
            with torch.no_grad():
                impl(x, mean, var, weight, bias, False, 0.1, 1e-5)
        return run

    def train_fn(impl):
        xg = x.detach().clone().requires_grad_()
        wg = weight.detach().clone().requires_grad_()
        bg = bias.detach().clone().requires_grad_()
        rm, rv = mean.clone(), var.clone()

        def run():
            out = impl(xg, rm, rv, wg, bg, True, 0.1, 1e-5)
            out.backward(grad)
        return run

    eval_t = time_interleaved({k: eval_fn(f) for k, f in impls.items()}, device, repeats)
    train_t = time_interleaved({k: train_fn(f) for k, f in impls.items()}, device, repeats)
    row = {"shape": list(shape), "channels_last": channels_last,
           "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
           "torch_eval_ms": eval_t["torch"] * 1e3, "torch_train_ms": train_t["torch"] * 1e3}
    for name in impls:
        if name != "torch":
            row[f"{name}_eval_ratio"] = eval_t[name] / eval_t["torch"]
            row[f"{name}_train_ratio"] = train_t[name] / train_t["torch"]
    return row


def saved_bytes(impl, shape, device, dtype, channels_last=False):
    """Bytes autograd keeps alive for backward after one training forward."""
    x, _, weight, bias, mean, var = make_case(shape, device, dtype, channels_last)
    xg = x.requires_grad_()
    wg, bg = weight.requires_grad_(), bias.requires_grad_()
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = impl(xg, mean, var, wg, bg, True, 0.1, 1e-5)
    del out
    return sum(seen.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--threads", default=None,
                        help="comma-separated thread counts, e.g. 1,2 (default: torch's)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--naive", action="store_true", help="also time the textbook formula")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    threads = ([int(t) for t in args.threads.split(",")] if args.threads
               else [torch.get_num_threads()])
    info = kernel_info(device)
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"bnsurgery BatchNorm vs torch native on {device} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}; bnsurgery backend: {info.backend}; malloc settings: "
          f"{malloc or 'default'}; ratio = time / torch's, median of interleaved rounds")
    naive_header = " naive eval | naive train |" * args.naive
    print(f"| threads | shape | layout | eval | train | reference eval | reference train "
          f"| saved/torch | torch eval ms | torch train ms |{naive_header}")
    print("| --- " * (10 + 2 * args.naive) + "|")
    rows = []
    for count in threads:
        torch.set_num_threads(count)
        for dtype in dtypes:
            for shape, channels_last in SHAPES:
                row = bench_shape(shape, device, dtype, args.repeats, channels_last, args.naive)
                ours = saved_bytes(batch_norm, shape, device, dtype, channels_last)
                theirs = saved_bytes(F.batch_norm, shape, device, dtype, channels_last)
                row["saved_bytes"], row["torch_saved_bytes"] = ours, theirs
                rows.append(row)
                layout = "channels-last" if channels_last else "contiguous"
                naive = (f" {row.get('naive_eval_ratio', float('nan')):.2f}x |"
                         f" {row.get('naive_train_ratio', float('nan')):.2f}x |"
                         if args.naive else "")
                print(f"| {count} | {tuple(shape)} | {layout} "
                      f"| {row['bnsurgery_eval_ratio']:.2f}x | {row['bnsurgery_train_ratio']:.2f}x "
                      f"| {row['reference_eval_ratio']:.2f}x | {row['reference_train_ratio']:.2f}x "
                      f"| {ours / theirs:.2f} | {row['torch_eval_ms']:.3f} "
                      f"| {row['torch_train_ms']:.3f} |{naive}", flush=True)
    print("train = forward + backward. Rerun: .venv/bin/python benchmarks/bn_kernel.py "
          + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
