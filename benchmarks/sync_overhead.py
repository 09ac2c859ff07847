"""What synchronising BatchNorm costs: collectives counted, time against unsynced BatchNorm.

Two CPU processes (gloo, loopback rendezvous) run, in the same run and interleaved so machine
noise hits all alike:

* one layer, forward + backward: bnsurgery's ``SyncBatchNorm`` (synchronised over the two
  processes) against bnsurgery's ``BatchNorm2d`` and torch's ``BatchNorm2d`` (each process on its
  own), on each process's half of the batch;
* one training step of a small CNN under DistributedDataParallel, with synced against unsynced
  BatchNorm;
* the bare latency of one gloo all_reduce of the forward's payload, which bounds what
  synchronising can cost per layer on this machine.

``torch.distributed.all_reduce`` is wrapped to count its calls per forward and per backward.
``torch.nn.SyncBatchNorm`` itself is not a baseline: it refuses CPU tensors.

Rerun with:  .venv/bin/python benchmarks/sync_overhead.py [--repeats 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

WORLD_SIZE = 2
SHAPES = [(16, 64, 32, 32), (32, 256, 8, 8), (128, 512, 1, 1)]  # per process


def _time_interleaved(fns: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved."""
    from bnsurgery.timing import interleaved_timings

    # The barrier makes both processes start each timed call together.
    timings = interleaved_timings(fns, rounds=repeats, warmup=warmup, before=dist.barrier)
    return {name: timing.median for name, timing in timings.items()}


class _AllReduceCounter:
    """Counts calls of ``torch.distributed.all_reduce`` while active."""

    def __init__(self):
        self.calls = 0
        self._original = None

    def __enter__(self):
        self._original = dist.all_reduce

        def counting(*args, **kwargs):
            self.calls += 1
            return self._original(*args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._original


def _layer_step(layer, x, grad):
    def run():
        layer.zero_grad(set_to_none=True)
        xg = x.detach().requires_grad_()
        layer(xg).backward(grad)
    return run


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def _worker(rank: int, directory: str, repeats: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from bnsurgery import BatchNorm2d, replace_batchnorm
    from bnsurgery.sync_batchnorm import SyncBatchNorm

    torch.set_num_threads(1)  # two processes share the machine
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=120))
    result: dict = {"layers": [], "threads": torch.get_num_threads()}
    gen = torch.Generator().manual_seed(rank)

    # Collectives per forward and per backward of one synced layer.
    layer = SyncBatchNorm(8)
    x = torch.randn(4, 8, 5, 5, generator=gen, requires_grad=True)
    with _AllReduceCounter() as counter:
        y = layer(x)
        forward_calls = counter.calls
        y.square().sum().backward()
        result["all_reduce_per_forward"] = forward_calls
        result["all_reduce_per_backward"] = counter.calls - forward_calls

    for shape in SHAPES:
        channels = shape[1]
        x = torch.randn(shape, generator=gen) * 2 + 1
        grad = torch.randn(shape, generator=gen)
        times = _time_interleaved({
            "sync": _layer_step(SyncBatchNorm(channels), x, grad),
            "bnsurgery": _layer_step(BatchNorm2d(channels), x, grad),
            "torch": _layer_step(nn.BatchNorm2d(channels), x, grad),
        }, repeats)
        payload = torch.zeros(WORLD_SIZE * (4 + 2 * channels), dtype=torch.float64)
        reduce_once = {"all_reduce": lambda p=payload: dist.all_reduce(p)}
        times["all_reduce"] = _time_interleaved(reduce_once, repeats)["all_reduce"]
        result["layers"].append({"shape_per_process": list(shape), **times})

    # One DDP training step of a small CNN, synced against unsynced BatchNorm.
    images = torch.randn(16, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (16,), generator=gen)
    models = {"sync": replace_batchnorm(_small_cnn(), sync=True),
              "bnsurgery": replace_batchnorm(_small_cnn()), "torch": _small_cnn()}
    steps = {}
    for name, model in models.items():
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)

        def step(ddp=ddp, optimizer=optimizer):
            optimizer.zero_grad()
            F.cross_entropy(ddp(images), labels).backward()
            optimizer.step()
        steps[name] = step
    with _AllReduceCounter() as counter:
        steps["sync"]()
    result["cnn_all_reduce_per_step"] = counter.calls
    result["cnn_bn_layers"] = sum(isinstance(m, nn.BatchNorm2d) for m in _small_cnn().modules())
    result["cnn"] = _time_interleaved(steps, repeats)
    torch.save(result, os.path.join(directory, f"result_{rank}.pt"))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(_worker, args=(directory, args.repeats), nprocs=WORLD_SIZE)
        results = [torch.load(os.path.join(directory, f"result_{rank}.pt"), weights_only=False)
                   for rank in range(WORLD_SIZE)]
    # A synchronised call ends on both processes together; report the slower process.
    first = results[0]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"SyncBatchNorm overhead, {WORLD_SIZE} CPU processes (gloo over loopback), "
          f"{first['threads']} thread each, torch {torch.__version__}, median of {args.repeats}; "
          f"{os.cpu_count()} CPU cores, load average {load:.1f} at the end")
    print(f"all_reduce calls: {first['all_reduce_per_forward']} per forward, "
          f"{first['all_reduce_per_backward']} per backward of one layer; "
          f"{first['cnn_all_reduce_per_step']} per DDP step of a CNN with "
          f"{first['cnn_bn_layers']} BatchNorm layers (DDP's own gradient reduction is not "
          "counted: it does not go through torch.distributed.all_reduce)")
    rows = []
    for index, layer in enumerate(first["layers"]):
        worst = {k: max(r["layers"][index][k] for r in results)
                 for k in ("sync", "bnsurgery", "torch", "all_reduce")}
        row = {"shape_per_process": layer["shape_per_process"], "sync_ms": worst["sync"] * 1e3,
               "sync_over_bnsurgery": worst["sync"] / worst["bnsurgery"],
               "sync_over_torch": worst["sync"] / worst["torch"],
               "all_reduce_ms": worst["all_reduce"] * 1e3}
        rows.append(row)
    table = [(str(tuple(row["shape_per_process"])), f"{row['sync_ms']:.3f}",
              f"{row['sync_over_bnsurgery']:.2f}", f"{row['sync_over_torch']:.2f}",
              f"{row['all_reduce_ms']:.3f}") for row in rows]
    from bnsurgery.tables import render_table

    for line in render_table(("shape per process", "sync ms", "/bnsurgery", "/torch",
                              "all_reduce ms"), table, align="rrrrr", rule=False):
        print(line)
    cnn = {k: max(r["cnn"][k] for r in results) for k in ("sync", "bnsurgery", "torch")}
    summary = {"cnn_step_ms_sync": cnn["sync"] * 1e3,
               "cnn_sync_over_bnsurgery": cnn["sync"] / cnn["bnsurgery"],
               "cnn_sync_over_torch": cnn["sync"] / cnn["torch"]}
    print(f"DDP training step, small CNN, 16 images per process: synced {cnn['sync'] * 1e3:.2f} "
          f"ms = {summary['cnn_sync_over_bnsurgery']:.2f}x unsynced bnsurgery BatchNorm, "
          f"{summary['cnn_sync_over_torch']:.2f}x torch BatchNorm")
    print("one layer = forward + backward; ratio = time / unsynced time. Rerun: "
          ".venv/bin/python benchmarks/sync_overhead.py " + " ".join(
              argv if argv is not None else sys.argv[1:]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"counts": {k: first[k] for k in ("all_reduce_per_forward",
                                                        "all_reduce_per_backward",
                                                        "cnn_all_reduce_per_step")},
                       "layers": rows, "cnn": summary, "cpu_cores": os.cpu_count(),
                       "load_average": load}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
