"""Port of torch's ``test/test_modules.py`` for the BatchNorm entries of ``module_db``.

torch checks every ``nn`` module against the samples of its ``ModuleInfo`` (``module_db`` in
``torch.testing._internal.common_modules``). This file takes the same entries (``nn.BatchNorm1d``,
``nn.BatchNorm2d``, ``nn.BatchNorm3d``; ``module_db`` has no LazyBatchNorm entry and bnsurgery no
lazy class) and the same samples, and runs each of torch's checks on torch's class and on
bnsurgery's in the same test, with the same constructor arguments, the same random state (copied
through ``state_dict``) and the same inputs; then compares the two. One test per check, module,
sample, dtype and training mode, so one failure does not hide the rest.

The checks are re-written here, not copied: torch's ``TestCase`` machinery (device-type
instantiation, ``assertEqual``) is replaced by pytest and ``torch.testing.assert_close``, whose
default tolerances are the per-dtype ones torch's ``assertEqual`` uses. One check is added to
torch's: ``test_grad_unbatched`` runs test_grad without its batched-gradient (vmap) part, so
first derivatives are verified while that part is listed in ``NEEDS_FUNC_TRANSFORMS``. Samples
are looped inside each test, as torch does; a failure names the sample.
"""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
from peer_suites import (
    BNSURGERY_CLASSES,
    assert_equal,
    import_torch_testing,
    one_thread,
    randomize_state,
    run_on_both,
)
from torch import nn

import_torch_testing()

from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402
from torch.testing._internal.common_utils import gradcheck, gradgradcheck  # noqa: E402

MODULE_INFOS = [info for info in module_db if info.module_cls in BNSURGERY_CLASSES]
DTYPES = (torch.float32, torch.float64)

#: Cases that need the autograd node's function-transform support (vmap for batched gradients,
#: forward AD): strict expected failures until it lands, so each one shows up when it starts to
#: pass and must be removed from this list.
NEEDS_FUNC_TRANSFORMS: set[str] = set()
#: Samples of those checks that pass already: an empty batch has no gradient values to batch.
PASSES_WITHOUT_FUNC_TRANSFORMS = {"zero_batch"}


def freeze_rng_state():
    """torch's freeze_rng_state for the CPU generator only (no accelerator RNG is touched)."""
    return torch.random.fork_rng(devices=[])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _sample_ids(info) -> list[str]:
    samples = info.module_inputs_func(info, device="cpu", dtype=torch.float32,
                                      requires_grad=False, training=True)
    return [f"{index}-{sample.desc or 'default'}" for index, sample in enumerate(samples)]


def _cases(dtypes=DTYPES, trainings=(True, False)):
    """One case per module, dtype and training mode, as torch's test_modules.py has."""
    return [pytest.param(info, dtype, training, id=f"{info.module_cls.__name__}-"
                         f"{str(dtype)[6:]}-{'train' if training else 'eval'}")
            for info, dtype, training in itertools.product(MODULE_INFOS, dtypes, trainings)]


def _samples(info, dtype, training, *, requires_grad=False, seed=0):
    torch.manual_seed(seed)  # the same inputs for both implementations
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=requires_grad,
                                   training=training)


def _module_class(impl: str, info) -> type[nn.Module]:
    return info.module_cls if impl == "torch" else BNSURGERY_CLASSES[info.module_cls]


def _build(impl: str, info, sample, dtype, training, seed=0) -> nn.Module:
    """The module of ``impl`` for ``sample``, with torch's module's random state loaded."""
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    reference = info.module_cls(*args, **kwargs)
    randomize_state(reference, seed)
    module = reference
    if impl != "torch":
        module = _module_class(impl, info)(*args, **kwargs)
        module.load_state_dict(reference.state_dict())
    module.to("cpu").to(dtype)
    module.train(training)
    return module


def _assert_parameters_and_buffers_are(module, device, dtype):
    for kind, items in (("parameter", module.named_parameters()),
                        ("buffer", module.named_buffers())):
        for name, tensor in items:
            assert tensor.device == torch.device(device), f"{kind} {name} on {tensor.device}"
            if tensor.is_floating_point():
                assert tensor.dtype == dtype, f"{kind} {name} is {tensor.dtype}, not {dtype}"


def _state(module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _grads(tensors):
    return [None if t.grad is None else t.grad.clone() for t in tensors]


@pytest.mark.parametrize("info, dtype, training", _cases())
def test_forward(info, dtype, training):
    def check(impl, index):
        sample = _samples(info, dtype, training)[index]
        module = _build(impl, info, sample, dtype, training)
        args, kwargs = sample.forward_input.args, sample.forward_input.kwargs
        with freeze_rng_state():
            output = module(*args, **kwargs)
        state = _state(module)
        # torch's check: the dtype-conversion method converts every parameter and buffer.
        getattr(module, {torch.float32: "float", torch.float64: "double"}[dtype])()
        module(*args, **kwargs)
        _assert_parameters_and_buffers_are(module, "cpu", dtype)
        return output, state

    run_on_both(check, _sample_ids(info), torch.testing.assert_close)


@pytest.mark.parametrize("info, dtype, training", _cases())
def test_factory_kwargs(info, dtype, training):
    def check(impl, index):
        sample = _samples(info, dtype, training)[index]
        args = sample.constructor_input.args
        kwargs = dict(sample.constructor_input.kwargs, device="cpu", dtype=dtype)
        module = _module_class(impl, info)(*args, **kwargs)
        module.train(training)
        _assert_parameters_and_buffers_are(module, "cpu", dtype)
        return [(name, tuple(t.shape), t.dtype, t.requires_grad)
                for name, t in itertools.chain(module.named_parameters(),
                                               module.named_buffers())]

    run_on_both(check, _sample_ids(info), assert_equal)


@pytest.mark.parametrize("info, dtype, training", _cases())
def test_repr(info, dtype, training):
    def check(impl, index):
        sample = _samples(info, dtype, training)[index]
        module = _build(impl, info, sample, dtype, training)
        return repr(module), str(module)

    run_on_both(check, _sample_ids(info), assert_equal)


@pytest.mark.parametrize("info, dtype, training", _cases())
def test_pickle(info, dtype, training):
    """torch's test_pickle (the whole module), loaded with ``weights_only=True``.

    torch 2.6 made ``weights_only=True`` the default of ``torch.load``; a pickled module then
    needs its class allowed, which is what a user does with ``torch.serialization.safe_globals``.
    """
    def check(impl, index):
        sample = _samples(info, dtype, training)[index]
        module = _build(impl, info, sample, dtype, training)
        args, kwargs = sample.forward_input.args, sample.forward_input.kwargs
        with freeze_rng_state():
            output = module(*args, **kwargs)
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        with torch.serialization.safe_globals([type(module)]):
            loaded = torch.load(buffer, weights_only=True)
        assert type(loaded) is type(module)
        with freeze_rng_state():
            output_from_copy = loaded(*args, **kwargs)
        torch.testing.assert_close(output_from_copy, output)
        return output

    run_on_both(check, _sample_ids(info), torch.testing.assert_close)


@pytest.mark.parametrize("info, dtype, training", _cases())
def test_save_load_state_dict(info, dtype, training):
    """state_dict through ``torch.save``/``torch.load(weights_only=True)`` into a fresh module."""
    def check(impl, index):
        sample = _samples(info, dtype, training)[index]
        module = _build(impl, info, sample, dtype, training)
        args, kwargs = sample.forward_input.args, sample.forward_input.kwargs
        module(*args, **kwargs)  # moves the running statistics in training
        buffer = io.BytesIO()
        torch.save(module.state_dict(), buffer)
        buffer.seek(0)
        fresh = _module_class(impl, info)(*sample.constructor_input.args,
                                          **sample.constructor_input.kwargs).to(dtype)
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        fresh.train(training)
        torch.testing.assert_close(_state(fresh), _state(module))
        return fresh(*args, **kwargs), _state(fresh)

    run_on_both(check, _sample_ids(info), torch.testing.assert_close)


def _memory_formats(args):
    ranks = {t.dim() for t in args if isinstance(t, torch.Tensor)}
    if 4 in ranks:
        return ([torch.contiguous_format, torch.channels_last],
                [torch.preserve_format, torch.contiguous_format, torch.channels_last])
    if 5 in ranks:
        return ([torch.contiguous_format, torch.channels_last_3d],
                [torch.preserve_format, torch.contiguous_format, torch.channels_last_3d])
    return [torch.contiguous_format], [torch.preserve_format, torch.contiguous_format]


def _to_memory_format(tensor, memory_format):
    rank = tensor.dim()
    if ((memory_format == torch.channels_last and rank != 4)
            or (memory_format == torch.channels_last_3d and rank != 5)):
        return tensor.clone().detach().requires_grad_(tensor.requires_grad)
    return (tensor.clone().to(memory_format=memory_format).detach()
            .requires_grad_(tensor.requires_grad))


def _assert_memory_format(tensor, input_format):
    if tensor.dim() == 4 and input_format == torch.channels_last:
        assert tensor.is_contiguous(memory_format=torch.channels_last)
    elif tensor.dim() == 5 and input_format == torch.channels_last_3d:
        assert tensor.is_contiguous(memory_format=torch.channels_last_3d)
    else:
        assert tensor.is_contiguous()


@pytest.mark.parametrize("info, dtype, training", _cases())
def test_memory_format(info, dtype, training):
    def check(impl, index):
        sample = _samples(info, dtype, training, requires_grad=True)[index]
        input_formats, module_formats = _memory_formats(sample.forward_input.args)
        module = _build(impl, info, sample, dtype, training)
        (x,) = sample.forward_input.args
        with freeze_rng_state():
            torch.manual_seed(1)
            desired = module(x)
            reference_grads = None
            if training:
                grad_output = torch.rand_like(desired)
                reference_grads = torch.autograd.grad(desired, (x, *module.parameters()),
                                                      grad_output)
            for input_format in input_formats:
                x_in = _to_memory_format(x, input_format)
                for module_format in module_formats:
                    module.to(memory_format=module_format)
                    output = module(x_in)
                    if input_format != torch.contiguous_format or \
                            module_format != torch.contiguous_format:
                        torch.testing.assert_close(output, desired)
                    _assert_memory_format(output, input_format)
                    if training:
                        grads = torch.autograd.grad(
                            output, (x_in, *module.parameters()),
                            torch.empty_like(output).copy_(grad_output))
                        torch.testing.assert_close(grads, reference_grads)
                        _assert_memory_format(grads[0], input_format)
        return desired, reference_grads

    run_on_both(check, _sample_ids(info), torch.testing.assert_close)


def _non_contiguous(tensor):
    if tensor.dim() == 0:
        return tensor
    out = torch.repeat_interleave(tensor, 2, dim=-1)[..., ::2].detach()
    out.requires_grad = tensor.requires_grad
    return out


@pytest.mark.parametrize("info, dtype, training", _cases())
def test_non_contiguous_tensors(info, dtype, training):
    def check(impl, index):
        sample = _samples(info, dtype, training, requires_grad=True)[index]
        module = _build(impl, info, sample, dtype, training)
        (x,) = sample.forward_input.args
        with freeze_rng_state():
            default_output = module(x)
            grad_output = default_output.clone().detach_().normal_()
            default_output.backward(grad_output, retain_graph=True)
        default_input_grad = x.grad.clone()
        default_param_grads = _grads(module.parameters())
        nc_x, nc_grad = _non_contiguous(x), _non_contiguous(grad_output)
        assert x.numel() == 0 or not nc_x.is_contiguous()
        for inp, grad in itertools.product((x, nc_x), (grad_output, nc_grad)):
            inp.grad = None
            module.zero_grad(set_to_none=True)
            with freeze_rng_state():
                out = module(inp)
                out.backward(grad.clone(), retain_graph=True)
            torch.testing.assert_close(out, default_output)
            torch.testing.assert_close(inp.grad, default_input_grad, atol=1e-4, rtol=0)
            torch.testing.assert_close(_grads(module.parameters()), default_param_grads)
        return default_output, default_input_grad, default_param_grads

    run_on_both(check, _sample_ids(info), torch.testing.assert_close)


def _gradients_check(impl, info, index, training, check_fn, **check_kwargs):
    """torch's _test_gradients_helper: the total derivative, then one parameter at a time."""
    sample = _samples(info, torch.float64, training, requires_grad=True)[index]
    module = _build(impl, info, sample, torch.float64, training)
    params = tuple(module.parameters())
    input_args = sample.forward_input.args

    def fn(*inputs_and_params):
        with freeze_rng_state():
            return module(*inputs_and_params[:len(input_args)])

    assert check_fn(fn, input_args + params, nondet_tol=0.0, **check_kwargs)
    for p in params:
        p.requires_grad = False
    for p in params:
        p.requires_grad = True
        assert check_fn(fn, input_args + params, nondet_tol=0.0, **check_kwargs)
        p.requires_grad = False


def _gradient_cases():
    cases = []
    for check_name in ("test_grad", "test_gradgrad", "test_grad_unbatched"):
        marks = []
        if check_name in NEEDS_FUNC_TRANSFORMS:
            marks = [pytest.mark.xfail(strict=True, reason="needs vmap support of the autograd "
                                       "node (batched gradients)")]
        for case in _cases(dtypes=(torch.float64,)):
            cases.append(pytest.param(check_name, *case.values, marks=marks,
                                      id=f"{check_name}-{case.id}"))
    return cases


@pytest.mark.parametrize("check_name, info, dtype, training", _gradient_cases())
def test_gradients(check_name, info, dtype, training):
    """torch's test_grad and test_gradgrad (double only, torch's gradcheck defaults)."""
    check_fn = gradgradcheck if check_name.startswith("test_gradgrad") else gradcheck
    kwargs = {"check_batched_grad": False} if check_name.endswith("_unbatched") else {}
    run_on_both(lambda impl, index: _gradients_check(impl, info, index, training, check_fn,
                                                     **kwargs), _sample_ids(info))


@pytest.mark.parametrize("info", MODULE_INFOS, ids=lambda info: info.module_cls.__name__)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_errors(info, dtype, training):
    def check(impl, index):  # one sample: the error inputs
        error_inputs = info.module_error_inputs_func(info, device="cpu", dtype=dtype,
                                                     requires_grad=False, training=training)
        assert error_inputs
        for error_input in error_inputs:
            sample = error_input.module_error_input
            args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
            cls = _module_class(impl, info)
            if error_input.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
                with pytest.raises(error_input.error_type, match=error_input.error_regex):
                    cls(*args, **kwargs)
            else:
                module = cls(*args, **kwargs)
                with pytest.raises(error_input.error_type, match=error_input.error_regex):
                    module(*sample.forward_input.args, **sample.forward_input.kwargs)

    run_on_both(check, ["error_inputs"])


@pytest.mark.parametrize("info, dtype, training", _cases())
@pytest.mark.parametrize("swap", [False, True], ids=["no_swap", "swap"])
@pytest.mark.parametrize("set_grad", [False, True], ids=["no_grad", "grad"])
def test_to(info, dtype, training, swap, set_grad):
    """torch's test_to: ``Module.to`` converts in place (``.data``) or swaps tensors."""
    def check(impl, index):
        sample = _samples(info, dtype, training)[index]
        module = _build(impl, info, sample, torch.float32, training)
        if set_grad:
            for p in module.parameters():
                p.grad = torch.randn_like(p)
        previous = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(swap)
        try:
            args = sample.forward_input.args
            if swap and not set_grad and list(module.parameters()):
                module(*(a.float() for a in args)).sum().backward()
                module.to(dtype=torch.half)
                module.to(dtype=torch.float32)
            outputs = []
            current = torch.float32
            for target in (dtype, torch.float32, dtype):
                ids_before = [id(p) for p in module.parameters()]
                cdatas_before = [p._cdata for p in module.parameters()]
                changes, current = target != current, target
                module.to(device="cpu", dtype=target)
                assert all(isinstance(p, nn.Parameter) for p in module.parameters())
                _assert_parameters_and_buffers_are(module, "cpu", target)
                if set_grad:
                    assert all(p.grad.dtype == target for p in module.parameters())
                assert [id(p) for p in module.parameters()] == ids_before
                cdatas_after = [p._cdata for p in module.parameters()]
                if swap and changes:
                    assert all(a != b for a, b in zip(cdatas_before, cdatas_after, strict=True))
                elif not swap:
                    assert cdatas_after == cdatas_before
                with torch.no_grad():
                    outputs.append(module(*(a.to(target) for a in args)))
        finally:
            torch.__future__.set_swap_module_params_on_conversion(previous)
        return outputs

    run_on_both(check, _sample_ids(info), torch.testing.assert_close)


@pytest.mark.parametrize("info, dtype, training", _cases())
def test_cpu_gpu_parity(info, dtype, training):
    if not torch.cuda.is_available():
        pytest.skip("test_cpu_gpu_parity needs a CUDA device")

    def check(impl, index):
        sample = _samples(info, dtype, training, requires_grad=True)[index]
        cpu_module = _build(impl, info, sample, dtype, training)
        gpu_module = copy.deepcopy(cpu_module).cuda()
        (x,) = sample.forward_input.args
        x_gpu = x.detach().cuda().requires_grad_()
        cpu_out, gpu_out = cpu_module(x), gpu_module(x_gpu)
        tolerance = {"atol": 5e-2 if dtype == torch.float32 else 4e-4, "rtol": 0}
        torch.testing.assert_close(gpu_out.cpu(), cpu_out, **tolerance)
        for _ in range(5):
            grad = torch.randn_like(cpu_out)
            cpu_out.backward(grad, retain_graph=True)
            gpu_out.backward(grad.cuda(), retain_graph=True)
            torch.testing.assert_close(x_gpu.grad.cpu(), x.grad, **tolerance)
            for p_cpu, p_gpu in zip(cpu_module.parameters(), gpu_module.parameters(), strict=True):
                torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, **tolerance)
        return cpu_out

    run_on_both(check, _sample_ids(info), torch.testing.assert_close)


@pytest.mark.parametrize("info, dtype, training", _cases())
def test_multiple_device_transfer(info, dtype, training):
    """torch's test_multiple_device_transfer; the CUDA legs run only where CUDA is."""
    def check(impl, index):
        sample = _samples(info, dtype, training)[index]
        module = _build(impl, info, sample, dtype, training)
        (x,) = sample.forward_input.args
        outputs = [module(x)]
        _assert_parameters_and_buffers_are(module, "cpu", dtype)
        if torch.cuda.is_available():
            module.cuda()
            outputs.append(module(x.cuda()).cpu())
            _assert_parameters_and_buffers_are(module, "cuda:0", dtype)
        module.cpu()
        outputs.append(module(x))
        _assert_parameters_and_buffers_are(module, "cpu", dtype)
        return outputs, _state(module)

    tolerance = {} if not torch.cuda.is_available() else {"atol": 1e-4, "rtol": 1e-4}
    run_on_both(check, _sample_ids(info),
                lambda ours, baseline: torch.testing.assert_close(ours, baseline, **tolerance))


@pytest.mark.parametrize("info, dtype, training", _cases())
def test_train_eval(info, dtype, training):
    """``train()``/``eval()`` return the module and set the flag, which selects the statistics."""
    def check(impl, index):
        sample = _samples(info, dtype, training)[index]
        module = _build(impl, info, sample, dtype, training)
        (x,) = sample.forward_input.args
        assert module.train() is module and module.training
        assert module.eval() is module and not module.training
        assert module.train(False) is module and not module.training
        eval_output = module(x)
        module.train(True)
        train_output = module(x)
        return eval_output, train_output, _state(module)

    run_on_both(check, _sample_ids(info), torch.testing.assert_close)


@pytest.mark.parametrize("info, dtype, training", _cases(trainings=(True,)))
def test_if_train_and_eval_modes_differ(info, dtype, training):
    """The ModuleInfo says train and eval differ: forward must read ``self.training``."""
    def check(impl, index):
        sample = _samples(info, dtype, training)[index]
        module = _build(impl, info, sample, dtype, training)
        delattr(module, "training")
        with pytest.raises(AttributeError, match="'training'"):
            module(*sample.forward_input.args)
        assert info.train_and_eval_differ

    run_on_both(check, _sample_ids(info))


@pytest.mark.parametrize("info, dtype, training", _cases())
def test_device_ctx_init(info, dtype, training):
    """Built under ``torch.device('meta')``, parameters and buffers are meta, same metadata."""
    def check(impl, index):
        sample = _samples(info, dtype, training)[index]
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        cls = _module_class(impl, info)
        cpu_module = cls(*args, **kwargs)
        with torch.device("meta"):
            meta_module = cls(*args, **kwargs)
        metadata = []
        pairs = itertools.chain(
            zip(meta_module.parameters(), cpu_module.parameters(), strict=True),
            zip(meta_module.buffers(), cpu_module.buffers(), strict=True))
        for meta, cpu in pairs:
            assert meta.is_meta
            assert (meta.shape, meta.dtype, meta.stride()) == (cpu.shape, cpu.dtype, cpu.stride())
            metadata.append((tuple(meta.shape), meta.dtype, meta.requires_grad))
        return metadata

    run_on_both(check, _sample_ids(info), assert_equal)
