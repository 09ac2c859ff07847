"""Build the model a command line names, and load weights without running code from files.

A MODEL is written ``torchvision:NAME`` (``torchvision.models.get_model``), ``timm:NAME``
(``timm.create_model``) or ``package.module:factory`` (a function called with no arguments that
returns an ``nn.Module``). Models are built with random weights; ``weights`` then loads a
state_dict from a file, or takes the library's pretrained weights (``"DEFAULT"``, which
downloads).

Weight files are loaded without unpickling code: ``.pt``/``.pth``/``.bin``/``.ckpt`` through
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers, and
``.safetensors`` through safetensors, which has no code path at all. A pickle that would need to
import or call anything is refused with :class:`~bnsurgery.errors.UnsafeFileError` before any of
it runs.

A weights file may not allocate more than the model it is loaded into could use: the sizes its
zip directory or safetensors header declares are compared with :func:`weights_budget` before
anything is inflated, so a small file that inflates to gigabytes is refused at once. A tensor
whose dtype cannot carry a parameter's values (integers or booleans into a float parameter) is
refused, and float tensors of another float dtype are reported as cast.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import inspect
import os
import pickle
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

from bnsurgery._lazy import require
from bnsurgery.archive import declared_bytes
from bnsurgery.errors import BnSurgeryError, InvalidInputError, UnsafeFileError, format_message
from bnsurgery.messages import first_line
from bnsurgery.results import JsonResult

__all__ = [
    "DEFAULT_WEIGHTS",
    "LoadedModel",
    "ModelSpec",
    "WEIGHTS_SIZE_FACTOR",
    "WEIGHTS_SIZE_SLACK",
    "WeightsCastWarning",
    "check_input_size",
    "check_seed",
    "default_input_shape",
    "load_model",
    "load_state_dict_file",
    "parse_input_shape",
    "parse_model_spec",
    "weights_budget",
]

#: The ``weights`` value that asks for the library's pretrained weights.
DEFAULT_WEIGHTS = "DEFAULT"

#: A weights file may declare this many times the model's own parameter and buffer bytes: a
#: training checkpoint holds the weights plus optimiser moments (two more copies for Adam) and
#: often an EMA copy, possibly in float64. A zip bomb inflates a thousandfold and more.
WEIGHTS_SIZE_FACTOR = 8
#: ...plus this many bytes, for the pickle, metadata and small models.
WEIGHTS_SIZE_SLACK = 64 * 1024 * 1024

_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_SAFETENSORS_SUFFIXES = (".safetensors",)
_SOURCES = ("torchvision", "timm")
# Networks whose native resolution is not 224.
_TORCHVISION_SIZES = {"inception_v3": 299}


@dataclass(frozen=True)
class ModelSpec(JsonResult):
    """A parsed MODEL argument.

    Attributes:
        source: ``"torchvision"``, ``"timm"``, ``"python"`` or ``"file"``.
        name: The model name, ``"package.module:factory"`` for ``"python"`` or
            ``"path/to/file.py:factory"`` for ``"file"``.
        text: The argument as given.
    """

    source: str
    name: str
    text: str


@dataclass(frozen=True)
class LoadedModel:
    """A built model, in eval mode, with what is known about its inputs.

    Attributes:
        model: The model.
        spec: What it was built from.
        input_shape: The input shape it expects by default, batch first (batch 1).
        weights: Where its weights came from: ``"random"``, ``"DEFAULT"`` or a file path.
        cast: The weights file's tensors that were converted to the parameter's float dtype,
            as ``"name: float16 -> float32"`` (empty when every dtype matched).
    """

    model: nn.Module
    spec: ModelSpec
    input_shape: tuple[int, ...]
    weights: str
    cast: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form, the model itself given by its class name.

        Written out by hand: the class goes under the key ``"class"``, which no field or
        property can be named.
        """
        return {"spec": self.spec.to_dict(), "input_shape": list(self.input_shape),
                "weights": self.weights, "class": type(self.model).__qualname__,
                "cast": list(self.cast)}


class WeightsCastWarning(UserWarning):
    """Tensors of a weights file were converted to the float dtype of the model's parameters.

    float16 into float32 is exact; float64 into float32 rounds. Either way the model does not
    hold the numbers of the file bit for bit, which the user should know.
    """


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``torchvision:NAME``, ``timm:NAME``, ``package.module:factory`` or ``file.py:factory``.

    ``package.module`` is also looked up in the working directory; a ``.py`` path is imported
    from that file.

    Raises:
        InvalidInputError: The text has no ``:`` or an empty part.
    """
    if not isinstance(text, str) or ":" not in text:
        raise InvalidInputError(format_message(
            "A MODEL is written SOURCE:NAME", where="MODEL", got=repr(text),
            expected="torchvision:NAME, timm:NAME or package.module:factory",
            hint="for example torchvision:resnet18"))
    # A file path may hold ':' itself; the factory name never does.
    source, _, name = text.rpartition(":") if ".py:" in text else text.partition(":")
    source, name = source.strip(), name.strip()
    if not source or not name:
        raise InvalidInputError(format_message(
            "A MODEL needs both a source and a name", where="MODEL", got=repr(text),
            expected="torchvision:NAME, timm:NAME or package.module:factory",
            hint="for example torchvision:resnet18"))
    if source in _SOURCES:
        return ModelSpec(source, name, text)
    if source.endswith(".py") and name.isidentifier():
        return ModelSpec("file", f"{source}:{name}", text)
    if not all(part.isidentifier() for part in source.split(".")) or not name.isidentifier():
        raise InvalidInputError(format_message(
            "Unknown MODEL source", where="MODEL", got=repr(text),
            expected="torchvision:NAME, timm:NAME or package.module:factory",
            hint="for example torchvision:resnet18"))
    return ModelSpec("python", f"{source}:{name}", text)


def parse_input_shape(text: str) -> tuple[int, ...]:
    """Parse ``"1,3,224,224"`` (``x`` also separates) into a tuple of positive integers.

    Raises:
        InvalidInputError: A part is not a positive integer.
    """
    parts = [p for p in str(text).replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise InvalidInputError(format_message(
            "The input shape must be comma-separated positive integers", where="--input-shape",
            got=repr(text), expected="e.g. 1,3,224,224", hint="batch first, then C,H,W"))
    return shape


def _close(name: str, choices: list[str]) -> str:
    matches = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f"did you mean {', '.join(matches)}?" if matches else "list them with " \
        "torchvision.models.list_models() or timm.list_models()"


def _built(model: object, where: str) -> nn.Module:
    """What torchvision or timm built, checked: mypy sees neither library's types."""
    if not isinstance(model, nn.Module):
        raise InvalidInputError(format_message(
            "The model builder did not return a torch.nn.Module", where=where,
            got=type(model).__name__, expected="an nn.Module",
            hint="check the installed torchvision/timm version"))
    return model


def _build_torchvision(name: str, weights: str | None) -> nn.Module:
    models = require("torchvision.models", purpose=f"Building torchvision:{name}")
    available = models.list_models()
    if name not in available:
        raise InvalidInputError(format_message(
            "Unknown torchvision model", where=f"torchvision:{name}", got=repr(name),
            expected="a name from torchvision.models.list_models()",
            hint=_close(name, available)))
    if weights != DEFAULT_WEIGHTS:
        return _built(models.get_model(name, weights=None), f"torchvision:{name}")
    try:
        enum = models.get_model_weights(name)
        default = enum.DEFAULT
    except (ValueError, AttributeError, KeyError) as exc:
        raise InvalidInputError(format_message(
            "This torchvision model has no pretrained weights", where=f"torchvision:{name}",
            got="--weights DEFAULT", expected="a model with torchvision weights",
            hint="pass --weights PATH to a state_dict instead")) from exc
    try:
        return _built(models.get_model(name, weights=default), f"torchvision:{name}")
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad download a RuntimeError
        raise BnSurgeryError(format_message(
            "Downloading torchvision's pretrained weights failed", where=str(default),
            got=f"{type(exc).__name__}: {exc}", expected="network access to download.pytorch.org",
            hint="download the file elsewhere and pass --weights PATH")) from exc


def _build_timm(name: str, weights: str | None) -> nn.Module:
    timm = require("timm", purpose=f"Building timm:{name}")
    if not timm.is_model(name):
        raise InvalidInputError(format_message(
            "Unknown timm model", where=f"timm:{name}", got=repr(name),
            expected="a name from timm.list_models()", hint=_close(name, timm.list_models())))
    if weights != DEFAULT_WEIGHTS:
        return _built(timm.create_model(name, pretrained=False), f"timm:{name}")
    try:
        return _built(timm.create_model(name, pretrained=True), f"timm:{name}")
    except (OSError, RuntimeError) as exc:
        raise BnSurgeryError(format_message(
            "Loading timm's pretrained weights failed", where=f"timm:{name}",
            got=f"{type(exc).__name__}: {exc}", expected="pretrained weights for this model",
            hint="download the file elsewhere and pass --weights PATH")) from exc


def _build_python(target: str, weights: str | None) -> nn.Module:
    module_name, _, factory_name = target.partition(":")
    if weights == DEFAULT_WEIGHTS:
        raise InvalidInputError(format_message(
            "--weights DEFAULT only works for torchvision and timm models", where=target,
            got="--weights DEFAULT", expected="--weights PATH",
            hint="pass --weights PATH to a state_dict file"))
    try:
        module = (_import_file(module_name) if module_name.endswith(".py")
                  else _import_from_here(module_name))
    except ImportError as exc:
        raise InvalidInputError(format_message(
            "Cannot import the model's module", where=target, got=f"{type(exc).__name__}: {exc}",
            expected="an importable package.module or path/to/file.py",
            hint="check the spelling, run from the folder that holds the package, or write "
                 "path/to/file.py:factory")) from exc
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise InvalidInputError(format_message(
            "The model factory does not exist", where=target, got=f"no callable {factory_name!r}",
            expected=f"a function in {module_name} returning an nn.Module",
            hint="name a function that takes no arguments"))
    try:
        inspect.signature(factory).bind()
    except TypeError as exc:
        raise InvalidInputError(format_message(
            "The model factory needs arguments", where=target, got=first_line(exc),
            expected="a function that takes no arguments and returns an nn.Module",
            hint=f"write one, e.g. def build(): return {factory_name}(...), in a module of "
                 "yours, and name it as module:build")) from exc
    except ValueError:  # no signature to read (some builtins): calling it will tell
        pass
    try:
        model = factory()
    except Exception as exc:  # the user's own code: keep it as the cause (--debug shows it)
        raise InvalidInputError(format_message(
            "The model factory raised an error", where=target,
            got=f"{type(exc).__name__}: {first_line(exc)}",
            expected="a function that builds the model", hint="run it in Python to see why"
        )) from exc
    if not isinstance(model, nn.Module):
        raise InvalidInputError(format_message(
            "The model factory did not return a torch.nn.Module", where=target,
            got=type(model).__name__, expected="an nn.Module",
            hint="return the model object from the factory"))
    return model


@contextlib.contextmanager
def _on_path(folder: str) -> Iterator[None]:
    """``folder`` at the end of ``sys.path`` for the duration (installed packages still win)."""
    added = folder not in sys.path
    if added:
        sys.path.append(folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def _import_from_here(module_name: str) -> ModuleType:
    """Import ``package.module``, also from the working directory.

    ``python -m`` puts the working directory on ``sys.path``, the ``bnsurgery`` console script
    does not: a model package next to the user should be found either way.
    """
    with _on_path(os.getcwd()):
        return importlib.import_module(module_name)


def _import_file(path: str) -> ModuleType:
    """Import a ``.py`` file by path, with its folder importable for its own imports."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ImportError(f"no such file: {path}")
    name = f"bnsurgery_model_file_{file.stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up by name
    try:
        with _on_path(str(file.parent)):
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _unpickler_reason(exc: Exception) -> str:
    """The line of torch's long weights_only message that says what was refused."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported" in line or "global" in line.lower():
            return line[:200]
    return lines[0][:200] if lines else type(exc).__name__


def _unwrap(obj: object) -> object:
    """Checkpoints often nest the weights under ``state_dict`` or ``model``."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping) and not any(
                isinstance(v, Tensor) for v in obj.values()):
            return obj[key]
    return obj


def weights_budget(model: nn.Module) -> int:
    """The most bytes a weights file loaded into ``model`` may declare.

    :data:`WEIGHTS_SIZE_FACTOR` times the bytes of the model's parameters and buffers (each
    storage counted once), plus :data:`WEIGHTS_SIZE_SLACK`.
    """
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "meta":
            total += tensor.numel() * tensor.element_size()
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return WEIGHTS_SIZE_FACTOR * total + WEIGHTS_SIZE_SLACK


def _check_declared_size(path: Path, max_bytes: int | None) -> None:
    """Refuse a file that declares more than ``max_bytes``, from its directory or header only."""
    declared = declared_bytes(path)
    if max_bytes is not None and declared > max_bytes:
        raise InvalidInputError(format_message(
            "Refused to load the weights file: it declares more data than the model could use "
            "(a compressed archive that inflates far beyond its size); nothing was inflated",
            where=str(path), got=f"{declared} bytes declared in a file of "
            f"{path.stat().st_size} bytes", expected=f"at most {max_bytes} bytes",
            hint="save only the model's state_dict (torch.save(model.state_dict(), path)) or "
                 "convert it to .safetensors"))


def load_state_dict_file(path: str | os.PathLike[str], *, max_bytes: int | None = None
                         ) -> dict[str, Tensor]:
    """Load a state_dict without running any code stored in the file.

    Args:
        path: A ``.pt``/``.pth``/``.bin``/``.ckpt`` file (``torch.save`` of a state_dict,
            possibly nested under ``"state_dict"`` or ``"model"``) or a ``.safetensors`` file.
        max_bytes: Refuse a file whose zip directory or safetensors header declares more bytes
            than this, before anything is inflated (``None``: no bound; :func:`load_model`
            passes :func:`weights_budget` of the model).

    Returns:
        The state_dict on the CPU, with a ``module.`` prefix (``DataParallel``) removed.

    Raises:
        UnsafeFileError: The pickle needs to import or call something to load; nothing of it ran.
        InvalidInputError: The file is missing, unreadable, of an unknown kind, declares more
            than ``max_bytes``, or holds something other than tensors.
    """
    path = _existing_weights_file(path)
    _check_declared_size(path, max_bytes)
    suffix = path.suffix.lower()
    if suffix in _SAFETENSORS_SUFFIXES:
        safetensors_torch = require("safetensors.torch", purpose="Loading .safetensors weights")
        try:
            state = safetensors_torch.load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise InvalidInputError(format_message(
                "The .safetensors file cannot be read", where=str(path),
                got=f"{type(exc).__name__}: {exc}", expected="a valid safetensors file",
                hint="re-save it with safetensors.torch.save_file")) from exc
    elif suffix in _PICKLE_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeFileError(format_message(
                "Refused to load the weights file: torch.load(weights_only=True) accepts only "
                "tensors and plain containers, and this file would need unpickling code (or is "
                "damaged); nothing in the file was run",
                where=str(path), got=_unpickler_reason(exc),
                expected="a state_dict saved with torch.save(model.state_dict(), path)",
                hint="re-save only the state_dict, or convert it to .safetensors")) from exc
        except Exception as exc:  # a damaged file can make the unpickler raise anything
            raise InvalidInputError(format_message(
                "The weights file cannot be read", where=str(path),
                got=f"{type(exc).__name__}: {first_line(exc)}",
                expected="a file written by torch.save", hint="check that it is not truncated"
            )) from exc
    state = _unwrap(state)
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise InvalidInputError(format_message(
            "The weights file does not hold a state_dict", where=str(path),
            got=type(state).__name__, expected="a mapping of parameter names to tensors",
            hint="save it with torch.save(model.state_dict(), path)"))
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _existing_weights_file(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(format_message(
            "The weights file does not exist", where=str(path), got="no such file",
            expected="a .pt, .pth or .safetensors file", hint="check the path"))
    if path.suffix.lower() not in _PICKLE_SUFFIXES + _SAFETENSORS_SUFFIXES:
        raise InvalidInputError(format_message(
            "Unknown weights file type", where=str(path), got=repr(path.suffix),
            expected=f"one of {', '.join(_PICKLE_SUFFIXES + _SAFETENSORS_SUFFIXES)}",
            hint="save a state_dict with torch.save or safetensors"))
    return path


def _check_dtypes(model: nn.Module, state: Mapping[str, Tensor], where: str) -> tuple[str, ...]:
    """Refuse tensors that cannot carry a float parameter's values; list the float casts.

    ``load_state_dict`` copies with ``copy_``, which converts any dtype silently: int64 weights
    become whole numbers (mostly 0.0 for real weights), booleans 0.0 and 1.0.
    """
    targets = model.state_dict(keep_vars=True)
    refused, cast = [], []
    for name, value in state.items():
        target = targets.get(name)
        if not isinstance(target, Tensor) or target.dtype == value.dtype:
            continue
        if target.is_floating_point() and not value.is_floating_point():
            refused.append(f"{name}: {value.dtype} into {target.dtype}")
        elif target.is_floating_point():
            cast.append(f"{name}: {value.dtype} -> {target.dtype}")
    if refused:
        raise InvalidInputError(format_message(
            "The weights file holds non-float tensors for float parameters", where=where,
            got=f"{len(refused)} such tensors ({', '.join(refused[:4])}"
                f"{', ...' if len(refused) > 4 else ''})",
            expected="float tensors (float16, bfloat16, float32 or float64)",
            hint="save the model's own state_dict; integer tensors would become whole numbers"))
    return tuple(cast)


def _apply_state_dict(model: nn.Module, state: Mapping[str, Tensor], where: str) -> None:
    result_missing, result_unexpected = [], []
    try:
        result = model.load_state_dict(state, strict=False)
        result_missing, result_unexpected = list(result.missing_keys), \
            list(result.unexpected_keys)
    except RuntimeError as exc:  # shape mismatches
        raise InvalidInputError(format_message(
            "The weights do not fit the model", where=where,
            got=str(exc).strip().splitlines()[-1][:300], expected="the same architecture",
            hint="check that the MODEL matches the checkpoint")) from exc
    if result_missing or result_unexpected:
        shown = ", ".join((result_missing + result_unexpected)[:4])
        raise InvalidInputError(format_message(
            "The weights do not fit the model", where=where,
            got=f"{len(result_missing)} missing and {len(result_unexpected)} unexpected keys "
                f"(e.g. {shown})", expected="the same parameter names",
            hint="check that the MODEL matches the checkpoint"))


def check_seed(seed: object, *, where: str = "seed") -> int:
    """``seed`` if torch's generators accept it: an integer in ``[-2**63, 2**64 - 1]``.

    Raises:
        InvalidInputError: Not an integer, or out of that range (torch raises a bare
            ``RuntimeError: Overflow when unpacking long`` deep inside seeding).
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or not -2**63 <= seed < 2**64:
        raise InvalidInputError(format_message(
            "The seed is out of range", where=where, got=repr(seed),
            expected="an integer from -2**63 to 2**64 - 1", hint=f"pass a smaller {where}"))
    return seed


def _available_memory() -> int | None:
    """Bytes of memory the system can still give, or ``None`` where it does not say."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def check_input_size(shape: tuple[int, ...], *, dtype: torch.dtype = torch.float32,
                     where: str = "input_shape", hint: str = "pass a smaller input_shape"
                     ) -> int:
    """Refuse an input shape whose tensor cannot be allocated, before trying to allocate it.

    Allocating a tensor larger than memory fails slowly (swapping) or kills the process; the
    element count and bytes are checked against the memory still available instead.

    Returns:
        The bytes the input needs.

    Raises:
        InvalidInputError: The element count overflows int64 or the bytes exceed what is
            available.
    """
    numel = 1
    for size in shape:
        numel *= int(size)
    needed = numel * torch.empty((), dtype=dtype).element_size()
    available = _available_memory()
    if numel >= 2**63 or (available is not None and needed > available):
        raise InvalidInputError(format_message(
            "The input shape is too large to allocate", where=where,
            got=f"{list(shape)}: {numel} elements, {needed} bytes of {dtype}",
            expected=f"at most the {available} bytes of memory available"
            if available is not None else "fewer than 2**63 elements", hint=hint))
    return needed


def _check_not_meta(model: nn.Module, where: str) -> None:
    meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()]
            if tensor.is_meta]
    if meta:
        raise InvalidInputError(format_message(
            "The model's tensors are on the meta device: they have shapes but no values",
            where=where, got=f"{len(meta)} meta tensors (e.g. {', '.join(meta[:3])})",
            expected="a model with real tensors (on the CPU or a GPU)",
            hint="build it on a real device, or call model.to_empty(device='cpu') and load "
                 "its weights before returning it from the factory"))


def default_input_shape(spec: ModelSpec | str, model: nn.Module | None = None
                        ) -> tuple[int, ...]:
    """The input shape a model expects by default, batch 1: ``(1, 3, 224, 224)`` for most."""
    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    if spec.source == "timm" and model is not None:
        config = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
        size = config.get("input_size") if isinstance(config, Mapping) else None
        if size:
            return (1, *(int(s) for s in size))
    if spec.source == "torchvision":
        side = _TORCHVISION_SIZES.get(spec.name, 224)
        return (1, 3, side, side)
    return (1, 3, 224, 224)


def load_model(spec: ModelSpec | str, *, weights: str | os.PathLike[str] | None = None
               ) -> LoadedModel:
    """Build the model named by ``spec``, load ``weights``, and put it in eval mode.

    Args:
        spec: ``torchvision:NAME``, ``timm:NAME`` or ``package.module:factory``.
        weights: ``None`` for random weights, ``"DEFAULT"`` for the library's pretrained ones
            (downloads), or a path to a state_dict file (see :func:`load_state_dict_file`).

    Returns:
        The loaded model and its default input shape.

    Raises:
        InvalidInputError: Unknown model; unreadable or mismatching weights; a weights file
            that declares more than :func:`weights_budget` of the model, or non-float tensors
            for float parameters.
        UnsafeFileError: The weights file would run code to unpickle.

    Warns:
        WeightsCastWarning: Float tensors of another float dtype were cast (also listed in
            :attr:`LoadedModel.cast`).
        MissingDependencyError: torchvision/timm is not installed.
        BnSurgeryError: Pretrained weights could not be downloaded.
    """
    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    keyword = str(weights) if weights is not None and str(weights) == DEFAULT_WEIGHTS else None
    if weights is not None and keyword is None:
        # Vet what can be vetted from the directory or header alone before building anything.
        declared_bytes(_existing_weights_file(weights))
    if spec.source == "torchvision":
        model = _build_torchvision(spec.name, keyword)
    elif spec.source == "timm":
        model = _build_timm(spec.name, keyword)
    else:
        model = _build_python(spec.name, keyword)
    _check_not_meta(model, spec.text)  # loading weights into meta tensors does nothing
    cast: tuple[str, ...] = ()
    if weights is not None and keyword is None:
        where = f"{spec.text} <- {weights}"
        state = load_state_dict_file(weights, max_bytes=weights_budget(model))
        cast = _check_dtypes(model, state, where)
        _apply_state_dict(model, state, where)
        if cast:
            warnings.warn(f"{len(cast)} tensors of {weights} were cast to the model's dtype: "
                          f"{', '.join(cast)}", WeightsCastWarning, stacklevel=2)
    model.eval()
    source = "random" if weights is None else (keyword or str(weights))
    return LoadedModel(model, spec, default_input_shape(spec, model), source, cast)
