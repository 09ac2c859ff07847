"""Train a small CNN with DistributedDataParallel and synchronised BatchNorm, on CPU.

Two processes on this machine (gloo backend, loopback rendezvous on 127.0.0.1) each get part of
every batch, deliberately uneven (3 and 5 images); ``bnsurgery.replace_batchnorm(sync=True)``
makes their BatchNorm layers normalise with the statistics of the whole batch of 8, which
``torch.nn.SyncBatchNorm`` refuses to do on CPU. After training, ``restore_batchnorm`` gives back
plain ``torch.nn.BatchNorm2d`` layers for single-process evaluation or export.

Run:  .venv/bin/python examples/ddp_syncbn.py [--steps 20] [--port 29531]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import bnsurgery

WORLD_SIZE = 2
SPLIT = (3, 5)  # images per process in every batch of 8


def small_cnn() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights in every process
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def batches(steps: int):
    """The same global batches in every process (a real job would use a DistributedSampler).

    A learnable toy task: each of the 10 classes shifts the three colour channels its own way.
    """
    gen = torch.Generator().manual_seed(1)
    class_colour = torch.randn(10, 3, 1, 1, generator=gen)
    for _ in range(steps):
        labels = torch.randint(0, 10, (sum(SPLIT),), generator=gen)
        yield torch.randn(sum(SPLIT), 3, 16, 16, generator=gen) + class_colour[labels], labels


def train(rank: int, steps: int, port: int) -> None:
    torch.set_num_threads(1)  # two processes share this machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        model = bnsurgery.replace_batchnorm(small_cnn(), sync=True)
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        start = sum(SPLIT[:rank])
        mine = slice(start, start + SPLIT[rank])
        for step, (images, labels) in enumerate(batches(steps)):
            logits = ddp(images[mine])
            # This process's share of the mean loss over all 8 images, times the world size:
            # DDP averages gradients over processes, so the update is that of the global mean.
            loss = F.cross_entropy(logits, labels[mine], reduction="sum") / len(labels)
            optimizer.zero_grad()
            (loss * WORLD_SIZE).backward()
            optimizer.step()
            total = loss.detach().clone()
            dist.all_reduce(total)  # for printing only
            if rank == 0 and (step % 5 == 0 or step == steps - 1):
                print(f"step {step:2d}: loss over the global batch {total.item():.4f}")
        # The running statistics were updated with the global batch statistics, so they agree.
        bn = model[1]
        spread = bn.running_mean.clone()
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        spread -= bn.running_mean
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        if rank == 0:
            print(f"{type(bn).__name__} running_mean[:3] {bn.running_mean[:3].tolist()}, "
                  f"largest difference between the processes {spread.max().item():.1e}")
            plain = bnsurgery.restore_batchnorm(model)
            print("restored for evaluation:", type(plain[1]).__module__ + "."
                  + type(plain[1]).__name__)
            with torch.no_grad():
                print("eval logits[0, :3]", plain.eval()(images[:1])[0, :3].tolist())
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--port", type=int, default=None, help="loopback port (default: free)")
    args = parser.parse_args()
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo on the loopback interface
    mp.spawn(train, args=(args.steps, args.port or free_port()), nprocs=WORLD_SIZE)


if __name__ == "__main__":
    main()
