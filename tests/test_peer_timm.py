"""Port of timm's model tests (``tests/test_models.py``), short form, on replaced models.

timm checks every model with forward, backward, TorchScript and FX-tracing tests. Here the same
checks run on three of timm's own test models that normalise with BatchNorm (``test_resnet``:
``nn.BatchNorm2d``; ``test_efficientnet`` and ``test_byobnet``: ``BatchNormAct2d``), once on the
original model (torch's BatchNorm, the baseline) and once on ``replace_batchnorm(model)``; the
replaced model must also compute what the original computes, outputs and gradients.

Short form: a batch of 2 at the models' 160x160 input, and no pretrained weights; BatchNorm
statistics and affine parameters are randomised first, since default ones make evaluation an
identity. timm's BatchNorm utilities on replaced models are tested in ``test_replace.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peer_suites import one_thread, randomize_state
from torch import nn

import bnsurgery

timm = pytest.importorskip("timm")

from timm.models import create_feature_extractor, get_graph_node_names  # noqa: E402

MODELS = ["test_resnet", "test_efficientnet", "test_byobnet"]
BATCH = 2

#: Cases that need TorchScript support of the from-scratch modules: strict expected failures
#: for the replaced model until it lands.
NEEDS_FUNC_TRANSFORMS: set[str] = set()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _models(name: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """The original model (random BatchNorm state), its replaced copy, and an input."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    batchnorms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)  # timm's subclass them
    for index, module in enumerate(m for m in model.modules() if isinstance(m, batchnorms)):
        randomize_state(module, seed=index)
    replaced = bnsurgery.replace_batchnorm(model)
    assert any(isinstance(m, bnsurgery.BatchNorm2d) for m in replaced.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in replaced.modules())
    inputs = torch.randn((BATCH, *model.pretrained_cfg["input_size"]))
    return model, replaced, inputs


def _tolerance(reference: torch.Tensor) -> dict[str, float]:
    # Rounding differences grow through a deep net; scale the absolute tolerance to the output.
    return {"rtol": 1e-4, "atol": 1e-5 * max(1.0, float(reference.abs().max()))}


@pytest.mark.parametrize("name", MODELS)
def test_model_forward(name):
    model, replaced, inputs = _models(name)
    results = []
    for m in (model, replaced):
        m.eval()
        with torch.no_grad():
            outputs = m(inputs)
        assert outputs.shape == (BATCH, m.num_classes)
        assert not torch.isnan(outputs).any(), "output included NaNs"
        results.append(outputs)
    torch.testing.assert_close(results[1], results[0], **_tolerance(results[0]))


@pytest.mark.parametrize("name", MODELS)
def test_model_backward(name):
    model, replaced, inputs = _models(name)
    results = []
    for m in (model, replaced):
        m.train()
        outputs = m(inputs)
        if isinstance(outputs, tuple):
            outputs = torch.cat(outputs)
        outputs.mean().backward()
        num_params = sum(1 for p in m.parameters() if p.requires_grad)
        num_grad = sum(1 for p in m.parameters() if p.grad is not None)
        assert num_params == num_grad, "some parameters are missing gradients"
        assert not torch.isnan(outputs).any(), "output included NaNs"
        grads = {n: p.grad for n, p in m.named_parameters()}
        buffers = {n: b.clone() for n, b in m.named_buffers()}
        results.append((outputs.detach(), grads, buffers))
    (expected_out, expected_grads, expected_buffers), (out, grads, buffers) = results
    torch.testing.assert_close(out, expected_out, **_tolerance(expected_out))
    assert grads.keys() == expected_grads.keys()
    for key, expected in expected_grads.items():
        torch.testing.assert_close(grads[key], expected, **_tolerance(expected), msg=key)
    torch.testing.assert_close(buffers, expected_buffers, rtol=1e-4, atol=1e-5)


def _torchscript_cases():
    marks = [pytest.mark.xfail(strict=True, reason="needs TorchScript support of the "
                               "from-scratch modules")]
    return [pytest.param(name, which, id=f"{name}-{which}",
                         marks=marks if which == "replaced" and
                         "test_model_forward_torchscript" in NEEDS_FUNC_TRANSFORMS else [])
            for name in MODELS for which in ("original", "replaced")]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("name, which", _torchscript_cases())
def test_model_forward_torchscript(name, which):
    model, replaced, inputs = _models(name)
    chosen = {"original": model, "replaced": replaced}[which].eval()
    if which == "replaced":
        # The from-scratch layers refuse TorchScript by design, with one clear error naming the
        # alternatives, rather than scripting something that is not the from-scratch maths.
        from bnsurgery.errors import ExportError

        with pytest.raises(ExportError,
                           match=r"(?s)torch\.jit\.script cannot compile.*torch\.export"):
            torch.jit.script(chosen)
        return
    with torch.no_grad():
        expected = model.eval()(inputs)
        scripted = torch.jit.script(chosen)
        outputs = scripted(inputs)
    assert outputs.shape == (BATCH, model.num_classes)
    assert not torch.isnan(outputs).any(), "output included NaNs"
    torch.testing.assert_close(outputs, expected, **_tolerance(expected))


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_fx(name):
    """timm's FX test: the last graph node of a traced feature extractor equals the output."""
    model, replaced, inputs = _models(name)
    results = []
    for m in (model, replaced):
        m.eval()
        _, eval_nodes = get_graph_node_names(m)
        fx_model = create_feature_extractor(m, return_nodes=[eval_nodes[-1]]).eval()
        with torch.no_grad():
            fx_outputs = tuple(fx_model(inputs).values())[0]
            outputs = m(inputs)
        torch.testing.assert_close(fx_outputs, outputs)
        results.append(outputs)
    torch.testing.assert_close(results[1], results[0], **_tolerance(results[0]))


def test_replacement_leaves_the_original_alone():
    model, replaced, inputs = _models("test_efficientnet")
    before = copy.deepcopy(model.state_dict())
    replaced.train()(inputs)  # moves the replaced model's running statistics only
    torch.testing.assert_close(model.state_dict(), before)
