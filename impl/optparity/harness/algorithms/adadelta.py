"""Adadelta: what the harness, the bench and the mutants know about it."""
from torch import tensor as _t

from optparity.harness.algorithms._spec import Algorithm, Mutant

SPEC = Algorithm(
    name='Adadelta',
    torch_configs=(
        {},
        {'lr': 0.01},
        {'weight_decay': 0.1},
        {'maximize': True},
        {'weight_decay': 0.1, 'maximize': True},
        {'rho': 0.95, 'weight_decay': 0.9},
    ),
    extra_configs=(
        {'lr': _t(0.5), 'rho': 0.8, 'eps': 0.0001},
        {'differentiable': True, 'weight_decay': 0.1},
    ),
    # torch's tests add these on CUDA only (capturable: state steps on the device, no host sync);
    # torch refuses capturable on the CPU, so they run only when both sides are on CUDA
    cuda_configs=({"capturable": True}, {"weight_decay": 0.1, "capturable": True},
        {"lr": _t(0.001), "capturable": True}),
    second_group={'lr': 0.5, 'rho': 0.7},
    traffic={'param': 'rw', 'grad': 'r', 'square_avg': 'rw', 'acc_delta': 'rw'},
    functional_upstream=True,
    mutants=(
        Mutant('adadelta_eps_outside_sqrt', 'Adadelta', 'functional.adadelta', 'denom = sq.add(eps).sqrt_()', 'denom = sq.sqrt().add_(eps)', 'logic'),
        Mutant('adadelta_acc_as_lerp', 'Adadelta', 'functional.adadelta', 'acc.mul_(rho).addcmul_(update, update, value=1 - rho)', 'acc.lerp_(update * update, 1 - rho)', 'numerics'),
    ),
)
