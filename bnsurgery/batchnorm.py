"""The from-scratch BatchNorm modules: drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d``.

Each class subclasses the torch class of the same name, so the constructor, the parameters and
buffers (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``), the
``state_dict`` (old checkpoints without ``num_batches_tracked`` included) and every
``isinstance(m, nn.BatchNorm2d)`` check in user code behave exactly as with torch. Only the
computation differs: :meth:`forward` calls :func:`bnsurgery.functional.batch_norm`, whose forward
and backward are written out in this package. Code that must tell the two apart (replacement,
fusing) compares exact types.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from bnsurgery.errors import (
    BatchNormRuntimeError,
    ExportError,
    InvalidInputError,
    format_message,
)
from bnsurgery.functional import batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct2d"]

# Calls to batch_norm become single call_function nodes under torch.fx symbolic tracing, instead
# of being traced into (they contain an autograd.Function that a Proxy cannot enter).
torch.fx.wrap("batch_norm")


class _FromScratchBatchNorm:
    """The forward shared by the 1d/2d/3d classes; mixed in before the torch base class."""

    # Set by the torch BatchNorm base class this is mixed into; declared for type checkers only
    # (annotations without values create no class attributes, so nn.Module's lookup is intact).
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    training: bool
    weight: nn.Parameter  # as torch's own class declares them, although None without affine
    bias: nn.Parameter
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    #: Accepted input ranks and the layout each means, for error messages.
    _ranks: dict[int, str] = {}

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._ranks:
            layouts = " or ".join(f"{rank}-D {layout}" for rank, layout in self._ranks.items())
            raise InvalidInputError(format_message(
                f"{type(self).__name__}({self.num_features}) got an input of the wrong rank",
                got=f"a {input.dim()}-D input of shape {tuple(input.shape)}",
                expected=layouts,
                hint="use the BatchNorm class that matches the input (1d, 2d or 3d)"))
        if input.shape[1] != self.num_features:
            # A RuntimeError as well, as torch's own layer raises for this mismatch.
            raise BatchNormRuntimeError(format_message(
                f"{type(self).__name__}({self.num_features}) got the wrong number of channels",
                got=f"{input.shape[1]} channels (dim 1 of shape {tuple(input.shape)})",
                expected=f"{self.num_features} channels",
                hint="the layer before it produces a different number of channels"))

    def __prepare_scriptable__(self) -> nn.Module:
        """Refuse ``torch.jit.script`` with a message that names the alternatives.

        TorchScript cannot compile a Python ``autograd.Function``, which is where this layer's
        backward lives; scripting would fail deep inside torch with an unrelated message. torch
        calls this hook on every submodule before compiling, so a whole model that contains the
        layer gets this error too.
        """
        raise ExportError(format_message(
            f"torch.jit.script cannot compile bnsurgery's {type(self).__name__}"
            f"({self.num_features})",
            where=f"{type(self).__module__}.{type(self).__qualname__}",
            got="a layer whose backward is a Python autograd.Function",
            expected="torch.export.export, or torch.jit.trace of the model in eval mode",
            hint=("export with torch.export.export(model, args); or call "
                  "torch.jit.script(bnsurgery.restore_batchnorm(model)) to script torch's own "
                  "layers instead")))

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input``; in training also update the running statistics.

        This mirrors ``torch.nn.modules.batchnorm._BatchNorm.forward`` step for step, so the
        running statistics follow the same schedule: ``num_batches_tracked`` counts training
        batches, and ``momentum=None`` turns the update into a cumulative average with weight
        ``1 / num_batches_tracked``.
        """
        if not is_fx_symbolic_tracing():  # a Proxy has no concrete rank or channel count to check
            self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        # Batch statistics in training, and in evaluation when there are no running ones.
        use_batch_stats = self.training or (self.running_mean is None
                                            and self.running_var is None)
        # Buffers are passed only when they are to be read or updated.
        use_buffers = not self.training or self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )


class BatchNorm1d(_FromScratchBatchNorm, nn.BatchNorm1d):
    """From-scratch ``torch.nn.BatchNorm1d``: inputs ``(N, C)`` or ``(N, C, L)``."""

    _ranks = {2: "(N, C)", 3: "(N, C, L)"}


class BatchNorm2d(_FromScratchBatchNorm, nn.BatchNorm2d):
    """From-scratch ``torch.nn.BatchNorm2d``: inputs ``(N, C, H, W)``."""

    _ranks = {4: "(N, C, H, W)"}


class BatchNorm3d(_FromScratchBatchNorm, nn.BatchNorm3d):
    """From-scratch ``torch.nn.BatchNorm3d``: inputs ``(N, C, D, H, W)``."""

    _ranks = {5: "(N, C, D, H, W)"}


class BatchNormAct2d(BatchNorm2d):
    """BatchNorm2d followed by dropout and an activation, in one module.

    The from-scratch counterpart of ``timm.layers.BatchNormAct2d``: the normalisation parameters
    live on the module itself (not on a child), so checkpoints keep the keys of a plain
    BatchNorm2d, and ``drop`` and ``act`` are child modules applied after normalising.

    Args:
        num_features: Number of channels ``C``.
        eps: Added to the variance for numerical stability.
        momentum: Weight of each batch in the running statistics; ``None`` for a cumulative
            average.
        affine: Learn a per-channel weight and bias.
        track_running_stats: Keep running statistics for evaluation.
        device: Device of the parameters and buffers.
        dtype: Dtype of the parameters and buffers.
        bias: Learn a bias (only with ``affine=True``).
        act: Activation applied last; ``None`` for identity.
        drop: Dropout applied before the activation; ``None`` for identity.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 *, bias: bool = True, act: nn.Module | None = None,
                 drop: nn.Module | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: Tensor) -> Tensor:
        """Normalise, then apply ``drop`` and ``act``, in that order (timm's order)."""
        output: Tensor = self.act(self.drop(super().forward(input)))  # Module calls are untyped
        return output
