"""The package metadata says what is shipped and tested: licence, type information, torch range."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; 3.10 has no TOML reader of its own

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2])


def test_license_is_an_spdx_expression_with_its_file():
    project = PROJECT["project"]
    assert isinstance(project["license"], str)  # the table form is deprecated by setuptools
    assert project["license"] == "BSD-3-Clause"
    for name in project["license-files"]:
        assert "BSD 3-Clause License" in (ROOT / name).read_text()


def test_py_typed_is_shipped():
    assert (ROOT / "bnsurgery" / "py.typed").is_file()
    assert "py.typed" in PROJECT["tool"]["setuptools"]["package-data"]["bnsurgery"]


def _mypy(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install 'bnsurgery[dev]')")
    return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, check=False)


def test_mypy_strict_finds_nothing_in_the_package():
    # py.typed promises users checked annotations: plain `mypy bnsurgery` is the strict check.
    assert PROJECT["tool"]["mypy"]["strict"] is True
    result = _mypy("bnsurgery", cwd=ROOT)
    assert result.returncode == 0, f"mypy bnsurgery failed:\n{result.stdout}{result.stderr}"


def test_the_mypy_check_can_fail(tmp_path):
    # An unannotated function is an error only in strict mode: the settings above are in force.
    module = tmp_path / "unannotated.py"
    module.write_text("def double(value):\n    return value * 2\n")
    result = _mypy("--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", os.devnull,
                   str(module), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "unannotated.py:1: error: Function is missing a type annotation" in result.stdout


def test_torch_floor_is_the_tested_release():
    # The suite runs on one torch release; the floor claims no older one than that.
    requirement = next(r for r in PROJECT["project"]["dependencies"] if r.startswith("torch>="))
    floor = _release(requirement.removeprefix("torch>="))
    assert floor <= _release(version("torch"))
    assert floor >= (2, 14)


def test_every_kernel_source_is_shipped():
    """The compiled CPU kernel is built on the user's machine from the sources in the wheel."""
    from fnmatch import fnmatch

    from bnsurgery import kernel_cpp

    patterns = PROJECT["tool"]["setuptools"]["package-data"]["bnsurgery"]
    package = Path(kernel_cpp.__file__).parent
    assert kernel_cpp.SOURCES[0] == kernel_cpp.SOURCE
    # Every source in csrc/ is compiled into the library and part of its cache key.
    assert set((package / "csrc").glob("*.cpp")) == set(kernel_cpp.SOURCES)
    # Every header is part of the key too (a change to it must rebuild), and ships.
    assert set((package / "csrc").glob("*.h")) == set(kernel_cpp.HEADERS)
    for source in (*kernel_cpp.SOURCES, *kernel_cpp.HEADERS):
        assert source.is_file(), source
        relative = source.relative_to(package).as_posix()
        assert any(fnmatch(relative, pattern) for pattern in patterns), relative
