"""Tests for bnsurgery.pt2: a .pt2 loader that refuses every archive feature that runs code.

Each hostile archive is a genuine ``torch.export.save`` file rewritten by the test. Where the
tampering is live (``torch.export.load`` or the loaded program really runs the payload), the test
shows that too, after checking that bnsurgery's loader refused it with nothing run.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
import zlib

import pytest
import torch
from hostile_files import rewrite_zip, write_zip
from torch import nn

from bnsurgery.errors import InvalidInputError, UnsafeFileError
from bnsurgery.pt2 import check_pt2_archive, load_exported_program


class _Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ConvBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer("scale", torch.full((4, 1, 1), 0.5))
        self.offset = torch.linspace(-1, 1, 4).reshape(4, 1, 1)  # a tensor constant

    def forward(self, x):
        return self.bn(self.conv(x)).relu() * self.scale + self.offset


def _model():
    torch.manual_seed(0)
    model = _ConvBn()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 2)
        model.bn.bias.uniform_(-1, 1)
    return model.eval()


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    """A dynamic-batch program saved by torch.export.save, and the model it came from."""
    model = _model()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: batch},))
    path = tmp_path_factory.mktemp("pt2") / "genuine.pt2"
    torch.export.save(program, path)
    return path, model


def _root(path):
    return zipfile.ZipFile(path).namelist()[0].split("/", 1)[0] + "/"


def _edit_json(suffix, change):
    def edit(name, data):
        if name.endswith(suffix):
            document = json.loads(data)
            change(document)
            return json.dumps(document).encode()
        return data
    return edit


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_genuine_archive_loads_and_computes_what_the_original_computes(genuine, batch):
    path, model = genuine
    program = load_exported_program(path)
    x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-6, atol=1e-6)


def test_static_archive_of_a_torchvision_model_loads(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    path = tmp_path / "resnet18.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    with torch.no_grad():
        torch.testing.assert_close(load_exported_program(path).module()(x), model(x),
                                   rtol=1e-5, atol=1e-5)


def _pickled_weight(marker):
    def change(document):
        first = next(iter(document["config"].values()))
        first["use_pickle"] = True
    edit_config = _edit_json("model_weights_config.json", change)

    def edit(name, data):
        if name.endswith("data/weights/weight_0"):
            return pickle.dumps(_Payload(marker))
        return edit_config(name, data)
    return edit, {}


def _sample_inputs(marker):
    def edit(name, data):
        return pickle.dumps(_Payload(marker)) if name.endswith("sample_inputs/model.pt") else data
    return edit, {}


def _opaque_constant(marker):
    def change(document):
        document["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False,
                                      "use_pickle": True, "tensor_meta": None}
    return (_edit_json("model_constants_config.json", change),
            {"data/constants/opaque_obj_0": pickle.dumps(_Payload(marker))})


def _guards_code(marker):
    def change(document):
        document["guards_code"] = [f"__import__('os').system('touch {marker}') == 0"]
    return _edit_json("models/model.json", change), {}


def _sympy_expression(marker):
    def edit(name, data):
        if not name.endswith("models/model.json"):
            return data
        text, count = re.subn(r'"expr_str": "Symbol\([^"]*\)"',
                              f'"expr_str": "__import__(\'os\').system(\'touch {marker}\')"',
                              data.decode(), count=1)
        assert count == 1
        return text.encode()
    return edit, {}


@pytest.mark.parametrize(
    ("tamper", "runs_when", "message"),
    [
        pytest.param(_pickled_weight, "load", "stored as a pickle \\(use_pickle\\)",
                     id="use_pickle-weight"),
        pytest.param(_sample_inputs, "load", "retry with weights_only=False",
                     id="sample_inputs-fallback"),
        pytest.param(_opaque_constant, "load", "pickle.loads", id="opaque-object-constant"),
        pytest.param(_guards_code, "run", "guard .*__import__", id="guards_code"),
        pytest.param(_sympy_expression, "load", "symbolic expression .* sympy",
                     id="sympify-expression"),
    ],
)
def test_live_tampering_is_refused_and_nothing_runs(genuine, tmp_path, tamper, runs_when,
                                                    message):
    path, _ = genuine
    marker = tmp_path / "executed"
    edit, extra = tamper(marker)
    hostile = tmp_path / "hostile.pt2"
    rewrite_zip(path, hostile, edit, {_root(path) + k: v for k, v in extra.items()})
    with pytest.raises(UnsafeFileError, match=rf"(?s)Refused to load the \.pt2 archive: "
                       rf"(?=.*nothing in it was unpickled or run)(?=.*{message}).*Hint:"):
        load_exported_program(hostile)
    assert not marker.exists()
    # The same file through torch's own loader really runs the payload.
    try:
        program = torch.export.load(hostile)
        if runs_when == "run":
            program.module()(torch.randn(2, 3, 8, 8))
    except Exception:  # noqa: S110 - the payload runs before torch fails on what it returned
        pass
    assert marker.exists()


def _add(name, data=b"\0" * 16):
    return (lambda n, d: d), {name: data}


def _drop(suffix):
    return (lambda n, d: None if n.endswith(suffix) else d), {}


def _target(target):
    def change(document):
        document["graph_module"]["graph"]["nodes"][0]["target"] = target
    return _edit_json("models/model.json", change), {}


def _custom_object_constant():
    def change(document):
        document["config"]["evil"] = {"path_name": "custom_obj_0", "is_param": False,
                                      "use_pickle": True, "tensor_meta": None}
    return _edit_json("model_constants_config.json", change), {"data/constants/custom_obj_0":
                                                               b"\0" * 16}


def _range_constraint():
    def change(document):
        name = next(iter(document["range_constraints"]))
        document["range_constraints"][name]["min_val"] = "1 or __import__('os')"
    return _edit_json("models/model.json", change), {}


def _string_argument():
    def change(document):
        node = document["graph_module"]["graph"]["nodes"][0]
        node["inputs"].append({"name": "n", "arg": {"as_int": "2; __import__('os')"},
                               "kind": 1})
    return _edit_json("models/model.json", change), {}


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        pytest.param(lambda: _add("data/aotinductor/model/model.so"), "compiled library",
                     id="aotinductor-library"),
        pytest.param(_custom_object_constant, "TorchScript object", id="custom-object"),
        pytest.param(lambda: _add("data/weights/model.pt"), "legacy weights",
                     id="legacy-weights-file"),
        pytest.param(lambda: _add("version", b"1"), "older archive format",
                     id="older-format-version"),
        pytest.param(lambda: _add("serialized_exported_program.json", b"{}"),
                     "older archive format", id="older-format-program"),
        pytest.param(lambda: _drop("archive_format"), "not the current .pt2 format",
                     id="no-archive-format"),
        pytest.param(lambda: _add("models/second.json", b"{}"), "second program",
                     id="second-program"),
        pytest.param(lambda: _add("data/executorch/x.bin"), "does not write",
                     id="unknown-member"),
        pytest.param(lambda: _target("torch.os.system"), "not a torch.ops operator",
                     id="target-os-system"),
        pytest.param(lambda: _target("torch.ops.aten.__class__"), "dunder",
                     id="target-dunder"),
        pytest.param(lambda: _target("_operator.call"), "not arithmetic",
                     id="target-operator-call"),
        pytest.param(_range_constraint, "integer bounds", id="range-constraint-code"),
        pytest.param(_string_argument, "integer argument", id="integer-argument-code"),
    ],
)
def test_other_archive_features_that_run_code_are_refused(genuine, tmp_path, tamper, message):
    path, _ = genuine
    edit, extra = tamper()
    hostile = tmp_path / "hostile.pt2"
    rewrite_zip(path, hostile, edit, {_root(path) + k: v for k, v in extra.items()})
    with pytest.raises(UnsafeFileError, match=rf"(?s)Refused to load the \.pt2 archive: .*"
                       rf"{message}"):
        check_pt2_archive(hostile)


def test_compressed_and_oversized_archives_are_refused(genuine, tmp_path):
    path, _ = genuine
    members = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            data = archive.read(info)
            if info.filename.endswith("weight_0"):
                compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
                stream = compressor.compress(data) + compressor.flush()
                members.append((info.filename, stream, True, zlib.crc32(data), len(data)))
            else:
                members.append((info.filename, data, False, zlib.crc32(data), len(data)))
    hostile = tmp_path / "deflated.pt2"
    write_zip(hostile, members)
    with pytest.raises(UnsafeFileError, match="compressed members"):
        load_exported_program(hostile)
    with pytest.raises(InvalidInputError, match="declares more data than allowed"):
        load_exported_program(path, max_bytes=1000)


def test_missing_and_damaged_files(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_exported_program(tmp_path / "nope.pt2")
    path = tmp_path / "garbage.pt2"
    path.write_bytes(b"not a zip at all")
    with pytest.raises(InvalidInputError, match="directory cannot be read"):
        load_exported_program(path)


@pytest.mark.parametrize("command", ["replace", "fuse"])
def test_programs_the_command_line_writes_pass_the_loader(tmp_path, monkeypatch, command):
    """What ``bnsurgery replace/fuse -o x.pt2`` writes loads and matches its state_dict twin."""
    import sys
    import types

    from bnsurgery.cli import main
    from bnsurgery.models import load_state_dict_file

    module = types.ModuleType("bnsurgery_pt2_factories")
    module.small = lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    monkeypatch.setitem(sys.modules, module.__name__, module)
    argv = [command, f"{module.__name__}:small", "--input-shape", "2,3,8,8", "-q"]
    assert main([*argv, "-o", str(tmp_path / "m.pt2")]) == 0
    assert main([*argv, "-o", str(tmp_path / "m.safetensors")]) == 0
    program = load_exported_program(tmp_path / "m.pt2")
    reference = module.small().eval()
    if command == "replace":
        from bnsurgery.replace import replace_batchnorm

        reference = replace_batchnorm(reference).eval()
    else:
        reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Identity(), nn.ReLU()).eval()
    reference.load_state_dict(load_state_dict_file(tmp_path / "m.safetensors"))
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), reference(x), rtol=1e-5, atol=1e-5)
