"""Adamax: what the harness, the bench and the mutants know about it."""
from torch import tensor as _t

from optparity.harness.algorithms._spec import Algorithm, Mutant

SPEC = Algorithm(
    name='Adamax',
    torch_configs=(
        {},
        {'lr': 0.1},
        {'weight_decay': 0.1},
        {'maximize': True},
        {'weight_decay': 0.1, 'maximize': True},
    ),
    extra_configs=(
        {'lr': _t(0.05), 'betas': (0.5, 0.7), 'eps': 0.0001},
        {'differentiable': True, 'weight_decay': 0.1},
    ),
    # torch's tests add these on CUDA only (capturable: state steps on the device, no host sync);
    # torch refuses capturable on the CPU, so they run only when both sides are on CUDA
    cuda_configs=({"capturable": True}, {"weight_decay": 0.9, "maximize": True, "capturable": True},
        {"weight_decay": 0, "maximize": True, "capturable": True},
        {"weight_decay": 0.9, "maximize": False, "capturable": True},
        {"lr": _t(0.001), "weight_decay": 0.9, "maximize": False, "capturable": True}),
    second_group={'lr': 0.01, 'eps': 1e-06},
    traffic={'param': 'rw', 'grad': 'r', 'exp_avg': 'rw', 'exp_inf': 'rw'},
    functional_upstream=True,
    mutants=(
        Mutant('adamax_eps_dropped', 'Adamax', 'functional.adamax', 'torch.maximum(u.mul_(beta2), g.abs().add_(eps), out=u)', 'torch.maximum(u.mul_(beta2), g.abs(), out=u)', 'logic'),
        Mutant('adamax_weight_decay_sign', 'Adamax', 'functional.adamax', 'g = g.add(param, alpha=weight_decay)', 'g = g.add(param, alpha=-weight_decay)', 'option', 'weight_decay'),
    ),
)
