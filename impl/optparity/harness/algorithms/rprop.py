"""Rprop: what the harness, the bench and the mutants know about it."""
from torch import tensor as _t

from optparity.harness.algorithms._spec import Algorithm, Mutant

SPEC = Algorithm(
    name='Rprop',
    torch_configs=(
        {},
        {'lr': 0.0002},
        {'etas': (0.5, 1.5)},
        {'step_sizes': (2e-06, 100)},
        {'maximize': True},
    ),
    extra_configs=(
        {'lr': _t(0.01), 'etas': (0.3, 1.7), 'maximize': True},
        {'differentiable': True},
        {'lr': 0.01, 'step_sizes': (0.001, 0.02)},
    ),
    # torch's tests add these on CUDA only (capturable: state steps on the device, no host sync);
    # torch refuses capturable on the CPU, so they run only when both sides are on CUDA
    cuda_configs=({"capturable": True}, {"lr": _t(0.001), "capturable": True}),
    second_group={'lr': 0.002, 'etas': (0.4, 1.3)},
    traffic={'param': 'rw', 'grad': 'r', 'prev': 'rw', 'step_size': 'rw'},
    functional_upstream=True,
    mutants=(
        Mutant('rprop_zero_counts_as_positive', 'Rprop', 'functional.rprop', 'sign[sign.gt(0)] = etaplus', 'sign[sign.ge(0)] = etaplus', 'logic'),
        Mutant('rprop_maximize_foreach_ignored', 'Rprop', 'functional.rprop', '        if maximize:\n            torch._foreach_neg_(factors)\n', '', 'option', 'maximize'),
        Mutant('rprop_step_size_max_ignored', 'Rprop', 'functional.rprop', 'delta.mul_(factor).clamp_(step_size_min, step_size_max)', 'delta.mul_(factor).clamp_(min=step_size_min)', 'option', 'step_sizes'),
    ),
)
