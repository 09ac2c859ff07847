"""The versioned JSON document of the command line, and a checker for the schema subset it uses.

Every command prints one document with ``--json`` and writes the same document (plus the
environment) with ``--report``, so a pipeline reads one set of keys whatever the command. The
schema ships in the package as ``report_schema.json`` (JSON Schema 2020-12); :func:`check_document`
checks a document against the part of JSON Schema that file uses, so the command line can check
what it prints without a ``jsonschema`` dependency.

A check's status is one of ``passed``, ``failed`` or ``skipped`` (with the reason in ``skipped``);
``passed`` is ``null`` for a skipped check, never ``false``: nothing was checked either way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bnsurgery.report import EquivalenceReport

__all__ = [
    "SCHEMA_VERSION",
    "check_document",
    "load_schema",
    "overall_status",
    "passed_value",
    "report_entry",
]

SCHEMA_VERSION = 1

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "null": (type(None),), "integer": (int,), "number": (int, float),
}


@cache
def load_schema() -> dict[str, Any]:
    """The JSON Schema of the documents, as shipped in the package."""
    text = resources.files("bnsurgery").joinpath("report_schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)  # the shipped file holds one JSON object
    return schema


def passed_value(status: str) -> bool | None:
    """The ``passed`` key for ``status``: ``None`` when nothing was checked."""
    return {"passed": True, "failed": False}.get(status)


def overall_status(statuses: Iterable[str]) -> str:
    """One status for several checks: failed if any failed, passed if any ran, else skipped."""
    statuses = list(statuses)
    if "failed" in statuses:
        return "failed"
    return "passed" if "passed" in statuses else "skipped"


def report_entry(report: EquivalenceReport) -> dict[str, Any]:
    """An :class:`~bnsurgery.report.EquivalenceReport` as the schema's ``report`` entry.

    The report's own ``status`` text (``"skipped: <reason>"``, ``"FAILED"``) becomes the bare
    ``skipped`` / ``failed``, and ``passed`` is ``None`` for a check that did not run.
    """
    entry = report.to_dict()
    if report.skipped is not None:
        status = "skipped"
    else:
        status = "passed" if report.passed else "failed"
    entry.update(status=status, passed=passed_value(status))
    return entry


def check_document(document: Any, schema: Mapping[str, Any] | None = None) -> list[str]:
    """Check ``document`` against ``schema`` (default: the shipped one).

    Supports the keywords ``report_schema.json`` uses: ``type``, ``enum``, ``const``,
    ``required``, ``properties``, ``items``, ``oneOf``, ``minimum`` and local ``$ref``.

    Returns:
        One line per violation, naming where (``$.reports[0].status``) and what; empty when the
        document conforms.
    """
    root = load_schema() if schema is None else schema
    errors: list[str] = []
    _check(document, root, root, "$", errors)
    return errors


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    while "$ref" in schema:
        node: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def _is_type(value: Any, name: str) -> bool:
    if isinstance(value, bool) and name in ("integer", "number"):
        return False  # JSON booleans are not numbers, though Python's bool is an int
    return isinstance(value, _TYPES[name])


def _same(value: Any, expected: Any) -> bool:
    # JSON tells true from 1, Python's == does not.
    return value == expected and isinstance(value, bool) == isinstance(expected, bool)


def _check(value: Any, schema: Mapping[str, Any], root: Mapping[str, Any], where: str,
           errors: list[str]) -> None:
    schema = _resolve(schema, root)
    if "oneOf" in schema:
        matches = 0
        for option in schema["oneOf"]:
            found: list[str] = []
            _check(value, option, root, where, found)
            matches += not found
        if matches != 1:
            errors.append(f"{where}: matches {matches} of the oneOf alternatives, expected 1")
        return
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, name) for name in names):
            errors.append(f"{where}: {type(value).__name__} {value!r:.60}, expected "
                          f"{' or '.join(names)}")
            return
    if "const" in schema and not _same(value, schema["const"]):
        errors.append(f"{where}: {value!r:.60}, expected {schema['const']!r}")
    if "enum" in schema and not any(_same(value, option) for option in schema["enum"]):
        errors.append(f"{where}: {value!r:.60}, expected one of {schema['enum']}")
    if "minimum" in schema and _is_type(value, "number") and value < schema["minimum"]:
        errors.append(f"{where}: {value!r} is below the minimum {schema['minimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                errors.append(f"{where}: missing key {key!r}")
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                _check(value[key], sub, root, f"{where}.{key}", errors)
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            _check(item, schema["items"], root, f"{where}[{index}]", errors)
