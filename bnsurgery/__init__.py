"""bnsurgery: BatchNorm model surgery and deployment.

A from-scratch BatchNorm that is a drop-in for ``torch.nn.BatchNorm1d/2d/3d``, swapping it into
(and out of) existing models, folding BatchNorm into neighbouring layers for deployment, and
exporting with numeric-equivalence checks.

``import bnsurgery`` imports nothing heavy: each public name loads its module (and torch) on first
use (PEP 562), so ``bnsurgery --help`` answers without paying for torch. onnx, onnxruntime,
torch-tensorrt and matplotlib load later still, when a function first needs them. Type checkers
see the ordinary imports in the ``TYPE_CHECKING`` branch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bnsurgery.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct2d
    from bnsurgery.calibrate import calibrate_batchnorm, randomize_batchnorm_affine
    from bnsurgery.errors import (
        BnSurgeryError,
        ExportError,
        FusionError,
        IncompatibleModuleError,
        InvalidInputError,
        MissingDependencyError,
        NonFiniteReferenceError,
        NumericMismatchError,
        ReplacementError,
        RunTimeoutError,
        UnsafeFileError,
    )
    from bnsurgery.functional import batch_norm
    from bnsurgery.fuse import (
        FoldedBatchNormAct,
        FoldRecord,
        FusionPlan,
        fuse_batchnorm,
        plan_fusion,
    )
    from bnsurgery.kernels import kernel_info
    from bnsurgery.models import load_model, load_state_dict_file
    from bnsurgery.onnx_compare import compare_onnx
    from bnsurgery.onnx_export import export_onnx
    from bnsurgery.onnx_fold import fold_onnx_batchnorm
    from bnsurgery.pairs import FoldPair, find_fold_pairs
    from bnsurgery.pt2 import load_exported_program
    from bnsurgery.recalibrate import RecalibrationReport, recalibrate_batchnorm
    from bnsurgery.reparam import (
        MergedBlock,
        ReparamPlan,
        plan_reparameterization,
        reparameterize_branches,
    )
    from bnsurgery.replace import (
        ReplacementHandle,
        ReplacementPlan,
        ReplacementRecord,
        convert_sync_batchnorm,
        plan_replacement,
        register_replacement,
        replace_batchnorm,
        restore_batchnorm,
    )
    from bnsurgery.report import (
        EquivalenceReport,
        LayerError,
        OutputComparison,
        Tolerance,
        plot_layer_errors,
        write_report_json,
    )
    from bnsurgery.sync_batchnorm import SyncBatchNorm, SyncBatchNormAct
    from bnsurgery.tensorrt import export_tensorrt, validate_tensorrt
    from bnsurgery.validate import TOLERANCES, compare_models, validate_onnx

from bnsurgery._version import __version__ as __version__

#: Which module defines each public name; read by :func:`__getattr__` on first access.
_EXPORTS: dict[str, str] = {
    "BatchNorm1d": "bnsurgery.batchnorm",
    "BatchNorm2d": "bnsurgery.batchnorm",
    "BatchNorm3d": "bnsurgery.batchnorm",
    "BatchNormAct2d": "bnsurgery.batchnorm",
    "BnSurgeryError": "bnsurgery.errors",
    "EquivalenceReport": "bnsurgery.report",
    "ExportError": "bnsurgery.errors",
    "FoldPair": "bnsurgery.pairs",
    "FoldRecord": "bnsurgery.fuse",
    "FoldedBatchNormAct": "bnsurgery.fuse",
    "FusionError": "bnsurgery.errors",
    "FusionPlan": "bnsurgery.fuse",
    "IncompatibleModuleError": "bnsurgery.errors",
    "InvalidInputError": "bnsurgery.errors",
    "LayerError": "bnsurgery.report",
    "MergedBlock": "bnsurgery.reparam",
    "MissingDependencyError": "bnsurgery.errors",
    "NonFiniteReferenceError": "bnsurgery.errors",
    "NumericMismatchError": "bnsurgery.errors",
    "OutputComparison": "bnsurgery.report",
    "RecalibrationReport": "bnsurgery.recalibrate",
    "ReparamPlan": "bnsurgery.reparam",
    "ReplacementError": "bnsurgery.errors",
    "ReplacementHandle": "bnsurgery.replace",
    "ReplacementPlan": "bnsurgery.replace",
    "ReplacementRecord": "bnsurgery.replace",
    "RunTimeoutError": "bnsurgery.errors",
    "SyncBatchNorm": "bnsurgery.sync_batchnorm",
    "SyncBatchNormAct": "bnsurgery.sync_batchnorm",
    "TOLERANCES": "bnsurgery.validate",
    "Tolerance": "bnsurgery.report",
    "UnsafeFileError": "bnsurgery.errors",
    "batch_norm": "bnsurgery.functional",
    "calibrate_batchnorm": "bnsurgery.calibrate",
    "compare_models": "bnsurgery.validate",
    "convert_sync_batchnorm": "bnsurgery.replace",
    "export_onnx": "bnsurgery.onnx_export",
    "export_tensorrt": "bnsurgery.tensorrt",
    "find_fold_pairs": "bnsurgery.pairs",
    "fuse_batchnorm": "bnsurgery.fuse",
    "kernel_info": "bnsurgery.kernels",
    "load_exported_program": "bnsurgery.pt2",
    "load_model": "bnsurgery.models",
    "load_state_dict_file": "bnsurgery.models",
    "plan_fusion": "bnsurgery.fuse",
    "plan_reparameterization": "bnsurgery.reparam",
    "plan_replacement": "bnsurgery.replace",
    "plot_layer_errors": "bnsurgery.report",
    "randomize_batchnorm_affine": "bnsurgery.calibrate",
    "recalibrate_batchnorm": "bnsurgery.recalibrate",
    "register_replacement": "bnsurgery.replace",
    "reparameterize_branches": "bnsurgery.reparam",
    "replace_batchnorm": "bnsurgery.replace",
    "restore_batchnorm": "bnsurgery.replace",
    "validate_onnx": "bnsurgery.validate",
    "compare_onnx": "bnsurgery.onnx_compare",
    "fold_onnx_batchnorm": "bnsurgery.onnx_fold",
    "validate_tensorrt": "bnsurgery.tensorrt",
    "write_report_json": "bnsurgery.report",
}


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first access and cache the result."""
    module_name = _EXPORTS.get(name)
    if module_name is None:
        if name.startswith("_"):  # dunder probes (copy, pickle, inspect) are not submodules
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        # ``bnsurgery.fuse`` and friends keep working as attribute access to submodules.
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct2d",
    "BnSurgeryError",
    "EquivalenceReport",
    "ExportError",
    "FoldPair",
    "FoldRecord",
    "FoldedBatchNormAct",
    "FusionError",
    "FusionPlan",
    "IncompatibleModuleError",
    "InvalidInputError",
    "LayerError",
    "MergedBlock",
    "MissingDependencyError",
    "NonFiniteReferenceError",
    "NumericMismatchError",
    "OutputComparison",
    "RecalibrationReport",
    "ReparamPlan",
    "ReplacementError",
    "ReplacementHandle",
    "ReplacementPlan",
    "ReplacementRecord",
    "RunTimeoutError",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "TOLERANCES",
    "Tolerance",
    "UnsafeFileError",
    "batch_norm",
    "calibrate_batchnorm",
    "compare_models",
    "compare_onnx",
    "convert_sync_batchnorm",
    "export_onnx",
    "export_tensorrt",
    "find_fold_pairs",
    "fold_onnx_batchnorm",
    "fuse_batchnorm",
    "kernel_info",
    "load_exported_program",
    "load_model",
    "load_state_dict_file",
    "plan_fusion",
    "plan_reparameterization",
    "plan_replacement",
    "plot_layer_errors",
    "randomize_batchnorm_affine",
    "recalibrate_batchnorm",
    "register_replacement",
    "reparameterize_branches",
    "replace_batchnorm",
    "restore_batchnorm",
    "validate_onnx",
    "validate_tensorrt",
    "write_report_json",
]
