"""bnsurgery: BatchNorm model surgery and deployment.

A from-scratch BatchNorm that is a drop-in for ``torch.nn.BatchNorm1d/2d/3d``, swapping it into
(and out of) existing models, folding BatchNorm into neighbouring layers for deployment, and
exporting with numeric-equivalence checks. ``import bnsurgery`` imports torch and nothing else
heavy; onnx, onnxruntime, torch-tensorrt and matplotlib load when first needed.
"""

from bnsurgery.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct2d
from bnsurgery.calibrate import calibrate_batchnorm, randomize_batchnorm_affine
from bnsurgery.errors import (
    BnSurgeryError,
    ExportError,
    FusionError,
    IncompatibleModuleError,
    InvalidInputError,
    MissingDependencyError,
    NumericMismatchError,
    ReplacementError,
    UnsafeFileError,
)
from bnsurgery.functional import batch_norm
from bnsurgery.fuse import FoldedBatchNormAct, FoldRecord, FusionPlan, fuse_batchnorm, plan_fusion
from bnsurgery.pairs import FoldPair, find_fold_pairs
from bnsurgery.replace import (
    ReplacementPlan,
    ReplacementRecord,
    plan_replacement,
    register_replacement,
    replace_batchnorm,
    restore_batchnorm,
)
from bnsurgery.sync_batchnorm import SyncBatchNorm, SyncBatchNormAct

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct2d",
    "BnSurgeryError",
    "ExportError",
    "FoldPair",
    "FoldRecord",
    "FoldedBatchNormAct",
    "FusionError",
    "FusionPlan",
    "IncompatibleModuleError",
    "InvalidInputError",
    "MissingDependencyError",
    "NumericMismatchError",
    "ReplacementError",
    "ReplacementPlan",
    "ReplacementRecord",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "UnsafeFileError",
    "batch_norm",
    "calibrate_batchnorm",
    "find_fold_pairs",
    "fuse_batchnorm",
    "plan_fusion",
    "plan_replacement",
    "randomize_batchnorm_affine",
    "register_replacement",
    "replace_batchnorm",
    "restore_batchnorm",
]
