"""Swap the BatchNorm layers of a torchvision ResNet-18 for bnsurgery's, check, and swap back.

Run:  .venv/bin/python examples/replace_torchvision.py            (random weights, offline)
      .venv/bin/python examples/replace_torchvision.py --pretrained  (downloads ImageNet weights)
"""

from __future__ import annotations

import argparse

import torch
import torchvision

import bnsurgery


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", action="store_true", help="use torchvision's weights")
    args = parser.parse_args()

    x = torch.randn(4, 3, 224, 224)
    if args.pretrained:
        model = torchvision.models.resnet18(weights="DEFAULT").eval()
    else:
        # Random weights with realistic BatchNorm state (what training would have produced).
        model = torchvision.models.resnet18(weights=None)
        model = bnsurgery.calibrate_batchnorm(model, x).eval()

    print(bnsurgery.plan_replacement(model))
    scratch = bnsurgery.replace_batchnorm(model)  # a copy: `model` is untouched
    with torch.no_grad():
        diff = (scratch(x) - model(x)).abs().max().item()
    print(f"max |from-scratch - torch| on the logits: {diff:.2e}")

    # Train a step with the from-scratch layers: forward and backward are bnsurgery's.
    scratch.train()
    optimizer = torch.optim.SGD(scratch.parameters(), lr=0.01)
    loss = torch.nn.functional.cross_entropy(scratch(x), torch.tensor([1, 2, 3, 4]))
    loss.backward()
    optimizer.step()
    print(f"one training step done, loss {loss.item():.3f}")

    restored = bnsurgery.restore_batchnorm(scratch)
    restored.load_state_dict(model.state_dict(), strict=True)  # checkpoints move both ways
    print("restored to", type(restored.bn1).__module__ + "." + type(restored.bn1).__name__)


if __name__ == "__main__":
    main()
