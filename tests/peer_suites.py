"""Shared plumbing for the ports of torch's and timm's own BatchNorm test suites.

The ports run every check twice in one test: on torch's class (the baseline) and on bnsurgery's.
A case that torch's own implementation fails is recorded as an expected failure naming torch, and
is not counted as a bnsurgery pass; a case that needs the function-transform support of the
autograd node (forward AD, vmap, batched gradients, TorchScript) is listed by each test file in
``NEEDS_FUNC_TRANSFORMS`` and runs as a strict expected failure, so it turns into a failure the
moment that support lands and the list must shrink.

``torch.testing._internal`` imports ``expecttest`` at the top of ``common_utils`` only to subclass
its ``TestCase`` for inline-expectation tests, which none of the pieces used here (``module_db``,
``gradcheck``, ``freeze_rng_state``) touch. Where the package is missing, a stand-in with a plain
``unittest.TestCase`` is registered before the import; ``expecttest`` is a dev extra, so a full
development install uses the real one.
"""

from __future__ import annotations

import contextlib
import sys
import types
import unittest
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
from torch import nn

import bnsurgery

__all__ = [
    "BNSURGERY_CLASSES",
    "TORCH_FAILS_PREFIX",
    "assert_equal",
    "import_torch_testing",
    "one_thread",
    "randomize_state",
    "run_on_both",
]

#: torch's class -> bnsurgery's drop-in.
BNSURGERY_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: bnsurgery.BatchNorm1d,
    nn.BatchNorm2d: bnsurgery.BatchNorm2d,
    nn.BatchNorm3d: bnsurgery.BatchNorm3d,
}

#: Start of the reason of every expected failure that torch's own implementation causes; the
#: README's counts are ``pytest -rx`` lines with this prefix.
TORCH_FAILS_PREFIX = "torch's own implementation fails this case"


def import_torch_testing() -> None:
    """Make ``torch.testing._internal`` importable without ``expecttest`` (see module doc)."""
    try:
        import expecttest  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("expecttest")
        stand_in.TestCase = unittest.TestCase
        stand_in.ACCEPT = False
        sys.modules["expecttest"] = stand_in


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch single-threaded for the duration, then restore the thread count.

    The suites' tensors have tens of values; on a loaded machine the intra-op thread pool of
    torch's own kernels then costs a hundred times the arithmetic, for both implementations.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def randomize_state(module: nn.Module, seed: int) -> None:
    """Give ``module`` random affine parameters and running statistics, reproducibly.

    Default statistics (zero mean, unit variance, unit weight, zero bias) make evaluation mode an
    identity, under which a wrong formula can still pass.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if not tensor.is_floating_point():
                continue
            values = torch.rand(tensor.shape, generator=generator, dtype=torch.float64)
            if name.endswith("running_var") or name.endswith("weight"):
                values = values + 0.5  # positive, away from zero
            else:
                values = values - 0.5
            tensor.copy_(values.to(tensor.dtype))


def assert_equal(actual: object, expected: object) -> None:
    """Plain equality, for results that are not tensors (names, shapes, repr strings)."""
    assert actual == expected, f"{actual!r} != {expected!r}"


def run_on_both(check: Callable[[str, int], object], samples: Sequence[str],
                compare: Callable[[object, object], None] | None = None) -> None:
    """Run ``check(impl, index)`` on torch, then on bnsurgery, for every sample; compare.

    A sample that torch's own implementation fails is recorded (the test ends as an expected
    failure naming torch and those samples, once bnsurgery has run every other sample) and is
    not counted; a sample that bnsurgery fails, or whose result differs from torch's, fails the
    test with the sample's name.
    """
    torch_failures = []
    for index, sample in enumerate(samples):
        try:
            baseline = check("torch", index)
        except (Exception, pytest.fail.Exception) as error:  # any failure of the baseline
            torch_failures.append(f"{sample}: {type(error).__name__}: {error}"[:200])
            continue
        try:
            ours = check("bnsurgery", index)
            if compare is not None:
                compare(ours, baseline)
        except (Exception, pytest.fail.Exception) as error:
            raise AssertionError(f"bnsurgery fails sample {sample!r} that torch passes: "
                                 f"{type(error).__name__}: {error}") from error
    if torch_failures:
        pytest.xfail(f"{TORCH_FAILS_PREFIX}: " + "; ".join(torch_failures))
