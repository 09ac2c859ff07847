"""onnxruntime plumbing: execution providers, inference sessions and ONNX file metadata.

Provider names are resolved here (short names such as ``"cpu"`` and ``"cuda"`` or full
onnxruntime names, with the CPU provider appended as the last resort onnxruntime needs), and a
provider onnxruntime does not offer fails with the extra to install. Sessions are created with
TF32 switched off on the CUDA provider (the float32 tolerance assumes it) and with idle threads
that do not spin. onnx and onnxruntime are imported on first use through
:func:`bnsurgery._lazy.require`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bnsurgery._lazy import require
from bnsurgery.errors import InvalidInputError, MissingDependencyError, format_message

__all__ = ["PROVIDER_ALIASES", "default_providers", "resolve_providers"]

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

_ONNX_TENSOR_TYPES: dict[str, torch.dtype] = {
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


def _session(path: Path, providers: Sequence[str]) -> Any:
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
            got=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            expected="a valid ONNX model", hint="re-export it with bnsurgery export")) from exc


def _file_details(path: Path) -> dict[str, Any]:
    onnx = require("onnx", purpose="Reading ONNX files")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends share no useful base
        raise InvalidInputError(format_message(
            "onnx could not load the ONNX file", where=str(path),
            got=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
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
