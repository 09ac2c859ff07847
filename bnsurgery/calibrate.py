"""Give a randomly initialised model realistic BatchNorm state.

Freshly built networks have BatchNorm statistics of zero mean and unit variance and affine
parameters of one and zero: folding such a layer is an identity, so it hides every bug. Purely
random statistics are no better: a deep network then scales activations by arbitrary factors at
every layer and float32 drifts far from float64. :func:`calibrate_batchnorm` does what training
would: random affine parameters, then running statistics *measured* in train mode on random data,
then a small nudge so running and batch statistics are not identical. Tests, the demo and the
benchmarks all use it; nothing here downloads weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bnsurgery._bn_registry import looks_like_batchnorm
from bnsurgery.copying import copy_model
from bnsurgery.errors import InvalidInputError, format_message

__all__ = ["calibrate_batchnorm", "randomize_batchnorm_affine"]


def randomize_batchnorm_affine(model: nn.Module, *, seed: int = 0, inplace: bool = False
                               ) -> nn.Module:
    """Draw BatchNorm weights from U(0.5, 1.5) and biases from N(0, 0.2).

    Frozen BatchNorms (torchvision's ``FrozenBatchNorm2d``), which never compute batch statistics,
    also get running statistics drawn around zero mean and unit variance.

    Args:
        model: The model whose BatchNorm layers are changed.
        seed: Seed of the private random generator; the global RNG is not touched.
        inplace: Change ``model`` itself instead of a deep copy.

    Returns:
        The model with randomised BatchNorm parameters.
    """
    model = model if inplace else copy_model(model, what="BatchNorm calibration")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not looks_like_batchnorm(module):
                continue
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(weight, torch.Tensor):
                weight.copy_(torch.rand(weight.shape, generator=gen) + 0.5)
            if isinstance(bias, torch.Tensor):
                bias.copy_(torch.randn(bias.shape, generator=gen) * 0.2)
            if not isinstance(module, nn.modules.batchnorm._NormBase):
                running_mean, running_var = module.running_mean, module.running_var
                if not isinstance(running_mean, torch.Tensor) or not isinstance(
                        running_var, torch.Tensor):
                    continue  # looks_like_batchnorm checked them; this only narrows the types
                running_mean.copy_(torch.randn(running_mean.shape, generator=gen) * 0.1)
                running_var.copy_(torch.rand(running_var.shape, generator=gen) + 0.5)
    return model


def calibrate_batchnorm(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    steps: int = 4,
    seed: int = 0,
    nudge: float = 0.05,
    inplace: bool = False,
) -> nn.Module:
    """Randomise BatchNorm affine parameters, then measure running statistics on random data.

    Running statistics are the cumulative average over ``steps`` train-mode batches drawn like
    ``example_inputs`` (standard normal, same shapes and dtypes). Each running mean is then moved
    by ``nudge`` standard deviations and each running variance scaled by a factor in
    ``[1 - nudge, 1 + nudge]``, so eval-mode outputs differ from train-mode ones as they do in a
    trained network. The training flag and momentum of every layer are restored afterwards.

    Args:
        model: The model to calibrate.
        example_inputs: One tensor or a sequence of positional input tensors; only their shapes,
            dtypes and devices are used.
        steps: Number of random batches to average the statistics over.
        seed: Seed of the private random generator; the global RNG is not touched.
        nudge: Relative size of the perturbation applied after measuring.
        inplace: Calibrate ``model`` itself instead of a deep copy.

    Returns:
        The calibrated model, in the training mode it had on entry.

    Raises:
        InvalidInputError: ``steps`` is below 1 or ``nudge`` is negative.
    """
    if steps < 1:
        raise InvalidInputError(format_message(
            "calibrate_batchnorm needs at least one batch", where="steps", got=steps,
            expected="an integer >= 1", hint="pass steps=4 (the default)"))
    if nudge < 0:
        raise InvalidInputError(format_message(
            "calibrate_batchnorm's nudge must be non-negative", where="nudge", got=nudge,
            expected="a float >= 0", hint="pass nudge=0.0 to keep the measured statistics"))
    model = randomize_batchnorm_affine(model, seed=seed, inplace=inplace)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    inputs = tuple(example_inputs)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
             and m.track_running_stats]
    saved = {id(m): (m.training, getattr(m, "momentum", None)) for m in model.modules()}
    gen = torch.Generator().manual_seed(seed + 1)
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average over the calibration batches
            norm.train()
        with torch.no_grad():
            for _ in range(steps):
                batch = [torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype)
                         .to(t.device) if t.is_floating_point() else t for t in inputs]
                model(*batch)
            for norm in norms:
                running_mean, running_var = norm.running_mean, norm.running_var
                batches = norm.num_batches_tracked
                if running_mean is None or running_var is None or batches is None:
                    continue  # never: track_running_stats is set; this narrows the types
                std = running_var.clamp_min(0).sqrt()
                noise = torch.randn(std.shape, generator=gen).to(std)
                running_mean.add_(noise * std * nudge)
                factor = 1 + (torch.rand(std.shape, generator=gen).to(std) * 2 - 1) * nudge
                running_var.mul_(factor)
                batches.fill_(1000)
    finally:
        for module in model.modules():
            training, momentum = saved[id(module)]
            module.training = training
            if isinstance(module, nn.modules.batchnorm._NormBase):
                module.momentum = momentum
    return model
