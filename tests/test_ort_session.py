"""Tests for bnsurgery.ort_session: onnxruntime execution providers."""

from __future__ import annotations

import pytest

from bnsurgery.errors import InvalidInputError, MissingDependencyError
from bnsurgery.ort_session import resolve_providers

ort = pytest.importorskip("onnxruntime")


def test_resolve_providers():
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(InvalidInputError, match="Unknown onnxruntime execution provider"):
        resolve_providers("gpu9000")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this onnxruntime has the CUDA provider")
def test_unavailable_provider_names_the_extra():
    with pytest.raises(MissingDependencyError, match=r"pip install 'bnsurgery\[gpu\]'"):
        resolve_providers("cuda")
