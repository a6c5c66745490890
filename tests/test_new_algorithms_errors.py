"""NAdam, RAdam and ASGD refuse bad input exactly as torch.optim does: torch's own error inputs
(optim_db's optim_error_inputs_func, CPU) plus the step-time refusals of the functional API,
with the same exception type, the same message, the same warnings, and nothing modified."""
import importlib
import re
import warnings

import pytest
import torch

import optparity.functional
import optparity.optim

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers",
                                        reason="torch's test helpers need expecttest")
OptimizerErrorEnum = common_optimizers.OptimizerErrorEnum

ALGOS = ("NAdam", "RAdam", "ASGD")


def _outcome(fn):
    """(exception type, message) or None, and the warnings raised, as (category, message)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
            error = None
        except Exception as e:  # noqa: BLE001
            error = (type(e), str(e))
    return error, [(w.category, str(w.message)) for w in caught]


def _error_inputs(algo):
    entry = next(e for e in common_optimizers.optim_db if e.optim_cls.__name__ == algo)
    return entry.optim_error_inputs_func("cpu", torch.float32)


def _cases():
    for algo in ALGOS:
        for i, error_input in enumerate(_error_inputs(algo)):
            yield pytest.param(algo, i, id=f"{algo}-{error_input.optimizer_error_input.desc}")


def _plain_params(params):
    """The tensors inside torch's params argument (a tensor, a list, named pairs, groups)."""
    if isinstance(params, torch.Tensor):
        return [params]
    out = []
    for item in params:
        if isinstance(item, dict):
            inner = item["params"]
            out += _plain_params(inner if isinstance(inner, (list, tuple)) else [inner])
        elif isinstance(item, tuple):
            out.append(item[1])
        else:
            out.append(item)
    return out


@pytest.mark.parametrize("algo,index", list(_cases()))
def test_torch_error_inputs_match(algo, index):
    # Fresh inputs per run: each optimizer gets the same, untouched arguments.
    def run(cls):
        error_input = _error_inputs(algo)[index]
        spec = error_input.optimizer_error_input
        params = spec.params if spec.params is not None else [torch.nn.Parameter(torch.randn(2, 3))]
        before = [p.detach().clone() for p in _plain_params(params)]

        def go():
            opt = cls(params, **spec.kwargs)
            if error_input.error_on == OptimizerErrorEnum.STEP_ERROR:
                for p in _plain_params(params):
                    p.grad = torch.ones_like(p)
                opt.step()

        result = _outcome(go)
        unchanged = all(torch.equal(p.detach(), b) for p, b in zip(_plain_params(params), before))
        return error_input, result, unchanged

    error_input, expected, torch_unchanged = run(getattr(torch.optim, algo))
    _, got, ours_unchanged = run(getattr(optparity.optim, algo))

    # torch itself must show the error its tests expect, or this comparison proves nothing.
    error, warned = expected
    if issubclass(error_input.error_type, Warning):
        assert any(issubclass(c, error_input.error_type) and re.search(error_input.error_regex, m)
                   for c, m in warned), warned
    else:
        assert error is not None and issubclass(error[0], error_input.error_type)
        assert re.search(error_input.error_regex, error[1]), error[1]
    assert got == expected
    assert torch_unchanged and ours_unchanged


def _step_outcome(cls, kwargs, complex_param=False):
    dtype = torch.complex64 if complex_param else torch.float32
    p = torch.randn(3, dtype=dtype, requires_grad=True)
    p.grad = torch.randn(3, dtype=dtype)
    before = p.detach().clone(), p.grad.clone()
    result = _outcome(lambda: cls([p], **kwargs).step())
    return result, torch.equal(p.detach(), before[0]), torch.equal(p.grad, before[1])


STEP_REFUSALS = [
    {"capturable": True, "foreach": False},  # params must be on a capturable device
    {"capturable": True, "foreach": True},  # same check, foreach wording
    {"capturable": True, "foreach": False, "maximize": True, "weight_decay": 0.1},
    {"differentiable": True, "foreach": True},  # foreach kernels have no autograd
]


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("kwargs", STEP_REFUSALS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("complex_param", [False, True], ids=["real", "complex"])
def test_step_refusals_match(algo, kwargs, complex_param):
    expected = _step_outcome(getattr(torch.optim, algo), kwargs, complex_param)
    got = _step_outcome(getattr(optparity.optim, algo), kwargs, complex_param)
    assert expected[0][0] is not None, "torch accepted it; the case proves nothing"
    assert got == expected
    assert all(expected[1:]) and all(got[1:]), "a refused step modified the param or its grad"


def _kernel_lists(algo, steps_as_floats, second_as_floats=False):
    p = torch.randn(3)
    g = torch.randn(3)
    scalar = (lambda v: v) if steps_as_floats else (lambda v: torch.tensor(float(v)))
    if algo == "NAdam":
        second = [1.0] if second_as_floats else [torch.tensor(1.0)]
        return ([p], [g], [torch.zeros(3)], [torch.zeros(3)], second, [scalar(0.0)]), dict(
            beta1=0.9, beta2=0.999, lr=1e-3, weight_decay=0.0, momentum_decay=4e-3, eps=1e-8)
    if algo == "RAdam":
        return ([p], [g], [torch.zeros(3)], [torch.zeros(3)], [scalar(0.0)]), dict(
            beta1=0.9, beta2=0.999, lr=1e-3, weight_decay=0.0, eps=1e-8)
    return ([p], [g], [torch.zeros(3)], [torch.ones(())], [torch.tensor(0.01)], [scalar(0.0)]), dict(
        lambd=1e-4, lr=1e-2, t0=1e6, alpha=0.75, weight_decay=0.0)


@pytest.mark.parametrize("algo,which", [(a, "state_steps") for a in ALGOS] + [("NAdam", "mu_products")])
@pytest.mark.parametrize("foreach", [False, True])
def test_functional_api_state_checks_match(algo, which, foreach):
    # Python numbers where tensors belong (the pre-1.12 API): NAdam and RAdam refuse them up
    # front; ASGD checks nothing (its for-loop runs on, its foreach path fails inside).
    def run(fn):
        torch.manual_seed(0)
        lists, kwargs = _kernel_lists(algo, which == "state_steps", which == "mu_products")
        return _outcome(lambda: fn(*lists, foreach=foreach, **kwargs)), lists[0][0]

    name = algo.lower()
    (expected, p_torch) = run(getattr(importlib.import_module(f"torch.optim.{name}"), name))
    (got, p_ours) = run(getattr(optparity.functional, name))
    if algo != "ASGD":
        assert expected[0] is not None, "torch accepted it; the case proves nothing"
    assert got == expected
    # whatever happened (ASGD's for-loop takes Python steps), it happened to the same bits
    assert torch.equal(p_ours.view(torch.int32), p_torch.view(torch.int32))
