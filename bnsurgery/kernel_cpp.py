"""The compiled C++ BatchNorm kernel for CPU: the ``cpp`` backend of :mod:`bnsurgery.kernels`.

The sources (:data:`SOURCES`, compiled into one library) are written from scratch (no torch
batch-norm call). ``bnsurgery/csrc/batch_norm_cpu.cpp`` defines three operators in the
``bnsurgery`` namespace: ``cpp_batch_norm_eval``,
``cpp_batch_norm_train`` (which updates the running statistics in place, declared in its schema)
and ``cpp_batch_norm_backward``. The two forward operators also carry their derivative: a C++
autograd node, registered for the ``Autograd`` dispatch key, whose backward calls
``cpp_batch_norm_backward`` (or, when the backward is itself differentiated or batched, the
same formulas in differentiable ATen operations). A training step from Python is therefore one
operator call forward and one node backward, with no Python in between. The library is also a
Python module whose ``fast_batch_norm`` makes the argument checks of
:func:`bnsurgery.functional.batch_norm` in C++ before calling the operator (or returns ``None``
for the Python path to say what is wrong): a small BatchNorm then costs what torch's own does,
rather than twice that in Python checks and a boxed operator call.
``bnsurgery/csrc/sync_cpu.cpp`` defines the local steps of :class:`bnsurgery.SyncBatchNorm`
(:data:`SYNC_OPERATORS`, called through the ``sync_*`` functions here): a rank's statistics, the
normalisation with the global ones, and the backward's local sums and input gradient, the
collectives between them staying in Python. ``bnsurgery/csrc/moments_cpu.cpp`` defines
``cpp_batch_norm_measure`` (:data:`MEASURE_OPERATOR`, called through :func:`measure`) for
:mod:`bnsurgery.recalibrate`: a BatchNorm input's exact float64 moments and the input normalised
with them, in one pass over memory. Fake implementations registered here let ``torch.compile``,
``torch.export`` and ``torch.library.opcheck`` reason about them without running them.

How it ships: it is compiled on first use with ``torch.utils.cpp_extension`` (ninja and the
system C++ compiler) and cached per user, keyed by the sources, the torch version and the CPU, so
it always matches the torch it is loaded into; ``bnsurgery kernels --build`` compiles it ahead of
time. A prebuilt wheel would have to be built for every torch version a user may have (the C++
ABI of torch changes between releases); building on the user's machine avoids that, and also
lets the compiler target that machine's vector instructions.

Nothing breaks without a compiler: when the build is impossible or fails, one warning names the
reason, :func:`unavailable_reason` reports it, and the reference backend runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from bnsurgery.errors import KernelUnavailableError, format_message
from bnsurgery.files import write_text
from bnsurgery.kernel_tensor import accumulate_dtype

__all__ = [
    "AUTOGRAD_IN_KERNEL",
    "CACHE_ENV_VAR",
    "HEADERS",
    "MEASURE_OPERATOR",
    "OPERATORS",
    "SOURCE",
    "SOURCES",
    "SYNC_OPERATORS",
    "backward",
    "build",
    "cache_dir",
    "fast_entry",
    "forward",
    "measure",
    "output_like",
    "sync_gradient_sums",
    "sync_input_gradient",
    "sync_normalise",
    "sync_statistics",
    "unavailable_reason",
]

#: The C++ source of the BatchNorm kernel (the first of :data:`SOURCES`).
SOURCE = Path(__file__).parent / "csrc" / "batch_norm_cpu.cpp"

#: Every C++ source of the library, compiled together: one build, one cache key, one module.
SOURCES = (SOURCE, SOURCE.parent / "sync_cpu.cpp", SOURCE.parent / "moments_cpu.cpp")

#: The headers the sources include (what they share): part of the cache key, not compiled alone.
HEADERS = (SOURCE.parent / "cpu_common.h",)

#: The forward operators are differentiable themselves (a C++ autograd node registered for the
#: Autograd dispatch key), so :func:`bnsurgery.functional.batch_norm` calls them directly in
#: reverse mode instead of wrapping them in the Python :class:`BatchNormFunction`.
AUTOGRAD_IN_KERNEL = True

#: Overrides where compiled kernels are cached (default: the user's cache directory).
CACHE_ENV_VAR = "BNSURGERY_CACHE_DIR"

#: SyncBatchNorm's local steps, as ``torch.ops`` names (see :mod:`bnsurgery.sync_batchnorm`).
SYNC_OPERATORS = ("bnsurgery::cpp_sync_statistics", "bnsurgery::cpp_sync_normalise",
                  "bnsurgery::cpp_sync_grad_sums", "bnsurgery::cpp_sync_grad_input")

# The BatchNorm operators, in the order forward() and backward() index them.
_BATCH_NORM_OPERATORS = ("bnsurgery::cpp_batch_norm_eval", "bnsurgery::cpp_batch_norm_train",
                         "bnsurgery::cpp_batch_norm_backward")

#: Recalibration's measure-and-normalise operator (see :func:`measure`).
MEASURE_OPERATOR = "bnsurgery::cpp_batch_norm_measure"

#: The operators the library registers, as ``torch.ops`` names.
OPERATORS = (*_BATCH_NORM_OPERATORS, *SYNC_OPERATORS, MEASURE_OPERATOR)

_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_state: dict[str, object] = {}  # "library": Path once loaded; "error": str once failed
#: The overloads of OPERATORS, in order; each returns three tensors (see their schemas in csrc/).
_Operators = tuple[Callable[..., tuple[Tensor, Tensor, Tensor]], ...]


def cache_dir() -> Path:
    """Where compiled kernels live: ``$BNSURGERY_CACHE_DIR``, else ``~/.cache/bnsurgery/kernels``.

    ``XDG_CACHE_HOME`` is honoured as other tools on the machine do.
    """
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bnsurgery" / "kernels"


def _cpu_identity() -> str:
    """The CPU's model and instruction sets: the build targets this machine's vector units."""
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [line for line in fh if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _key() -> str:
    digest = hashlib.sha256()
    for part in (*(f.read_bytes() for f in (*SOURCES, *HEADERS)), torch.__version__.encode(),
                 sys.version.encode(),
                 platform.machine().encode(), _cpu_identity().encode(),
                 " ".join(_CFLAGS + _LDFLAGS).encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes, released if the holder dies."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: torch's own build lock still applies
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _compile(directory: Path, name: str, verbose: bool) -> Path:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} (from CXX, default c++) is not on PATH")
    # Importing it logs a warning about CUDA on machines without it: irrelevant to a CPU build.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compiler-version chatter; failures raise
        module = cpp_extension.load(
            name=name, sources=[str(source) for source in SOURCES], build_directory=str(directory),
            extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS, is_python_module=True,
            verbose=verbose)
    _state["module"] = module
    return Path(module.__file__)


def _import(name: str, library: Path) -> None:
    """Import a library built before as the Python module it is (which registers its operators)."""
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.ExtensionFileLoader(name, str(library))
    spec = importlib.util.spec_from_file_location(name, str(library), loader=loader)
    if spec is None:  # pragma: no cover - a path ending in .so always has a spec
        raise RuntimeError(f"cannot import {library}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    _state["module"] = module


def _build(verbose: bool) -> Path:
    key = _key()
    directory = cache_dir() / key
    name = f"bnsurgery_cpu_{key}"
    directory.mkdir(parents=True, exist_ok=True)
    with _file_lock(directory / "build.lock"):
        ready = directory / "ready"  # written last: names a library that was built completely
        library = Path(ready.read_text()) if ready.exists() else None
        if library is not None and library.exists():
            _import(name, library)  # built before: no compiler needed
        else:
            library = _compile(directory, name, verbose)
            write_text(ready, str(library), what="kernel cache marker")
    _register_fakes()
    return library


def build(*, verbose: bool = False) -> Path:
    """Compile (or find in the cache) and load the kernel; the path of the shared library.

    Raises:
        KernelUnavailableError: No compiler, no ninja, or the build failed; the message says
            which.
    """
    with _lock:
        if "library" not in _state and "error" not in _state:
            try:
                _state["library"] = _build(verbose)
            except Exception as exc:  # a compiler's failure takes many forms; it is recorded
                _state["error"] = _describe(exc)
                warnings.warn(f"bnsurgery: the compiled CPU BatchNorm kernel is unavailable "
                              f"({_state['error']}); the pure-tensor kernel runs instead",
                              RuntimeWarning, stacklevel=2)
    if "error" in _state:
        raise KernelUnavailableError(format_message(
            "the compiled CPU BatchNorm kernel could not be built", where=str(SOURCE),
            got=_state["error"], expected="a C++ compiler (CXX or c++) and ninja",
            hint="install a C++ compiler and ninja, or set BNSURGERY_KERNEL=reference"))
    return _state["library"]  # type: ignore[return-value]


def _describe(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else 'no message'}"


def unavailable_reason(device: torch.device) -> str | None:
    """Why the kernel cannot run on ``device`` (``None`` when it can); builds it on first call."""
    if device.type != "cpu":
        return f"CPU only (asked for {device.type})"
    if "library" in _state:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # one warning per process, whatever the filters
            build()
    except KernelUnavailableError:
        return f"build failed: {_state['error']}"
    return None


# --- The operators ---------------------------------------------------------------------------


def fast_entry() -> Any:
    """The library's ``fast_batch_norm`` (see :func:`bnsurgery.kernels.fast_path`), or ``None``
    when the library is not loaded."""
    module = _state.get("module")
    return None if module is None else module.fast_batch_norm  # type: ignore[attr-defined]


def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
            running_var: Tensor | None, training: bool, momentum: float,
            eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """The backend contract's forward (see :func:`bnsurgery.kernel_tensor.forward`)."""
    # _state["ops"] is only ever set by _resolve_operators.
    ops = cast(_Operators, _state.get("ops") or _resolve_operators())
    if training:
        return ops[1](x, weight, bias, running_mean, running_var, momentum, eps)
    return ops[0](x, weight, bias, running_mean, running_var, eps)


def backward(grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor,
             training: bool, needs: tuple[bool, bool, bool]
             ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The backend contract's backward (see :func:`bnsurgery.kernel_tensor.backward`)."""
    # _state["ops"] is only ever set by _resolve_operators.
    ops = cast(_Operators, _state.get("ops") or _resolve_operators())
    grads = ops[2](grad_out, x, weight, mean, invstd, training, list(needs))
    grad_x, grad_w, grad_b = (g if need else None for g, need in zip(grads, needs, strict=True))
    return grad_x, grad_w, grad_b


def measure(x: Tensor, weight: Tensor | None, bias: Tensor | None, stats_dtype: torch.dtype,
            eps: float, out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """A BatchNorm input's exact moments and the input normalised with them, in one operator.

    What recalibration needs from a plain BatchNorm: the float64 per-channel mean and sum of
    squared deviations of ``x``, and the output a training-mode forward hands on, i.e.
    ``F.batch_norm(x, mean.to(stats_dtype), (sq_dev / count).to(stats_dtype), weight, bias,
    training=False, eps=eps)``, without reading ``x`` from memory a second time for it (on
    contiguous inputs; see ``csrc/moments_cpu.cpp``). Not differentiable: it is meant for
    passes without gradients. Takes the library as built (callers check
    :func:`unavailable_reason` first, as :func:`bnsurgery.kernels.select_backend` does).

    Args:
        x: The input ``(N, C, ...)``, float64, float32, float16 or bfloat16, on the CPU.
        weight: The affine weight ``(C,)``, or ``None``.
        bias: The affine bias ``(C,)``, or ``None``.
        stats_dtype: The dtype the statistics are rounded to before normalising (the layer's
            running buffers').
        eps: Added to the variance.
        out: Where to write the output: :func:`output_like` ``(x)`` or a tensor of that shape,
            dtype and layout (the operator refuses any other, and one that shares memory with
            ``x``). ``None`` allocates one.

    Returns:
        ``(output, mean, sq_dev)``; ``output`` is ``out`` when given; ``mean`` and ``sq_dev``
        are float64 ``(C,)``.
    """
    # _state["measure_op"] is only ever set here.
    op = cast("Callable[..., tuple[Tensor, Tensor]] | None", _state.get("measure_op"))
    if op is None:
        op = _state["measure_op"] = _direct_callables((MEASURE_OPERATOR,))[0]
    output = output_like(x) if out is None else out
    mean, sq_dev = op(x, weight, bias, stats_dtype, eps, output)
    return output, mean, sq_dev


def _resolve_operators() -> _Operators:
    """The operators' overloads, looked up once: ``torch.ops`` attribute access and the
    overload packet's resolution cost microseconds per call, which small inputs feel."""
    ops = _direct_callables(_BATCH_NORM_OPERATORS)
    _state["ops"] = ops
    return ops


def _direct_callables(names: tuple[str, ...]) -> tuple[Callable[..., Any], ...]:
    overloads = (getattr(torch.ops.bnsurgery, name.split("::")[1]).default for name in names)
    # An overload's ``_op`` is the C++ callable its ``__call__`` forwards to: calling it directly
    # saves a Python frame per call (a tenth of a small BatchNorm). Same dispatch, same result.
    return tuple(getattr(overload, "_op", overload) for overload in overloads)


def output_like(x: Tensor) -> Tensor:
    """An empty tensor in the layout the kernels write: ``x``'s when dense, else contiguous."""
    if x.is_contiguous():
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    for dim, fmt in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if x.dim() == dim and x.is_contiguous(memory_format=fmt):
            return torch.empty_like(x, memory_format=fmt)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _stats_like(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[1],), dtype=accumulate_dtype(x.dtype))


def _fake_eval(x: Tensor, weight: Tensor | None, bias: Tensor | None,
               running_mean: Tensor | None, running_var: Tensor | None, eps: float
               ) -> tuple[Tensor, Tensor, Tensor]:
    if x.numel() == 0:
        return torch.empty_like(x), _stats_like(x), _stats_like(x)
    return output_like(x), _stats_like(x), _stats_like(x)


def _fake_train(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _fake_eval(x, weight, bias, running_mean, running_var, eps)


def _fake_backward(grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor,
                   invstd: Tensor, training: bool, output_mask: Sequence[bool]
                   ) -> tuple[Tensor, Tensor, Tensor]:
    acc = accumulate_dtype(x.dtype)
    grad_x = (torch.empty_like(x) if x.numel() == 0 else output_like(x)) if output_mask[0] \
        else x.new_empty((0,))
    sizes = [(x.shape[1],) if need else (0,) for need in output_mask[1:]]
    return grad_x, x.new_empty(sizes[0], dtype=acc), x.new_empty(sizes[1], dtype=acc)


def _register_fakes() -> None:
    if _state.get("registered"):
        return
    torch.library.register_fake("bnsurgery::cpp_batch_norm_eval", _fake_eval)
    torch.library.register_fake("bnsurgery::cpp_batch_norm_train", _fake_train)
    torch.library.register_fake("bnsurgery::cpp_batch_norm_backward", _fake_backward)
    torch.library.register_fake("bnsurgery::cpp_sync_statistics", _fake_sync_statistics)
    torch.library.register_fake("bnsurgery::cpp_sync_normalise", _fake_sync_normalise)
    torch.library.register_fake("bnsurgery::cpp_sync_grad_sums", _fake_sync_grad_sums)
    torch.library.register_fake("bnsurgery::cpp_sync_grad_input", _fake_sync_grad_input)
    torch.library.register_fake(MEASURE_OPERATOR, _fake_measure)
    _state["registered"] = True


# --- SyncBatchNorm's local steps -------------------------------------------------------------
# The formulas are in bnsurgery/sync_batchnorm.py and bnsurgery/csrc/sync_cpu.cpp. Each function
# takes the library as built (callers check unavailable_reason first, as select_backend does).


def _sync_operators() -> tuple[Callable[..., Any], ...]:
    # _state["sync_ops"] is only ever set here.
    ops = cast("tuple[Callable[..., Any], ...] | None", _state.get("sync_ops"))
    if ops is None:
        ops = _state["sync_ops"] = _direct_callables(SYNC_OPERATORS)
    return ops


def sync_statistics(x: Tensor) -> tuple[int, Tensor, Tensor]:
    """This rank's ``(n_r, S_r, M2_r)``: values per channel, per-channel sum and sum of squared
    deviations from its own mean (both float64, ``(C,)``). ``x`` is ``(N, C, ...)``."""
    sums, sq_devs = _sync_operators()[0](x)
    return x.numel() // x.shape[1], sums, sq_devs


def sync_normalise(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
                   bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, rounded mean, mean residual, invstd)`` from the global float64 ``mean`` and biased
    ``var``; ``y`` has ``x``'s dtype and layout, the rest the accumulation dtype."""
    # The operators' results are what their schemas (csrc/sync_cpu.cpp) say.
    outputs: tuple[Tensor, Tensor, Tensor, Tensor] = _sync_operators()[1](x, mean, var, weight,
                                                                          bias, eps)
    return outputs


def sync_gradient_sums(grad_out: Tensor, x: Tensor, mean: Tensor,
                       mean_residual: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's float64 ``sum(g)`` and ``sum(g * (x - mean))``, the mean being the rounded
    ``mean`` plus ``mean_residual`` (as :func:`sync_normalise` returns them)."""
    sums: tuple[Tensor, Tensor] = _sync_operators()[2](grad_out, x, mean, mean_residual)
    return sums


def sync_input_gradient(grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor,
                        mean_residual: Tensor, invstd: Tensor, sum_dy: Tensor,
                        sum_dy_xmu: Tensor, count: int) -> Tensor:
    """``dL/dx`` from the GLOBAL ``sum_dy`` and ``sum_dy_xmu`` over ``count`` values per
    channel; ``x``'s dtype and layout."""
    grad_x: Tensor = _sync_operators()[3](grad_out, x, weight, mean, mean_residual, invstd,
                                          sum_dy, sum_dy_xmu, count)
    return grad_x


def _channel_vector(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.new_empty((x.shape[1],), dtype=dtype)


def _fake_sync_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    return _channel_vector(x, torch.float64), _channel_vector(x, torch.float64)


def _fake_sync_normalise(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
                         bias: Tensor | None, eps: float
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y = torch.empty_like(x) if x.numel() == 0 else output_like(x)
    return y, _stats_like(x), _stats_like(x), _stats_like(x)


def _fake_sync_grad_sums(grad_out: Tensor, x: Tensor, mean: Tensor, mean_residual: Tensor
                         ) -> tuple[Tensor, Tensor]:
    return _fake_sync_statistics(x)


def _fake_sync_grad_input(grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor,
                          mean_residual: Tensor, invstd: Tensor, sum_dy: Tensor,
                          sum_dy_xmu: Tensor, count: int) -> Tensor:
    return torch.empty_like(x) if x.numel() == 0 else output_like(x)


def _fake_measure(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                  stats_dtype: torch.dtype, eps: float, out: Tensor) -> tuple[Tensor, Tensor]:
    return _channel_vector(x, torch.float64), _channel_vector(x, torch.float64)
