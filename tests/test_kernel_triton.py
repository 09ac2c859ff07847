"""The Triton backend, run on the CPU through Triton's interpreter, against torch and the oracle.

Triton's interpreter must be switched on (``TRITON_INTERPRET=1``) before its programs are first
used, and it costs microseconds per element. So every case below runs in one subprocess started
with ``TRITON_INTERPRET=1`` and ``BNSURGERY_KERNEL=triton`` (the backend forced: a case cannot
quietly run another one), on tensors of a few dozen values, and reports back; each case is its
own test here. The interpreter's tiles are 16 values, so these small tensors still cross tile,
split and channel-block boundaries.

References: torch's own ``F.batch_norm`` in float64 on the same (rounded) inputs, its autograd
for the gradients, and :func:`bnsurgery.functional.literal_batch_norm`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
_RESULT_MARKER = "TRITON-CASES:"
_EPS = 1e-5

#: (rtol, atol) per dtype for outputs and gradients of magnitude about 1, against float64:
#: a couple of units in the last place of the dtype (the interpreter rounds bfloat16 towards
#: zero, where a GPU rounds to nearest, hence a full bfloat16 unit more).
_TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 6e-3),
    torch.bfloat16: (1.6e-2, 5e-2),
}

#: Each case: keyword arguments of :func:`_parity`, or the name of a function below.
CASES: dict[str, dict | str] = {
    "nchw-train-fp32": dict(shape=(5, 3, 4, 3)),
    "nchw-eval-fp32": dict(shape=(5, 3, 4, 3), training=False),
    "channels_last-train-fp32": dict(shape=(5, 3, 4, 3), layout="channels_last"),
    "channels_last-eval-fp32": dict(shape=(5, 3, 4, 3), layout="channels_last",
                                    training=False),
    "2d-train-fp32": dict(shape=(20, 6)),
    "2d-eval-fp32": dict(shape=(20, 6), training=False),
    "3d-train-fp32": dict(shape=(4, 3, 10)),
    "5d-channels_last_3d-train-fp32": dict(shape=(2, 3, 2, 2, 3), layout="channels_last"),
    "odd-strides-train-fp32": dict(shape=(4, 3, 3, 3), layout="strided"),
    "no-affine-train-fp32": dict(shape=(4, 3, 5), weight=False, bias=False),
    "weight-only-eval-fp32": dict(shape=(4, 3, 5), bias=False, training=False),
    "input-grad-only-eval-fp32": dict(shape=(4, 3, 5), training=False, grads=("x",)),
    "weight-grad-only-train-fp32": dict(shape=(4, 3, 5), grads=("weight",)),
    "momentum-1-train-fp32": dict(shape=(6, 4), momentum=1.0),
    "nchw-train-fp16": dict(shape=(4, 3, 3, 2), dtype=torch.float16),
    "channels_last-eval-fp16": dict(shape=(4, 3, 3, 2), dtype=torch.float16,
                                    layout="channels_last", training=False),
    "fp16-input-fp32-params-train": dict(shape=(4, 3, 3, 2), dtype=torch.float16,
                                         param_dtype=torch.float32),
    "channels_last-train-bf16": dict(shape=(4, 3, 3, 2), dtype=torch.bfloat16,
                                     layout="channels_last"),
    "2d-eval-bf16": dict(shape=(12, 5), dtype=torch.bfloat16, training=False),
    "nchw-train-fp64": dict(shape=(4, 3, 3, 2), dtype=torch.float64),
    "2d-eval-fp64": dict(shape=(12, 5), dtype=torch.float64, training=False),
    "large-mean-small-spread": "large_mean_small_spread",
    "half-running-stats-rounded-once": "half_running_stats",
    "empty-batch": "empty_batch",
    "module-momentum-none": "module_momentum_none",
    "gradcheck-fp64": "gradcheck_fp64",
    "opcheck": "opcheck",
    "backend-is-triton": "backend_is_triton",
    "no-torch-batch-norm-kernel": "no_torch_batch_norm_kernel",
}


# --- The cases (run inside the interpreter subprocess) -----------------------------------------


def _inputs(shape, dtype, layout, loc=0.0, spread=1.0, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    channels = shape[1]
    offsets = torch.randn(channels, generator=generator, dtype=torch.float64)
    offsets = offsets.view(1, -1, *([1] * (len(shape) - 2)))
    x = loc + offsets + spread * torch.randn(shape, generator=generator, dtype=torch.float64)
    x = x.to(device=device, dtype=dtype)
    if layout == "strided":  # every other value of the last dimension: neither layout
        x = torch.cat([x, x], dim=-1)[..., ::2]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


def _close(actual, expected, dtype, what, scale=1.0):
    rtol, atol = _TOLERANCE[dtype]
    torch.testing.assert_close(actual.cpu().double(), expected.double(), rtol=rtol,
                               atol=atol * scale, msg=lambda m: f"{what}: {m}")


def _parity(shape, *, dtype=torch.float32, param_dtype=None, layout="contiguous",
            training=True, weight=True, bias=True, grads=("x", "weight", "bias"),
            momentum=0.1, device="cpu"):
    """Output, running statistics and gradients against torch in float64 and the oracle.

    The references run on the CPU in float64, from the very values the backend was given.
    """
    from bnsurgery.functional import batch_norm, literal_batch_norm

    param_dtype = param_dtype or dtype
    channels = shape[1]
    x = _inputs(shape, dtype, layout, device=device)
    generator = torch.Generator().manual_seed(1)
    params = {"weight": torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5,
              "bias": torch.randn(channels, generator=generator, dtype=torch.float64)}
    params = {k: v.to(param_dtype) for k, v in params.items()
              if {"weight": weight, "bias": bias}[k]}
    running = {"mean": torch.randn(channels, generator=generator, dtype=torch.float64),
               "var": torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5}
    running = {k: v.to(param_dtype) for k, v in running.items()}
    grad_out = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)

    def run(cast):
        xs = cast(x).requires_grad_("x" in grads)
        ps = {k: cast(v).requires_grad_(k in grads) for k, v in params.items()}
        stats = {k: cast(v).clone() for k, v in running.items()}
        return xs, ps, stats

    ours_x, ours_p, ours_s = run(lambda t: t.detach().to(device).clone())
    y = batch_norm(ours_x, ours_s["mean"], ours_s["var"], ours_p.get("weight"),
                   ours_p.get("bias"), training, momentum, _EPS)
    ref_x, ref_p, ref_s = run(lambda t: t.detach().cpu().double())
    expected = F.batch_norm(ref_x, ref_s["mean"], ref_s["var"], ref_p.get("weight"),
                            ref_p.get("bias"), training, momentum, _EPS)
    oracle = literal_batch_norm(x.cpu().double(), running["mean"].double().clone(),
                                running["var"].double().clone(),
                                params["weight"].double() if weight else None,
                                params["bias"].double() if bias else None, training, momentum,
                                _EPS)
    assert y.dtype == dtype and y.shape == x.shape
    if layout != "strided":
        assert y.stride() == x.stride(), f"layout {y.stride()} != input's {x.stride()}"
    _close(y, expected, dtype, "output vs torch")
    _close(y, oracle, dtype, "output vs literal_batch_norm")
    for key in ("mean", "var"):
        assert ours_s[key].dtype == param_dtype
        _close(ours_s[key], ref_s[key], param_dtype, f"running_{key}")
    y.backward(grad_out.to(device))
    expected.backward(grad_out.double())
    tensors = {"x": (ours_x, ref_x), **{k: (ours_p[k], ref_p[k]) for k in ours_p}}
    for name, (ours, ref) in tensors.items():
        if name not in grads:
            assert ours.grad is None
            continue
        assert ours.grad.dtype == ours.dtype
        scale = max(1.0, float(ref.grad.abs().max()))
        _close(ours.grad, ref.grad, dtype, f"grad of {name}", scale)


def large_mean_small_spread():
    """A mean 10^4 times the spread: about as accurate as torch's float32 kernel, against float64.

    torch's CPU kernel accumulates float32 in float64, so it is a strict yardstick: measured,
    this backend's largest errors are 1.3x (output) and 3.1x (input gradient) torch's, from the
    float32 variance (``dL/dx`` depends on ``invstd^3``). ``E[x^2] - E[x]^2`` would be wrong by
    about 100^2 * 6e-8 = 6e-4 in a variance of 1e-4.
    """
    from bnsurgery.functional import batch_norm

    x = _inputs((6, 3, 4, 2), torch.float32, "contiguous", loc=100.0, spread=0.01)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    errors = {}
    for label, cast, fn in (("ours", torch.float32, batch_norm),
                            ("torch", torch.float32, F.batch_norm),
                            ("float64", torch.float64, F.batch_norm)):
        xs = x.to(cast).clone().requires_grad_(True)
        stats = [torch.zeros(3, dtype=cast), torch.ones(3, dtype=cast)]
        y = fn(xs, *stats, None, None, True, 0.1, _EPS)
        y.backward(grad_out.to(cast))
        errors[label] = (y.detach().double(), xs.grad.double(), stats[1].double())
    for i, what in enumerate(("output", "grad of x", "running_var")):
        exact = errors["float64"][i]
        ours = float((errors["ours"][i] - exact).abs().max())
        theirs = float((errors["torch"][i] - exact).abs().max())
        scale = float(exact.abs().max())
        assert ours <= max(4 * theirs, 1e-5 * scale), (what, ours, theirs, scale)


def half_running_stats():
    """float16 buffers: each new value computed in float32 and rounded once, as torch does."""
    from bnsurgery.functional import batch_norm

    x = _inputs((4, 3, 3, 2), torch.float16, "contiguous")
    ours = [torch.full((3,), 0.3, dtype=torch.float16), torch.full((3,), 0.7, dtype=torch.float16)]
    exact = [t.float() for t in ours]  # the same starting values, updated in float32
    batch_norm(x, *ours, None, None, True, 0.1, _EPS)
    F.batch_norm(x.float(), *exact, None, None, True, 0.1, _EPS)
    for mine, updated in zip(ours, exact, strict=True):
        torch.testing.assert_close(mine, updated.to(torch.float16), rtol=0, atol=0)


def empty_batch():
    """No values: an empty output, and the running statistics left alone."""
    from bnsurgery.functional import batch_norm

    x = torch.empty(0, 3, 2, 2)
    stats = [torch.randn(3), torch.rand(3) + 0.5]
    before = [t.clone() for t in stats]
    y = batch_norm(x, *stats, None, None, True, 0.1, _EPS)
    assert y.shape == x.shape
    for after, was in zip(stats, before, strict=True):
        torch.testing.assert_close(after, was, rtol=0, atol=0)


def module_momentum_none():
    """Two training steps of the module with a cumulative average, against torch's module."""
    import bnsurgery

    ours, theirs = bnsurgery.BatchNorm2d(3, momentum=None), torch.nn.BatchNorm2d(3, momentum=None)
    for seed in (0, 1):
        x = _inputs((3, 3, 2, 3), torch.float32, "channels_last", seed=seed)
        torch.testing.assert_close(ours(x), theirs(x), rtol=2e-5, atol=2e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name))


def gradcheck_fp64():
    """First derivatives of the Triton forward and backward, by finite differences."""
    from bnsurgery.functional import batch_norm

    x = _inputs((3, 2, 2), torch.float64, "contiguous").requires_grad_(True)
    weight = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([0.1, -0.2], dtype=torch.float64, requires_grad=True)
    for training in (True, False):
        stats = [torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)]
        assert torch.autograd.gradcheck(
            lambda x, w, b, training=training, stats=stats: batch_norm(
                x, *stats, w, b, training, 0.0, _EPS),
            (x, weight, bias), fast_mode=True)


def opcheck():
    """torch.library.opcheck: schema, fake tensors, autograd registration, AOT dispatch."""
    from bnsurgery import kernel_triton  # noqa: F401  (registers the operators)

    ops = torch.ops.bnsurgery
    x = _inputs((3, 2, 2, 2), torch.float32, "channels_last")
    weight, bias = torch.rand(2) + 0.5, torch.randn(2)
    stats = [torch.randn(2), torch.rand(2) + 0.5]
    torch.library.opcheck(ops.triton_forward_train, (x, weight, bias, *stats, 0.1, _EPS))
    torch.library.opcheck(ops.triton_forward_eval,
                          (x.requires_grad_(True), weight.requires_grad_(True), bias, *stats,
                           _EPS))
    _, mean, invstd = ops.triton_forward_train(x.detach(), weight.detach(), bias,
                                               *[t.clone() for t in stats], 0.1, _EPS)
    torch.library.opcheck(ops.triton_backward,
                          (torch.randn(x.shape), x.detach(), weight.detach(), mean, invstd,
                           True, True, True))


def backend_is_triton():
    """The forced backend is the one selected, for CPU tensors in the interpreter."""
    from bnsurgery import kernel_triton, kernels

    info = kernels.kernel_info("cpu")
    assert info.backend == "triton" and "forced" in info.reason, info
    assert kernels.select_backend(torch.zeros(2, 3)) is kernel_triton
    assert kernel_triton.unavailable_reason(torch.device("cpu")) is None


def no_torch_batch_norm_kernel():
    """No operator of torch's batch-norm family runs, forward or backward (profiler as spy).

    A dispatch-mode spy would send the call to the reference backend (an active mode means a
    graph may be captured), so torch's profiler records the operators instead.
    """
    from bnsurgery.functional import batch_norm

    x = _inputs((3, 2, 2, 2), torch.float32, "contiguous").requires_grad_(True)
    weight = torch.ones(2, requires_grad=True)
    stats = [torch.zeros(2), torch.ones(2)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        batch_norm(x, *stats, weight, None, True, 0.1, _EPS).sum().backward()
        with torch.no_grad():
            batch_norm(x, *stats, weight, None, False, 0.1, _EPS)
    names = {event.name for event in profile.events()}
    assert "aten::empty" in names or "aten::empty_like" in names, sorted(names)[:20]
    assert not [n for n in names if "batch_norm" in n], sorted(names)


def _run_all_cases() -> None:
    """Subprocess entry: run every case and print one JSON line of outcomes."""
    results = {}
    for name, spec in CASES.items():
        try:
            if isinstance(spec, str):
                globals()[spec]()
            else:
                _parity(**spec)
            results[name] = "ok"
        except Exception:  # a failed case is reported, and the others still run
            results[name] = traceback.format_exc(limit=6)
    print(_RESULT_MARKER + json.dumps(results), flush=True)


# --- The tests -----------------------------------------------------------------------------

_needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                   reason="triton is not installed")


def _environment(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str]:
    proc = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, timeout=900,
        env=_environment(TRITON_INTERPRET="1", BNSURGERY_KERNEL="triton"))
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_MARKER):
            return json.loads(line[len(_RESULT_MARKER):])
    pytest.fail(f"the interpreter subprocess reported nothing (exit {proc.returncode}):\n"
                f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


@_needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_interpreter_case(interpreter_results, case):
    assert interpreter_results[case] == "ok", interpreter_results[case]


_PARITY_CASES = [name for name, spec in CASES.items() if isinstance(spec, dict)]


@pytest.mark.gpu
@_needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", _PARITY_CASES)
def test_compiled_on_cuda(monkeypatch, case):
    """The same matrix on a GPU, where the programs are compiled rather than interpreted."""
    from bnsurgery import kernels

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    _parity(**CASES[case], device="cuda")


#: How each program argument is typed when compiled ahead of time, by name.
_INPUT_POINTERS = {"x_ptr", "y_ptr", "grad_ptr", "out_ptr"}
_PARAMETER_POINTERS = {"weight_ptr", "bias_ptr", "running_mean_ptr", "running_var_ptr"}
_FLOAT_SCALARS = {"eps_hi", "eps_lo", "momentum_hi", "momentum_lo"}


def _compile_for_cuda(program, dtype: str, blocks: tuple[int, int, int], flags: bool,
                      capability: int) -> None:
    """Compile one program to a CUDA binary (PTX, then ptxas), as a launch on a GPU would."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    accumulate = "fp64" if dtype == "fp64" else "fp32"
    names = list(inspect.signature(program.fn).parameters)
    constexprs = {}
    combine = "combine" in program.fn.__name__
    for name, value in zip(("BLOCK_A", "BLOCK_C", "BLOCK_L"), blocks, strict=True):
        if name in names:
            constexprs[name] = value if not combine else 128
    if combine:
        constexprs["BLOCK_S"] = 16
    constexprs.update({n: flags for n in names if n.isupper() and n not in constexprs
                       and n not in ("A", "C", "L")})
    if blocks[2] == 1 and "L" in names:
        constexprs["L"] = 1  # Triton specialises an integer argument equal to 1 as a constant
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _INPUT_POINTERS:
            signature[name] = f"*{dtype}"
        elif name in _PARAMETER_POINTERS:
            signature[name] = f"*{dtype}"
        elif name.endswith("_ptr"):
            signature[name] = f"*{accumulate}"
        else:
            signature[name] = "fp32" if name in _FLOAT_SCALARS else "i32"
    compiled = triton.compile(ASTSource(fn=program, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", capability, 32))
    assert compiled.asm["cubin"], program.fn.__name__


@_needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="the interpreter is on: the programs are not compiled")
@pytest.mark.parametrize("layout", ["nchw-fp16-sm80", "channels_last-fp64-sm90"])
def test_programs_compile_for_cuda_without_a_gpu(layout):
    """Every program compiles to a CUDA binary: what the interpreter cannot show.

    Both tile shapes (one channel and 512 positions; 128 channels and one position), half and
    double precision, every optional-tensor flag on and off, for an A100 and an H100.
    """
    from bnsurgery import triton_programs

    dtype, blocks, flags, capability = {
        "nchw-fp16-sm80": ("fp16", (4, 1, 512), True, 80),
        "channels_last-fp64-sm90": ("fp64", (16, 128, 1), False, 90),
    }[layout]
    for name in triton_programs.__all__:
        _compile_for_cuda(getattr(triton_programs, name), dtype, blocks, flags, capability)


def test_importing_bnsurgery_does_not_import_triton():
    """Asking about the CUDA backends looks for triton without importing it."""
    code = ("import sys, bnsurgery; from bnsurgery import kernels; kernels.kernel_info('cuda'); "
            "print('triton' in sys.modules, 'bnsurgery.kernel_triton' in sys.modules)")
    env = _environment()
    env.pop("BNSURGERY_KERNEL", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, check=True)
    assert proc.stdout.split() == ["False", "True"]


def test_cpu_without_the_interpreter_says_why(monkeypatch):
    from bnsurgery import kernel_triton, kernels
    from bnsurgery.errors import KernelUnavailableError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = kernel_triton.unavailable_reason(torch.device("cpu"))
    assert reason is not None and ("TRITON_INTERPRET" in reason or "triton" in reason)
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    with pytest.raises(KernelUnavailableError, match="'triton' on cpu"):
        kernels.kernel_info("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_auto_on_cuda_reports_triton_unavailable_without_cuda(monkeypatch):
    from bnsurgery import kernels

    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    info = kernels.kernel_info("cuda")
    assert info.backend == "reference"
    assert "triton" in info.unavailable and info.unavailable["triton"]


if __name__ == "__main__":
    _run_all_cases()
