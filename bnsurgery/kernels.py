"""Which BatchNorm kernel runs: the backends, how one is chosen, and why.

Every backend computes the same maths (:mod:`bnsurgery.functional` has the formulas) through two
functions with one contract, ``forward`` and ``backward`` (see :mod:`bnsurgery.kernel_tensor`):

- ``reference``: :mod:`bnsurgery.kernel_tensor`, torch reductions and element-wise arithmetic.
  Runs everywhere, and is the only backend used while a graph is being captured
  (``torch.compile``, ``torch.fx``, ``torch.export``, ONNX export, TorchScript tracing), so that
  captured graphs hold ordinary torch operators that every exporter and compiler understands.
- further backends (compiled kernels) are listed in :data:`BACKENDS` with the module that
  implements them. Each module has ``unavailable_reason(device) -> str | None`` (``None`` when it
  can run on that device) besides ``forward`` and ``backward``, and is imported only when it
  is first considered.

The environment variable ``BNSURGERY_KERNEL`` forces one backend (``reference``, or another name
in :data:`BACKENDS`), for debugging and tests; ``auto`` or unset picks the fastest available one
for the input's device. A forced backend that cannot run raises, rather than quietly running
another one: whoever forces a backend wants to know.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Protocol, cast

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from bnsurgery import kernel_tensor
from bnsurgery.errors import InvalidInputError, KernelUnavailableError, format_message

__all__ = ["BACKENDS", "ENV_VAR", "Backend", "KernelInfo", "fast_path", "kernel_info",
           "select_backend"]

#: The environment variable that forces a backend.
ENV_VAR = "BNSURGERY_KERNEL"

#: Backend name -> the module implementing it, in order of preference per device type.
BACKENDS: dict[str, str] = {
    "reference": "bnsurgery.kernel_tensor",
    "cpp": "bnsurgery.kernel_cpp",
    "triton": "bnsurgery.kernel_triton",
}

#: For each device type, the backends tried in order by ``auto``; ``reference`` always last.
_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("cpp", "reference"),
    "cuda": ("triton", "reference"),
}

class Backend(Protocol):
    """The contract every backend module meets (described in :mod:`bnsurgery.kernel_tensor`)."""

    def forward(self, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, training: bool,
                momentum: float, eps: float) -> tuple[Tensor, Tensor, Tensor]: ...

    def backward(self, grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor,
                 invstd: Tensor, training: bool, needs: tuple[bool, bool, bool]
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None]: ...


# The reference backend is loaded up front: graph capture selects it, and an import under
# torch.compile would break the graph.
_modules: dict[str, ModuleType] = {"reference": kernel_tensor}
_PLAIN = (torch.Tensor, torch.nn.Parameter)
# (device type, ENV_VAR's value) -> the backend chosen: availability does not change within a
# process, and choosing costs more than a small BatchNorm itself.
_chosen: dict[tuple[str, object], Backend] = {}
# ``os.environ.get`` costs more than a microsecond per call (a Python-level mapping that encodes
# the key and decodes the value each time), a tenth of a small BatchNorm. Where the mapping keeps
# its raw store (CPython on POSIX) the variable is read there, with the key encoded once; the
# store is what ``os.environ[...] = ...`` writes, so a change is still seen at once.
_ENVIRON_STORE = getattr(os.environ, "_data", None)
_ENVIRON_KEY = os.environ.encodekey(ENV_VAR) if _ENVIRON_STORE is not None else None


def _forced_raw() -> object:
    """``ENV_VAR``'s value as the environment stores it (undecoded): a cache key."""
    if _ENVIRON_STORE is not None:
        return _ENVIRON_STORE.get(_ENVIRON_KEY)
    return os.environ.get(ENV_VAR)  # pragma: no cover - not CPython on POSIX


@dataclasses.dataclass(frozen=True)
class KernelInfo:
    """The backend that runs for a device, and why each of the others does not.

    Attributes:
        device: The device type asked about (``"cpu"``, ``"cuda"``, ...).
        backend: The backend that runs there now.
        reason: Why that one: forced through :data:`ENV_VAR`, or the first available by
            preference.
        unavailable: For every other backend considered, why it does not run.
    """

    device: str
    backend: str
    reason: str
    unavailable: dict[str, str]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form.

        Written out rather than taken from ``results.JsonResult``: the BatchNorm stack
        (kernels included) imports nothing above it, and the fields are plain strings anyway.
        """
        return dataclasses.asdict(self)


def _module(name: str) -> ModuleType:
    if name not in _modules:
        _modules[name] = importlib.import_module(BACKENDS[name])
    return _modules[name]


def _unavailable(name: str, device: torch.device) -> str | None:
    """Why ``name`` cannot run on ``device``, or ``None`` when it can."""
    if name == "reference":
        return None
    try:
        module = _module(name)
    except ImportError as exc:  # an optional backend's own optional dependency is missing
        return f"cannot be imported ({exc})"
    reason: str | None = module.unavailable_reason(device)  # every backend but the reference's
    return reason


def _forced() -> str | None:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise InvalidInputError(format_message(
            f"unknown BatchNorm kernel in {ENV_VAR}", where=ENV_VAR, got=repr(value),
            expected=f"one of auto, {', '.join(BACKENDS)}",
            hint=f"unset {ENV_VAR} to let bnsurgery choose"))
    return value


def _capturing(x: torch.Tensor) -> bool:
    """Whether a graph is being captured, where only ordinary torch operators may appear.

    Besides the compilers' own flags, an input that is not a plain tensor (a fake, functional or
    proxy tensor of ``torch.export`` and ``make_fx``, or a tensor subclass such as ``DTensor``)
    or an active dispatch mode means the operators are being recorded or reinterpreted.
    """
    # The compiler's flag first: under Dynamo the checks below would be traced themselves, and
    # the dispatch-stack query breaks the graph. Then the cheapest: this runs on every call, and
    # small inputs feel every microsecond.
    if torch.compiler.is_compiling():
        return True
    if type(x) not in _PLAIN or torch._C._len_torch_dispatch_stack() > 0:
        return True
    # torch.jit's __all__ leaves out its documented is_tracing and is_scripting, and is_tracing
    # is unannotated.
    return (torch.compiler.is_exporting()
            or torch.jit.is_tracing()  # type: ignore[attr-defined, no-untyped-call]
            or torch.jit.is_scripting()  # type: ignore[attr-defined]
            or is_fx_symbolic_tracing())


def _choose(device: torch.device) -> tuple[str, str, dict[str, str]]:
    """``(backend, reason, {other backend: why not})`` for ``device``."""
    forced = _forced()
    if forced is not None:
        why_not = _unavailable(forced, device)
        if why_not is not None:
            raise KernelUnavailableError(format_message(
                f"the BatchNorm kernel forced through {ENV_VAR} cannot run", where=ENV_VAR,
                got=f"{forced!r} on {device.type}: {why_not}",
                expected=f"one that can run there, e.g. {ENV_VAR}=reference",
                hint=f"unset {ENV_VAR}, or fix what the reason names"))
        return forced, f"forced by {ENV_VAR}={forced}", {}
    unavailable: dict[str, str] = {}
    for name in _PREFERENCE.get(device.type, ("reference",)):
        why_not = _unavailable(name, device)
        if why_not is None:
            return name, "the first available by preference", unavailable
        unavailable[name] = why_not
    return "reference", "the fallback of last resort", unavailable  # pragma: no cover


def select_backend(x: torch.Tensor) -> Backend:
    """The backend module that computes BatchNorm for ``x`` now.

    While a graph is being captured this is always the reference backend, whatever is forced:
    a captured graph must hold only operators that exporters and compilers understand.
    """
    if _capturing(x):
        return kernel_tensor
    key = ("cpu" if x.is_cpu else x.device.type, _forced_raw())  # is_cpu: no device object
    module = _chosen.get(key)
    if module is None:
        # Each module in BACKENDS implements the contract: mypy checks the reference's where it
        # is returned above, tests/test_kernel_cpp.py and test_kernel_triton.py the others'.
        module = _chosen[key] = cast(Backend, _module(_choose(x.device)[0]))
    return module


#: A backend's self-checking entry point (see :func:`fast_path`).
FastCall = Callable[..., "torch.Tensor | None"]

# ENV_VAR's raw value -> the CPU backend's self-checking entry point, or None when the backend
# that runs on the CPU has none.
_fast: dict[object, FastCall | None] = {}


def fast_path() -> FastCall | None:
    """The CPU backend's self-checking entry point, when it may be called now; else ``None``.

    The compiled CPU kernel offers ``fast_batch_norm(input, running_mean, running_var, weight,
    bias, training, momentum, eps)``: the argument checks of
    :func:`bnsurgery.functional.batch_norm` made in C++, then the operator, or ``None`` when any
    check fails or an argument is not a plain CPU tensor, so that the Python path runs and says
    what is wrong. For a small input that halves the cost of a call. It may only be used in plain
    eager mode: while a graph is compiled, exported or traced, under a dispatch mode, a
    ``torch.func`` transform or forward-mode AD, the Python path chooses what runs. (fx symbolic
    tracing records operations on proxies only; with plain tensors every backend computes the
    same constant.)
    """
    # The compiler's flag first (see _capturing), then the cheapest.
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()
            or torch.compiler.is_exporting()
            or torch.jit.is_tracing()):  # type: ignore[attr-defined, no-untyped-call]  # as above
        return None
    raw = _forced_raw()
    if raw in _fast:
        return _fast[raw]
    cpu = torch.device("cpu")
    name = _choose(cpu)[0]
    entry = getattr(_module(name), "fast_entry", None)
    _fast[raw] = fast = entry() if entry is not None else None
    return fast


def kernel_info(device: str | torch.device = "cpu") -> KernelInfo:
    """Which BatchNorm backend runs on ``device`` and why the others do not.

    Args:
        device: A device or device type, e.g. ``"cpu"`` or ``"cuda"``.

    Returns:
        A :class:`KernelInfo`.

    Raises:
        InvalidInputError: :data:`ENV_VAR` names no backend.
        KernelUnavailableError: :data:`ENV_VAR` forces a backend that cannot run there.
    """
    device = torch.device(device)
    backend, reason, unavailable = _choose(device)
    return KernelInfo(device=device.type, backend=backend, reason=reason,
                      unavailable=unavailable)
