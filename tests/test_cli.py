"""Tests for the bnsurgery command line, run in-process through ``main([...])``."""

from __future__ import annotations

import json
import os
import pickle
import sys
import types

import pytest
import torch

from bnsurgery._lazy import is_available
from bnsurgery.cli import main
from bnsurgery.models import load_state_dict_file

pytest.importorskip("onnxruntime")

MODEL = "torchvision:resnet18"
SHAPE = "1,3,32,32"
#: For the commands run on MODEL; the others use small models defined here (``factories``).
needs_torchvision = pytest.mark.usefixtures("torchvision")


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if not line.startswith("bnsurgery [")]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    "argv",
    [pytest.param(["--help"], id="top"),
     *[pytest.param([command, "--help"], id=command)
       for command in ("demo", "inspect", "replace", "fuse", "export", "validate")]],
)
def test_help(capsys, argv):
    code, out, _ = _run(capsys, *argv)
    assert code == 0
    assert "usage: bnsurgery" in out


def test_usage_errors_exit_2(capsys):
    assert _run(capsys)[0] == 2  # no command
    assert _run(capsys, "export", MODEL)[0] == 2  # -o missing
    assert _run(capsys, "export", MODEL, "-o", "x.onnx", "--tensorrt", "int8")[0] == 2


@pytest.fixture
def factories(monkeypatch):
    """Small models reachable as ``bnsurgery_cli_factories:NAME`` MODEL specs."""
    module = types.ModuleType("bnsurgery_cli_factories")

    def small():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                   torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten(), torch.nn.Linear(8, 4))

    def mixed():
        # The second BatchNorm has no running statistics: it can never be folded.
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                   torch.nn.Conv2d(4, 4, 3),
                                   torch.nn.BatchNorm2d(4, track_running_stats=False))

    module.small, module.mixed = small, mixed
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module.__name__


@needs_torchvision
def test_inspect_lists_every_batchnorm(capsys):
    code, out, err = _run(capsys, "inspect", MODEL, "--input-shape", SHAPE)
    assert code == 0, err
    assert "20 BatchNorm layers, 20 fold, 0 skipped" in out
    assert "layer1.0.bn1" in out and "folds into layer1.0.conv1" in out
    assert "bnsurgery [" in err  # progress goes to stderr


def test_inspect_reports_skipped_batchnorms_with_a_reason_as_json(capsys, factories):
    code, out, err = _run(capsys, "inspect", f"{factories}:mixed", "--input-shape", "2,3,8,8",
                          "--json", "-q")
    assert code == 0, err
    assert err == ""  # --quiet: no progress lines
    rows = {row["name"]: row for row in json.loads(out)["batchnorms"]}
    assert rows["1"]["status"] == "folds" and rows["1"]["into"] == "0"
    assert rows["3"]["status"] == "skipped" and "running statistics" in rows["3"]["reason"]


@needs_torchvision
def test_bad_model_name_is_one_line_without_traceback(capsys):
    code, out, err = _run(capsys, "inspect", "torchvision:resnet1")
    assert code == 2
    lines = _error_lines(err)
    assert len(lines) == 1
    assert lines[0].startswith("bnsurgery inspect: error: Unknown torchvision model")
    assert "did you mean resnet18" in lines[0]
    assert "Traceback" not in err and out == ""

    code, _, err = _run(capsys, "inspect", "torchvision:resnet1", "--debug")
    assert code == 2
    assert "Traceback" in err


@needs_torchvision
def test_wrong_input_shape_is_a_user_error(capsys):
    code, _, err = _run(capsys, "inspect", MODEL, "--input-shape", "1,5,32,32")
    assert code == 2
    assert "does not run on inputs of this shape" in err and "--input-shape" in err
    code, _, err = _run(capsys, "inspect", MODEL, "--input-shape", "1,3,0,32")
    assert code == 2 and "positive integers" in err


def test_error_as_json(capsys):
    code, out, _ = _run(capsys, "inspect", "nonsense", "--json")
    assert code == 2
    document = json.loads(out)
    assert document["exit_code"] == 2 and document["error"]["type"] == "InvalidInputError"


@needs_torchvision
def test_malicious_pickle_as_weights_is_refused_and_nothing_runs(capsys, tmp_path):
    marker = tmp_path / "executed"
    evil = tmp_path / "weights.pt"
    with open(evil, "wb") as handle:
        pickle.dump({"fc.weight": _Payload(marker)}, handle, protocol=2)
    code, out, err = _run(capsys, "inspect", MODEL, "--weights", str(evil))
    assert code == 2
    assert "Refused to load the weights file" in err
    assert "Traceback" not in err
    assert not marker.exists()


def test_weights_file_is_used(torchvision, capsys, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    code, out, err = _run(capsys, "inspect", MODEL, "--weights", str(path), "--input-shape",
                          SHAPE, "--json")
    assert code == 0, err
    assert json.loads(out)["model"]["weights"] == str(path)


def test_replace_saves_a_state_dict(torchvision, capsys, tmp_path):
    out_path = tmp_path / "replaced.safetensors"
    code, out, err = _run(capsys, "replace", MODEL, "--input-shape", SHAPE, "-o", str(out_path))
    assert code == 0, err
    assert "pytorch check passed" in out
    assert set(load_state_dict_file(out_path)) == set(torchvision.models.resnet18().state_dict())


@needs_torchvision
def test_fuse_saves_a_torch_export_program(capsys, tmp_path):
    out_path = tmp_path / "fused.pt2"
    code, out, err = _run(capsys, "fuse", MODEL, "--input-shape", SHAPE, "-o", str(out_path),
                          "--json", "--report", str(tmp_path / "report.json"))
    assert code == 0, err
    document = json.loads(out)
    assert document["passed"] is True and document["output"] == str(out_path)
    assert len(document["plan"]["folded"]) == 20
    assert json.loads((tmp_path / "report.json").read_text())["passed"] is True
    from bnsurgery.calibrate import calibrate_batchnorm
    from bnsurgery.models import load_model
    from bnsurgery.pt2 import load_exported_program

    program = load_exported_program(out_path)  # vetted first: nothing in it can run code
    with torch.random.fork_rng():  # the original, built as the command builds it (seed 0)
        torch.manual_seed(0)
        original = load_model(MODEL).model
    inputs = torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    original = calibrate_batchnorm(original, torch.cat([inputs, inputs]), seed=0).eval()
    x = torch.randn(3, 3, 32, 32)  # dynamic batch
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), original(x), rtol=1e-4, atol=1e-4)
    assert not any("batch_norm" in str(node.target) for node in program.graph.nodes)


@needs_torchvision
def test_fuse_refuses_unknown_output_type(capsys, tmp_path):
    code, _, err = _run(capsys, "fuse", MODEL, "--input-shape", SHAPE, "-o",
                        str(tmp_path / "fused.txt"))
    assert code == 2
    assert "Unknown output file type" in err
    assert not (tmp_path / "fused.txt").exists()


@pytest.fixture(scope="module")
def exported(torchvision, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    path = folder / "resnet18.onnx"
    code = main(["export", MODEL, "--input-shape", SHAPE, "-o", str(path), "--validate",
                 "--providers", "cpu", "--report", str(folder / "report.json"), "-q"])
    return code, path, folder


def test_export_with_validation(exported):
    code, path, folder = exported
    assert code == 0
    assert sorted(p.name for p in folder.iterdir()) == ["report.json", "resnet18.onnx"]
    report = json.loads((folder / "report.json").read_text())
    assert report["passed"] is True
    (entry,) = report["reports"]
    assert entry["details"]["opset"] == 18
    assert {o["batch"] for o in entry["outputs"]} == {1, 5}


def test_validate_exit_codes(exported, capsys, tmp_path):
    _, path, _ = exported
    plot = tmp_path / "layers.png"
    code, out, err = _run(capsys, "validate", MODEL, str(path), "--input-shape", "2,3,32,32",
                          "--providers", "cpu", "--plot", str(plot))
    assert code == 0, err
    assert "onnxruntime check passed" in out
    if is_available("matplotlib"):
        assert plot.read_bytes()[:4] == b"\x89PNG"
    # Another seed builds another model: the file no longer computes what it claims.
    code, out, err = _run(capsys, "validate", MODEL, str(path), "--input-shape", "2,3,32,32",
                          "--providers", "cpu", "--seed", "1")
    assert code == 1
    assert "onnxruntime check FAILED" in out
    assert "first diverging module" in out and "first diverging tensor" not in out


@needs_torchvision
def test_validate_missing_file(capsys, tmp_path):
    code, _, err = _run(capsys, "validate", MODEL, str(tmp_path / "missing.onnx"))
    assert code == 2
    assert "does not exist" in err


def test_export_without_fusing_as_json(capsys, tmp_path, factories):
    path = tmp_path / "plain.onnx"
    code, out, err = _run(capsys, "export", f"{factories}:small", "--input-shape", "1,3,8,8",
                          "-o", str(path), "--no-fuse", "--json")
    assert code == 0, err
    document = json.loads(out)
    assert document["fused"] is False and document["reports"] == []
    assert path.is_file()


@needs_torchvision
def test_export_tensorrt_without_it_is_a_clear_error(capsys, tmp_path):
    from bnsurgery.tensorrt import tensorrt_unavailable_reason

    if tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT is available here")
    code, _, err = _run(capsys, "export", MODEL, "-o", str(tmp_path / "x.onnx"), "--tensorrt",
                        "fp16")
    assert code == 2
    assert "pip install 'bnsurgery[gpu]'" in err
    assert not any(tmp_path.iterdir())  # refused before any work


@needs_torchvision
def test_unavailable_provider_is_a_clear_error(capsys, tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    code, _, err = _run(capsys, "export", MODEL, "-o", str(tmp_path / "x.onnx"), "--validate",
                        "--providers", "cuda")
    assert code == 2
    assert "CUDAExecutionProvider" in err
    assert not any(tmp_path.iterdir())


@needs_torchvision
def test_recalibrate_from_tensor_file(tmp_path, capsys):
    import json

    from bnsurgery.cli import main

    data = tmp_path / "images.pt"
    torch.save(torch.randn(6, 3, 32, 32), data)
    out, report = tmp_path / "model.safetensors", tmp_path / "recal.json"
    code = main(["--json", "recalibrate", "torchvision:resnet18", "--data", str(data),
                 "--batch-size", "3", "-o", str(out), "--report", str(report), "-q"])
    assert code == 0, capsys.readouterr()
    payload = json.loads(capsys.readouterr().out)
    recalibration = payload["recalibration"]
    assert recalibration["batches"] == 2 and len(recalibration["layers"]) == 20
    assert out.exists() and json.loads(report.read_text())["passed"] is True


@needs_torchvision
def test_recalibrate_refuses_pickled_code(tmp_path, capsys):
    from bnsurgery.cli import main

    data = tmp_path / "data.pt"
    torch.save({"a": object()}, data)
    code = main(["recalibrate", "torchvision:resnet18", "--data", str(data),
                 "-o", str(tmp_path / "m.pt"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "without unpickling code" in err and len(err.strip().splitlines()) == 1


def test_recalibrate_refuses_a_zip_bomb_before_inflating_it(tmp_path, capsys, factories):
    from hostile_files import zip_bomb_pt

    data = tmp_path / "bomb.pt"
    zip_bomb_pt(data, 1 << 28)  # 1 GiB declared in a file of about 1 MB
    code, out, err = _run(capsys, "recalibrate", f"{factories}:small", "--data", str(data),
                          "-o", str(tmp_path / "m.pt"))
    lines = _error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert "declares more data than it holds" in lines[0] and "bomb.pt" in lines[0]
    assert "Hint: save the inputs with torch.save" in lines[0]
    assert out == "" and not (tmp_path / "m.pt").exists()


def test_fuse_refuses_its_own_input_as_output(capsys, tmp_path, factories):
    weights = tmp_path / "w.pt"
    torch.save(sys.modules[factories].small().state_dict(), weights)
    before = weights.read_bytes()
    code, _, err = _run(capsys, "fuse", f"{factories}:small", "--weights", str(weights),
                        "--input-shape", "1,3,8,8", "-o", str(tmp_path / "." / "w.pt"))
    assert code == 2 and "overwrite the input weights" in err
    assert weights.read_bytes() == before


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".pt2"])
def test_full_disk_exits_2_with_one_line(capsys, tmp_path, factories, monkeypatch, suffix):
    import errno as errno_codes

    from bnsurgery import files

    def full(_descriptor, _data):
        raise OSError(errno_codes.ENOSPC, os.strerror(errno_codes.ENOSPC))

    monkeypatch.setattr(files, "_write_all", full)
    out = tmp_path / f"fused{suffix}"
    code, _, err = _run(capsys, "fuse", f"{factories}:small", "--input-shape", "2,3,8,8",
                        "-o", str(out))
    lines = _error_lines(err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert str(out) in lines[0] and "No space left" in lines[0] and ".bns-" not in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_output_in_a_file_is_refused_before_any_work(capsys, tmp_path, factories):
    (tmp_path / "f").write_text("")
    code, _, err = _run(capsys, "fuse", f"{factories}:small", "-o", str(tmp_path / "f" / "x.pt"))
    assert code == 2 and "a file is in the way" in err and "building" not in err


def test_validate_stops_a_never_ending_file_at_its_time_limit(capsys, tmp_path):
    from test_ort_session import _hostile_loop

    path = _hostile_loop(tmp_path / "loop.onnx")
    code, _, err = _run(capsys, "validate", "torch.nn:Identity", str(path), "--input-shape", "1",
                        "--providers", "cpu", "--timeout", "0.3")
    assert code == 2
    assert len(_error_lines(err)) == 1 and "Traceback" not in err
    assert "did not finish within the time limit of 0.3 s" in err
    assert "pass --timeout " in err and "timeout=" not in err  # the flag, not the keyword
    code, _, err = _run(capsys, "validate", "torch.nn:Identity", str(path), "--timeout", "-1")
    assert code == 2 and "positive number of seconds" in err


def _small_state(dtype=None):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 4))
    return {k: v.to(dtype) if dtype is not None and k.startswith("0.") else v.contiguous()
            for k, v in model.state_dict().items()}


def test_zip_bomb_weights_exit_2_in_one_line(capsys, tmp_path, factories):
    from hostile_files import zip_bomb_pt

    path = tmp_path / "bomb.pt"
    zip_bomb_pt(path, 1 << 28, name="0.weight")
    code, out, err = _run(capsys, "inspect", f"{factories}:small", "--weights", str(path),
                          "--input-shape", "2,3,8,8")
    assert code == 2, err
    lines = _error_lines(err)
    assert len(lines) == 1 and "declares more data than the model could use" in lines[0]
    assert "Hint: save only the model's state_dict" in lines[0]
    assert "Traceback" not in err and out == ""


def test_integer_weights_are_refused_and_float_casts_are_listed(capsys, tmp_path, factories):
    from safetensors.torch import save_file

    path = tmp_path / "int.safetensors"
    save_file(_small_state(torch.int64), str(path))
    code, _, err = _run(capsys, "inspect", f"{factories}:small", "--weights", str(path),
                        "--input-shape", "2,3,8,8")
    assert code == 2
    assert "non-float tensors for float parameters" in err and "0.weight: torch.int64" in err

    path = tmp_path / "half.safetensors"
    save_file(_small_state(torch.float16), str(path))
    code, out, err = _run(capsys, "--json", "inspect", f"{factories}:small", "--weights",
                          str(path), "--input-shape", "2,3,8,8")
    assert code == 0, err
    assert "note: 2 tensors of" in err and "0.weight: torch.float16 -> torch.float32" in err
    assert "Warning" not in err  # listed once, as a note, not also as a Python warning
    assert sorted(json.loads(out)["model"]["cast"]) == [
        "0.bias: torch.float16 -> torch.float32", "0.weight: torch.float16 -> torch.float32"]


@pytest.mark.parametrize("command", ["fuse", "replace", "export"])
def test_report_to_a_folder_is_refused_before_the_model_is_saved(capsys, tmp_path, factories,
                                                                 command):
    out = tmp_path / ("m.onnx" if command == "export" else "m.safetensors")
    folder = tmp_path / "reports"
    folder.mkdir()
    code, out_text, err = _run(capsys, command, f"{factories}:small", "--input-shape", "2,3,8,8",
                               "-o", str(out), "--report", str(folder))
    lines = _error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert "The report destination is a folder" in lines[0]
    assert "Hint: append a file name, or pass another path to --report" in lines[0]
    assert "building" not in err  # refused before any work
    assert not out.exists() and list(folder.iterdir()) == []


def test_report_that_is_the_output_is_refused(capsys, tmp_path, factories):
    out = tmp_path / "m.safetensors"
    code, _, err = _run(capsys, "fuse", f"{factories}:small", "--input-shape", "2,3,8,8",
                        "-o", str(out), "--report", str(out))
    assert code == 2 and "--report would overwrite another file" in err
    assert "same file as -o" in err and not out.exists()


@pytest.fixture
def odd_factories(monkeypatch):
    """Models a user might name that cannot be used as they are."""
    import threading

    module = types.ModuleType("bnsurgery_cli_odd")

    def on_meta():
        with torch.device("meta"):
            return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))

    def with_lock():
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        model.lock = threading.Lock()
        return model

    module.on_meta, module.with_lock = on_meta, with_lock
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module.__name__


def _one_line_error(capsys, *argv):
    code, out, err = _run(capsys, *argv)
    lines = _error_lines(err)
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err and "unexpected" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(["inspect", "torch.nn:Conv2d"],
                     ["The model factory needs arguments", "in_channels", "Hint: write one"],
                     id="factory-needs-arguments"),
        pytest.param(["inspect", "torch.nn:Identity", "--seed", str(2**70)],
                     ["The seed is out of range", "--seed", "Hint: pass a smaller --seed"],
                     id="seed-overflow"),
        pytest.param(["inspect", "torch.nn:Identity", "--input-shape", "100000,100000,100000"],
                     ["too large to allocate", "1000000000000000 elements",
                      "Hint: pass a smaller --input-shape"], id="input-too-large"),
        pytest.param(["inspect", "bnsurgery_cli_odd:on_meta", "--input-shape", "2,3,8,8"],
                     ["on the meta device", "0.weight", "Hint: build it on a real device"],
                     id="meta-device"),
        pytest.param(["fuse", "bnsurgery_cli_odd:with_lock", "--input-shape", "2,3,8,8", "-o",
                      "never.safetensors"],
                     ["bnsurgery fuse works on a copy", "cannot pickle",
                      "Hint: no command-line flag avoids the copy", "inplace=True"],
                     id="not-copyable"),
    ],
)
def test_specific_one_line_errors_with_a_hint(capsys, odd_factories, argv, expected):
    line = _one_line_error(capsys, *argv)
    for text in expected:
        assert text in line, line
    assert not os.path.exists("never.safetensors")


def test_multi_line_messages_are_printed_whole_after_the_summary(capsys, factories):
    code, _, err = _run(capsys, "fuse", f"{factories}:mixed", "--input-shape", "2,3,8,8",
                        "--strict", "-o", "never.safetensors")
    lines = _error_lines(err)
    assert code == 2 and "Traceback" not in err
    assert lines[0].startswith("bnsurgery fuse: error: ")
    assert len(lines) > 1 and any("3" in line and "running statistics" in line
                                  for line in lines[1:]), err


def test_onnx_metadata_cannot_forge_lines_or_drive_the_terminal(capsys, tmp_path, factories):
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "m.onnx"
    model = f"{factories}:small"
    assert main(["export", model, "--input-shape", "2,3,8,8", "-o", str(path), "-q"]) == 0
    proto = onnx.load(str(path))
    forged = "\n  check passed\x1b[2K\r\x1b]0;title\x07\u2028"
    proto.producer_name = "exporter" + forged
    proto.producer_version = "1" + forged
    proto.doc_string = "doc" + forged
    proto.graph.doc_string = "graph" + forged
    for prop in proto.metadata_props:
        prop.value = prop.value + forged
    onnx.save(proto, str(path))
    for extra in ([], ["--per-layer"]):
        code, out, err = _run(capsys, "validate", model, str(path), "--input-shape", "2,3,8,8",
                              "--providers", "cpu", *extra)
        assert code == 0, err
        text = out + err
        assert "\x1b" not in text and "\r" not in text and "\u2028" not in text
        assert not any(line.strip().startswith("check passed") for line in text.splitlines())
        assert "\\n  check passed\\x1b[2K" in out  # shown, escaped, on its own line
    code, out, _ = _run(capsys, "--json", "validate", model, str(path), "--input-shape",
                        "2,3,8,8", "--providers", "cpu")
    assert code == 0 and "\x1b" not in out
    values = []
    json.loads(out, object_hook=lambda d: values.extend(v for v in d.values()
                                                        if isinstance(v, str)) or d)
    assert any("\n  check passed\x1b[2K" in v for v in values)  # JSON keeps the value as is


def test_kernels_reports_the_backend_of_each_device(capsys, monkeypatch):
    monkeypatch.setenv("BNSURGERY_KERNEL", "reference")
    code, out, _ = _run(capsys, "kernels")
    assert code == 0 and "cpu: reference (forced by BNSURGERY_KERNEL=reference)" in out
    code, out, _ = _run(capsys, "kernels", "--json")
    assert code == 0 and json.loads(out)["devices"][0]["backend"] == "reference"


def test_kernels_build_prints_where_the_kernel_lives(capsys):
    from bnsurgery.errors import KernelUnavailableError
    from bnsurgery.kernel_cpp import build

    try:
        library = build()
    except KernelUnavailableError as exc:
        pytest.skip(f"the C++ kernel cannot be built here: {exc}")
    code, out, _ = _run(capsys, "kernels", "--build", "--json", "-q")
    payload = json.loads(out)
    assert code == 0 and payload["cpp_library"] == str(library)
    assert os.path.isfile(payload["cpp_library"])


def _conforming(text: str) -> dict:
    from bnsurgery.schema import check_document

    document = json.loads(text)
    assert check_document(document) == []
    return document


def test_every_command_prints_the_documented_schema(capsys, tmp_path, factories):
    small, shape = f"{factories}:small", "2,3,8,8"
    onnx_path, data = tmp_path / "small.onnx", tmp_path / "data.pt"
    torch.save(torch.randn(4, 3, 8, 8), data)
    runs = {
        "inspect": ["inspect", small, "--input-shape", shape],
        "replace": ["replace", small, "--input-shape", shape, "-o", str(tmp_path / "r.pt")],
        "fuse": ["fuse", small, "--input-shape", shape, "-o", str(tmp_path / "f.safetensors"),
                 "--report", str(tmp_path / "fuse.json")],
        "export": ["export", small, "--input-shape", shape, "-o", str(onnx_path), "--validate",
                   "--providers", "cpu"],
        "validate": ["validate", small, str(onnx_path), "--input-shape", shape,
                     "--providers", "cpu", "--report", str(tmp_path / "validate.json")],
        "recalibrate": ["recalibrate", small, "--data", str(data), "--batch-size", "2",
                        "--input-shape", shape, "-o", str(tmp_path / "c.pt")],
        "kernels": ["kernels"],
        "error": ["inspect", "torchvision:resnet1"],
    }
    documents = {}
    for name, argv in runs.items():
        code, out, err = _run(capsys, *argv, "--json", "-q")
        documents[name] = _conforming(out)
        assert documents[name]["exit_code"] == code, (name, err)
    assert documents["error"]["status"] == "error" and documents["error"]["exit_code"] == 2
    assert documents["kernels"]["status"] == "skipped" and documents["kernels"]["devices"]
    for name in ("inspect", "replace", "fuse", "export", "validate", "recalibrate"):
        document = documents[name]
        assert document["status"] == "passed" and document["passed"] is True, name
        assert document["command"] == name and document["exit_code"] == 0
        assert document["input_shape"] == [2, 3, 8, 8], name  # the shape actually used
        assert document["seed"] == 0 and document["weights"] == "random"
        assert document["model"]["spec"]["text"] == small
    assert documents["recalibrate"]["input_shape"] == [2, 3, 8, 8]
    assert documents["fuse"]["plan"]["folded"] and documents["export"]["output"] == str(onnx_path)
    assert [r["status"] for r in documents["validate"]["reports"]] == ["passed"]
    for report in ("fuse.json", "validate.json"):  # --report: the same document, reproducible
        written = _conforming((tmp_path / report).read_text())
        assert written["model"]["spec"]["text"] == small and written["seed"] == 0
        assert written["weights"] == "random" and written["summary"]["passed"] == 1
        assert written["environment"]["versions"]["torch"]
    assert json.loads((tmp_path / "fuse.json").read_text())["plan"]["folded"]


def test_export_without_a_check_is_skipped_not_passed(capsys, tmp_path, factories):
    code, out, err = _run(capsys, "export", f"{factories}:small", "--input-shape", "1,3,8,8",
                          "-o", str(tmp_path / "x.onnx"), "--json", "-q")
    assert code == 0, err
    document = _conforming(out)
    assert document["status"] == "skipped" and document["passed"] is None


def test_a_failed_plot_keeps_the_finished_result(capsys, tmp_path, factories, monkeypatch):
    from bnsurgery import report as report_module
    from bnsurgery.errors import FileWriteError

    def broken(*_args, **_kwargs):
        raise FileWriteError("The plot could not be written: disk full")

    monkeypatch.setattr(report_module, "plot_layer_errors", broken)
    pytest.importorskip("matplotlib")
    code, out, err = _run(capsys, "fuse", f"{factories}:small", "--input-shape", "2,3,8,8",
                          "-o", str(tmp_path / "f.pt"), "--plot", str(tmp_path / "p.png"),
                          "--json", "-q")
    assert code == 2
    document = _conforming(out)
    assert document["status"] == "passed" and document["exit_code"] == 2
    assert any("disk full" in note for note in document["notes"])
    assert "error: The plot could not be written" in err
    assert (tmp_path / "f.pt").is_file()


def test_validate_takes_the_input_shape_from_the_file(capsys, tmp_path, factories):
    small, path = f"{factories}:small", tmp_path / "static.onnx"
    code, _, err = _run(capsys, "export", small, "--input-shape", "1,3,8,8", "-o", str(path),
                        "--static-batch", "-q")
    assert code == 0, err
    # No --input-shape: the file's 1,3,8,8, not the factory default, and the check passes.
    code, out, err = _run(capsys, "validate", small, str(path), "--providers", "cpu", "--json")
    assert code == 0, err
    assert json.loads(out)["input_shape"] == [1, 3, 8, 8] and "from " + str(path) in err
    code, out, err = _run(capsys, "validate", small, str(path), "--providers", "cpu",
                          "--input-shape", "2,3,8,8")
    assert code == 2 and out == ""
    (line,) = _error_lines(err)
    assert "the file expects 1,3,8,8, got 2,3,8,8" in line and "--input-shape 1,3,8,8" in line
    assert "building" not in err  # refused before the model was built


@pytest.mark.parametrize(("command", "suffix"), [
    ("export", ".onnx"), ("fuse", ".pt2"), ("replace", ".safetensors"), ("recalibrate", ".pt")])
def test_an_existing_folder_as_output_is_refused_before_any_work(capsys, tmp_path, factories,
                                                                 command, suffix):
    folder = tmp_path / f"out{suffix}"
    folder.mkdir()
    data = tmp_path / "data.pt"
    torch.save(torch.randn(2, 3, 8, 8), data)
    extra = ["--data", str(data)] if command == "recalibrate" else []
    code, _, err = _run(capsys, command, f"{factories}:small", "-o", str(folder), *extra)
    assert code == 2 and "is a folder" in err and "building" not in err
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize(("argv", "message"), [
    pytest.param(["-o", "x.txt"], "Unknown output file type", id="suffix"),
    pytest.param(["-o", "x.onnx", "--opset", "17"], "expected 18 to", id="opset-low"),
    pytest.param(["-o", "x.onnx", "--opset", "99"], "--legacy-exporter writes 7 to", id="high"),
    pytest.param(["-o", "x.onnx", "--legacy-exporter", "--opset", "99"], "expected 7 to",
                 id="legacy-opset"),
    pytest.param(["-o", "x.onnx", "--validate", "--report", "."], "The report path has no file "
                 "name", id="report-folder"),
])
def test_export_refuses_what_it_cannot_do_before_any_work(capsys, tmp_path, factories,
                                                          monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, "export", f"{factories}:small", *argv)
    assert code == 2 and message in err and "building" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_plot_without_matplotlib_is_refused_before_any_work(capsys, tmp_path, factories,
                                                             monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code, _, err = _run(capsys, "fuse", f"{factories}:small", "-o", str(tmp_path / "f.pt"),
                        "--plot", str(tmp_path / "p.png"))
    assert code == 2 and "pip install 'bnsurgery[plot]'" in err and "building" not in err
    assert list(tmp_path.iterdir()) == []


def test_demo_with_an_unavailable_provider_is_refused_before_any_work(capsys, tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    code, _, err = _run(capsys, "demo", "--out", str(tmp_path / "demo"), "--providers", "cuda")
    assert code == 2 and "CUDAExecutionProvider" in err and "--providers cpu" in err
    assert "providers=" not in err and not (tmp_path / "demo").exists()


def test_hints_use_the_command_line_spelling():
    from bnsurgery.cli import cli_spelling

    text = ("Export failed (at model). Got x.\nHint: the model fixes its batch size; or pass "
            "dynamic_batch=False; fuse=False or exporter='legacy' may get around it")
    assert cli_spelling(text) == (
        "Export failed (at model). Got x.\nHint: the model fixes its batch size; or pass "
        "--static-batch; --no-fuse or pass --legacy-exporter may get around it")
    assert cli_spelling("Hint: use opset=18 or newer, or pass exporter='legacy' explicitly") == (
        "Hint: pass --opset 18 or newer, or pass --legacy-exporter")
    assert cli_spelling("strict=False\nHint: x") == "strict=False\nHint: x"  # only Hint lines


def test_strict_failure_hint_says_drop_strict(capsys, tmp_path, factories):
    code, _, err = _run(capsys, "fuse", f"{factories}:mixed", "--input-shape", "2,3,8,8",
                        "-o", str(tmp_path / "f.pt"), "--strict", "-q")
    assert code == 2
    assert "drop --strict" in err and "bnsurgery inspect MODEL" in err
    assert "strict=False" not in err and "plan_fusion(" not in err


def test_warnings_are_one_line_notes(capsys, tmp_path, monkeypatch):
    import logging
    import warnings

    module = types.ModuleType("bnsurgery_cli_noisy")

    class Noisy(torch.nn.Module):
        def forward(self, x):
            warnings.warn("a foreign warning\nwith a second line", UserWarning, stacklevel=1)
            logging.getLogger("bnsurgery.test").warning("a bnsurgery warning")
            return x * 2

    module.noisy = Noisy
    monkeypatch.setitem(sys.modules, module.__name__, module)
    argv = ["inspect", "bnsurgery_cli_noisy:noisy", "--input-shape", "2,3"]
    code, _, err = _run(capsys, *argv)
    assert code == 0, err
    assert "bnsurgery inspect: note: a foreign warning with a second line" in err
    assert err.count("note: a bnsurgery warning") == 1  # said once, not once per forward
    code, _, err = _run(capsys, *argv, "-q")
    assert code == 0
    assert err == "bnsurgery inspect: note: a bnsurgery warning\n"  # -q: only bnsurgery's own


def test_models_from_a_file_and_from_the_working_directory(capsys, tmp_path, monkeypatch):
    source = ("import torch\n\ndef make():\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, "
              "3), torch.nn.BatchNorm2d(4))\n")
    (tmp_path / "cli_file_model.py").write_text(source)
    (tmp_path / "cli_cwd_pkg").mkdir()
    (tmp_path / "cli_cwd_pkg" / "__init__.py").write_text(source)
    code, out, err = _run(capsys, "inspect", f"{tmp_path}/cli_file_model.py:make",
                          "--input-shape", "2,3,8,8", "-q")
    assert code == 0, err
    assert "1 BatchNorm layers, 1 fold" in out
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, "inspect", "cli_cwd_pkg:make", "--input-shape", "2,3,8,8",
                          "-q")
    assert code == 0, err
    assert "1 BatchNorm layers, 1 fold" in out


def test_saved_files_say_what_they_hold(capsys, tmp_path, factories):
    from safetensors import safe_open

    small = f"{factories}:small"
    out = tmp_path / "fused.safetensors"
    code, _, err = _run(capsys, "fuse", small, "--input-shape", "2,3,8,8", "-o", str(out), "-q")
    assert code == 0, err
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["bnsurgery.model"] == small and metadata["bnsurgery.seed"] == "0"
    assert metadata["bnsurgery.weights"] == "random" and metadata["bnsurgery.command"] == "fuse"
    assert json.loads(metadata["bnsurgery.folded"]) == [
        {"batchnorm": "1", "into": "0", "direction": "preceding"}]
    program_path = tmp_path / "fused.pt2"
    code, _, err = _run(capsys, "fuse", small, "--input-shape", "2,3,8,8", "-o",
                        str(program_path), "-q")
    assert code == 0, err
    extra = {"bnsurgery.json": ""}
    torch.export.load(program_path, extra_files=extra)
    assert json.loads(extra["bnsurgery.json"])["bnsurgery.model"] == small


def test_no_fuse_says_who_folded(capsys, tmp_path, factories):
    code, out, err = _run(capsys, "export", f"{factories}:small", "--input-shape", "1,3,8,8",
                          "-o", str(tmp_path / "plain.onnx"), "--no-fuse", "--json", "-q")
    assert code == 0, err
    import onnx

    graph = onnx.load(str(tmp_path / "plain.onnx")).graph
    left = sum(node.op_type == "BatchNormalization" for node in graph.node)
    assert json.loads(out)["batchnorm_nodes"] == left


def test_the_cli_time_limit_default_is_the_library_default():
    from bnsurgery import cli, ort_session

    assert cli.DEFAULT_TIMEOUT_S == ort_session.DEFAULT_TIMEOUT_S


# ---------------------------------------------------------------------------------------------
# ONNX files only: validate A.onnx B.onnx, fuse X.onnx -o Y.onnx.
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def onnx_files(tmp_path):
    from onnx_graphs import conv_net, save

    return (save(conv_net(0), tmp_path / "a.onnx"), save(conv_net(0), tmp_path / "same.onnx"),
            save(conv_net(0, scale_channel=1.05), tmp_path / "off.onnx"))


def test_validate_two_onnx_files_exit_codes(capsys, onnx_files):
    a, same, off = onnx_files
    code, out, err = _run(capsys, "validate", str(a), str(same), "--providers", "cpu", "-q")
    assert code == 0, err
    assert "onnxruntime check passed: same.onnx in onnxruntime vs a.onnx" in out
    code, out, _ = _run(capsys, "validate", str(a), str(off), "--providers", "cpu", "-q")
    assert code == 1
    assert ("  first diverging tensor: conv.out (the candidate computes it from tensors that "
            "still agree with: Conv conv)") in out.splitlines()
    assert "first diverging module" not in out  # two ONNX files have tensors, not modules


def test_validate_two_onnx_files_as_json(capsys, onnx_files, tmp_path):
    a, _, off = onnx_files
    code, out, _ = _run(capsys, "validate", str(a), str(off), "--providers", "cpu",
                        "--input-shape", "2,3,8,8", "--json", "-q",
                        "--report", str(tmp_path / "report.json"))
    document = _conforming(out)
    assert code == 1 and document["exit_code"] == 1 and document["status"] == "failed"
    assert document["onnx_reference"] == str(a) and document["onnx"] == str(off)
    assert document["onnx_inputs"] == [{"name": "x", "dtype": "float32", "shape": [2, 3, 8, 8]}]
    assert document["input_shape"] == [2, 3, 8, 8] and document["model"] is None
    assert document["weights"] is None and document["seed"] == 0
    (report,) = document["reports"]
    assert report["first_divergence"] == "conv.out" and report["divergence_kind"] == "tensor"
    assert [layer["name"] for layer in report["layers"]][0] == "conv.out"
    assert _conforming((tmp_path / "report.json").read_text())["summary"]["failed"] == 1


def test_validate_two_onnx_files_that_differ_in_inputs_exits_2(capsys, onnx_files, tmp_path):
    import onnx

    a, _, _ = onnx_files
    model = onnx.load(str(a))
    model.graph.input[0].name = "image"
    model.graph.node[0].input[0] = "image"
    other = tmp_path / "other.onnx"
    onnx.save(model, str(other))
    code, _, err = _run(capsys, "validate", str(a), str(other), "--providers", "cpu", "-q")
    lines = _error_lines(err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "input only in the first file: x; input only in the second file: image" in lines[0]
    code, _, err = _run(capsys, "validate", str(a), str(a), "--weights", "w.pt", "-q")
    assert code == 2 and "--weights applies to a MODEL built in Python" in err
    assert "Hint: drop --weights" in err
    code, _, err = _run(capsys, "validate", str(a), str(a), "--input-shape", "1,3,9,9", "-q")
    assert code == 2 and "the file expects N,3,8,8, got 1,3,9,9" in err
    before = a.read_bytes()
    code, _, err = _run(capsys, "validate", str(a), str(other), "--report", str(a), "-q")
    assert code == 2 and "--report would overwrite the ONNX file read" in err
    assert a.read_bytes() == before


def test_fuse_an_onnx_file(capsys, onnx_files, tmp_path):
    import onnx

    a, _, _ = onnx_files
    out = tmp_path / "folded.onnx"
    code, text, err = _run(capsys, "fuse", str(a), "-o", str(out), "--providers", "cpu",
                           "--json", "-q")
    document = _conforming(text)
    assert code == 0 and document["status"] == "passed", err
    assert document["output"] == str(out) and document["format"] == "onnx"
    assert document["batchnorms"] == [{"name": "bn", "type": "BatchNormalization",
                                       "status": "folded", "into": "conv", "direction": "after",
                                       "reason": "folded into Conv conv"}]
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["Conv", "Relu", "Flatten",
                                                                   "Gemm"]
    code, text, _ = _run(capsys, "validate", str(a), str(out), "--providers", "cpu", "-q")
    assert code == 0, text  # the written file checks out against the original, independently


def test_fuse_an_onnx_file_refuses_bad_output_and_strict_misses(capsys, onnx_files, tmp_path):
    from onnx_graphs import Graph, TensorProto, save

    a, _, _ = onnx_files
    code, _, err = _run(capsys, "fuse", str(a), "-o", str(tmp_path / "x.pt"), "-q")
    assert code == 2 and "Unknown output file type for an ONNX MODEL" in err
    assert "Hint: pass -o FILE.onnx" in err
    g = Graph(0)
    g.batchnorm("bn", g.node("Relu", ["x"], ["r"], "relu"), 3, output="y")
    kept = save(g.model([("x", TensorProto.FLOAT, ["N", 3, 2, 2])],
                        [("y", TensorProto.FLOAT, ["N", 3, 2, 2])]), tmp_path / "kept.onnx")
    out = tmp_path / "out.onnx"
    code, _, err = _run(capsys, "fuse", str(kept), "-o", str(out), "--strict", "-q")
    assert code == 2 and "bn: it follows Relu" in err and "Hint: drop --strict" in err
    assert not out.exists()
    code, text, _ = _run(capsys, "fuse", str(kept), "-o", str(out), "--json", "-q")
    document = _conforming(text)
    assert code == 0 and document["status"] == "skipped" and document["passed"] is None
    assert document["batchnorms"][0]["status"] == "skipped" and out.exists()


def test_fuse_an_onnx_file_that_folds_wrongly_exits_1_and_writes_nothing(capsys, onnx_files,
                                                                         tmp_path, monkeypatch):
    import bnsurgery.fold as fold_maths  # onnx_fold imports it when a node folds

    real = fold_maths.fold_layer_weights

    def off_by_five_percent(*args, **kwargs):
        folded = real(*args, **kwargs)
        return type(folded)(folded.weight * 1.05, folded.bias, folded.weight64, folded.bias64)

    monkeypatch.setattr(fold_maths, "fold_layer_weights", off_by_five_percent)
    a, _, _ = onnx_files
    out = tmp_path / "folded.onnx"
    code, text, _ = _run(capsys, "fuse", str(a), "-o", str(out), "--providers", "cpu", "-q")
    assert code == 1 and not out.exists()
    assert f"not saved: the folded graph does not match {a}" in text
    assert "first diverging tensor: bn.out" in text and "first diverging module" not in text


def test_fuse_and_validate_onnx_files_plot_the_error_per_tensor(capsys, onnx_files, tmp_path):
    pytest.importorskip("matplotlib")
    a, _, off = onnx_files
    plot = tmp_path / "tensors.png"
    code, _, err = _run(capsys, "fuse", str(a), "-o", str(tmp_path / "f.onnx"), "--providers",
                        "cpu", "--plot", str(plot), "-q")
    assert code == 0, err
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot.unlink()
    code, _, err = _run(capsys, "validate", str(a), str(off), "--providers", "cpu", "--plot",
                        str(plot), "-q")
    assert code == 1 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", err
