"""Speed and memory of bnsurgery's BatchNorm against torch's native kernel, as ratios.

Each configuration is timed interleaved with its baseline in the same run (the median of many
repetitions), so a noisy machine moves both. Also timed: the formula of the classic
"BatchNorm from scratch" write-up (mean/var with keepdim, then ``(x - mean) / sqrt(var + eps)``
and the running-stat update left to autograd), as a naive baseline.

Rerun with:  .venv/bin/python benchmarks/bn_kernel.py [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from bnsurgery.functional import batch_norm

SHAPES = [(32, 64, 56, 56), (64, 256, 14, 14), (256, 512)]


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
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            fn()
            for _ in range(burst):
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def make_case(shape, device, dtype):
    gen = torch.Generator().manual_seed(0)
    channels = shape[1]
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device, dtype)
    grad = torch.randn(shape, generator=gen).to(device, dtype)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    weight = (torch.rand(channels, generator=gen) + 0.5).to(device, param_dtype)
    bias = torch.randn(channels, generator=gen).to(device, param_dtype)
    mean = torch.randn(channels, generator=gen).to(device, param_dtype)
    var = (torch.rand(channels, generator=gen) + 0.5).to(device, param_dtype)
    return x, grad, weight, bias, mean, var


def bench_shape(shape, device, dtype, repeats):
    x, grad, weight, bias, mean, var = make_case(shape, device, dtype)
    impls = {"torch": F.batch_norm, "bnsurgery": batch_norm, "naive": naive_batch_norm}
    if dtype != torch.float32 and dtype != torch.float64:
        impls.pop("naive")  # the textbook code has no mixed-precision path

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
    row = {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
           "torch_eval_ms": eval_t["torch"] * 1e3, "torch_train_ms": train_t["torch"] * 1e3}
    for name in impls:
        if name != "torch":
            row[f"{name}_eval_ratio"] = eval_t[name] / eval_t["torch"]
            row[f"{name}_train_ratio"] = train_t[name] / train_t["torch"]
    return row


def saved_bytes(impl, shape, device, dtype):
    """Bytes autograd keeps alive for backward after one training forward."""
    x, _, weight, bias, mean, var = make_case(shape, device, dtype)
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
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    rows = []
    print(f"bnsurgery BatchNorm vs torch native on {device} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; ratio = time / torch")
    print(f"{'shape':>20} {'dtype':>8} {'eval':>7} {'train':>7} {'naive eval':>10} "
          f"{'naive train':>11} {'saved/torch':>11}")
    for dtype in dtypes:
        for shape in SHAPES:
            row = bench_shape(shape, device, dtype, args.repeats)
            ours = saved_bytes(batch_norm, shape, device, dtype)
            theirs = saved_bytes(F.batch_norm, shape, device, dtype)
            row["saved_bytes"], row["torch_saved_bytes"] = ours, theirs
            rows.append(row)
            print(f"{str(tuple(shape)):>20} {row['dtype']:>8} {row['bnsurgery_eval_ratio']:7.2f} "
                  f"{row['bnsurgery_train_ratio']:7.2f} "
                  f"{row.get('naive_eval_ratio', float('nan')):10.2f} "
                  f"{row.get('naive_train_ratio', float('nan')):11.2f} {ours / theirs:11.2f}")
    print("train = forward + backward. Rerun: .venv/bin/python benchmarks/bn_kernel.py "
          + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
