"""Load a ``.pt2`` program (``torch.export.save``) only when nothing in it can run code.

``torch.export.load`` trusts its archive. Read against torch 2.14's loader, these features of a
tampered archive make it unpickle or run code, at load time or when the program is run:

- a weights or constants entry whose config says ``use_pickle`` is loaded with
  ``torch.load(weights_only=False)``; ``opaque_obj_*`` constants with ``pickle.loads`` and
  ``custom_obj_*`` constants with the TorchScript unpickler;
- a ``data/sample_inputs`` entry that ``weights_only=True`` refuses is loaded again with
  ``weights_only=False``;
- a legacy weights/constants file (``data/weights/model.pt``) or an archive in the older format
  (``serialized_*.json`` beside a ``version`` file, which torch falls back to when the new format
  fails) is unpickled with ``weights_only=False``;
- ``data/aotinductor/`` holds compiled shared libraries, which are loaded and run;
- ``models/model.json`` names node targets by dotted path from ``torch`` (``torch.os.system``
  resolves), parses symbolic shapes with ``sympy.sympify`` (which evaluates Python), and holds
  ``guards_code`` and constants that ``ExportedProgram.module()`` pastes into Python source and
  executes.

:func:`check_pt2_archive` reads the zip directory and the JSON files with the standard library
only and refuses every one of these before torch sees the file; :func:`load_exported_program`
then calls ``torch.export.load``. What is accepted is what ``torch.export.save`` writes for a
plain program: tensors stored raw, ATen operators, a few arithmetic operators on sizes.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bnsurgery.archive import read_zip_entries
from bnsurgery.errors import InvalidInputError, UnsafeFileError, format_message
from bnsurgery.messages import first_line, printable

__all__ = ["check_pt2_archive", "load_exported_program"]

_FIXED_MEMBERS = frozenset({
    "archive_format", "archive_version", "byteorder", ".data/version",
    ".data/serialization_id", "models/model.json", "data/sample_inputs/model.pt",
    "data/weights/model_weights_config.json", "data/constants/model_constants_config.json",
})
_WEIGHT_MEMBER = re.compile(r"data/weights/weight_\d+")
_CONSTANT_MEMBER = re.compile(r"data/constants/tensor_\d+")
_EXTRA_MEMBER = re.compile(r"extra/[^/]+")
# Why a member that is not accepted would be dangerous, by where it sits.
_MEMBER_REASONS = (
    ("data/aotinductor/", "a compiled library that torch.export.load would load and run"),
    ("data/constants/opaque_obj_", "a constant that torch unpickles with pickle.loads"),
    ("data/constants/custom_obj_", "a TorchScript object that torch unpickles"),
    ("data/weights/model.pt", "legacy weights that torch unpickles with weights_only=False"),
    ("data/constants/model.pt", "legacy constants that torch unpickles with weights_only=False"),
    ("serialized_", "the older archive format, unpickled with weights_only=False"),
    ("version", "the older archive format, unpickled with weights_only=False"),
    ("models/", "a second program, which torch.export.load also deserialises"),
)
_OPERATOR_NAMES = frozenset({
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
    "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift",
    "rshift", "matmul",
})
_TORCH_OPS_TARGET = re.compile(r"torch\.ops\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?")
# Functions a symbolic shape may call: sympy's own classes and torch's sympy functions.
_SYMPY_CALLS = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan", "LessThan",
    "StrictGreaterThan", "GreaterThan", "And", "Or", "Not", "Piecewise", "ExprCondPair",
    "floor", "ceiling", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv",
    "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow",
    "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat",
    "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
})
_SYMPY_NAMES = frozenset({"oo", "zoo", "nan", "true", "false", "S"})
_SYMBOL_NAME = re.compile(r"[a-z]+\d+")
_GUARD_ATTRIBUTES = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
# Graph input kinds that carry no Python value into generated code.
_GRAPH_INPUT_KINDS = frozenset({"as_tensor", "as_sym_int", "as_sym_float", "as_sym_bool",
                                "as_int", "as_float", "as_bool", "as_none"})


def _refuse(path: Path, what: str, got: str) -> UnsafeFileError:
    return UnsafeFileError(format_message(
        f"Refused to load the .pt2 archive: {what}; nothing in it was unpickled or run",
        where=str(path), got=printable(got, limit=300),
        expected="a program written by torch.export.save with tensors stored raw, ATen "
                 "operators and no pickled, compiled or custom objects",
        hint="load only .pt2 files you wrote yourself, or exchange weights as .safetensors"))


def _member_reason(name: str) -> str:
    for prefix, reason in _MEMBER_REASONS:
        if name.startswith(prefix):
            return reason
    return "a member torch.export.save does not write"


def _walk(value: Any, key: str | None = None) -> Iterator[tuple[str | None, Any]]:
    """Every (key, value) pair of a JSON document, depth first."""
    yield key, value
    if isinstance(value, dict):
        for child_key, child in value.items():
            yield from _walk(child, child_key)
    elif isinstance(value, list):
        for child in value:
            yield from _walk(child)


def _check_target(target: object) -> str | None:
    """Why a node target may not be resolved, or ``None`` when it is a plain operator."""
    if not isinstance(target, str):
        return f"a node target of type {type(target).__name__}"
    if "__" in target:
        return f"node target {target!r} reaches a dunder attribute"
    if target.startswith("_operator."):
        name = target[len("_operator."):]
        return None if name in _OPERATOR_NAMES else f"node target {target!r} is not arithmetic"
    if target.startswith("math.") and target.count(".") == 1:
        return None
    match = _TORCH_OPS_TARGET.fullmatch(target)
    if match is None:
        return f"node target {target!r} is not a torch.ops operator"
    namespace, name, overload = match.groups()
    try:
        resolved = getattr(getattr(getattr(torch.ops, namespace), name), overload) \
            if overload else getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError) as exc:
        return f"node target {target!r} is not a registered operator ({first_line(exc)})"
    if not isinstance(resolved, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return f"node target {target!r} resolves to {type(resolved).__name__}, not an operator"
    return None


def _check_sympy(text: object) -> str | None:
    """Why a symbolic expression may not go to ``sympy.sympify`` (which evaluates Python)."""
    if not isinstance(text, str):
        return f"a symbolic expression of type {type(text).__name__}"
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return f"symbolic expression {text!r} is not an expression"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _SYMPY_CALLS:
                return f"symbolic expression {text!r} calls something other than sympy"
        elif isinstance(node, ast.Name):
            if node.id not in _SYMPY_CALLS and node.id not in _SYMPY_NAMES \
                    and not _SYMBOL_NAME.fullmatch(node.id):
                return f"symbolic expression {text!r} names {node.id!r}"
        elif isinstance(node, ast.keyword):
            if node.arg is None or "__" in node.arg:
                return f"symbolic expression {text!r} has a keyword {node.arg!r}"
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float, str, bool)) or (
                    isinstance(node.value, str) and not _SYMBOL_NAME.fullmatch(node.value)
                    and not re.fullmatch(r"-?[\d./e+]+", node.value)):
                return f"symbolic expression {text!r} holds the constant {node.value!r}"
        elif not isinstance(node, (ast.Expression, ast.Load, ast.Tuple, ast.BinOp, ast.UnaryOp,
                                   ast.Compare, ast.BoolOp, ast.operator, ast.unaryop,
                                   ast.cmpop, ast.boolop)):
            return f"symbolic expression {text!r} uses {type(node).__name__}"
    return None


def _check_guard(text: object) -> str | None:
    """Why a guard may not be pasted into the Python source ``ExportedProgram.module()`` runs."""
    if not isinstance(text, str):
        return f"a guard of type {type(text).__name__}"
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return f"guard {text!r} is not an expression"
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if node.id not in ("L", "math", "torch"):
                return f"guard {text!r} names {node.id!r}"
        elif isinstance(node, ast.Attribute):
            base = node.value.id if isinstance(node.value, ast.Name) else None
            if base == "math" and node.attr in ("isnan", "inf"):
                continue
            if base == "torch" and isinstance(getattr(torch, node.attr, None), torch.dtype):
                continue
            if base is None and node.attr in _GUARD_ATTRIBUTES:
                continue
            return f"guard {text!r} reads the attribute {node.attr!r}"
        elif isinstance(node, ast.Constant):
            if node.value is not None and not isinstance(node.value, (int, float, str, bool)):
                return f"guard {text!r} holds the constant {node.value!r}"
        elif not isinstance(node, (ast.Expression, ast.Load, ast.Call, ast.Subscript,
                                   ast.Tuple, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp,
                                   ast.operator, ast.unaryop, ast.cmpop, ast.boolop)):
            return f"guard {text!r} uses {type(node).__name__}"
    return None


def _check_program(document: object) -> str | None:
    """Why ``models/model.json`` could run code, or ``None``."""
    if not isinstance(document, dict) or not isinstance(document.get("graph_module"), dict):
        return "models/model.json is not a serialised program"
    for guard in document.get("guards_code") or []:
        if (reason := _check_guard(guard)) is not None:
            return reason
    for name, bounds in (document.get("range_constraints") or {}).items():
        if not _SYMBOL_NAME.fullmatch(str(name)) or not isinstance(bounds, dict) or not all(
                bounds.get(k) is None or type(bounds.get(k)) is int
                for k in ("min_val", "max_val")):
            return f"range constraint {name!r}: {bounds!r} is not a symbol with integer bounds"
    for key, value in _walk(document):
        if key in ("custom_obj_values", "as_custom_obj", "custom_obj") and value:
            return f"a custom object ({key})"
        if key == "nodes" and isinstance(value, list):
            for node in value:
                target = node.get("target") if isinstance(node, dict) else node
                if (reason := _check_target(target)) is not None:
                    return reason
        elif key == "as_operator" and (reason := _check_target(value)) is not None:
            return reason
        elif key == "expr_str" and (reason := _check_sympy(value)) is not None:
            return reason
        elif key == "as_int" and type(value) is not int:
            return f"an integer argument holding {value!r}"
        elif key == "as_ints" and not (isinstance(value, list)
                                       and all(type(v) is int for v in value)):
            return f"an integer-list argument holding {value!r}"
        elif key == "as_float" and not isinstance(value, (int, float, str)) or (
                key == "as_float" and isinstance(value, str)
                and value not in ("Infinity", "-Infinity", "NaN")):
            return f"a float argument holding {value!r}"
        elif key == "inputs" and isinstance(value, list) and value \
                and all(isinstance(v, dict) and len(v) == 1 for v in value):
            for argument in value:  # the graph's own inputs: placeholders
                kind = next(iter(argument))
                if kind not in _GRAPH_INPUT_KINDS:
                    return f"a graph input of kind {kind!r}"
    return None


def _check_payload_config(path: Path, names: set[str], text: bytes, directory: str,
                          pattern: re.Pattern[str]) -> None:
    try:
        config = json.loads(text)
        entries = config["config"]
        if not isinstance(entries, dict):
            raise TypeError("config is not a mapping")
    except (ValueError, KeyError, TypeError) as exc:
        raise _refuse(path, f"{directory} has no readable config",
                      f"{type(exc).__name__}: {first_line(exc)}") from exc
    for fqn, entry in entries.items():
        if not isinstance(entry, dict) or entry.get("use_pickle") is not False:
            raise _refuse(path, "a tensor stored as a pickle (use_pickle), which torch loads "
                          "with weights_only=False", f"{directory}: {fqn!r}")
        member = f"{directory}{entry.get('path_name')}"
        if not pattern.fullmatch(member) or member not in names \
                or not isinstance(entry.get("tensor_meta"), dict):
            raise _refuse(path, "a tensor entry that is not a raw tensor in the archive",
                          f"{fqn!r} -> {entry.get('path_name')!r}")


def _check_sample_inputs(path: Path, data: bytes, max_bytes: int | None) -> None:
    """``weights_only=True`` must accept the entry, or torch retries with ``weights_only=False``."""
    if not data:
        return
    buffer = io.BytesIO(data)
    if zipfile.is_zipfile(buffer):
        entries = read_zip_entries(buffer)
        if any(e.compressed for e in entries) or (
                max_bytes is not None and sum(e.size for e in entries) > max_bytes):
            raise _refuse(path, "sample inputs that inflate beyond their size",
                          f"{sum(e.size for e in entries)} bytes declared")
    buffer.seek(0)
    try:
        torch.load(buffer, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure here sends torch to weights_only=False
        raise _refuse(path, "sample inputs that torch.load(weights_only=True) refuses, which "
                      "torch.export.load would retry with weights_only=False",
                      f"{type(exc).__name__}: {first_line(exc)}") from exc


def check_pt2_archive(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> None:
    """Refuse a ``.pt2`` archive that would make ``torch.export.load`` unpickle or run code.

    Only the zip directory and the archive's JSON and sample-input entries are read; tensors
    are not. See the module docstring for what is refused and why.

    Args:
        path: The archive.
        max_bytes: Refuse an archive whose members declare more bytes than this in all.

    Raises:
        UnsafeFileError: The archive holds something that would unpickle or run code, or a
            member ``torch.export.save`` does not write.
        InvalidInputError: The file is missing, not a zip archive, or larger than ``max_bytes``.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(format_message(
            "The .pt2 file does not exist", where=str(path), got="no such file",
            expected="a file written by torch.export.save", hint="check the path"))
    entries = read_zip_entries(path)
    roots = {e.name.split("/", 1)[0] for e in entries}
    if len(roots) != 1 or any("/" not in e.name for e in entries):
        raise _refuse(path, "members outside one archive folder", ", ".join(sorted(roots))[:200])
    root = roots.pop() + "/"
    members = {e.name[len(root):]: e for e in entries}
    if any(e.compressed for e in entries):
        raise _refuse(path, "compressed members (torch.export.save stores them raw)",
                      ", ".join(n for n, e in members.items() if e.compressed)[:200])
    declared = sum(e.size for e in entries)
    if max_bytes is not None and declared > max_bytes:
        raise InvalidInputError(format_message(
            "Refused to load the .pt2 archive: it declares more data than allowed", where=str(path),
            got=f"{declared} bytes", expected=f"at most {max_bytes} bytes",
            hint="pass a larger max_bytes if the program really is this large"))
    for name in members:
        if name in _FIXED_MEMBERS or _WEIGHT_MEMBER.fullmatch(name) \
                or _CONSTANT_MEMBER.fullmatch(name) or _EXTRA_MEMBER.fullmatch(name):
            continue
        raise _refuse(path, _member_reason(name), f"member {root}{name}")
    if "models/model.json" not in members or "archive_format" not in members:
        raise _refuse(path, "not the current .pt2 format (torch falls back to the older one, "
                      "which unpickles with weights_only=False)", ", ".join(sorted(members)))
    with zipfile.ZipFile(path) as archive:
        def read(name: str) -> bytes:
            return archive.read(root + name) if name in members else b""

        if read("archive_format") != b"pt2" or read("archive_version") != b"0":
            raise _refuse(path, "an archive format or version this loader does not know",
                          f"{read('archive_format')!r} version {read('archive_version')!r}")
        for directory, pattern in (("data/weights/", _WEIGHT_MEMBER),
                                   ("data/constants/", _CONSTANT_MEMBER)):
            config = f"{directory}model_{directory.split('/')[1]}_config.json"
            if config in members:
                _check_payload_config(path, set(members), read(config), directory, pattern)
            elif any(n.startswith(directory) for n in members):
                raise _refuse(path, f"{directory} without its config", config)
        _check_sample_inputs(path, read("data/sample_inputs/model.pt"), max_bytes)
        try:
            document = json.loads(read("models/model.json"))
        except ValueError as exc:
            raise _refuse(path, "models/model.json is not JSON", first_line(exc)) from exc
    if (reason := _check_program(document)) is not None:
        raise _refuse(path, "the program could run code when loaded or run", reason)


def load_exported_program(path: str | os.PathLike[str], *, max_bytes: int | None = None
                          ) -> torch.export.ExportedProgram:
    """Load a ``.pt2`` program after :func:`check_pt2_archive` found nothing that runs code.

    Args:
        path: A file written by ``torch.export.save`` (``bnsurgery fuse -o x.pt2`` writes one).
        max_bytes: Refuse an archive whose members declare more bytes than this in all.

    Returns:
        The program, as ``torch.export.load`` returns it.

    Raises:
        UnsafeFileError: See :func:`check_pt2_archive`; torch never saw the file.
        InvalidInputError: The file is missing or damaged, or torch cannot deserialise it.
    """
    check_pt2_archive(path, max_bytes=max_bytes)
    try:
        program = torch.export.load(os.fspath(path))
    except Exception as exc:  # torch raises many types for a damaged archive
        raise InvalidInputError(format_message(
            "torch.export.load could not read the .pt2 archive", where=str(path),
            got=f"{type(exc).__name__}: {first_line(exc)}",
            expected="a program written by torch.export.save in a compatible torch",
            hint="re-export the model with this version of torch")) from exc
    if not isinstance(program, torch.export.ExportedProgram):
        raise InvalidInputError(format_message(
            "The .pt2 archive did not hold an exported program", where=str(path),
            got=type(program).__name__, expected="an ExportedProgram",
            hint="write it with torch.export.save"))
    return program
