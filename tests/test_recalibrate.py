"""Tests for bnsurgery.recalibrate: exact re-estimation of BatchNorm statistics from data.

The reference is a float64 computation of each layer's true input mean and variance over all of
the data (upstream BatchNorms normalising with batch statistics, as during estimation: the
batch's float64 mean and biased variance, rounded once to float32, applied by torch's
``F.batch_norm``).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnsurgery.errors import InvalidInputError
from bnsurgery.recalibrate import merge_moments, recalibrate_batchnorm

F32 = {"rtol": 2.4e-7, "atol": 1e-9}  # the float64 result rounded once to float32
# A layer behind a BatchNorm sees that BatchNorm's float32 output, which depends on how it rounds
# (torch's evaluation kernel folds the mean into the shift; the compiled kernel centres first):
# its mean may then differ by a few float32 roundings of the activations, ~1e-8 absolute here.
DEEPER = {"rtol": 2.4e-7, "atol": 5e-8}


def _net(dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Dropout(dropout), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5)).eval()


def _batches(sizes=(3, 5, 2), seed: int = 0, pixels: int = 6) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, pixels, pixels, generator=gen) * 2 + 1 for n in sizes]


def _oracle(model: nn.Sequential, batches: list[torch.Tensor]) -> dict[str, tuple]:
    """True per-channel mean and unbiased variance of each BatchNorm's input, in float64.

    The activations are computed with torch's functional ops in the model's float32, the
    upstream BatchNorm normalising with the batch's own statistics (taken over the whole batch
    in float64 by a plain two-pass ``mean`` / ``var``); their statistics in float64.
    """
    m = model
    first, second = [], []
    with torch.no_grad():
        for x in batches:
            a = F.conv2d(x, m[0].weight, m[0].bias, padding=1)
            first.append(a)
            var, mean = torch.var_mean(a.double(), (0, 2, 3), correction=0)
            h = F.batch_norm(a, mean.float(), var.float(), m[1].weight, m[1].bias,
                             training=False, eps=m[1].eps)
            second.append(F.conv2d(F.relu(h), m[4].weight, m[4].bias))

    def stats(parts):
        values = torch.cat(parts).double().transpose(0, 1).reshape(parts[0].shape[1], -1)
        return values.mean(1), values.var(1, correction=1)

    return {"1": stats(first), "5": stats(second)}


def test_equals_float64_dataset_statistics_not_a_momentum_average() -> None:
    model, batches = _net(), _batches()
    report = recalibrate_batchnorm(model, batches)
    oracle = _oracle(model, batches)
    for name, (mean, var) in oracle.items():
        bn = report.model.get_submodule(name)
        tolerance = F32 if name == "1" else DEEPER
        torch.testing.assert_close(bn.running_mean, mean.float(), **tolerance)
        torch.testing.assert_close(bn.running_var, var.float(), **tolerance)
        assert int(bn.num_batches_tracked) == 3
    # torch.optim.swa_utils.update_bn averages per-batch variances: a different number.
    swa = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, swa)
    assert not torch.allclose(swa[1].running_var, oracle["1"][1].float(), rtol=1e-4)
    assert [r.name for r in report.layers] == ["1", "5"]
    assert report.batches == 3 and report.world_size == 1


def test_batchnorm_hands_on_its_training_mode_output() -> None:
    """During the pass each BatchNorm normalises with this batch's statistics, as in training."""
    model, batches = _net(), _batches()
    seen = []
    model[1].register_forward_hook(lambda m, a, o: seen.append((a[0].clone(), o.clone())))
    recalibrate_batchnorm(model, batches, inplace=True)
    assert len(seen) == len(batches)
    for x, output in seen:
        training = F.batch_norm(x, None, None, model[1].weight, model[1].bias, training=True,
                                eps=model[1].eps)
        evaluation = F.batch_norm(x, model[1].running_mean, model[1].running_var,
                                  model[1].weight, model[1].bias, eps=model[1].eps)
        # float32 rounding of the statistics apart (torch's own are float32), the same values.
        torch.testing.assert_close(output, training, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(output, evaluation, rtol=1e-3, atol=1e-3)


class ActBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm subclass that does more after normalising (as timm's BatchNormAct2d does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x)) - 1.0


def test_batchnorm_subclass_keeps_its_own_forward() -> None:
    model = _net()
    subclassed = ActBatchNorm2d(4).eval()
    subclassed.load_state_dict(model[1].state_dict())
    model[1] = subclassed
    outputs = []
    model[1].register_forward_hook(lambda m, a, o: outputs.append(o))
    report = recalibrate_batchnorm(model, _batches())
    assert outputs and all(float(o.min()) == -1.0 for o in outputs)
    oracle = _oracle(model, _batches())
    torch.testing.assert_close(report.model[1].running_mean, oracle["1"][0].float(), **F32)
    torch.testing.assert_close(report.model[1].running_var, oracle["1"][1].float(), **F32)
    assert type(report.model[1]) is ActBatchNorm2d and "forward" not in vars(report.model[1])


def test_caller_model_untouched_and_modes_restored() -> None:
    model = _net()
    model[1].train()
    before = copy.deepcopy(model.state_dict())
    report = recalibrate_batchnorm(model, _batches())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert report.model is not model
    assert [m.training for m in report.model] == [m.training for m in model]
    same = recalibrate_batchnorm(model, _batches(), inplace=True)
    assert same.model is model


class DropPath(nn.Module):
    """Stochastic depth as timm writes it: active only in training mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1) > 0.5
        return x * keep / 0.5


def test_dropout_and_stochastic_depth_inactive() -> None:
    model = _net(dropout=0.9)
    model.insert(4, DropPath())
    model.eval()
    seen = []
    for module in (model[3], model[4]):
        module.register_forward_hook(lambda m, a, o, seen=seen: seen.append(
            (m.training, torch.equal(a[0], o))))
    report = recalibrate_batchnorm(model, _batches())
    assert seen and all(not training and unchanged for training, unchanged in seen)
    oracle = _oracle(nn.Sequential(*[m for i, m in enumerate(model) if i != 4]), _batches())
    torch.testing.assert_close(report.model[6].running_var, oracle["5"][1].float(), **DEEPER)


def test_frozen_excluded_and_unreached_layers_left_alone() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = _net()
    model.append(torchvision.ops.misc.FrozenBatchNorm2d(5))
    model.train()  # the excluded layer runs in training mode and its buffers must still stay
    unused = nn.BatchNorm2d(7)
    model.add_module("unused", unused)

    class Wrapper(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net[:7](x)

    wrapped = Wrapper(model)
    before = copy.deepcopy(wrapped.state_dict())
    report = recalibrate_batchnorm(wrapped, _batches(), exclude=["net.5"])
    after = report.model.state_dict()
    for layer in ("net.5", "net.6", "net.unused"):
        for key in before:
            if key.startswith(layer + "."):
                torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    assert "excluded" in report.skipped["net.5"]
    assert "frozen" in report.skipped["net.6"]
    assert "never reached" in report.skipped["net.unused"]
    assert [r.name for r in report.layers] == ["net.1"]


def test_report_to_dict_near_zero_and_most_changed() -> None:
    model = _net()
    with torch.no_grad():
        model[0].weight[2] = 0  # channel 2 of the first BatchNorm sees a constant
    report = recalibrate_batchnorm(model, _batches())
    data = report.to_dict()
    assert data["layers"][0]["near_zero_variance_channels"] == [2]
    assert data["most_changed"][0] == report.most_changed(1)[0].name
    assert data["layers"][0]["var_change"] > 0
    assert "near-zero variance" in str(report)


def test_dict_and_tuple_batches_and_num_batches() -> None:
    model = _net()
    batches = _batches()
    as_tuples = recalibrate_batchnorm(model, [(x, 0) for x in batches], num_batches=2)
    direct = recalibrate_batchnorm(model, batches[:2])
    torch.testing.assert_close(as_tuples.model[5].running_var, direct.model[5].running_var,
                               rtol=0, atol=0)

    class Keyword(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, *, pixels):
            return self.net(pixels)

    keyword = recalibrate_batchnorm(Keyword(model), [{"pixels": x} for x in batches[:2]])
    torch.testing.assert_close(keyword.model.net[5].running_var, direct.model[5].running_var,
                               rtol=0, atol=0)


@pytest.mark.parametrize("bad, match", [({"num_batches": 0}, "num_batches must be"),
                                        ({"exclude": ["nope"]}, "exclude names modules")],
                         ids=["num_batches", "exclude"])
def test_bad_options(bad, match) -> None:
    with pytest.raises(InvalidInputError, match=match):
        recalibrate_batchnorm(_net(), _batches(), **bad)


def test_bad_batch_kind() -> None:
    with pytest.raises(InvalidInputError, match="cannot feed"):
        recalibrate_batchnorm(_net(), [3])


def test_progress_on_stderr_only_when_asked(capsys) -> None:
    recalibrate_batchnorm(_net(), _batches())
    assert capsys.readouterr().err == ""
    recalibrate_batchnorm(_net(), _batches(), progress=True)
    assert "3/3 batches" in capsys.readouterr().err


def test_merge_moments_equals_concatenation() -> None:
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(4, n, generator=gen, dtype=torch.float64) + 3 for n in (1, 7, 0, 5)]
    counts = torch.tensor([float(p.shape[1]) for p in parts])
    means = torch.stack([p.mean(1) if p.shape[1] else torch.zeros(4, dtype=torch.float64)
                         for p in parts])
    sq = torch.stack([(p - m.unsqueeze(1)).square().sum(1) for p, m in zip(parts, means,
                                                                         strict=True)])
    n, mean, sq_dev = merge_moments(counts, means, sq)
    every = torch.cat(parts, 1)
    assert int(n) == 13
    torch.testing.assert_close(mean, every.mean(1), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(sq_dev / 12, every.var(1), rtol=1e-13, atol=1e-14)


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        batches = _batches(sizes=(3, 5, 2)) if rank == 0 else _batches(sizes=(4,), seed=1)
        report = recalibrate_batchnorm(_net(), batches)
        torch.save({k: v for k, v in report.model.state_dict().items() if "running" in k
                    or "tracked" in k}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_single_process(tmp_path) -> None:
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = recalibrate_batchnorm(_net(), _batches() + _batches(sizes=(4,), seed=1)).model
    for key, value in ranks[0].items():
        torch.testing.assert_close(ranks[1][key], value, rtol=0, atol=0)
        if "tracked" not in key:
            torch.testing.assert_close(value, single.state_dict()[key], **F32)
    assert int(ranks[0]["1.num_batches_tracked"]) == 4


def _images(pixels: int, count: int = 6) -> torch.Tensor:
    """The same scenes at two resolutions: coarse random fields resized (bilinear)."""
    scenes = torch.randn(count, 3, 24, 24, generator=torch.Generator().manual_seed(5))
    return F.interpolate(scenes, size=(pixels, pixels), mode="bilinear", align_corners=False)


def _normalised_error(model: nn.Module, images: torch.Tensor) -> float:
    """How far each BatchNorm's output is from zero mean / unit variance per channel."""
    errors = []

    def hook(module, args, output):
        if isinstance(module, nn.BatchNorm2d):
            x = args[0].double()
            y = (x - module.running_mean.double()[None, :, None, None]) / torch.sqrt(
                module.running_var.double()[None, :, None, None] + module.eps)
            mean = y.mean((0, 2, 3))
            errors.append(float((mean.abs() + (y.var((0, 2, 3)) - 1).abs()).max()))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return max(errors)


def test_statistics_from_128px_evaluated_at_224px() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8)).eval()
    at_128 = recalibrate_batchnorm(model, [_images(128)]).model
    before = _normalised_error(at_128, _images(224))
    after_model = recalibrate_batchnorm(at_128, [_images(224)]).model
    after = _normalised_error(after_model, _images(224))
    # Measured: before 0.42 (variances off by ~40 %), after 4.5e-4 (what eps leaves).
    assert before > 0.2 and after < before / 100, (before, after)


@pytest.mark.parametrize("case", ["nchw", "channels_last", "2d", "far_mean", "sorted", "half"])
def test_batch_moments_equal_float64_oracle(case: str) -> None:
    """The chunked, shifted one-pass moments agree with a float64 two-pass on every layout."""
    from bnsurgery.recalibrate import batch_moments

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 40, 40, generator=gen)
    if case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case == "2d":
        x = torch.randn(3000, 5, generator=gen)
    elif case == "far_mean":  # mean 1e4 over a spread of 1e-2: 12 digits of cancellation
        x = 1e4 + 1e-2 * x
    elif case == "sorted":  # several chunks, the first one far from the others
        x = torch.randn(40, 4, 64, 64, generator=gen) * 1e-2 + 1e4
        x[:16] += 50.0
    elif case == "half":
        x = x.half()
    dims = [0, *range(2, x.dim())]
    oracle = x.double()
    want_mean = oracle.mean(dims)
    want_sq = (oracle - want_mean.view(1, -1, *[1] * (x.dim() - 2))).square().sum(dims)
    count, mean, sq_dev = batch_moments(x)
    assert count == x.numel() // x.shape[1]
    assert mean.dtype == sq_dev.dtype == torch.float64
    torch.testing.assert_close(mean, want_mean, rtol=1e-13, atol=0)
    torch.testing.assert_close(sq_dev, want_sq, rtol=1e-9, atol=0)


# --- The compiled measure-and-normalise operator against the torch path ------------------------


@pytest.fixture(scope="module")
def compiled():
    """The compiled CPU kernel, or a skip where it cannot be built."""
    from bnsurgery import kernel_cpp
    from bnsurgery.errors import KernelUnavailableError

    try:
        return kernel_cpp.build()
    except KernelUnavailableError as exc:
        pytest.skip(f"the C++ kernel cannot be built here: {exc}")


def _layer_zoo(kind: str) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    if kind == "1d-2d":
        model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4),
                              nn.BatchNorm1d(4))
        return model.eval(), [torch.randn(n, 6, generator=gen) * 2 + 1 for n in (7, 9)]
    if kind == "1d-3d":
        model = nn.Sequential(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5), nn.ReLU(), nn.Conv1d(5, 4, 3),
                              nn.BatchNorm1d(4))
        return model.eval(), [torch.randn(n, 3, 11, generator=gen) * 2 + 1 for n in (3, 4)]
    if kind == "3d":
        model = nn.Sequential(nn.Conv3d(3, 4, 2), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 5, 2),
                              nn.BatchNorm3d(5))
        return model.eval(), [torch.randn(n, 3, 5, 6, 4, generator=gen) + 1 for n in (2, 3)]
    model, batches = _net(), _batches()
    if kind == "2d-channels-last":
        model = model.to(memory_format=torch.channels_last)
        batches = [x.contiguous(memory_format=torch.channels_last) for x in batches]
    if kind == "2d-float64":
        model, batches = model.double(), [x.double() for x in batches]
    return model, batches


def _recalibrated(model: nn.Module, batches: list[torch.Tensor], backend: str,
                  monkeypatch) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Running statistics after recalibration with ``backend`` forced, and the operators run."""
    from bnsurgery import kernels

    monkeypatch.setenv(kernels.ENV_VAR, backend)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        report = recalibrate_batchnorm(model, batches)
    monkeypatch.delenv(kernels.ENV_VAR)
    stats = {k: v for k, v in report.model.state_dict().items() if "running" in k}
    return stats, {event.name for event in prof.events()}


@pytest.mark.parametrize("kind", ["2d", "2d-channels-last", "2d-float64", "1d-2d", "1d-3d",
                                  "3d"])
def test_compiled_and_torch_paths_give_the_same_statistics(compiled, kind, monkeypatch) -> None:
    """BNSURGERY_KERNEL=cpp (one operator per layer) and =reference (torch) agree: the first
    layer, whose input is the same, to the rounding of its buffers; deeper layers, whose inputs
    differ by the float rounding of the upstream normalisation, to a few of those roundings."""
    model, batches = _layer_zoo(kind)
    ours, ran = _recalibrated(model, batches, "cpp", monkeypatch)
    reference, ran_reference = _recalibrated(model, batches, "reference", monkeypatch)
    assert "bnsurgery::cpp_batch_norm_measure" in ran
    assert "bnsurgery::cpp_batch_norm_measure" not in ran_reference
    assert not {n for n in ran if "batch_norm" in n and not n.startswith("bnsurgery::")}
    double = kind == "2d-float64"
    first, deeper = ((dict(rtol=1e-12, atol=0), dict(rtol=1e-10, atol=1e-12)) if double else
                     (F32, dict(rtol=2e-5, atol=1e-6)))
    for key, value in reference.items():
        torch.testing.assert_close(ours[key], value, **(first if key.startswith("1.") else deeper),
                                   msg=lambda m, k=key: f"{k}: {m}")


def test_compiled_path_equals_float64_dataset_statistics(compiled, monkeypatch) -> None:
    """The compiled path against the float64 oracle of the whole data (not only the torch path)."""
    from bnsurgery import kernels

    monkeypatch.setenv(kernels.ENV_VAR, "cpp")
    model, batches = _net(), _batches()
    report = recalibrate_batchnorm(model, batches)
    for name, (mean, var) in _oracle(model, batches).items():
        tolerance = F32 if name == "1" else DEEPER
        bn = report.model.get_submodule(name)
        torch.testing.assert_close(bn.running_mean, mean.float(), **tolerance)
        torch.testing.assert_close(bn.running_var, var.float(), **tolerance)


_NO_COMPILER_SCRIPT = r"""
import json, warnings
import torch
from torch import nn
from bnsurgery import kernels
from bnsurgery.recalibrate import recalibrate_batchnorm

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
batches = [torch.randn(n, 3, 6, 6) for n in (3, 5)]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    report = recalibrate_batchnorm(model, batches)
print(json.dumps({"backend": kernels.kernel_info("cpu").backend,
                  "warnings": sum("compiled CPU BatchNorm kernel" in str(w.message)
                                  for w in caught),
                  "var": report.model[1].running_var.tolist()}))
"""


def test_without_a_compiler_the_torch_path_runs(tmp_path) -> None:
    """The compiled kernel is never required: without a compiler, one warning and torch ops."""
    import json
    import subprocess
    import sys

    from bnsurgery import kernel_cpp, kernels

    env = {**os.environ, "CXX": str(tmp_path / "missing-c++"),
           kernel_cpp.CACHE_ENV_VAR: str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(
               os.path.abspath(kernels.__file__))), os.environ.get("PYTHONPATH", "")])}
    env.pop(kernels.ENV_VAR, None)
    result = subprocess.run([sys.executable, "-c", _NO_COMPILER_SCRIPT], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["backend"] == "reference" and report["warnings"] == 1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    batches = [torch.randn(n, 3, 6, 6) for n in (3, 5)]
    with torch.no_grad():
        inputs = torch.cat([model[0](x) for x in batches]).double()
    want = inputs.transpose(0, 1).reshape(4, -1).var(1)
    torch.testing.assert_close(torch.tensor(report["var"]), want.float(), **F32)


# --- Reused outputs ---------------------------------------------------------------------------

def _holders(output: torch.Tensor) -> dict[str, object]:
    """Every way a model or a hook can keep hold of a BatchNorm's output."""
    import torch.utils.dlpack

    return {"tensor": output, "view": output[0], "storage": output.untyped_storage(),
            "numpy": output.numpy(), "dlpack": torch.utils.dlpack.to_dlpack(output),
            "list": [output], "detached": output.detach()}


def _as_tensor(held: object, like: torch.Tensor) -> torch.Tensor:
    """What a holder from :func:`_holders` reads now, in ``like``'s shape where it has one."""
    if isinstance(held, torch.UntypedStorage):
        return torch.empty(0, dtype=like.dtype).set_(held, 0, like.shape, like.stride())
    if isinstance(held, list):
        return held[0]
    if type(held).__name__ == "PyCapsule":
        return torch.from_dlpack(held)
    if not isinstance(held, torch.Tensor):
        return torch.from_numpy(held)
    return held


def _count_reuses(monkeypatch) -> list[bool]:
    """Make every output reusable (not only large ones); record whether each layer call got one."""
    from bnsurgery import recalibrate

    monkeypatch.setattr(recalibrate, "_REUSE_BYTES", 0)
    reused: list[bool] = []
    take = recalibrate._Spares.take

    def spy(self, x):
        spare = take(self, x)
        reused.append(spare is not None)
        return spare

    monkeypatch.setattr(recalibrate._Spares, "take", spy)
    return reused


def test_outputs_nothing_holds_are_written_again_and_the_statistics_stay_exact(
        compiled, monkeypatch) -> None:
    from bnsurgery import kernels

    monkeypatch.setenv(kernels.ENV_VAR, "cpp")
    reused = _count_reuses(monkeypatch)
    model, batches = _net(), _batches(sizes=(3, 3, 3, 2))
    report = recalibrate_batchnorm(model, batches)
    # Two layers of different shapes, four batches: from the second batch of each shape on.
    assert reused == [False, False, True, True, True, True, False, False]
    for name, (mean, var) in _oracle(model, batches).items():
        tolerance = F32 if name == "1" else DEEPER
        bn = report.model.get_submodule(name)
        torch.testing.assert_close(bn.running_mean, mean.float(), **tolerance)
        torch.testing.assert_close(bn.running_var, var.float(), **tolerance)


@pytest.mark.parametrize("holder", list(_holders(torch.zeros(2, 2))))
def test_an_output_something_still_holds_is_never_written_again(compiled, monkeypatch,
                                                                holder) -> None:
    """A forward hook keeps each batch's output (or a view, its storage, a numpy array, a DLPack
    capsule, ...): what it kept must still read as it was when it was handed on."""
    from bnsurgery import kernels

    monkeypatch.setenv(kernels.ENV_VAR, "cpp")
    reused = _count_reuses(monkeypatch)
    kept: list[tuple[object, torch.Tensor]] = []

    def keep(_module, _args, output):
        kept.append((_holders(output)[holder], output.clone()))

    model, batches = _net(), _batches(sizes=(3, 3, 3))
    model[1].register_forward_hook(keep)
    recalibrate_batchnorm(model, batches, inplace=True)
    assert len(kept) == 3
    assert reused[0::2] == [False, False, False]  # model[1]'s calls: nothing could be reused
    for held, when_handed_on in kept:
        got = _as_tensor(held, when_handed_on)
        torch.testing.assert_close(got, when_handed_on.reshape(got.shape) if holder != "view"
                                   else when_handed_on[0], rtol=0, atol=0)


def test_unshared_sees_every_kind_of_holder() -> None:
    from bnsurgery.recalibrate import _unshared

    def probe(make_holder) -> bool:
        tensor = torch.empty(16)
        holder = make_holder(tensor)  # noqa: F841  # alive during the check
        return _unshared(tensor, 1)

    assert probe(lambda t: None)
    for name in _holders(torch.zeros(2, 2)):
        assert not probe(lambda t, n=name: _holders(t)[n]), name


def test_moments_of_more_batches_than_are_kept_apart_equal_the_concatenation() -> None:
    """Parts are merged a few dozen at a time; the total must not depend on where that happens."""
    from bnsurgery.recalibrate import _Moments

    gen = torch.Generator().manual_seed(3)
    parts = [torch.randn(int(n), 4, 3, generator=gen, dtype=torch.float64) * 3 + 100
             for n in torch.randint(1, 6, (2 * _Moments.PARTS + 5,), generator=gen)]
    moments = _Moments()
    for part in parts:
        moments.add(part)
    count, mean, sq_dev = moments.total()
    every = torch.cat(parts).transpose(0, 1).reshape(4, -1)
    assert count == every.shape[1]
    torch.testing.assert_close(mean, every.mean(1), rtol=1e-14, atol=0)
    torch.testing.assert_close(sq_dev, every.var(1, correction=0) * count, rtol=1e-12, atol=0)
