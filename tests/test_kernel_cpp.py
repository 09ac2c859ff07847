"""The compiled C++ CPU kernel (the ``cpp`` backend) against torch and the literal formulas.

The kernel is built once per test session (a minute or more the first time; cached after).
Where it cannot be built these tests are skipped, and the one that matters there still runs:
without a compiler, one warning and the reference backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bnsurgery
from bnsurgery import kernel_cpp, kernels
from bnsurgery.errors import KernelUnavailableError
from bnsurgery.functional import batch_norm, literal_batch_norm

SHAPES = {"2d": (16, 5), "3d": (4, 5, 7), "4d": (3, 5, 4, 6), "5d": (2, 5, 3, 4, 3)}
LAYOUTS = ("contiguous", "channels_last", "strided")
# Outputs and gradients against torch's kernel; the float64 oracle is held to the same.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=2e-5),
       torch.bfloat16: dict(rtol=2e-2, atol=4e-2), torch.float16: dict(rtol=2e-3, atol=4e-3)}


@pytest.fixture(scope="session")
def built():
    try:
        return kernel_cpp.build()
    except KernelUnavailableError as exc:
        pytest.skip(f"the C++ kernel cannot be built here: {exc}")


@pytest.fixture
def cpp(built, monkeypatch):
    """Force the cpp backend for the test."""
    monkeypatch.setenv(kernels.ENV_VAR, "cpp")
    return built


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4
                            else torch.channels_last_3d)
    if layout == "strided":  # every other value of a twice-as-long last dimension
        wide = torch.repeat_interleave(t, 2, dim=-1)
        return wide[..., ::2]
    return t.contiguous()


def _case(shape, dtype, layout="contiguous", param_dtype=None, offset=0.8, spread=1.7):
    param_dtype = param_dtype or dtype
    channels = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * spread + offset)
    x = _layout(x, layout).to(dtype)
    weight = (torch.rand(channels, dtype=torch.float64) + 0.5).to(param_dtype)
    bias = torch.randn(channels, dtype=torch.float64).to(param_dtype)
    running_mean = torch.randn(channels, dtype=torch.float64).to(param_dtype)
    running_var = (torch.rand(channels, dtype=torch.float64) + 0.5).to(param_dtype)
    grad = _layout(torch.randn(shape, dtype=torch.float64), layout).to(dtype)
    return x, weight, bias, running_mean, running_var, grad


def _run(fn, x, weight, bias, running_mean, running_var, grad, training, momentum=0.1,
         eps=1e-5, to=None):
    """Forward and backward of ``fn``; every result, optionally converted with ``to``."""
    def prep(t):
        return None if t is None else (t if to is None else t.to(to)).detach().clone()

    x = prep(x).requires_grad_()
    weight = None if weight is None else prep(weight).requires_grad_()
    bias = None if bias is None else prep(bias).requires_grad_()
    rm, rv = prep(running_mean), prep(running_var)
    out = fn(x, rm, rv, weight, bias, training, momentum, eps)
    out.backward(prep(grad))
    return {"out": out.detach(), "grad_input": x.grad,
            "grad_weight": None if weight is None else weight.grad,
            "grad_bias": None if bias is None else bias.grad, "running_mean": rm,
            "running_var": rv}


def _assert_same(ours, ref, tol):
    for key, expected in ref.items():
        if expected is None:
            assert ours[key] is None, key
        else:
            torch.testing.assert_close(ours[key], expected.to(ours[key].dtype), **tol,
                                       msg=lambda m, k=key: f"{k}: {m}")


# --- The parity matrix -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape,layout", [
    (shape, layout) for shape in SHAPES.values() for layout in LAYOUTS
    if layout != "channels_last" or len(shape) >= 4],  # channels-last exists for 4-D and 5-D
    ids=lambda v: v if isinstance(v, str) else f"{len(v)}d")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "bias", "none"])
def test_matches_torch_and_the_literal_formulas(cpp, dtype, layout, shape, training, affine):
    x, weight, bias, rm, rv, grad = _case(shape, dtype, layout)
    weight = weight if "weight" in affine else None
    bias = bias if "bias" in affine else None
    ours = _run(batch_norm, x, weight, bias, rm, rv, grad, training)
    _assert_same(ours, _run(F.batch_norm, x, weight, bias, rm, rv, grad, training), TOL[dtype])
    oracle = _run(literal_batch_norm, x, weight, bias, rm, rv, grad, training, to=torch.float64)
    _assert_same(ours, oracle, TOL[dtype])
    dense = x.is_contiguous() or layout == "channels_last"
    assert ours["out"].stride() == (x.stride() if dense else x.contiguous().stride())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("param_dtype", ["float32", "same"], ids=["mixed", "pure"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_half_precision_is_as_accurate_as_torch(cpp, dtype, param_dtype, layout, training):
    """float32 statistics, rounded once: no farther from a float64 run than torch is."""
    params = torch.float32 if param_dtype == "float32" else dtype
    x, weight, bias, rm, rv, grad = _case((8, 6, 5, 7), dtype, layout, param_dtype=params)
    ours = _run(batch_norm, x, weight, bias, rm, rv, grad, training)
    theirs = _run(F.batch_norm, x, weight, bias, rm, rv, grad, training)
    oracle = _run(literal_batch_norm, x, weight, bias, rm, rv, grad, training, to=torch.float64)
    _assert_same(ours, theirs, TOL[dtype])
    for key in ("out", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var"):
        ours_err = (ours[key].double() - oracle[key]).abs().max().item()
        torch_err = (theirs[key].double() - oracle[key]).abs().max().item()
        # Within a factor of torch's error, or a few roundings of the result's dtype.
        ulp = torch.finfo(ours[key].dtype).eps * oracle[key].abs().max().item()
        assert ours_err <= max(2 * torch_err, 4 * ulp), (key, ours_err, torch_err)
        assert ours[key].dtype == theirs[key].dtype, key


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_a_mean_far_larger_than_the_spread_keeps_its_digits(cpp, layout):
    """Mean 1e4, spread 1 in float32: as close to float64 as the pure-tensor kernel, or closer."""
    x, weight, bias, rm, rv, grad = _case((16, 4, 9, 9), torch.float32, layout, offset=1e4,
                                          spread=1.0)
    oracle = _run(literal_batch_norm, x, weight, bias, rm, rv, grad, True, to=torch.float64)
    ours = _run(batch_norm, x, weight, bias, rm, rv, grad, True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(kernels.ENV_VAR, "reference")
        reference = _run(batch_norm, x, weight, bias, rm, rv, grad, True)
    for key in ("out", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var"):
        scale = oracle[key].abs().max().item()
        ours_err = (ours[key].double() - oracle[key]).abs().max().item() / scale
        ref_err = (reference[key].double() - oracle[key]).abs().max().item() / scale
        # float32 rounding of the sums is ~1e-6 here; two lost digits would be ~1e-4.
        assert ours_err <= max(1.5 * ref_err, 2e-6), (key, ours_err, ref_err)
    # What E[x^2] - E[x]^2 would lose entirely: the variance of values around 1e4.
    torch.testing.assert_close(ours["running_var"], oracle["running_var"].float(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("threads", [1, 2])
def test_larger_inputs_split_across_threads_agree(cpp, layout, threads):
    """Inputs big enough to be split into per-thread parts (interleaved) or channel ranges."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in ((32, 16, 32, 32), (16384, 32)):
            lay = layout if len(shape) == 4 else "contiguous"
            x, weight, bias, rm, rv, grad = _case(shape, torch.float32, lay)
            for training in (True, False):
                ours = _run(batch_norm, x, weight, bias, rm, rv, grad, training)
                oracle = _run(literal_batch_norm, x, weight, bias, rm, rv, grad, training,
                              to=torch.float64)
                _assert_same(ours, oracle, dict(rtol=1e-5, atol=5e-5))
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch(cpp, training):
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    before = rm.clone(), rv.clone()
    weight, bias = torch.rand(3, requires_grad=True), torch.randn(3, requires_grad=True)
    out = batch_norm(x, rm, rv, weight, bias, training)
    torch_out = F.batch_norm(x, rm.clone(), rv.clone(), weight, bias, training)
    assert out.shape == torch_out.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    torch.testing.assert_close(weight.grad, torch.zeros(3))
    torch.testing.assert_close((rm, rv), before)  # buffers left alone


@pytest.mark.parametrize("cls_name,shape", [("BatchNorm1d", (8, 4)), ("BatchNorm1d", (4, 4, 6)),
                                            ("BatchNorm2d", (4, 4, 3, 5)),
                                            ("BatchNorm3d", (2, 4, 3, 2, 3))],
                         ids=["1d-2d", "1d-3d", "2d", "3d"])
@pytest.mark.parametrize("options", [
    dict(), dict(affine=False), dict(track_running_stats=False), dict(momentum=None),
    dict(affine=False, track_running_stats=False), dict(eps=1e-3, momentum=0.5)], ids=str)
def test_modules_with_every_constructor_option_match_torch(cpp, cls_name, shape, options):
    ours = getattr(bnsurgery, cls_name)(4, **options)
    theirs = getattr(torch.nn, cls_name)(4, **options)
    if ours.affine:
        with torch.no_grad():
            for module in (ours, theirs):
                module.weight.copy_(torch.linspace(0.5, 1.5, 4))
                module.bias.copy_(torch.linspace(-1, 1, 4))
    for step in range(3):
        x = torch.randn(shape) * 2 + step
        ours_x, theirs_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.testing.assert_close(ours(ours_x), theirs(theirs_x), **TOL[torch.float32])
        ours(ours_x).square().sum().backward()
        theirs(theirs_x).square().sum().backward()
        torch.testing.assert_close(ours_x.grad, theirs_x.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dict(ours.state_dict()), dict(theirs.state_dict()),
                               **TOL[torch.float32])
    if ours.track_running_stats:
        ours.eval(), theirs.eval()
        x = torch.randn(shape)
        torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float32])


# --- Gradients, operators, and what runs ------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout,shape", [("contiguous", (4, 3)), ("contiguous", (3, 2, 5)),
                                          ("channels_last", (2, 3, 3, 2))],
                         ids=["2d", "3d", "4d-channels-last"])
def test_gradcheck_and_gradgradcheck(cpp, training, layout, shape):
    x, weight, bias, rm, rv, _ = _case(shape, torch.float64, layout)
    x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))

    def fn(x, weight, bias):
        return batch_norm(x, rm.clone(), rv.clone(), weight, bias, training, 0.1, 1e-5)

    # The derivatives checked are the C++ node's: its backward, and under create_graph its
    # differentiable formulas (not a Python Function's).
    node = "TrainNode" if training else "EvalNode"
    assert node in fn(x, weight, bias).grad_fn.name()
    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias))


def _op_samples():
    samples = []
    for shape, layout in (((6, 4), "contiguous"), ((3, 4, 5), "contiguous"),
                          ((2, 4, 3, 3), "channels_last"), ((2, 4, 3, 3), "strided")):
        for dtype in (torch.float32, torch.bfloat16):
            params = torch.float32
            x, weight, bias, rm, rv, grad = _case(shape, dtype, layout, param_dtype=params)
            mean = x.float().mean([0, *range(2, x.dim())])
            invstd = torch.rand(shape[1]) + 0.5
            samples += [
                ("cpp_batch_norm_eval", (x, weight, bias, rm, rv, 1e-5)),
                ("cpp_batch_norm_eval", (x, None, None, rm, rv, 1e-5)),
                ("cpp_batch_norm_train", (x, weight, bias, rm.clone(), rv.clone(), 0.1, 1e-5)),
                ("cpp_batch_norm_train", (x, None, None, None, None, 0.1, 1e-5)),
                ("cpp_batch_norm_backward", (grad, x, weight, mean, invstd, True,
                                             [True, True, True])),
                ("cpp_batch_norm_backward", (grad, x, None, mean, invstd, False,
                                             [True, False, True])),
                *_sync_op_samples(x, grad, weight, bias, mean, invstd),
                ("cpp_batch_norm_measure", (x, weight, bias, torch.float32, 1e-5,
                                            kernel_cpp.output_like(x))),
                ("cpp_batch_norm_measure", (x, None, None, dtype, 1e-3,
                                            kernel_cpp.output_like(x))),
            ]
    empty = torch.randn(0, 4, 3)
    samples += _sync_op_samples(empty, empty.clone(), None, None, torch.zeros(4), torch.ones(4))
    samples.append(("cpp_batch_norm_measure", (empty, None, None, torch.float32, 1e-5,
                                               torch.empty_like(empty))))
    return samples


def _sync_op_samples(x, grad, weight, bias, mean, invstd):
    """SyncBatchNorm's local steps (bnsurgery/csrc/sync_cpu.cpp) on one input."""
    channels = x.shape[1]
    mean64, var64 = mean.double() + 0.25, torch.rand(channels, dtype=torch.float64) + 0.5
    residual = torch.full((channels,), 1e-7)
    sums = torch.randn(channels, dtype=torch.float64), torch.randn(channels, dtype=torch.float64)
    count = max(1, 2 * x.numel() // channels)
    return [
        ("cpp_sync_statistics", (x,)),
        ("cpp_sync_normalise", (x, mean64, var64, weight, bias, 1e-5)),
        ("cpp_sync_normalise", (x, mean64, var64, None, None, 1e-5)),
        ("cpp_sync_grad_sums", (grad, x, mean, residual)),
        ("cpp_sync_grad_input", (grad, x, weight, mean, residual, invstd, *sums, count)),
        ("cpp_sync_grad_input", (grad, x, None, mean, residual, invstd, *sums, count)),
    ]


def test_opcheck_every_registered_operator(built):
    """Schema (including the declared mutation), fake implementations and AOT dispatch."""
    samples = _op_samples()
    assert {name for name, _ in samples} == {op.split("::")[1] for op in kernel_cpp.OPERATORS}
    for name, args in samples:
        op = getattr(torch.ops.bnsurgery, name).default
        torch.library.opcheck(op, args)


def test_no_torch_batch_norm_kernel_runs(cpp):
    """Every dispatcher call, including those made inside the compiled kernel, is recorded.

    The profiler sees operators called from C++ as well; a Python dispatch mode would not see
    inside the compiled kernel (and switches selection to the reference backend, as any graph
    capture does), so it is not the spy here.
    """
    x, weight, bias, rm, rv, grad = _case((4, 3, 5, 5), torch.float32, "channels_last")
    x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        batch_norm(x, rm, rv, weight, bias, True).backward(grad)
        with torch.no_grad():
            batch_norm(x, rm, rv, weight, bias, False)
    names = {event.name for event in prof.events()}
    assert {"bnsurgery::cpp_batch_norm_train", "bnsurgery::cpp_batch_norm_backward",
            "bnsurgery::cpp_batch_norm_eval"} <= names
    torch_batch_norm = {n for n in names if "batch_norm" in n and not n.startswith("bnsurgery::")}
    assert not torch_batch_norm


def test_the_cache_key_covers_every_source(tmp_path, monkeypatch):
    """A change to any source makes a new build, not a stale library from the cache."""
    copies = []
    for source in kernel_cpp.SOURCES:
        copy = tmp_path / source.name
        copy.write_bytes(source.read_bytes())
        copies.append(copy)
    monkeypatch.setattr(kernel_cpp, "SOURCES", tuple(copies))
    keys = [kernel_cpp._key()]
    for copy in copies:
        copy.write_bytes(copy.read_bytes() + b"\n// edited\n")
        keys.append(kernel_cpp._key())
    assert len(set(keys)) == len(keys)
    assert len(copies) >= 2 and {c.name for c in copies} >= {"batch_norm_cpu.cpp", "sync_cpu.cpp"}


def test_auto_chooses_the_compiled_kernel_on_cpu(built, monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    info = bnsurgery.kernel_info("cpu")
    assert (info.backend, info.reason) == ("cpp", "the first available by preference")
    assert kernels.select_backend(torch.zeros(2, 3)) is kernel_cpp
    assert "CPU only" in kernel_cpp.unavailable_reason(torch.device("meta"))
    monkeypatch.setenv(kernels.ENV_VAR, "reference")  # a change of the variable is seen at once
    assert kernels.select_backend(torch.zeros(2, 3)) is not kernel_cpp


def test_the_build_is_cached_under_the_cache_directory(built):
    assert Path(built).is_file()
    assert Path(built).parent.parent == kernel_cpp.cache_dir()
    assert (Path(built).parent / "ready").read_text() == str(built)


# --- Without a compiler ----------------------------------------------------------------------

_NO_COMPILER_SCRIPT = r"""
import json, warnings
import torch, torch.nn.functional as F
from bnsurgery import kernels
from bnsurgery.functional import batch_norm
from bnsurgery.errors import KernelUnavailableError

x = torch.randn(8, 3, 4, 4)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    outs = [batch_norm(x, None, None, training=True) for _ in range(3)]
info = kernels.kernel_info("cpu")
ok = all(torch.allclose(o, F.batch_norm(x, None, None, training=True), atol=1e-5) for o in outs)
try:
    import os
    os.environ[kernels.ENV_VAR] = "cpp"
    batch_norm(x, None, None, training=True)
    forced = "no error"
except KernelUnavailableError as exc:
    forced = str(exc)
print(json.dumps({"warnings": [str(w.message) for w in caught
                               if "compiled CPU BatchNorm kernel" in str(w.message)],
                  "backend": info.backend, "unavailable": info.unavailable, "ok": ok,
                  "forced": forced}))
"""


def _without_compiler(tmp_path, *args):
    env = {**os.environ, "CXX": str(tmp_path / "missing-c++"),
           kernel_cpp.CACHE_ENV_VAR: str(tmp_path / "cache")}
    env.pop(kernels.ENV_VAR, None)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(bnsurgery.__file__).parent.parent),
                                         env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_without_a_compiler_one_warning_and_the_reference_runs(tmp_path):
    result = _without_compiler(tmp_path, "-c", _NO_COMPILER_SCRIPT)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["warnings"]) == 1
    assert "missing-c++" in report["warnings"][0] and "pure-tensor" in report["warnings"][0]
    assert report["backend"] == "reference"
    assert "no C++ compiler" in report["unavailable"]["cpp"]
    assert report["ok"]
    assert "BNSURGERY_KERNEL" in report["forced"] and "missing-c++" in report["forced"]


def test_cli_build_without_a_compiler_exits_2_with_one_line(tmp_path):
    result = _without_compiler(tmp_path, "-m", "bnsurgery", "kernels", "--build", "-q")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()
             and "CUDA_HOME" not in line]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bnsurgery kernels: error:") and "missing-c++" in lines[0]


# --- The checked entry point from Python --------------------------------------------------------


def _fast_call(fast, x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5):
    return fast(x, rm, rv, w, b, training, momentum, eps)


def _bad_calls():
    """Arguments the Python path refuses (each raises there), or would route elsewhere."""
    x = torch.randn(4, 3)
    c3, c2 = torch.ones(3), torch.ones(2)
    sparse = torch.randn(4, 3).to_sparse()
    return {
        "int input": (x.long(), c3, c3, c3, c3, True, 0.1, 1e-5),
        "1-d input": (torch.randn(3), c3, c3, c3, c3, True, 0.1, 1e-5),
        "empty input": (torch.randn(0, 3), c3, c3, c3, c3, True, 0.1, 1e-5),
        "channel mismatch (mean)": (x, c2, c3, c3, c3, True, 0.1, 1e-5),
        "channel mismatch (weight)": (x, c3, c3, c2, c3, True, 0.1, 1e-5),
        "channel mismatch (bias)": (x, c3, c3, c3, c2, False, 0.1, 1e-5),
        "eps 0 in training": (x, c3, c3, c3, c3, True, 0.1, 0.0),
        "eps nan": (x, c3, c3, c3, c3, False, 0.1, float("nan")),
        "negative eps in evaluation": (x, c3, c3, c3, c3, False, 0.1, -1e-5),
        "no running stats in evaluation": (x, None, None, c3, c3, False, 0.1, 1e-5),
        "one value per channel": (torch.randn(1, 3), c3, c3, c3, c3, True, 0.1, 1e-5),
        "running mean requires grad": (x, torch.ones(3, requires_grad=True), c3, c3, c3, True,
                                       0.1, 1e-5),
        "not a tensor": (x.tolist(), c3, c3, c3, c3, True, 0.1, 1e-5),
        "weight not a tensor": (x, c3, c3, [1.0, 1.0, 1.0], c3, True, 0.1, 1e-5),
        "training not a bool": (x, c3, c3, c3, c3, 1, 0.1, 1e-5),
        "momentum None": (x, c3, c3, c3, c3, True, None, 1e-5),
        "eps a string": (x, c3, c3, c3, c3, True, 0.1, "1e-5"),
        "sparse input": (sparse, c3, c3, c3, c3, False, 0.1, 1e-5),
        "meta input": (x.to("meta"), c3, c3, c3, c3, False, 0.1, 1e-5),
        "meta weight": (x, c3, c3, c3.to("meta"), c3, False, 0.1, 1e-5),
        "tensor subclass": (x.as_subclass(_Subclass), c3, c3, c3, c3, True, 0.1, 1e-5),
    }


class _Subclass(torch.Tensor):
    pass


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_fast_entry_declines_what_the_python_path_refuses(built, name):
    """Whatever the Python path refuses or routes elsewhere, the C++ entry declines (returns
    None, raising nothing, changing nothing), so that the Python path runs and names the fault."""
    args = _bad_calls()[name]
    buffers = [t.clone() for t in args[1:3] if isinstance(t, torch.Tensor) and not t.is_meta]
    assert kernel_cpp.fast_entry()(*args) is None
    after = [t for t in args[1:3] if isinstance(t, torch.Tensor) and not t.is_meta]
    for before, now in zip(buffers, after, strict=True):
        assert torch.equal(before, now)


def test_fast_entry_matches_the_operator_and_updates_the_buffers(built):
    fast = kernel_cpp.fast_entry()
    for training in (True, False):
        x, w, b, rm, rv, _ = _case((6, 4, 3, 3), torch.float32, "channels_last")
        rm2, rv2 = rm.clone(), rv.clone()
        expected = F.batch_norm(x, rm2, rv2, w, b, training, 0.1, 1e-5)
        out = _fast_call(fast, x, rm, rv, w, b, training)
        torch.testing.assert_close(out, expected, **TOL[torch.float32])
        torch.testing.assert_close((rm, rv), (rm2, rv2), **TOL[torch.float32])
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_fast_entry_records_the_cpp_node(built):
    x = torch.randn(5, 3, requires_grad=True)
    w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    out = _fast_call(kernel_cpp.fast_entry(), x, torch.zeros(3), torch.ones(3), w, b)
    assert "TrainNode" in out.grad_fn.name()
    with torch.no_grad():
        assert _fast_call(kernel_cpp.fast_entry(), x, torch.zeros(3), torch.ones(3), w,
                          b).grad_fn is None


def test_fast_path_only_in_plain_eager_mode(built, monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.fast_path() is kernel_cpp.fast_entry()
    from torch.autograd import forward_ad
    from torch.utils._python_dispatch import TorchDispatchMode

    with forward_ad.dual_level():
        assert kernels.fast_path() is None

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Spy():
        assert kernels.fast_path() is None
    seen = []
    torch.func.vmap(lambda t: seen.append(kernels.fast_path()) or t)(torch.ones(2, 3))
    assert seen == [None]
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    assert kernels.fast_path() is None


# --- The measure operator (recalibration) -----------------------------------------------------

MEASURE_DTYPES = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16,
                  "bf16": torch.bfloat16}


def _moments_oracle(x):
    """Per-channel float64 mean and sum of squared deviations, by plain two-pass torch."""
    values = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    mean = values.mean(1)
    return mean, (values - mean[:, None]).square().sum(1)


def _stats_dtype(dtype):
    """A module's buffer dtype for an input of ``dtype`` (half inputs keep float32 buffers)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@pytest.mark.parametrize("dtype", MEASURE_DTYPES.values(), ids=MEASURE_DTYPES.keys())
@pytest.mark.parametrize("shape,layout", [
    (shape, layout) for shape in SHAPES.values() for layout in LAYOUTS
    if layout != "channels_last" or len(shape) >= 4],
    ids=lambda v: v if isinstance(v, str) else f"{len(v)}d")
@pytest.mark.parametrize("offset,spread", [(0.8, 1.7), (1e4, 1.0)], ids=["plain", "far-mean"])
def test_measure_moments_equal_a_float64_oracle(built, dtype, shape, layout, offset, spread):
    """Exact to float64 (rel 1e-12), a mean 1e4 times the spread included."""
    x, *_ = _case((shape[0] * 8, *shape[1:]), dtype, layout, param_dtype=torch.float32,
                  offset=offset, spread=spread)
    _, mean, sq_dev = kernel_cpp.measure(x, None, None, _stats_dtype(dtype), 1e-5)
    want_mean, want_sq_dev = _moments_oracle(x)
    assert mean.dtype == sq_dev.dtype == torch.float64
    torch.testing.assert_close(mean, want_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(sq_dev, want_sq_dev, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", MEASURE_DTYPES.values(), ids=MEASURE_DTYPES.keys())
@pytest.mark.parametrize("shape,layout", [
    (shape, layout) for shape in SHAPES.values() for layout in LAYOUTS
    if layout != "channels_last" or len(shape) >= 4],
    ids=lambda v: v if isinstance(v, str) else f"{len(v)}d")
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_measure_output_is_batch_norm_with_the_rounded_statistics(built, dtype, shape, layout,
                                                                  affine):
    """What F.batch_norm gives when fed the measured mean and biased variance, rounded to the
    buffer dtype, in the input's layout."""
    stats = _stats_dtype(dtype)
    x, weight, bias, *_ = _case(shape, dtype, layout, param_dtype=stats)
    weight, bias = (weight, bias) if affine else (None, None)
    out, mean, sq_dev = kernel_cpp.measure(x, weight, bias, stats, 1e-5)
    count = x.numel() // x.shape[1]
    expected = F.batch_norm(x, mean.to(stats), (sq_dev / count).to(stats), weight, bias,
                            training=False, eps=1e-5)
    assert out.dtype == x.dtype
    torch.testing.assert_close(out, expected, **TOL[dtype])
    dense = x.is_contiguous() or layout == "channels_last"
    assert out.stride() == (x.stride() if dense else x.contiguous().stride())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_measure_output_keeps_its_digits_with_a_far_mean(built, layout):
    """Mean 1e4, spread 1e-2 in float64 data: the output is centred before it is scaled, so it
    matches a float64 normalisation with the same rounded statistics to float32 rounding (a
    kernel that folds the mean into the shift, x * scale + shift, loses about four digits)."""
    x, weight, bias, *_ = _case((16, 4, 9, 9), torch.float32, layout, offset=1e4, spread=1e-2)
    out, mean, sq_dev = kernel_cpp.measure(x, weight, bias, torch.float32, 1e-5)
    count = x.numel() // x.shape[1]
    m, v = mean.float().double(), (sq_dev / count).float().double()
    shape = (1, -1, 1, 1)
    oracle = ((x.double() - m.view(shape)) / (v.view(shape) + 1e-5).sqrt()
              * weight.double().view(shape) + bias.double().view(shape))
    torch.testing.assert_close(out.double(), oracle, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_measure_split_across_threads_agrees(built, threads):
    """Channel groups (row path) and per-thread parts of rows (interleaved path)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape, layout in (((32, 16, 32, 32), "contiguous"),
                              ((32, 16, 32, 32), "channels_last"), ((16384, 32), "contiguous")):
            x, weight, bias, *_ = _case(shape, torch.float32, layout)
            out, mean, sq_dev = kernel_cpp.measure(x, weight, bias, torch.float32, 1e-5)
            want_mean, want_sq_dev = _moments_oracle(x)
            torch.testing.assert_close(mean, want_mean, rtol=1e-12, atol=0)
            torch.testing.assert_close(sq_dev, want_sq_dev, rtol=1e-12, atol=0)
            count = x.numel() // x.shape[1]
            expected = F.batch_norm(x, mean.float(), (sq_dev / count).float(), weight, bias,
                                    training=False, eps=1e-5)
            torch.testing.assert_close(out, expected, **TOL[torch.float32])
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("inner", [3, 8, 13, 31, 32, 63, 64, 100, 1000])
@pytest.mark.parametrize("channels", [3, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_measure_every_map_size_on_the_row_path(built, inner, channels, dtype):
    """Maps shorter than a vector (a masked tail), shorter than the long-stretch sums (32), than
    the per-value tables (64), and longer; one group of channels and several (70 > 64). Far-mean
    channels are mixed in, so a group cannot hide a wrong shift."""
    gen = torch.Generator().manual_seed(inner * channels)
    x = torch.randn(5, channels, inner, generator=gen, dtype=dtype)
    x[:, ::2] += 1e4
    weight = torch.rand(channels, generator=gen, dtype=dtype) + 0.5
    bias = torch.randn(channels, generator=gen, dtype=dtype)
    out, mean, sq_dev = kernel_cpp.measure(x, weight, bias, dtype, 1e-5)
    want_mean, want_sq_dev = _moments_oracle(x)
    torch.testing.assert_close(mean, want_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(sq_dev, want_sq_dev, rtol=1e-12, atol=0)
    # In float64 from the statistics rounded to the buffer dtype: torch's own kernel folds the
    # mean into the shift, which costs a float32 output its digits at a mean of 1e4.
    count = x.numel() // channels
    expected = F.batch_norm(x.double(), mean.to(dtype).double(),
                            (sq_dev / count).to(dtype).double(), weight.double(), bias.double(),
                            training=False, eps=1e-5)
    torch.testing.assert_close(out, expected.to(dtype), **TOL[dtype])


def test_measure_writes_into_out_and_refuses_one_that_does_not_fit(built):
    x, weight, bias, *_ = _case((4, 6, 5, 5), torch.float32, "contiguous")
    fresh, mean, sq_dev = kernel_cpp.measure(x, weight, bias, torch.float32, 1e-5)
    out = torch.full_like(x, float("nan"))
    written, mean2, sq_dev2 = kernel_cpp.measure(x, weight, bias, torch.float32, 1e-5, out)
    assert written is out
    torch.testing.assert_close((written, mean2, sq_dev2), (fresh, mean, sq_dev), rtol=0, atol=0)
    last = x.contiguous(memory_format=torch.channels_last)
    written = kernel_cpp.measure(last, weight, bias, torch.float32, 1e-5,
                                 kernel_cpp.output_like(last))[0]
    assert written.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(written, fresh, **TOL[torch.float32])
    misfits = {
        "the input's shape": torch.empty(4, 6, 5, 4),
        "dtype": torch.empty_like(x, dtype=torch.float64),
        "dense in the layout": torch.empty_like(x, memory_format=torch.channels_last),
        "single memory location": x,
    }
    for match, bad in misfits.items():
        with pytest.raises(RuntimeError, match=match):
            kernel_cpp.measure(x, weight, bias, torch.float32, 1e-5, bad)


def test_measure_empty_batch_and_bad_arguments(built):
    out, mean, sq_dev = kernel_cpp.measure(torch.randn(0, 3, 4), None, None, torch.float32, 1e-5)
    assert out.shape == (0, 3, 4)
    torch.testing.assert_close((mean, sq_dev), (torch.zeros(3, dtype=torch.float64),) * 2)
    with pytest.raises(RuntimeError, match="one value per channel"):
        kernel_cpp.measure(torch.randn(4, 3), torch.ones(2), None, torch.float32, 1e-5)
    with pytest.raises(RuntimeError, match="a batch and a channel"):
        kernel_cpp.measure(torch.randn(4), None, None, torch.float32, 1e-5)
    with pytest.raises(RuntimeError, match="stats_dtype must be a float dtype"):
        kernel_cpp.measure(torch.randn(4, 3), None, None, torch.int64, 1e-5)


def test_measure_runs_no_torch_batch_norm_kernel(built):
    x, weight, bias, *_ = _case((4, 3, 5, 5), torch.float32, "channels_last")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        kernel_cpp.measure(x, weight, bias, torch.float32, 1e-5)
    names = {event.name for event in prof.events()}
    assert "bnsurgery::cpp_batch_norm_measure" in names
    assert not {n for n in names if "batch_norm" in n and not n.startswith("bnsurgery::")}
