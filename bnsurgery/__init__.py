"""bnsurgery: BatchNorm model surgery and deployment.

A from-scratch BatchNorm that is a drop-in for ``torch.nn.BatchNorm1d/2d/3d``, swapping it into
(and out of) existing models, folding BatchNorm into neighbouring layers for deployment, and
exporting with numeric-equivalence checks. ``import bnsurgery`` imports torch and nothing else
heavy; onnx, onnxruntime, torch-tensorrt and matplotlib load when first needed.
"""

from bnsurgery._version import __version__ as __version__
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
from bnsurgery.fuse import FoldedBatchNormAct, FoldRecord, FusionPlan, fuse_batchnorm, plan_fusion
from bnsurgery.kernels import kernel_info
from bnsurgery.models import load_model, load_state_dict_file
from bnsurgery.onnx_export import export_onnx
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
    "convert_sync_batchnorm",
    "export_onnx",
    "export_tensorrt",
    "find_fold_pairs",
    "fuse_batchnorm",
    "load_exported_program",
    "kernel_info",
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
