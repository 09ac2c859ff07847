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
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import os
import pickle
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

from bnsurgery._lazy import require
from bnsurgery.errors import BnSurgeryError, InvalidInputError, UnsafeFileError, format_message

__all__ = [
    "DEFAULT_WEIGHTS",
    "LoadedModel",
    "ModelSpec",
    "default_input_shape",
    "load_model",
    "load_state_dict_file",
    "parse_input_shape",
    "parse_model_spec",
]

#: The ``weights`` value that asks for the library's pretrained weights.
DEFAULT_WEIGHTS = "DEFAULT"

_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_SAFETENSORS_SUFFIXES = (".safetensors",)
_SOURCES = ("torchvision", "timm")
# Networks whose native resolution is not 224.
_TORCHVISION_SIZES = {"inception_v3": 299}


@dataclass(frozen=True)
class ModelSpec:
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

    def to_dict(self) -> dict[str, str]:
        """JSON-ready form."""
        return {"source": self.source, "name": self.name, "text": self.text}


@dataclass(frozen=True)
class LoadedModel:
    """A built model, in eval mode, with what is known about its inputs.

    Attributes:
        model: The model.
        spec: What it was built from.
        input_shape: The input shape it expects by default, batch first (batch 1).
        weights: Where its weights came from: ``"random"``, ``"DEFAULT"`` or a file path.
    """

    model: nn.Module
    spec: ModelSpec
    input_shape: tuple[int, ...]
    weights: str

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (without the model itself)."""
        return {"spec": self.spec.to_dict(), "input_shape": list(self.input_shape),
                "weights": self.weights, "class": type(self.model).__qualname__}


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


def _build_torchvision(name: str, weights: str | None) -> nn.Module:
    models = require("torchvision.models", purpose=f"Building torchvision:{name}")
    available = models.list_models()
    if name not in available:
        raise InvalidInputError(format_message(
            "Unknown torchvision model", where=f"torchvision:{name}", got=repr(name),
            expected="a name from torchvision.models.list_models()",
            hint=_close(name, available)))
    if weights != DEFAULT_WEIGHTS:
        return models.get_model(name, weights=None)
    try:
        enum = models.get_model_weights(name)
        default = enum.DEFAULT
    except (ValueError, AttributeError, KeyError) as exc:
        raise InvalidInputError(format_message(
            "This torchvision model has no pretrained weights", where=f"torchvision:{name}",
            got="--weights DEFAULT", expected="a model with torchvision weights",
            hint="pass --weights PATH to a state_dict instead")) from exc
    try:
        return models.get_model(name, weights=default)
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
        return timm.create_model(name, pretrained=False)
    try:
        return timm.create_model(name, pretrained=True)
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
    model = factory()
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


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Load a state_dict without running any code stored in the file.

    Args:
        path: A ``.pt``/``.pth``/``.bin``/``.ckpt`` file (``torch.save`` of a state_dict,
            possibly nested under ``"state_dict"`` or ``"model"``) or a ``.safetensors`` file.

    Returns:
        The state_dict on the CPU, with a ``module.`` prefix (``DataParallel``) removed.

    Raises:
        UnsafeFileError: The pickle needs to import or call something to load; nothing of it ran.
        InvalidInputError: The file is missing, unreadable, of an unknown kind, or holds
            something other than tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(format_message(
            "The weights file does not exist", where=str(path), got="no such file",
            expected="a .pt, .pth or .safetensors file", hint="check the path"))
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
                got=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                expected="a file written by torch.save", hint="check that it is not truncated"
            )) from exc
    else:
        raise InvalidInputError(format_message(
            "Unknown weights file type", where=str(path), got=repr(path.suffix),
            expected=f"one of {', '.join(_PICKLE_SUFFIXES + _SAFETENSORS_SUFFIXES)}",
            hint="save a state_dict with torch.save or safetensors"))
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
        InvalidInputError: Unknown model, unreadable or mismatching weights.
        UnsafeFileError: The weights file would run code to unpickle.
        MissingDependencyError: torchvision/timm is not installed.
        BnSurgeryError: Pretrained weights could not be downloaded.
    """
    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    keyword = str(weights) if weights is not None and str(weights) == DEFAULT_WEIGHTS else None
    state = None
    if weights is not None and keyword is None:
        # Read (and vet) the file before building anything: a refused file must cost nothing.
        state = load_state_dict_file(weights)
    if spec.source == "torchvision":
        model = _build_torchvision(spec.name, keyword)
    elif spec.source == "timm":
        model = _build_timm(spec.name, keyword)
    else:
        model = _build_python(spec.name, keyword)
    if state is not None:
        _apply_state_dict(model, state, f"{spec.text} <- {weights}")
    model.eval()
    source = "random" if weights is None else (keyword or str(weights))
    return LoadedModel(model, spec, default_input_shape(spec, model), source)
