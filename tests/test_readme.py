"""Every ```python block of README.md runs verbatim, in order, as one script would.

The blocks share one namespace, like the cells of a notebook: a later block may use what an
earlier one defined. They run in a temporary working directory, so the files they write go
nowhere. A block that cannot run here is marked in README.md by an HTML comment on the line
before it, ``<!-- not run: REASON -->``, and shows as skipped with that reason, never as passed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"(?:<!-- not run: (?P<reason>.*?) -->\n)?```python\n(?P<code>.*?)^```",
                    re.S | re.M)


def _blocks() -> list[tuple[int, str, str | None]]:
    text = README.read_text()
    return [(text[:m.start("code")].count("\n") + 1, m["code"], m["reason"])
            for m in _BLOCK.finditer(text)]


BLOCKS = _blocks()
_state: dict[str, object] = {"namespace": {"__name__": "__readme__"}, "failed": None}


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 5
    assert all(code.strip() for _, code, _ in BLOCKS)


@pytest.mark.parametrize(("line", "code", "reason"), BLOCKS,
                         ids=[f"README.md:{line}" for line, _, _ in BLOCKS])
def test_readme_block_runs(line, code, reason, tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    if reason:
        pytest.skip(f"README.md:{line} is marked not run: {reason}")
    if _state["failed"] is not None:
        pytest.skip(f"an earlier block ({_state['failed']}) failed, so this one cannot run")
    monkeypatch.chdir(tmp_path)
    compiled = compile(code, f"README.md:{line}", "exec")
    try:
        exec(compiled, _state["namespace"])  # noqa: S102 - the point of the test
    except BaseException:
        _state["failed"] = f"README.md:{line}"
        raise
