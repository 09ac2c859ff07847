"""Tests for bnsurgery.onnx_export: one checked file, a real dynamic batch, atomic writes."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import TinyNet
from torch import nn

from bnsurgery.calibrate import calibrate_batchnorm
from bnsurgery.errors import ExportError, InvalidInputError, NumericMismatchError
from bnsurgery.onnx_export import export_onnx
from bnsurgery.validate import validate_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


class TwoInTwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6))

    def forward(self, image, vector):
        return self.a(image), self.b(vector)


class FixedBatch(nn.Module):
    """Adds a per-row table of two rows: only a batch of two broadcasts, so the batch is fixed."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("table", torch.randn(2, 4))

    def forward(self, x):
        return self.conv(x).mean((2, 3)) + self.table


def _calibrated(model: nn.Module, *inputs: torch.Tensor) -> nn.Module:
    return calibrate_batchnorm(model.eval(), inputs, seed=1).eval()


def _ort_session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options,
                                providers=["CPUExecutionProvider"])


ZOO = [
    pytest.param("resnet18", id="resnet18"),
    pytest.param("mobilenet_v3_small", id="mobilenet_v3_small"),
    pytest.param("efficientnet_b0", id="efficientnet_b0", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name", ZOO)
def test_export_and_validate_zoo(torchvision, name, tmp_path):
    """The acceptance check: one checked file, batches 1 and 5, float32-grade accuracy."""
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    model = _calibrated(model, torch.randn(4, 3, 64, 64))
    original = copy.deepcopy(model.state_dict())
    # Exported from a batch of one: the exporter must still produce a real dynamic batch.
    path = export_onnx(model, torch.randn(1, 3, 64, 64), tmp_path / f"{name}.onnx")

    assert [p.name for p in tmp_path.iterdir()] == [f"{name}.onnx"]  # one file, no sidecar
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    assert all(init.data_location == onnx.TensorProto.DEFAULT for init in proto.graph.initializer)
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert metadata["bnsurgery.exporter"] == "torch.onnx.export(dynamo=True)"
    assert metadata["bnsurgery.fused"] == "true"
    assert not any(node.op_type == "BatchNormalization" for node in proto.graph.node)

    inputs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    report = validate_onnx(model, path, inputs, providers="cpu")
    assert report.passed, str(report)
    assert {1, 5} <= {o.batch for o in report.outputs}
    for output in report.outputs:
        assert output.float64_error <= 2 * output.reference_float64_error + 1e-6 * output.scale
    # Exporting worked on a folded copy: the caller's model is untouched.
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_export_without_fusing(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    model = _calibrated(TinyNet(), x)
    path = export_onnx(model, x, tmp_path / "tiny.onnx", fuse=False)
    proto = onnx.load(str(path))
    assert {p.key: p.value for p in proto.metadata_props}["bnsurgery.fused"] == "false"
    assert validate_onnx(model, path, x, providers="cpu").passed


def test_static_batch(tmp_path):
    x = torch.randn(3, 3, 8, 8)
    model = _calibrated(TinyNet(), x)
    path = export_onnx(model, x, tmp_path / "static.onnx", dynamic_batch=False)
    assert _ort_session(path).get_inputs()[0].shape[0] == 3


def test_several_inputs_and_outputs(tmp_path):
    image, vector = torch.randn(1, 3, 4, 4), torch.randn(1, 6)
    model = _calibrated(TwoInTwoOut(), torch.randn(4, 3, 4, 4), torch.randn(4, 6))
    path = export_onnx(model, (image, vector), tmp_path / "two.onnx")
    session = _ort_session(path)
    assert [i.name for i in session.get_inputs()] == ["input_0", "input_1"]
    assert [o.name for o in session.get_outputs()] == ["output_0", "output_1"]
    report = validate_onnx(model, path, (torch.randn(2, 3, 4, 4), torch.randn(2, 6)),
                           providers="cpu")
    assert report.passed, str(report)
    assert {o.name for o in report.outputs} == {"output[0]", "output[1]"}


def test_legacy_exporter_only_when_asked_and_recorded(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    model = _calibrated(TinyNet(), x)
    path = export_onnx(model, x, tmp_path / "legacy.onnx", exporter="legacy", opset=17)
    proto = onnx.load(str(path))
    assert {o.domain: o.version for o in proto.opset_import}[""] == 17
    report = validate_onnx(model, path, x, providers="cpu")
    assert report.passed
    assert "legacy" in report.details["exporter"]
    assert "legacy" in str(report)


def test_training_mode_is_refused(tmp_path):
    model = TinyNet().train()
    with pytest.raises(InvalidInputError, match=r"eval mode.*running statistics"):
        export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "x.onnx")
    # Only one BatchNorm left in training mode is enough to refuse.
    model.eval()
    model.bn.train()
    with pytest.raises(InvalidInputError, match=r"at bn"):
        export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "x.onnx")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"opset": 13}, "cannot target this opset", id="opset-below-18"),
        pytest.param({"opset": "18"}, "must be an integer", id="opset-not-int"),
        pytest.param({"exporter": "torchscript"}, "Unknown ONNX exporter", id="bad-exporter"),
    ],
)
def test_bad_options(options, message, tmp_path):
    with pytest.raises(InvalidInputError, match=message):
        export_onnx(TinyNet().eval(), torch.randn(2, 3, 8, 8), tmp_path / "x.onnx", **options)


def test_bad_inputs_and_destination(tmp_path):
    model = TinyNet().eval()
    with pytest.raises(InvalidInputError, match="tensor"):
        export_onnx(model, [1, 2, 3], tmp_path / "x.onnx")
    with pytest.raises(InvalidInputError, match="does not run on the example inputs"):
        export_onnx(model, torch.randn(2, 5, 8, 8), tmp_path / "x.onnx", fuse=False)
    with pytest.raises(InvalidInputError, match="is a folder"):
        export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path)


def test_fixed_batch_model_fails_cleanly_and_leaves_nothing(tmp_path):
    destination = tmp_path / "fixed.onnx"
    destination.write_bytes(b"previous file")
    with pytest.raises(ExportError, match="batch"):
        export_onnx(FixedBatch().eval(), torch.randn(1, 3, 8, 8), destination, fuse=False)
    # The earlier file is intact and no temporary file or folder is left behind.
    assert destination.read_bytes() == b"previous file"
    assert [p.name for p in tmp_path.iterdir()] == ["fixed.onnx"]


def test_a_file_that_fails_the_checker_never_lands(tmp_path, monkeypatch):
    def failing_check(*args, **kwargs):  # onnx's own checker, rejecting the file
        raise onnx.checker.ValidationError("checker says no")

    monkeypatch.setattr(onnx.checker, "check_model", failing_check)
    with pytest.raises(ExportError, match=r"(?s)fails onnx.checker.*checker says no"):
        export_onnx(TinyNet().eval(), torch.randn(2, 3, 8, 8), tmp_path / "x.onnx", fuse=False)
    assert not any(tmp_path.iterdir())


def test_a_file_that_disagrees_with_the_original_is_never_written(tmp_path, monkeypatch):
    import bnsurgery.fuse as fuse_module

    x = torch.randn(2, 3, 8, 8)
    model = _calibrated(TinyNet(), x)
    honest = fuse_module.fuse_batchnorm

    def off_by_ten_percent(*args, **kwargs):  # stands in for any wrong transformation
        fused = honest(*args, **kwargs)
        with torch.no_grad():
            next(m for m in fused.modules() if isinstance(m, nn.Conv2d)).weight.mul_(1.1)
        return fused

    monkeypatch.setattr(fuse_module, "fuse_batchnorm", off_by_ten_percent)
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=r"does not compute what the original model computes"
                       ) as caught:
        export_onnx(model, x, path)
    assert list(tmp_path.iterdir()) == []
    # A numeric mismatch, so the command line exits 1, not 2.
    assert isinstance(caught.value, NumericMismatchError)


class _CachesShape(nn.Module):
    """Caches the input shape on the first forward, as ultralytics' Detect head does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.shape = None
        self.scale = torch.ones(1)

    def forward(self, x):
        if self.shape != x.shape:
            self.scale = torch.ones(1) * x.shape[-1]
            self.shape = x.shape
        return self.conv(x) * self.scale


def test_cached_input_shape_is_named_in_the_batch_hint(tmp_path):
    model = _CachesShape().eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))  # the batch the export uses: the cache then matches
    with pytest.raises(ExportError, match=r"'shape' \(\(2, 3, 8, 8\)\) holds an input shape "
                                          r"cached by an earlier forward"):
        export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_destination_is_checked_before_any_work(tmp_path, monkeypatch):
    import bnsurgery.fuse as fuse_module

    calls = []
    monkeypatch.setattr(fuse_module, "fuse_batchnorm", lambda *a, **k: calls.append(a))
    (tmp_path / "f").write_text("")
    with pytest.raises(InvalidInputError, match=r"(?s)a file is in the way.*Hint: pass another "
                       r"file as path="):
        export_onnx(TinyNet().eval(), torch.randn(2, 3, 8, 8), tmp_path / "f" / "x.onnx")
    assert calls == []  # refused before folding, let alone exporting


def test_overwrite_keeps_the_mode_and_long_names_work(tmp_path):
    model = TinyNet().eval()
    x = torch.randn(2, 3, 8, 8)
    destination = tmp_path / ("n" * 244 + ".onnx")  # 249 bytes: the file system allows 255
    destination.write_bytes(b"old")
    destination.chmod(0o600)
    export_onnx(model, x, destination, fuse=False)
    assert destination.stat().st_mode & 0o777 == 0o600
    assert destination.read_bytes() != b"old"
    assert [p.name for p in tmp_path.iterdir()] == [destination.name]  # no staging left
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(destination), providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(result), model(x), rtol=1e-4, atol=1e-5)
