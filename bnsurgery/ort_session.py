"""onnxruntime plumbing: execution providers, sessions, time-limited runs and file metadata.

Provider names are resolved here (short names such as ``"cpu"`` and ``"cuda"`` or full
onnxruntime names, with the CPU provider appended as the last resort onnxruntime needs), and a
provider onnxruntime does not offer fails with the extra to install. Sessions are created with
TF32 switched off on the CUDA provider (the float32 tolerance assumes it) and with idle threads
that do not spin. onnx and onnxruntime are imported on first use through
:func:`bnsurgery._lazy.require`.

Every run of a file goes through :class:`OnnxRunner` (torch tensors in, torch tensors out), which
gives it a time limit: an ONNX file is code, and a ``Loop`` node with a trip count of 2**62 runs
until the process is killed. The run happens in a worker thread while the calling thread waits,
so that the time limit and Ctrl-C (which Python only delivers to the main thread, and not while
it is inside onnxruntime) both reach it; either sets onnxruntime's ``RunOptions.terminate``,
which stops the run between two nodes or loop iterations.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bnsurgery._lazy import require
from bnsurgery.errors import (
    BackendRunError,
    InvalidInputError,
    MissingDependencyError,
    RunTimeoutError,
    format_message,
)
from bnsurgery.messages import first_line

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ONNX_TENSOR_TYPES",
    "PROVIDER_ALIASES",
    "OnnxRunner",
    "check_timeout",
    "create_session",
    "default_providers",
    "file_details",
    "resolve_providers",
    "run_with_limit",
]

#: Default time limit of one onnxruntime run, in seconds: far above what a vision model needs
#: on a CPU (resnet50 at batch 32 takes about 5 s on two cores), far below "until killed".
DEFAULT_TIMEOUT_S = 300.0

#: How long a run may take to stop once told to: onnxruntime checks the flag between nodes, so a
#: single huge node finishes first.
_STOP_GRACE_S = 30.0
# How often a waiting thread wakes to take a signal that another thread received.
_WAKE_S = 0.1

#: Short provider names accepted wherever providers are given.
PROVIDER_ALIASES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}

_PROVIDER_HINTS: dict[str, str] = {
    "CUDAExecutionProvider": "pip install 'bnsurgery[gpu]' (it brings onnxruntime-gpu) on a "
                             "machine with an NVIDIA GPU, or pass providers=['cpu']",
    "TensorrtExecutionProvider": "pip install 'bnsurgery[gpu]' on a machine with TensorRT, or "
                                 "pass providers=['cpu']",
}

#: onnxruntime's input type names and the torch dtype of each.
ONNX_TENSOR_TYPES: dict[str, torch.dtype] = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(double)": torch.float64,
    "tensor(bfloat16)": torch.bfloat16,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(bool)": torch.bool,
}


def default_providers() -> list[str]:
    """CUDA when this onnxruntime offers it, then CPU."""
    ort = require("onnxruntime", purpose="Running ONNX files")
    available = ort.get_available_providers()
    chosen = [p for p in ("CUDAExecutionProvider",) if p in available]
    return chosen + ["CPUExecutionProvider"]


def resolve_providers(providers: Sequence[str] | str | None) -> list[str]:
    """Turn short names (``"cpu"``, ``"cuda"``) or full names into onnxruntime provider names.

    ``None`` means :func:`default_providers`. The CPU provider is appended as the last resort
    onnxruntime needs for nodes another provider cannot run.

    Raises:
        InvalidInputError: A provider name is unknown.
        MissingDependencyError: A requested provider is not offered by the installed onnxruntime.
    """
    if providers is None:
        return default_providers()
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p.strip()]
    ort = require("onnxruntime", purpose="Running ONNX files")
    available = ort.get_available_providers()
    resolved: list[str] = []
    for name in providers:
        full = PROVIDER_ALIASES.get(name.strip().lower(), name.strip())
        if not full.endswith("ExecutionProvider"):
            raise InvalidInputError(format_message(
                "Unknown onnxruntime execution provider", where="providers", got=repr(name),
                expected=f"one of {sorted(PROVIDER_ALIASES)} or a full provider name",
                hint="use 'cpu' or 'cuda'"))
        if full not in available:
            raise MissingDependencyError(format_message(
                f"onnxruntime cannot use {full} here", where="providers", got=repr(name),
                expected=f"one of the available providers {available}",
                hint=_PROVIDER_HINTS.get(full, "install the onnxruntime build that has it")))
        if full not in resolved:
            resolved.append(full)
    if not resolved:
        raise InvalidInputError(format_message(
            "No execution provider given", where="providers", got=repr(providers),
            expected="at least one provider", hint="use 'cpu' or 'cuda'"))
    if "CPUExecutionProvider" not in resolved:
        resolved.append("CPUExecutionProvider")
    return resolved


def _provider_entries(providers: Sequence[str]) -> list[Any]:
    # onnxruntime's CUDA provider allows TF32 by default; the fp32 tolerance assumes it is off.
    return [(p, {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p for p in providers]


def create_session(path: str | Path, providers: Sequence[str]) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``path`` on ``providers`` (resolved names).

    Raises:
        InvalidInputError: onnxruntime cannot load the file.
    """
    ort = require("onnxruntime", purpose="Running ONNX files")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # validate_onnx checks for a provider fallback explicitly
    # Idle onnxruntime threads spin by default, slowing the PyTorch runs interleaved with them.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=options,
                                    providers=_provider_entries(providers))
    except Exception as exc:  # onnxruntime's own exception types do not share a useful base
        raise InvalidInputError(format_message(
            "onnxruntime could not load the ONNX file", where=str(path),
            got=f"{type(exc).__name__}: {first_line(exc)}",
            expected="a valid ONNX model", hint="re-export it with bnsurgery export")) from exc


def file_details(path: str | Path) -> dict[str, Any]:
    """What a report needs to know about an ONNX file: opset, exporter, producer, bnsurgery's
    own metadata; the weights are not loaded.

    Raises:
        InvalidInputError: onnx cannot read the file.
    """
    onnx = require("onnx", purpose="Reading ONNX files")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends share no useful base
        raise InvalidInputError(format_message(
            "onnx could not load the ONNX file", where=str(path),
            got=f"{type(exc).__name__}: {first_line(exc)}",
            expected="a valid ONNX model", hint="re-export it with bnsurgery export")) from exc
    props = {p.key: p.value for p in proto.metadata_props}
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    exporter = props.get("bnsurgery.exporter",
                         f"{proto.producer_name} {proto.producer_version}".strip() or "unknown")
    details = {"file": str(path), "opset": opset, "exporter": exporter,
               "producer": f"{proto.producer_name} {proto.producer_version}".strip()}
    for key in ("bnsurgery.fused", "bnsurgery.dynamic_batch", "bnsurgery.export_batch"):
        if key in props:
            details[key.split(".", 1)[1]] = props[key]
    return details


def check_timeout(timeout: object, *, where: str = "timeout") -> float:
    """``timeout`` as a float number of seconds, refused unless positive and finite.

    Raises:
        InvalidInputError: ``timeout`` is not a positive finite number.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not math.isfinite(timeout) or timeout <= 0:
        raise InvalidInputError(format_message(
            "A time limit must be a positive number of seconds", where=where, got=repr(timeout),
            expected="a finite number > 0",
            hint=f"leave {where}={DEFAULT_TIMEOUT_S:g} (the default) or pass e.g. {where}=600"))
    return float(timeout)


def _terminate(options: Any, done: threading.Event) -> bool:
    """Tell a run to stop, again and again until it has, for at most the grace period.

    The flag is set more than once because an interruption can come before the worker's run has
    begun reading it; whether the run started before or after, one of the settings lands.
    """
    deadline = time.monotonic() + _STOP_GRACE_S
    while True:
        options.terminate = True
        if done.wait(0.05):
            return True
        if time.monotonic() >= deadline:
            return False


def _wait_in_slices(done: threading.Event, timeout: float) -> bool:
    """``done.wait(timeout)``, woken every :data:`_WAKE_S` seconds to take pending signals.

    A process-directed SIGINT may be delivered to any thread that does not block it (an
    onnxruntime pool thread, the worker, a timer). Python then only flags it, and the main thread
    would not see the flag until one long wait returned: Ctrl-C could be ignored for the whole
    time limit. Short waits let the main thread raise ``KeyboardInterrupt`` within a slice.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return done.is_set()
        if done.wait(min(left, _WAKE_S)):
            return True


def run_with_limit(session: Any, feed: dict[str, Any], *, timeout: float, where: str
                   ) -> list[Any]:
    """``session.run(None, feed)``, stopped after ``timeout`` seconds or on Ctrl-C.

    The run happens in a worker thread; this thread waits for it. When the time passes, or the
    wait is interrupted (Ctrl-C raises ``KeyboardInterrupt`` here, SIGTERM whatever its handler
    raises), ``RunOptions.terminate`` is set and the worker is given a moment to stop.

    Args:
        session: An onnxruntime ``InferenceSession``.
        feed: Input name -> numpy array.
        timeout: Seconds the run may take.
        where: The file, for the message.

    Returns:
        The outputs as numpy arrays.

    Raises:
        RunTimeoutError: The run did not finish within ``timeout`` seconds.
        BackendRunError: onnxruntime raised (its own exception types share no useful base; the
            original is the cause).
        InvalidInputError: ``timeout`` is not a positive number.
    """
    timeout = check_timeout(timeout)
    ort = require("onnxruntime", purpose="Running ONNX files")
    options = ort.RunOptions()
    options.log_severity_level = 4  # a terminated run logs an error; the exception says it all
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["results"] = session.run(None, feed, options)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting thread as it is
            outcome["error"] = exc
        finally:
            done.set()

    worker = threading.Thread(target=work, name="bnsurgery-onnxruntime", daemon=True)
    try:
        worker.start()
        finished = _wait_in_slices(done, timeout)
    except BaseException:  # Ctrl-C or SIGTERM: stop the run, then let the interruption through
        _terminate(options, done)
        raise
    if not finished:
        stopped = _terminate(options, done)
        raise RunTimeoutError(format_message(
            f"onnxruntime did not finish within the time limit of {timeout:g} s"
            + ("" if stopped else f" and did not stop within {_STOP_GRACE_S:g} s of being told"),
            where=where, got=f"a run still going after {timeout:g} s",
            expected=f"a run shorter than {timeout:g} s",
            hint=f"pass timeout={max(2 * timeout, DEFAULT_TIMEOUT_S):g} if the model is really "
                 "this slow; otherwise the file may never finish (a Loop or Scan node with a "
                 "huge trip count): do not run it"))
    if "error" in outcome:
        error = outcome["error"]
        raise BackendRunError(format_message(
            "onnxruntime failed to run the file", where=where,
            got=f"{type(error).__name__}: {first_line(error)}",
            expected="inputs matching the file's inputs (count, dtype, shape, batch axis)",
            hint="compare the inputs with the file's inputs (onnxruntime's "
                 "InferenceSession.get_inputs())")) from error
    results: list[Any] = outcome["results"]  # what InferenceSession.run returned
    return results


class OnnxRunner:
    """An ONNX file in onnxruntime, called like a model: torch tensors in, torch tensors out.

    Inputs are moved to the CPU and cast to the dtype the file declares for them; outputs come
    back as CPU tensors. Every call is time-limited (see :func:`run_with_limit`). The export
    check, the per-layer search and validation all run files through this one class.

    Args:
        path: The ONNX file.
        providers: Resolved execution provider names (see :func:`resolve_providers`).
        timeout: Seconds one call may take.

    Attributes:
        session: The onnxruntime session.
        input_names: The file's input names, in order.
        input_dtypes: The torch dtype of each input (``None`` for a type torch has no dtype for).
        providers_used: The providers onnxruntime actually uses, in order.
        load_seconds: How long creating the session took.

    Raises:
        InvalidInputError: onnxruntime cannot load the file, or ``timeout`` is not a positive
            number.
    """

    def __init__(self, path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",),
                 *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.timeout = check_timeout(timeout)
        start = time.perf_counter()
        self.session = create_session(self.path, list(providers))
        self.load_seconds = time.perf_counter() - start
        inputs = self.session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self.input_dtypes = [ONNX_TENSOR_TYPES.get(i.type) for i in inputs]
        self.input_shapes = [list(i.shape or []) for i in inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.providers_used = list(self.session.get_providers())

    def feed(self, inputs: Sequence[Tensor]) -> dict[str, Any]:
        """The numpy feed for ``inputs``, cast to the file's input dtypes.

        Raises:
            InvalidInputError: The number of inputs differs from the file's.
        """
        if len(inputs) != len(self.input_names):
            raise InvalidInputError(format_message(
                "The number of inputs does not match the ONNX file", where=str(self.path),
                got=f"{len(inputs)} input tensors",
                expected=f"{len(self.input_names)} ({', '.join(self.input_names)})",
                hint="pass one tensor per model input"))
        return {name: tensor.detach().to("cpu", dtype=dtype or tensor.dtype).numpy()
                for name, tensor, dtype in zip(self.input_names, inputs, self.input_dtypes,
                                               strict=True)}

    def run(self, feed: dict[str, Any]) -> list[Any]:
        """Run on a numpy feed; the outputs as numpy arrays, in the file's output order."""
        return run_with_limit(self.session, feed, timeout=self.timeout, where=str(self.path))

    def __call__(self, *inputs: Tensor) -> list[Tensor]:
        return [torch.from_numpy(value) for value in self.run(self.feed(inputs))]
