"""The case matrix covers every configuration torch's own optimizer tests use."""
import pytest
import torch

from optparity.harness import matrix
from optparity.harness.algorithms import ALGORITHMS, FUSED_ON_CPU

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers",
                                        reason="torch's test helpers need expecttest")


def _same(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _contains(configs, kwargs):
    return any(c.keys() == kwargs.keys() and all(_same(c[k], kwargs[k]) for k in c) for c in configs)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_every_torch_config_is_in_the_matrix(algo):
    entry = next(e for e in common_optimizers.optim_db if e.optim_cls.__name__ == algo)
    torch_kwargs = [i.kwargs for i in entry.optim_inputs_func("cpu", None)]
    assert torch_kwargs
    missing = [k for k in torch_kwargs if not _contains(matrix.configs(algo), k)]
    assert not missing, f"torch tests {algo} with {missing}, our matrix does not"


def test_matrix_shape():
    cases = matrix.build_cases()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert {c.path for c in cases} == set(matrix.PATHS)
    assert {c.algorithm for c in cases if c.path == "fused"} == FUSED_ON_CPU
    # every reload, the lr change and the cross-load happen, with a step after each
    assert all(c.steps > matrix.CROSS_LOAD for c in cases if c.axis == "base")
    assert matrix.RELOAD_OWN < matrix.CROSS_LOAD < matrix.STEPS


def test_seeds_do_not_depend_on_the_subset():
    full = {c.id: c.seed for c in matrix.build_cases()}
    sub = matrix.build_cases(["SGD"], ("foreach",), (torch.float64,), ("groups",))
    assert sub and all(full[c.id] == c.seed for c in sub)
