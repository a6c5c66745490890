"""optparity's classes refuse bad input exactly as torch.optim does: same exception type, same
message, and nothing modified."""
import inspect

import pytest
import torch

import optparity.optim
from optparity.harness.algorithms import ALGORITHMS

BAD_HYPERPARAMETERS = [
    {"lr": -1.0}, {"lr": torch.tensor([0.1, 0.2])}, {"lr": torch.tensor(0.1), "foreach": True},
    {"eps": -1e-8}, {"weight_decay": -0.1},
    {"betas": (1.0, 0.999)}, {"betas": (0.9, -0.1)}, {"betas": (torch.tensor(0.9), 0.99)},
    {"momentum": -0.5}, {"nesterov": True}, {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
    {"dampening": -1.0}, {"rho": 1.5}, {"rho": -0.1}, {"alpha": -0.1}, {"lr_decay": -0.1},
    {"initial_accumulator_value": -1.0}, {"etas": (1.1, 1.2)}, {"etas": (0.5, 0.9)},
    {"fused": True, "differentiable": True}, {"fused": True, "foreach": True},
    {"step_sizes": (1e-6, 50)},  # valid: must not raise in either
]


def _errors(cls, params, kwargs):
    try:
        cls(params, **kwargs)
    except Exception as e:  # noqa: BLE001
        return type(e), str(e)
    return None


def _cases():
    for algo in ALGORITHMS:
        accepted = inspect.signature(getattr(torch.optim, algo)).parameters
        for kwargs in BAD_HYPERPARAMETERS:
            if all(k in accepted for k in kwargs):
                yield pytest.param(algo, kwargs, id=f"{algo}-{','.join(kwargs)}")


@pytest.mark.parametrize("algo,kwargs", list(_cases()))
def test_hyperparameter_errors_match_torch(algo, kwargs):
    p = torch.randn(3, requires_grad=True)
    before = p.detach().clone()
    expected = _errors(getattr(torch.optim, algo), [p], kwargs)
    got = _errors(getattr(optparity.optim, algo), [p], kwargs)
    assert got == expected
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("algo", ALGORITHMS)
@pytest.mark.parametrize("params_name", ["empty", "duplicate", "tensor_not_iterable", "not_a_tensor",
                                         "non_leaf", "set_of_params", "duplicate_across_groups"])
def test_bad_parameter_lists_match_torch(algo, params_name):
    p, q = torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)
    params = {
        "empty": [], "duplicate": [p, p], "tensor_not_iterable": p, "not_a_tensor": [p, 1.0],
        "non_leaf": [p * 2], "set_of_params": {p, q},
        "duplicate_across_groups": [{"params": [p]}, {"params": [p, q]}],
    }[params_name]
    import warnings

    with warnings.catch_warnings(record=True) as w_torch:
        warnings.simplefilter("always")
        expected = _errors(getattr(torch.optim, algo), params, {})
    with warnings.catch_warnings(record=True) as w_ours:
        warnings.simplefilter("always")
        got = _errors(getattr(optparity.optim, algo), params, {})
    assert got == expected
    assert [str(w.message) for w in w_ours] == [str(w.message) for w in w_torch]


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_sparse_gradient_refused_like_torch(algo):
    def run(cls):
        p = torch.zeros(4, requires_grad=True)
        p.grad = torch.sparse_coo_tensor([[0, 2]], [1.0, 2.0], (4,))
        try:
            cls([p]).step()
        except Exception as e:  # noqa: BLE001
            return type(e), str(e), p.detach().clone()
        return None, None, p.detach().clone()

    exp, got = run(getattr(torch.optim, algo)), run(getattr(optparity.optim, algo))
    assert got[:2] == exp[:2] and torch.equal(got[2], exp[2])


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_signature_and_defaults_match_torch(algo):
    ours = inspect.signature(getattr(optparity.optim, algo))
    theirs = inspect.signature(getattr(torch.optim, algo))
    assert [(n, p.kind, p.default) for n, p in ours.parameters.items()] == \
           [(n, p.kind, p.default) for n, p in theirs.parameters.items()]
    p = torch.randn(2, 2, requires_grad=True)  # 2-D: Muon takes nothing else
    assert getattr(optparity.optim, algo)([p]).defaults == getattr(torch.optim, algo)([p]).defaults
