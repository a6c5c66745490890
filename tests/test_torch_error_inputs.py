"""Every optparity.optim class refuses bad input exactly as torch.optim does: torch's own CPU
error inputs (optim_db's optim_error_inputs_func) for every algorithm, and sparse-gradient
refusals of ours, each run against torch's class and optparity's — same exception type and
message, same warnings, and the same params and state afterwards. (LBFGS, whose step needs a
closure, replays its error inputs in test_lbfgs.py.)"""
import re
import warnings

import pytest
import torch

import optparity.optim
from optparity.harness.algorithms import SPECS

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers",
                                        reason="torch's test helpers need expecttest")
OptimizerErrorEnum = common_optimizers.OptimizerErrorEnum

ALGOS = tuple(name for name, s in SPECS.items() if s.kind != "closure")


def _error_inputs(algo: str, dtype: torch.dtype):
    entry = next(e for e in common_optimizers.optim_db if e.optim_cls.__name__ == algo)
    torch.manual_seed(0)  # the inputs hold random tensors: the same ones for both classes
    return entry.optim_error_inputs_func(device="cpu", dtype=dtype)


def _snapshot(params) -> list:
    """Every tensor reachable from `params` (lists, groups, named pairs), cloned."""
    out = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            out.append(x.detach().clone())
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(params)
    return out


def _same_tensors(a: list, b: list) -> bool:
    def same(x, y):
        if x.layout != y.layout or x.dtype != y.dtype or x.shape != y.shape:
            return False
        if x.is_sparse:
            return same(x._indices(), y._indices()) and same(x._values(), y._values())
        return torch.equal(x, y)

    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def _outcome(cls, params, kwargs, on_step: bool):
    """(where it failed, exception type, message, warnings, tensors afterwards, state afterwards)."""
    where, error, opt = "construction", None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            opt = cls(params, **kwargs)
            if on_step:
                where = "step"
                opt.step()
            where = "none"
        except Exception as e:  # noqa: BLE001 - the error is what we compare
            error = e
    state = [] if opt is None else _snapshot([list(s.values()) for s in opt.state.values()])
    steps = [] if opt is None else [s.get("step") for s in opt.state.values() if not torch.is_tensor(s.get("step"))]
    return (where, type(error), str(error) if error else None, [str(w.message) for w in caught],
            _snapshot(params), state, steps)


def _compare(algo, torch_input, our_input, on_step):
    theirs = _outcome(getattr(torch.optim, algo), *torch_input, on_step)
    ours = _outcome(getattr(optparity.optim, algo), *our_input, on_step)
    assert ours[:4] == theirs[:4]
    assert _same_tensors(ours[4], theirs[4]), "params after the error differ"
    assert _same_tensors(ours[5], theirs[5]), "state after the error differs"
    assert ours[6] == theirs[6]
    return theirs


def _torch_cases():
    for algo in ALGOS:
        for i, e in enumerate(_error_inputs(algo, torch.float32)):
            yield pytest.param(algo, i, id=f"{algo}-{e.optimizer_error_input.desc}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("algo,index", list(_torch_cases()))
def test_torch_error_inputs(algo, index, dtype):
    expected = _error_inputs(algo, dtype)[index]
    ours = _error_inputs(algo, dtype)[index]
    on_step = expected.error_on == OptimizerErrorEnum.STEP_ERROR

    def args(e):
        oi = e.optimizer_error_input
        # params=None: the error comes before the params are looked at; give 2-D ones anyway (Muon)
        gen = torch.Generator().manual_seed(1)
        params = oi.params if oi.params is not None else [
            torch.nn.Parameter(torch.randn(2, 3, generator=gen, dtype=dtype))]
        return params, dict(oi.kwargs)

    where, etype, message, caught = _compare(algo, args(expected), args(ours), on_step)[:4]
    # torch's own expectation holds for torch, so the comparison above compared a real error
    if issubclass(expected.error_type, Warning):
        assert any(re.search(expected.error_regex, w) for w in caught)
    else:
        assert etype is expected.error_type and where == ("step" if on_step else "construction")
        assert re.search(expected.error_regex, message)


def _sparse(shape, rows, dtype=torch.float32):
    values = torch.ones((len(rows),) + tuple(shape[1:]), dtype=dtype)
    return torch.sparse_coo_tensor(torch.tensor([rows]), values, shape)


def _with_grads(grads, shapes, requires_grad=True):
    params = []
    for shape, grad in zip(shapes, grads):
        g = grad() if grad is not None else None
        p = torch.arange(float(torch.Size(shape).numel()), dtype=torch.float32 if g is None else g.dtype)
        p = p.reshape(shape).requires_grad_(requires_grad)
        p.grad = g
        params.append(p)
    return params


# (algorithm, constructor kwargs, grad makers, param shapes): each refused by torch at step().
SPARSE_REFUSALS = {
    "sgd_fused": ("SGD", {"fused": True}, [lambda: _sparse((4, 3), [0, 2])], [(4, 3)]),
    "sgd_fused_momentum": ("SGD", {"fused": True, "momentum": 0.9}, [lambda: _sparse((4, 3), [1, 1])], [(4, 3)]),
    "sgd_weight_decay": ("SGD", {"weight_decay": 0.1}, [lambda: _sparse((4, 3), [0])], [(4, 3)]),
    "sgd_foreach_weight_decay": ("SGD", {"weight_decay": 0.1, "foreach": True}, [lambda: _sparse((4, 3), [0])], [(4, 3)]),
    "adagrad_fused": ("Adagrad", {"fused": True}, [lambda: _sparse((4, 3), [0, 2])], [(4, 3)]),
    "adagrad_weight_decay": ("Adagrad", {"weight_decay": 0.1}, [lambda: _sparse((4, 3), [3])], [(4, 3)]),
    "adagrad_foreach_weight_decay": ("Adagrad", {"weight_decay": 0.1, "foreach": True},
                                     [lambda: torch.ones(2), lambda: _sparse((4, 3), [3])], [(2,), (4, 3)]),
    "adafactor_sparse": ("Adafactor", {}, [lambda: _sparse((4, 3), [1])], [(4, 3)]),
    "muon_sparse": ("Muon", {}, [lambda: _sparse((4, 3), [1])], [(4, 3)]),
    # the first param's step is counted before the second one's dense grad is refused
    "sparseadam_dense_grad": ("SparseAdam", {}, [lambda: _sparse((4, 3), [1, 1]), lambda: torch.ones(4, 3)],
                              [(4, 3), (4, 3)]),
}


@pytest.mark.parametrize("name", SPARSE_REFUSALS)
def test_sparse_gradient_refusals(name):
    algo, kwargs, grads, shapes = SPARSE_REFUSALS[name]
    where, etype, message = _compare(algo, (_with_grads(grads, shapes), kwargs),
                                     (_with_grads(grads, shapes), kwargs), on_step=True)[:3]
    assert where == "step" and etype is not type(None) and message


def test_sparseadam_counts_steps_before_refusing():
    algo, kwargs, grads, shapes = SPARSE_REFUSALS["sparseadam_dense_grad"]
    params = _with_grads(grads, shapes)
    opt = optparity.optim.SparseAdam(params, **kwargs)
    with pytest.raises(RuntimeError, match="SparseAdam does not support dense gradients"):
        opt.step()
    assert opt.state[params[0]]["step"] == 1 and params[1] not in opt.state
