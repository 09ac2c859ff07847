"""Architecture rules read from the source: no function in the package runs over 80 lines
(``def`` to its last line, docstring included) unless its docstring says why on a line starting
with ``Length:``.

A long function usually does several jobs; splitting it into named steps is what makes each one
readable and testable. Where a long function is still the clearest form, the reason is written
where the next reader will look for it.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80



def long_functions(source: str, *, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    """Every function (nested and methods too) longer than ``limit`` lines whose docstring has
    no line starting with ``Length:``, as (name, lines)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        lines = node.end_lineno - node.lineno + 1
        docstring = ast.get_docstring(node) or ""
        excused = any(line.strip().startswith("Length:") for line in docstring.splitlines())
        if lines > limit and not excused:
            found.append((node.name, lines))
    return found


def test_the_length_check_can_fail():
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    long = f"def long():\n    '''Doc.'''\n{body}\n"
    assert long_functions(long) == [("long", 82)]
    excused = f"def long():\n    '''Doc.\n\n    Length: one table.\n    '''\n{body}\n"
    assert long_functions(excused) == []
    nested = "class A:\n" + textwrap.indent(long, "    ")
    assert long_functions(nested) == [("long", 82)]
    short = "def short():\n" + "\n".join(f"    x{i} = {i}" for i in range(79))
    assert long_functions(short) == []  # exactly 80 lines is allowed


def test_no_function_in_the_package_is_over_80_lines():
    offenders = []
    for path in sorted((ROOT / "bnsurgery").glob("*.py")):
        for name, lines in long_functions(path.read_text()):
            offenders.append(f"{path.name}:{name} ({lines} lines)")
    assert offenders == [], ("split these into steps, or give the reason on a 'Length:' line "
                             f"of the docstring: {offenders}")

