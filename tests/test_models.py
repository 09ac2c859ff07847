"""Tests for bnsurgery.models: MODEL specs, safe weight loading, default shapes."""

from __future__ import annotations

import os
import pickle
import sys
import urllib.error

import pytest
import torch
from torch import nn

from bnsurgery.errors import BnSurgeryError, InvalidInputError, UnsafeFileError
from bnsurgery.models import (
    default_input_shape,
    load_model,
    load_state_dict_file,
    parse_input_shape,
    parse_model_spec,
)


class _Payload:
    """Unpickling this calls ``os.system``; a safe loader must refuse before calling it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_malicious(path, marker):
    with open(path, "wb") as handle:
        pickle.dump({"conv.weight": _Payload(marker)}, handle, protocol=2)


@pytest.mark.parametrize(
    ("text", "source", "name"),
    [
        pytest.param("torchvision:resnet18", "torchvision", "resnet18", id="torchvision"),
        pytest.param("timm:resnet18.a1_in1k", "timm", "resnet18.a1_in1k", id="timm-tag"),
        pytest.param("torch.nn:Identity", "python", "torch.nn:Identity", id="python-factory"),
    ],
)
def test_parse_model_spec(text, source, name):
    spec = parse_model_spec(text)
    assert (spec.source, spec.name, spec.text) == (source, name, text)
    assert spec.to_dict()["source"] == source


@pytest.mark.parametrize(
    "text",
    [pytest.param("resnet18", id="no-colon"), pytest.param("torchvision:", id="no-name"),
     pytest.param(":resnet18", id="no-source"), pytest.param("my-pkg:make", id="bad-module")],
)
def test_parse_model_spec_rejects(text):
    with pytest.raises(InvalidInputError, match="MODEL"):
        parse_model_spec(text)


@pytest.mark.parametrize(
    ("text", "shape"),
    [pytest.param("1,3,224,224", (1, 3, 224, 224), id="commas"),
     pytest.param("2x3x32x32", (2, 3, 32, 32), id="x-separated"),
     pytest.param(" 4, 16 ", (4, 16), id="spaces")],
)
def test_parse_input_shape(text, shape):
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["", "1,3,a,4", "1,0,4", "-1,3"])
def test_parse_input_shape_rejects(text):
    with pytest.raises(InvalidInputError, match="positive integers"):
        parse_input_shape(text)


@pytest.mark.usefixtures("torchvision")
def test_load_torchvision_model_random_weights_in_eval_mode():
    loaded = load_model("torchvision:mobilenet_v3_small")
    assert not loaded.model.training
    assert loaded.input_shape == (1, 3, 224, 224)
    assert loaded.weights == "random"
    assert loaded.to_dict()["class"] == "MobileNetV3"


@pytest.mark.usefixtures("torchvision")
def test_unknown_torchvision_model_suggests_names():
    with pytest.raises(InvalidInputError,
                       match=r"(?s)Unknown torchvision model.*did you mean resnet18"):
        load_model("torchvision:resnet1")


@pytest.mark.usefixtures("timm")
def test_timm_model_and_unknown_name():
    loaded = load_model("timm:resnet10t")
    assert loaded.input_shape[:2] == (1, 3)
    with pytest.raises(InvalidInputError, match="Unknown timm model"):
        load_model("timm:not_a_model_at_all")


def test_python_factory():
    assert isinstance(load_model("torch.nn:Identity").model, nn.Identity)
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_model("torch.nn:not_there")
    with pytest.raises(InvalidInputError, match="Cannot import"):
        load_model("no_such_package_xyz.models:build")
    with pytest.raises(InvalidInputError, match="did not return a torch.nn.Module"):
        load_model("os:getcwd")


def test_default_input_shapes():
    assert default_input_shape("torchvision:inception_v3") == (1, 3, 299, 299)
    assert default_input_shape("torchvision:resnet18") == (1, 3, 224, 224)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_weights_round_trip(torchvision, tmp_path, suffix):
    source = torchvision.models.mobilenet_v3_small()
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(1.0)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = load_model("torchvision:mobilenet_v3_small", weights=path)
    assert loaded.weights == str(path)
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key], rtol=0, atol=0, msg=key)


def test_nested_checkpoint_and_data_parallel_prefix(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2))
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "epoch": 3}, path)
    assert set(load_state_dict_file(path)) == {"0.weight", "0.bias"}


@pytest.mark.usefixtures("torchvision")
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    _write_malicious(path, marker)
    with pytest.raises(UnsafeFileError, match=r"(?s)Refused to load.*nothing in the file was run"):
        load_model("torchvision:mobilenet_v3_small", weights=path)
    assert not marker.exists()
    # The same file, unpickled without protection, really would have run the command.
    with open(path, "rb") as handle:
        pickle.load(handle)  # noqa: S301 - proves the payload is live
    assert marker.exists()


def test_pickled_whole_model_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2), path)  # needs to import torch.nn.Linear to load: refused
    with pytest.raises(UnsafeFileError, match="state_dict"):
        load_state_dict_file(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        pytest.param("w.npz", b"x", "Unknown weights file type", id="suffix"),
        pytest.param("w.pt", b"\x80\x02truncated", "cannot be read", id="garbage-pt"),
        pytest.param("w.safetensors", b"\x00\x01", "cannot be read", id="garbage-safetensors"),
    ],
)
def test_bad_weight_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InvalidInputError, match=message):
        load_state_dict_file(path)


@pytest.mark.usefixtures("torchvision")
def test_missing_and_mismatching_weights(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_state_dict_file(tmp_path / "nope.pt")
    path = tmp_path / "other.pt"
    torch.save(nn.Linear(3, 3).state_dict(), path)
    with pytest.raises(InvalidInputError, match="do not fit the model"):
        load_model("torchvision:mobilenet_v3_small", weights=path)
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(InvalidInputError, match="does not hold a state_dict"):
        load_state_dict_file(path)


def test_default_weights_take_the_torchvision_download_path(torchvision, monkeypatch):
    """DEFAULT goes through torchvision's own weights loading; here it is served locally."""
    from torchvision.models._api import WeightsEnum

    served = torchvision.models.mobilenet_v3_small().state_dict()
    served = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v
              for k, v in served.items()}
    calls = []

    def fake_get_state_dict(self, *args, **kwargs):
        calls.append(self)
        return served

    monkeypatch.setattr(WeightsEnum, "get_state_dict", fake_get_state_dict)
    loaded = load_model("torchvision:mobilenet_v3_small", weights="DEFAULT")
    assert loaded.weights == "DEFAULT"
    assert len(calls) == 1 and "IMAGENET1K" in str(calls[0])
    assert torch.all(loaded.model.features[0][0].weight == 0.5)


@pytest.mark.usefixtures("torchvision")
def test_default_weights_download_failure_is_a_clear_error(monkeypatch):
    from torchvision.models._api import WeightsEnum

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(BnSurgeryError, match=r"(?s)Downloading torchvision's pretrained weights "
                                             r"failed.*--weights PATH"):
        load_model("torchvision:mobilenet_v3_small", weights="DEFAULT")


def test_default_weights_only_for_libraries():
    with pytest.raises(InvalidInputError, match="only works for torchvision and timm"):
        load_model("torch.nn:Identity", weights="DEFAULT")


# --- What a weights file may allocate, and which dtypes it may bring -------------------------

@pytest.fixture
def small_factory(monkeypatch):
    """A small model reachable as ``bnsurgery_models_factories:small``."""
    import sys
    import types

    module = types.ModuleType("bnsurgery_models_factories")
    module.small = lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return f"{module.__name__}:small"


def test_zip_bomb_is_refused_before_it_is_inflated(tmp_path, small_factory, monkeypatch):
    from hostile_files import zip_bomb_pt

    path = tmp_path / "bomb.pt"
    zip_bomb_pt(path, 1 << 28, name="0.weight")  # inflates to 1 GiB
    assert path.stat().st_size < 2_000_000
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or {})
    with pytest.raises(InvalidInputError, match=r"(?s)declares more data than the model could "
                       r"use.*Got 10737\d{5} bytes declared.*Hint: save only the model's "
                       r"state_dict"):
        load_model(small_factory, weights=path)
    with pytest.raises(InvalidInputError, match="nothing was inflated"):
        load_state_dict_file(path, max_bytes=10_000_000)
    assert loads == []  # refused from the zip directory: torch.load never saw the file


def test_small_zip_bomb_really_inflates(tmp_path):
    """The bomb is genuine: torch.load inflates its entry (shown at 16 MiB, not 1 GiB)."""
    from hostile_files import zip_bomb_pt

    path = tmp_path / "small-bomb.pt"
    zip_bomb_pt(path, 1 << 22, name="0.weight")
    assert path.stat().st_size < 100_000
    state = load_state_dict_file(path)  # no bound asked for: loaded, and it is all zeros
    torch.testing.assert_close(state["0.weight"], torch.zeros(1 << 22), rtol=0, atol=0)


def test_weights_budget_counts_shared_storage_once():
    from bnsurgery.models import WEIGHTS_SIZE_FACTOR, WEIGHTS_SIZE_SLACK, weights_budget

    linear = nn.Linear(10, 10)
    shared = nn.Sequential(linear, linear)
    expected = (100 + 10) * 4
    assert weights_budget(linear) == WEIGHTS_SIZE_FACTOR * expected + WEIGHTS_SIZE_SLACK
    assert weights_budget(shared) == weights_budget(linear)


def test_genuine_checkpoint_with_optimizer_state_fits_the_budget(tmp_path, torchvision):
    model = torchvision.models.mobilenet_v3_small()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "ema": model.state_dict()}, path)
    loaded = load_model("torchvision:mobilenet_v3_small", weights=path)
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[key], rtol=0, atol=0, msg=key)


def _save_safetensors(path, state):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool],
                         ids=["int64", "int32", "bool"])
def test_non_float_tensors_for_float_parameters_are_refused(tmp_path, small_factory, suffix,
                                                            dtype):
    state = {k: (torch.ones_like(v) if v.is_floating_point() else v).to(dtype)
             if k == "0.weight" else v for k, v in nn.Sequential(
                 nn.Linear(4, 4), nn.BatchNorm1d(4)).state_dict().items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        _save_safetensors(path, state)
    with pytest.raises(InvalidInputError, match=rf"(?s)non-float tensors for float parameters"
                       rf".*0\.weight: {dtype} into torch\.float32.*Hint:"):
        load_model(small_factory, weights=path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16],
                         ids=["float16", "float64", "bfloat16"])
def test_float_casts_are_reported(tmp_path, small_factory, dtype):
    reference = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    state = {k: v.to(dtype) if k.startswith("0.") else v
             for k, v in reference.state_dict().items()}
    path = tmp_path / "w.safetensors"
    _save_safetensors(path, state)
    from bnsurgery.models import WeightsCastWarning

    with pytest.warns(WeightsCastWarning, match=rf"2 tensors .* cast.*0\.weight: {dtype}"):
        loaded = load_model(small_factory, weights=path)
    assert sorted(loaded.cast) == [f"0.bias: {dtype} -> torch.float32",
                                   f"0.weight: {dtype} -> torch.float32"]
    assert loaded.to_dict()["cast"] == list(loaded.cast)
    # The values are the file's, converted as torch converts them.
    torch.testing.assert_close(loaded.model[0].weight, state["0.weight"].float(), rtol=0, atol=0)


def test_matching_dtypes_are_not_reported(tmp_path, small_factory, recwarn):
    path = tmp_path / "w.pt"
    torch.save(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).state_dict(), path)
    assert load_model(small_factory, weights=path).cast == ()
    assert not [w for w in recwarn if "cast" in str(w.message)]


_MODEL_SOURCE = """
import torch
from {helper} import width


def make():
    return torch.nn.Sequential(torch.nn.Conv2d(3, width(), 3), torch.nn.BatchNorm2d(width()))
"""


def test_a_factory_in_a_file_by_path(tmp_path):
    folder = tmp_path / "models dir"
    folder.mkdir()
    (folder / "helpers_for_file.py").write_text("def width():\n    return 5\n")
    (folder / "net.py").write_text(_MODEL_SOURCE.format(helper="helpers_for_file"))
    spec = parse_model_spec(f"{folder}/net.py:make")
    assert (spec.source, spec.name) == ("file", f"{folder}/net.py:make")
    loaded = load_model(f"{folder}/net.py:make")
    assert loaded.model[0].out_channels == 5  # its sibling import worked
    assert str(folder) not in sys.path  # the folder was only on the path while importing
    with pytest.raises(InvalidInputError, match=r"(?s)no such file.*path/to/file.py:factory"):
        load_model(f"{folder}/missing.py:make")


def test_a_package_in_the_working_directory(tmp_path, monkeypatch):
    package = tmp_path / "cwd_models_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "width.py").write_text("def width():\n    return 7\n")
    (package / "nets.py").write_text(_MODEL_SOURCE.format(helper="cwd_models_pkg.width"))
    with pytest.raises(InvalidInputError, match="Cannot import the model's module"):
        load_model("cwd_models_pkg.nets:make")  # not found from elsewhere
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "cwd_models_pkg", raising=False)
    assert load_model("cwd_models_pkg.nets:make").model[0].out_channels == 7
    assert str(tmp_path) not in sys.path
