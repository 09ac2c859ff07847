"""Shared test fixtures: seeding, calibrated models, and a spy for torch's batch-norm kernels."""

from __future__ import annotations

import importlib.abc
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: Substrings of aten operator names that belong to torch's batch-norm family.
BATCH_NORM_OP_MARKERS = ("batch_norm", "native_batch_norm", "_batch_norm", "cudnn_batch_norm",
                         "miopen_batch_norm", "batch_norm_stats", "batch_norm_elemt")


class AtenOpRecorder(TorchDispatchMode):
    """Records the name of every aten operator that runs while it is active."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))

    def batch_norm_ops(self) -> list[str]:
        return sorted({op for op in self.ops if any(m in op for m in BATCH_NORM_OP_MARKERS)})


try:  # CI replays a fixed set of property-test examples; local runs keep exploring.
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        _hypothesis_settings.load_profile("ci")
except ImportError:  # hypothesis is a dev extra; only the property tests need it
    pass


def pytest_addoption(parser):
    parser.addoption(
        "--block-import", action="append", default=[], metavar="PACKAGE",
        help="make importing PACKAGE (and its submodules) fail as if it were not installed; "
             "repeatable. Shows which tests need an optional package: those skip, the rest run.")


class ImportBlocker(importlib.abc.MetaPathFinder):
    """A meta-path finder that refuses the named top-level packages, as if never installed."""

    def __init__(self, blocked: set[str]) -> None:
        self.blocked = blocked

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by --block-import)",
                                      name=name)
        return None


def pytest_configure(config):
    blocked = {name for option in config.getoption("block_import") for name in option.split(",")
               if name}
    if not blocked:
        return
    # A package imported before this point (by a plugin) would stay importable: refuse to run
    # rather than report a check that did not happen.
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in blocked)
    if loaded:
        raise pytest.UsageError(f"--block-import: already imported before the tests: {loaded}")
    sys.meta_path.insert(0, ImportBlocker(blocked))


@pytest.fixture(scope="session")
def torchvision():
    """torchvision, or a skip of the test that needs it."""
    return pytest.importorskip("torchvision")


@pytest.fixture(scope="session")
def timm():
    """timm, or a skip of the test that needs it."""
    return pytest.importorskip("timm")
@pytest.fixture(scope="session", autouse=True)
def _compiled_kernels():
    """Build the compiled CPU kernel once, first, so that no single test (or its timeout) pays
    for the build. Where it cannot be built the reference backend runs, and
    ``test_kernel_cpp.py`` reports why."""
    import warnings

    from bnsurgery import kernel_cpp
    from bnsurgery.errors import KernelUnavailableError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            kernel_cpp.build()
        except KernelUnavailableError:
            pass
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def has_cuda() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


#: Input shape of the calibrated resnet18 shared by the validation and divergence tests.
RESNET18_SHAPE = (2, 3, 64, 64)


def _calibrated_resnet18() -> torch.nn.Module:
    torchvision = pytest.importorskip("torchvision")
    from bnsurgery.calibrate import calibrate_batchnorm

    model = torchvision.models.resnet18(num_classes=10).eval()
    return calibrate_batchnorm(model, torch.randn(RESNET18_SHAPE), seed=3).eval()


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return _calibrated_resnet18()


@pytest.fixture(scope="module")
def resnet18_onnx(resnet18, tmp_path_factory):
    from bnsurgery.onnx_export import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "resnet18.onnx"
    return export_onnx(resnet18, torch.randn(1, 3, 64, 64), path, fuse=True)


@pytest.fixture
def inputs():
    return torch.randn(RESNET18_SHAPE, generator=torch.Generator().manual_seed(7))


def pytest_collection_finish(session):
    """Undo what importing ``torch.testing._internal.common_utils`` (the peer-suite ports) does.

    That module calls ``torch.backends.disable_global_flags()`` on import, after which setting
    a backend flag such as ``cudnn.allow_tf32`` raises: bnsurgery's validation sets them (in a
    context that restores them), so every later test would see an error no user sees.
    """
    import torch.backends

    if torch.backends.flags_frozen():
        # The flag lives in the globals of torch/backends/__init__.py, which has no setter.
        torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
        assert not torch.backends.flags_frozen()
