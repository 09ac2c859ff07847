"""Tests for bnsurgery.ort_session: onnxruntime execution providers and time-limited runs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from bnsurgery.errors import (
    BackendRunError,
    InvalidInputError,
    MissingDependencyError,
    RunTimeoutError,
)
from bnsurgery.ort_session import OnnxRunner, check_timeout, resolve_providers

ort = pytest.importorskip("onnxruntime")


def test_resolve_providers():
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(InvalidInputError, match="Unknown onnxruntime execution provider"):
        resolve_providers("gpu9000")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this onnxruntime has the CUDA provider")
def test_unavailable_provider_names_the_extra():
    with pytest.raises(MissingDependencyError, match=r"pip install 'bnsurgery\[gpu\]'"):
        resolve_providers("cuda")


# ------------------------------------------------------------------------ time-limited runs

def _hostile_loop(path):
    """An ONNX file whose Loop runs 2**62 iterations: it never finishes on its own."""
    onnx = pytest.importorskip("onnx")
    helper, tensor = onnx.helper, onnx.TensorProto
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", tensor.INT64, []),
         helper.make_tensor_value_info("cond_in", tensor.BOOL, []),
         helper.make_tensor_value_info("v_in", tensor.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", tensor.BOOL, []),
         helper.make_tensor_value_info("v_out", tensor.FLOAT, [1])],
        initializer=[helper.make_tensor("one", tensor.FLOAT, [1], [1.0])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trip", "cond", "x"], ["y"], body=body)],
        "hostile", [helper.make_tensor_value_info("x", tensor.FLOAT, [1])],
        [helper.make_tensor_value_info("y", tensor.FLOAT, [1])],
        initializer=[helper.make_tensor("trip", tensor.INT64, [], [2**62]),
                     helper.make_tensor("cond", tensor.BOOL, [], [True])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _affine_file(path, weight, bias):
    """``x @ weight.T + bias`` as an ONNX file, with a dynamic batch axis."""
    onnx = pytest.importorskip("onnx")
    helper, tensor = onnx.helper, onnx.TensorProto
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "affine",
        [helper.make_tensor_value_info("x", tensor.FLOAT, ["batch", weight.shape[1]])],
        [helper.make_tensor_value_info("y", tensor.FLOAT, ["batch", weight.shape[0]])],
        initializer=[helper.make_tensor("w", tensor.FLOAT, list(weight.shape),
                                        weight.flatten().tolist()),
                     helper.make_tensor("b", tensor.FLOAT, list(bias.shape), bias.tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _runner_threads():
    return [t for t in threading.enumerate() if t.name == "bnsurgery-onnxruntime" and t.is_alive()]


def test_runner_computes_what_torch_computes(tmp_path):
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 3)
    path = _affine_file(tmp_path / "affine.onnx", linear.weight.detach(), linear.bias.detach())
    runner = OnnxRunner(path)
    x = torch.randn(5, 4, dtype=torch.float64)  # cast to the file's float32 by the runner
    (got,) = runner(x)
    with torch.no_grad():
        torch.testing.assert_close(got, linear(x.float()), rtol=1e-5, atol=1e-6)
    assert runner.input_names == ["x"] and runner.input_dtypes == [torch.float32]
    assert runner.providers_used[0] == "CPUExecutionProvider"
    with pytest.raises(InvalidInputError, match="number of inputs"):
        runner(x, x)
    with pytest.raises(BackendRunError, match="failed to run the file"):
        runner(torch.randn(5, 7))  # the wrong width: onnxruntime's own error, wrapped


def test_a_run_past_its_time_limit_is_stopped_and_raises(tmp_path):
    runner = OnnxRunner(_hostile_loop(tmp_path / "loop.onnx"), timeout=0.2)
    with pytest.raises(RunTimeoutError, match=r"within the time limit of 0.2 s.*loop.onnx"):
        runner(torch.zeros(1))
    # RunOptions.terminate stopped the Loop: the worker thread ended, nothing keeps spinning.
    assert _runner_threads() == []


def test_validate_onnx_raises_the_time_limit(tmp_path):
    from bnsurgery.validate import validate_onnx

    path = _hostile_loop(tmp_path / "loop.onnx")
    with pytest.raises(RunTimeoutError, match="timeout="):
        validate_onnx(torch.nn.Identity(), path, torch.zeros(1), providers="cpu", timeout=0.2,
                      float64_baseline=False)
    assert _runner_threads() == []


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, "10", True])
def test_a_time_limit_must_be_a_positive_number(tmp_path, bad):
    with pytest.raises(InvalidInputError, match="positive number of seconds"):
        check_timeout(bad)


# "main": the signal reaches the waiting (main) thread. "other thread": the main thread blocks
# SIGINT, so the kernel hands the signal to the timer thread that sent it, as it may hand a
# terminal's Ctrl-C to any onnxruntime thread; Python only flags it there, and a main thread in
# one long wait would not notice until its time limit (this is how the run hung intermittently).
@pytest.mark.parametrize("receiver", ["main", "other thread"])
def test_ctrl_c_stops_a_run(tmp_path, receiver):
    """SIGINT during a never-ending run ends it: KeyboardInterrupt, and the run is terminated."""
    path = _hostile_loop(tmp_path / "loop.onnx")
    block = "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})" if receiver != "main" \
        else "pass"
    code = textwrap.dedent(f"""
        import faulthandler, os, signal, sys, threading, time, torch
        from bnsurgery.ort_session import OnnxRunner
        faulthandler.dump_traceback_later(60, exit=True)  # a hang shows where, then ends
        runner = OnnxRunner({str(path)!r}, timeout=600)
        timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()  # before the mask: the timer thread can take the signal
        {block}
        started = time.monotonic()
        try:
            runner(torch.zeros(1))
        except KeyboardInterrupt:
            alive = [t.name for t in threading.enumerate()
                     if t.name == "bnsurgery-onnxruntime" and t.is_alive()]
            print("interrupted", alive, round(time.monotonic() - started))
    """)
    # The subprocess limit only keeps a broken implementation from hanging the suite.
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=False, env={**os.environ})
    assert result.returncode == 0, result.stderr
    interrupted, alive, seconds = result.stdout.strip().splitlines()[-1].rsplit(" ", 2)
    assert (interrupted, alive) == ("interrupted", "[]"), result.stdout
    assert int(seconds) < 30, f"the run took {seconds} s to stop after Ctrl-C at 1 s"
