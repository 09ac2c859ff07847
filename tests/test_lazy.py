"""Lazy optional imports: a missing package is an error that names the extra to install."""

from __future__ import annotations

import sys

import pytest

from bnsurgery import _lazy
from bnsurgery.errors import MissingDependencyError


def test_require_returns_the_module():
    assert _lazy.require("json", purpose="Testing") is sys.modules["json"]


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # import now raises ImportError
    with pytest.raises(MissingDependencyError,
                       match=r"TensorRT export needs the Python package 'torch_tensorrt'"
                             r"(.|\n)*Hint: pip install 'bnsurgery\[gpu\]'"):
        _lazy.require("torch_tensorrt", purpose="TensorRT export")
    assert not _lazy.is_available("torch_tensorrt")


def test_is_available():
    assert _lazy.is_available("json")
