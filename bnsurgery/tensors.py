"""Tensor and model plumbing shared by export, validation, TensorRT and the command line.

Every stage that runs a model on example inputs needs the same small steps: normalise the inputs
into a tuple, name the tensors of a (nested) output, find a model's device and dtype, move a
model without touching the caller's, cast inputs, switch TF32, and grow or shrink a batch. They
live here, below every stage, so that exporting never depends on the validation that runs after
it. Nothing here compares numbers (see :mod:`bnsurgery.comparison`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bnsurgery._bn_registry import looks_like_batchnorm
from bnsurgery.errors import IncompatibleModuleError, InvalidInputError, format_message

__all__ = [
    "as_input_tuple",
    "batch_size_of",
    "cast_inputs",
    "check_eval_mode",
    "export_inputs",
    "first_tensor",
    "flatten_outputs",
    "model_device",
    "model_dtype",
    "model_on",
    "module_tensor",
    "resize_batch",
    "tf32_allowed",
]


def as_input_tuple(inputs: object, *, where: str = "inputs") -> tuple[Tensor, ...]:
    """Normalise one tensor or a sequence of tensors into a tuple of positional inputs.

    Takes any object because it is the check: callers that accept user inputs of any type
    (``example_inputs: object``) hand them here to be refused in the house words.

    Raises:
        InvalidInputError: ``inputs`` is empty or holds something other than tensors.
    """
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs:
        tensors = tuple(t for t in inputs if isinstance(t, Tensor))
        if len(tensors) == len(inputs):
            return tensors
    got = type(inputs).__name__ if not isinstance(inputs, (tuple, list)) else \
        f"a {type(inputs).__name__} of {[type(t).__name__ for t in inputs]}"
    raise InvalidInputError(format_message(
        "Model inputs must be a tensor or a non-empty sequence of tensors", where=where, got=got,
        expected="torch.Tensor or tuple[torch.Tensor, ...]",
        hint="pass example inputs such as torch.randn(1, 3, 224, 224)"))


def check_eval_mode(model: nn.Module, *, what: str) -> None:
    """Refuse a model whose BatchNorm (or dropout) is in training mode.

    A BatchNorm in training mode normalises with the statistics of the batch; an exported or
    folded one uses running statistics. Comparing or exporting such a model would silently check
    something else than what runs.

    Args:
        model: The model to check.
        what: What is about to happen, for the message (e.g. ``"export_onnx"``).

    Raises:
        IncompatibleModuleError: ``model`` is not an ``nn.Module``.
        InvalidInputError: The model or one of its BatchNorm-like modules is in training mode.
    """
    if not isinstance(model, nn.Module):
        raise IncompatibleModuleError(format_message(
            f"{what} needs a torch.nn.Module", got=type(model).__name__,
            expected="an nn.Module", hint="pass the model object, not its state_dict"))
    # Only modules whose training flag changes what they compute matter; the root's own flag
    # does not (a torch.export GraphModule reports training=True and cannot always be .eval()'d).
    training = [name or "<root>" for name, module in model.named_modules()
                if module.training and (isinstance(module, (nn.modules.batchnorm._NormBase,
                                                            nn.modules.dropout._DropoutNd))
                                        or looks_like_batchnorm(module))]
    if training:
        shown = ", ".join(training[:5]) + (f" and {len(training) - 5} more"
                                           if len(training) > 5 else "")
        raise InvalidInputError(format_message(
            f"{what} needs a model in eval mode: in training mode BatchNorm normalises with batch "
            "statistics (and dropout is random), while the exported or folded model uses the "
            "running statistics",
            where=shown, got="training=True", expected="training=False",
            hint="call model.eval() first"))


def module_tensor(module: nn.Module, name: str) -> Tensor | None:
    """``module.<name>`` when it is a tensor (a parameter or buffer), else ``None``.

    ``nn.Module.__getattr__`` is typed as returning a tensor or a module, so code that reads a
    layer's ``weight`` or ``running_mean`` goes through this one check instead of trusting it.
    """
    value = getattr(module, name, None)
    return value if isinstance(value, Tensor) else None


def first_tensor(model: nn.Module) -> Tensor | None:
    """The model's first parameter, else its first buffer, else ``None``."""
    for parameter in model.parameters():
        return parameter
    for buffer in model.buffers():
        return buffer
    return None


def model_device(model: nn.Module) -> torch.device:
    """Where the model's tensors live (the CPU for a model without any)."""
    tensor = first_tensor(model)
    return tensor.device if tensor is not None else torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point tensor (float32 when it has none)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def model_on(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None
             ) -> nn.Module:
    """``model`` itself if already on ``device`` (and ``dtype``), else a moved deep copy.

    The caller's model is never moved: ``nn.Module.to`` works in place.
    """
    tensors = list(model.parameters()) + list(model.buffers())
    same = all(t.device == device for t in tensors) and (
        dtype is None or all(t.dtype == dtype for t in tensors if t.is_floating_point()))
    if same:
        return model
    moved = copy.deepcopy(model).to(device)
    return moved.to(dtype) if dtype is not None else moved


def cast_inputs(inputs: Sequence[Tensor], device: torch.device, dtype: torch.dtype | None
                ) -> tuple[Tensor, ...]:
    """Inputs moved to ``device``; floating-point ones also cast to ``dtype`` when given."""
    return tuple(t.to(device=device, dtype=dtype) if dtype is not None and t.is_floating_point()
                 else t.to(device) for t in inputs)


@contextlib.contextmanager
def tf32_allowed(enabled: bool) -> Iterator[None]:
    """Set both TF32 switches for the duration, then restore what the caller had."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def flatten_outputs(output: Any, prefix: str = "output") -> list[tuple[str, Tensor]]:
    """Name every tensor in a (nested) model output, in the order exporters flatten them."""
    if isinstance(output, Tensor):
        return [(prefix, output)]
    if isinstance(output, Mapping):
        items: list[tuple[str, Tensor]] = []
        for key, value in output.items():
            items += flatten_outputs(value, f"{prefix}[{key!r}]")
        return items
    if isinstance(output, (tuple, list)):
        items = []
        for index, value in enumerate(output):
            items += flatten_outputs(value, f"{prefix}[{index}]")
        return items
    return []


def batch_size_of(inputs: Sequence[Tensor]) -> int | None:
    """The leading size of the first input, or ``None`` when it has no axis."""
    return int(inputs[0].shape[0]) if inputs and inputs[0].dim() > 0 else None


def resize_batch(inputs: Sequence[Tensor], size: int, seed: int) -> tuple[Tensor, ...]:
    """The first ``size`` rows, extended with new rows drawn like the given ones when needed."""
    gen = torch.Generator().manual_seed(seed)
    resized = []
    for tensor in inputs:
        have = tensor.shape[0]
        if size <= have:
            resized.append(tensor[:size])
            continue
        extra_shape = (size - have, *tensor.shape[1:])
        if tensor.is_floating_point():
            std = float(tensor.float().std()) if tensor.numel() > 1 else 1.0
            mean = float(tensor.float().mean())
            extra = (torch.randn(extra_shape, generator=gen) * std + mean).to(tensor)
        else:
            rows = torch.randint(0, have, (size - have,), generator=gen)
            extra = tensor[rows]
        resized.append(torch.cat([tensor, extra]))
    return tuple(resized)


def export_inputs(inputs: tuple[Tensor, ...], dynamic_batch: bool) -> tuple[Tensor, ...]:
    """Inputs with a batch of at least two, so the batch axis is not specialised to 1.

    ``torch.export`` turns a dimension of size 1 into the constant 1, so a "dynamic" batch
    traced from a single example would quietly be static.
    """
    if not dynamic_batch or inputs[0].dim() == 0 or inputs[0].shape[0] >= 2:
        return inputs
    return tuple(torch.cat([t, t]) if t.dim() > 0 and t.shape[0] == 1 else t for t in inputs)
