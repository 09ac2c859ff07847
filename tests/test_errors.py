"""The error hierarchy and the message shape every raise site shares."""

from __future__ import annotations

import pytest

from bnsurgery import errors


@pytest.mark.parametrize(("cls", "builtin"), [
    (errors.InvalidInputError, ValueError), (errors.IncompatibleModuleError, TypeError),
    (errors.ReplacementError, RuntimeError), (errors.FusionError, RuntimeError),
    (errors.ExportError, RuntimeError), (errors.NumericMismatchError, RuntimeError),
    (errors.UnsafeFileError, ValueError), (errors.MissingDependencyError, ImportError),
    (errors.BackendRunError, RuntimeError), (errors.DistributedRunError, RuntimeError),
    (errors.RunTimeoutError, TimeoutError), (errors.ExportMismatchError, errors.ExportError),
    (errors.ExportMismatchError, errors.NumericMismatchError),
])
def test_every_error_is_also_its_builtin(cls, builtin):
    assert issubclass(cls, errors.BnSurgeryError) and issubclass(cls, builtin)


def test_message_shape():
    text = errors.format_message("BatchNorm2d(4) got the wrong number of channels", where="bn1",
                                 got="3 channels", expected="4 channels",
                                 hint="check the layer before")
    assert text == ("BatchNorm2d(4) got the wrong number of channels (at bn1). Got 3 channels; "
                    "expected 4 channels.\nHint: check the layer before")


def test_message_keeps_the_case_of_values():
    assert "Got dtype torch.Int64" in errors.format_message("x", got="dtype torch.Int64")
