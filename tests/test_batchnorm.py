"""bnsurgery.BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d: a drop-in in every respect."""

from __future__ import annotations

import inspect
import itertools
from collections import OrderedDict

import pytest
import torch
from conftest import AtenOpRecorder, requires_cuda
from torch import nn

import bnsurgery
from bnsurgery.errors import ExportError, InvalidInputError

PAIRS = {
    "1d-2D": (nn.BatchNorm1d, bnsurgery.BatchNorm1d, (6, 4)),
    "1d-3D": (nn.BatchNorm1d, bnsurgery.BatchNorm1d, (4, 4, 5)),
    "2d": (nn.BatchNorm2d, bnsurgery.BatchNorm2d, (3, 4, 5, 3)),
    "3d": (nn.BatchNorm3d, bnsurgery.BatchNorm3d, (2, 4, 3, 2, 3)),
}
OPTIONS = [dict(zip(("affine", "track_running_stats", "momentum", "bias"), values, strict=True))
           for values in itertools.product([True, False], [True, False], [0.1, None],
                                           [True, False])
           if values[0] or values[3]]  # bias=False only matters with affine=True
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=2e-5)}


def _option_id(options):
    return ",".join(f"{k}={v}" for k, v in options.items())


def _twins(torch_cls, our_cls, dtype, **options):
    ref = torch_cls(4, eps=1e-3, dtype=dtype, **options)
    ours = our_cls(4, eps=1e-3, dtype=dtype, **options)
    with torch.no_grad():  # non-trivial affine parameters, identical in both
        for p in ref.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("pair", PAIRS.values(), ids=PAIRS.keys())
@pytest.mark.parametrize("options", OPTIONS, ids=_option_id)
def test_several_steps_match_torch(options, pair, mode, dtype):
    torch_cls, our_cls, shape = pair
    ref, ours = _twins(torch_cls, our_cls, dtype, **options)
    ref.train(mode == "train")
    ours.train(mode == "train")
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1) if options["affine"] else None
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1) if options["affine"] else None
    for step in range(3):
        x = (torch.randn(shape, dtype=dtype) * (1 + step) + step).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        grad = torch.randn(shape, dtype=dtype)
        out, out_ref = ours(x), ref(x_ref)
        torch.testing.assert_close(out, out_ref, **TOL[dtype])
        out.backward(grad)
        out_ref.backward(grad)
        torch.testing.assert_close(x.grad, x_ref.grad, **TOL[dtype])
        for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, p_ref.grad, **TOL[dtype], msg=name)
        for (name, b), b_ref in zip(ours.named_buffers(), ref.buffers(), strict=True):
            torch.testing.assert_close(b, b_ref, **TOL[dtype], msg=name)
        if opt_ref is not None:
            opt_ref.step()
            opt_ours.step()
            opt_ref.zero_grad()
            opt_ours.zero_grad()


@pytest.mark.parametrize("pair", PAIRS.values(), ids=PAIRS.keys())
def test_constructor_signature_is_torchs(pair):
    torch_cls, our_cls, _ = pair
    assert inspect.signature(our_cls.__init__) == inspect.signature(torch_cls.__init__)


@pytest.mark.parametrize("pair", PAIRS.values(), ids=PAIRS.keys())
@pytest.mark.parametrize("options", OPTIONS, ids=_option_id)
def test_state_dict_is_torchs(pair, options):
    torch_cls, our_cls, _ = pair
    ref, ours = torch_cls(7, **options), our_cls(7, **options)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    for key in ref_sd:
        assert our_sd[key].shape == ref_sd[key].shape, key
        assert our_sd[key].dtype == ref_sd[key].dtype, key
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
    # Strict loading both ways.
    ours.load_state_dict(ref_sd, strict=True)
    ref.load_state_dict(our_sd, strict=True)
    assert repr(ours).replace("bnsurgery.", "") == repr(ref)


def test_old_checkpoint_without_num_batches_tracked_loads_like_torch():
    ref = nn.BatchNorm2d(3)
    old = OrderedDict((k, v) for k, v in ref.state_dict().items() if k != "num_batches_tracked")
    old._metadata = OrderedDict({"": {"version": 1}})
    ours = bnsurgery.BatchNorm2d(3)
    ours.num_batches_tracked.fill_(5)
    ref.num_batches_tracked.fill_(5)
    ours.load_state_dict(old, strict=True)
    ref.load_state_dict(old, strict=True)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)


def test_factory_kwargs_and_isinstance():
    bn = bnsurgery.BatchNorm2d(5, dtype=torch.float64, device="cpu")
    assert bn.weight.dtype == torch.float64 and bn.running_var.dtype == torch.float64
    assert bn.num_batches_tracked.dtype == torch.long
    assert isinstance(bn, nn.BatchNorm2d)  # user code that checks isinstance keeps working


@pytest.mark.parametrize("pair", PAIRS.values(), ids=PAIRS.keys())
def test_no_torch_kernel_in_module(pair):
    _, our_cls, shape = pair
    bn = our_cls(4)
    x = torch.randn(shape, requires_grad=True)
    with AtenOpRecorder() as rec:
        bn(x).sum().backward()
        bn.eval()
        bn(x).sum().backward()
    assert rec.ops and rec.batch_norm_ops() == []


@pytest.mark.parametrize(("cls", "shape", "match"), [
    (bnsurgery.BatchNorm2d, (2, 4, 5), r"wrong rank.*3-D input of shape \(2, 4, 5\).*4-D"),
    (bnsurgery.BatchNorm1d, (2, 4, 5, 6), r"wrong rank.*4-D.*expected 2-D \(N, C\) or 3-D"),
    (bnsurgery.BatchNorm3d, (2, 4, 5, 6), r"wrong rank.*5-D"),
    (bnsurgery.BatchNorm2d, (2, 3, 5, 5), r"BatchNorm2d\(4\).*Got 3 channels.*expected 4"),
    (bnsurgery.BatchNorm1d, (1, 4), r"more than one value per channel.*\(1, 4\)"),
], ids=["2d-rank", "1d-rank", "3d-rank", "channels", "one-value"])
def test_bad_input_names_expected_and_actual(cls, shape, match):
    with pytest.raises(InvalidInputError, match=match):
        cls(4)(torch.randn(shape))


def test_integer_input_is_refused():
    with pytest.raises(InvalidInputError, match="floating-point input.*int64"):
        bnsurgery.BatchNorm1d(4)(torch.ones(3, 4, dtype=torch.int64))


def test_one_value_per_channel_is_fine_in_eval():
    bn = bnsurgery.BatchNorm1d(4).eval()
    ref = nn.BatchNorm1d(4).eval()
    x = torch.randn(1, 4)
    torch.testing.assert_close(bn(x), ref(x))


def test_eval_without_tracking_uses_batch_stats():
    ref = nn.BatchNorm2d(3, track_running_stats=False).eval()
    ours = bnsurgery.BatchNorm2d(3, track_running_stats=False).eval()
    x = torch.randn(4, 3, 2, 2) * 3 + 1
    torch.testing.assert_close(ours(x), ref(x))


def _tiny_net(bn_cls):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bn_cls(4), nn.ReLU(),
                         nn.Conv2d(4, 2, 1))


def test_fx_symbolic_trace():
    model = bnsurgery.calibrate_batchnorm(_tiny_net(bnsurgery.BatchNorm2d),
                                          torch.randn(2, 3, 6, 6))
    x = torch.randn(2, 3, 6, 6)
    for training in (False, True):
        model.train(training)
        traced = torch.fx.symbolic_trace(model)
        targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
        assert bnsurgery.functional.batch_norm in targets
        with torch.no_grad():
            torch.testing.assert_close(traced(x), _tiny_net_copy(model)(x))


def _tiny_net_copy(model):
    import copy
    return copy.deepcopy(model)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_export(training):
    model = bnsurgery.calibrate_batchnorm(_tiny_net(bnsurgery.BatchNorm2d),
                                          torch.randn(2, 3, 6, 6)).train(training)
    reference = _tiny_net_copy(model)
    x = torch.randn(3, 3, 6, 6)
    program = torch.export.export(model, (x,))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in op for op in ops), ops
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), reference(x))


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = bnsurgery.calibrate_batchnorm(_tiny_net(bnsurgery.BatchNorm2d),
                                          torch.randn(2, 3, 6, 6)).eval()
    x = torch.randn(2, 3, 6, 6)
    path = tmp_path / "bn.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=18)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-5, atol=1e-5)


class _Shift(nn.Module):
    """Subtracts one: ``relu(y - 1)`` and ``relu(y) - 1`` differ, so the order shows."""

    def forward(self, x):
        return x - 1.0


def test_batchnorm_act_applies_drop_then_act():
    bn = bnsurgery.BatchNormAct2d(3, act=nn.ReLU(), drop=_Shift())
    ref = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    out = bn(x)
    torch.testing.assert_close(out, torch.relu(ref(x) - 1.0))
    assert out.min() == 0  # act last: the shifted values were clipped, not shifted after
    assert set(bn.state_dict()) == set(ref.state_dict())


def test_batchnorm_act_real_dropout_runs_before_the_activation():
    # sigmoid(0) = 0.5: an element dropped before the activation reads 0.5, one dropped after
    # it reads 0. Every other element is sigmoid of the normalised value scaled by 1 / (1 - p).
    bn = bnsurgery.BatchNormAct2d(3, act=nn.Sigmoid(), drop=nn.Dropout(0.5))
    ref = nn.BatchNorm2d(3)
    x = torch.randn(16, 3, 4, 4)
    out, kept = bn(x), torch.sigmoid(2 * ref(x))
    dropped = out == 0.5
    assert 0.3 < dropped.float().mean() < 0.7  # dropout really ran, at about p
    torch.testing.assert_close(out[~dropped], kept[~dropped])
    assert not (out == 0).any()
    bn.eval(), ref.eval()  # no dropout in eval mode
    torch.testing.assert_close(bn(x), torch.sigmoid(ref(x)))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("pair", PAIRS.values(), ids=PAIRS.keys())
def test_cuda_module_matches_torch(pair):
    torch_cls, our_cls, shape = pair
    ref, ours = _twins(torch_cls, our_cls, torch.float32)
    ref, ours = ref.cuda(), ours.cuda()
    x = torch.randn(shape, device="cuda")
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)


def _calibrated_twins():
    ours, ref = bnsurgery.BatchNorm2d(3), nn.BatchNorm2d(3)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
        ours.running_mean.normal_()
        ours.running_var.uniform_(0.5, 2.0)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def test_torch_jit_script_is_refused_with_the_alternatives():
    """torch scripts its own class; ours raises one error naming the layer and torch.export."""
    model = nn.Sequential(nn.Conv2d(3, 3, 1), bnsurgery.BatchNorm2d(3))
    torch.jit.script(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))  # torch's scripts
    with pytest.raises(ExportError, match=r"(?s)BatchNorm2d\(3\).*torch\.export\.export"):
        torch.jit.script(model)
    with pytest.raises(RuntimeError, match="restore_batchnorm"):
        torch.jit.script(bnsurgery.BatchNorm1d(4))
    torch.jit.script(bnsurgery.restore_batchnorm(model))  # the hint's alternative works


def test_torch_jit_trace_in_eval_mode_matches_torch(tmp_path):
    """An eval-mode trace records torch operators only: it saves, loads, takes other shapes and
    differentiates like torch's layer."""
    ours, ref = _calibrated_twins()
    ours.eval()
    ref.eval()
    traced = torch.jit.trace(ours, torch.randn(2, 3, 4, 4))
    torch.jit.save(traced, str(tmp_path / "bn.pt"))
    loaded = torch.jit.load(str(tmp_path / "bn.pt"))
    with AtenOpRecorder() as recorder:
        loaded(torch.randn(1, 3, 2, 2))
    assert recorder.ops and recorder.batch_norm_ops() == []
    x = torch.randn(5, 3, 6, 7, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(5, 3, 6, 7)
    out, out_ref = loaded(x), ref(x_ref)
    out.backward(g)
    out_ref.backward(g)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-4)


def test_torch_jit_trace_in_training_mode_is_refused():
    """A training-mode trace would freeze the batch size into the statistics: refused."""
    ours, ref = _calibrated_twins()
    torch.jit.trace(ref, torch.randn(2, 3, 4, 4), check_trace=False)  # torch's records its op
    before = ours.running_mean.clone()
    with pytest.raises(ExportError, match=r"(?s)training-mode.*\.eval\(\).*torch\.export"):
        torch.jit.trace(ours, torch.randn(2, 3, 4, 4))
    torch.testing.assert_close(ours.running_mean, before, rtol=0, atol=0)
