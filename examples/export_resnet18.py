"""Fold, export and validate resnet18: the deployment path in a dozen lines.

Uses random weights with calibrated BatchNorm state so it runs offline; with network access use
``torchvision.models.resnet18(weights="DEFAULT")`` instead of the first two lines.

Run:  .venv/bin/python examples/export_resnet18.py [OUT.onnx]
"""

import sys

import torch
import torchvision

from bnsurgery.calibrate import calibrate_batchnorm
from bnsurgery.onnx_export import export_onnx
from bnsurgery.report import write_report_json
from bnsurgery.validate import validate_onnx

model = torchvision.models.resnet18().eval()
model = calibrate_batchnorm(model, torch.randn(4, 3, 224, 224)).eval()

inputs = torch.randn(2, 3, 224, 224)
path = export_onnx(model, inputs, sys.argv[1] if len(sys.argv) > 1 else "resnet18.onnx")

# Compare the file with the ORIGINAL model: batch 1, 2 and 5, CUDA provider when available.
report = validate_onnx(model, path, inputs)
print(report)
write_report_json(report, path.with_suffix(".report.json"))
sys.exit(0 if report.passed else 1)
