"""JSON-ready forms of result dataclasses.

Every check and plan bnsurgery returns is a small frozen dataclass whose ``to_dict()`` must give
something ``json.dumps`` accepts and a reader can load back: tuples become lists, paths and
dtypes become strings, and non-finite floats become the strings ``"inf"``/``"nan"`` (JSON has no
number for them). :class:`JsonResult` derives ``to_dict()`` from the dataclass fields so that a
field added later cannot be forgotten in the JSON form.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = ["JsonResult", "json_float", "jsonable"]


def json_float(value: float | None) -> float | str | None:
    """``value`` as a float, or as a string when it is not finite (JSON cannot hold inf/nan)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else str(value)


def jsonable(value: Any) -> Any:
    """Turn nested containers of results, paths, tuples and numbers into JSON-ready values."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return json_float(value)
    if hasattr(value, "to_dict"):
        return jsonable(value.to_dict())
    return str(value)


class JsonResult:
    """Base of result dataclasses: ``to_dict()`` built from the fields.

    Not ``dataclasses.asdict`` itself: it deep-copies every value and turns nested results into
    plain field dictionaries, losing their derived entries (``passed``, ``status``). Each field
    goes through :func:`jsonable` instead, which asks nested results for their own ``to_dict()``.

    Attributes:
        json_derived: Properties added after the fields (values computed from them).
        json_omitted: Fields left out (objects that are not data, such as a model).
    """

    json_derived: ClassVar[tuple[str, ...]] = ()
    json_omitted: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: every field, then the derived properties."""
        data = {f.name: jsonable(getattr(self, f.name))
                for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if f.name not in self.json_omitted}
        data.update({name: jsonable(getattr(self, name)) for name in self.json_derived})
        return data
