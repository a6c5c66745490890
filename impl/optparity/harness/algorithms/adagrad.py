"""Adagrad: what the harness, the bench and the mutants know about it."""
from torch import tensor as _t

from optparity.harness.algorithms._spec import Algorithm, Mutant

SPEC = Algorithm(
    name='Adagrad',
    torch_configs=(
        {},
        {'weight_decay': 0.1},
        {'weight_decay': 0.1, 'maximize': True},
        {'lr': 0.1},
        {'initial_accumulator_value': 0.1, 'weight_decay': 0.1},
        {'lr': 0.1, 'lr_decay': 0.5, 'weight_decay': 0.1},
        {'lr': _t(0.001)},
    ),
    extra_configs=(
        {'lr_decay': 0.1, 'maximize': True, 'eps': 1e-06},
        {'initial_accumulator_value': 0.5},
        {'differentiable': True, 'weight_decay': 0.1, 'lr_decay': 0.05},
    ),
    second_group={'lr': 0.05, 'eps': 1e-06},
    traffic={'param': 'rw', 'grad': 'r', 'sum': 'rw'},
    fused_on_cpu=True,
    fused_on_cuda=True,
    sparse_grads=True,
    functional_upstream=True,
    mutants=(
        Mutant('adagrad_lr_decay_off_by_one', 'Adagrad', 'functional.adagrad', 'clr = lr / (1 + (t - 1) * lr_decay)', 'clr = lr / (1 + t * lr_decay)', 'option', 'lr_decay'),
        Mutant('adagrad_eps_inside_sqrt', 'Adagrad', 'functional.adagrad', 'else acc.sqrt().add_(eps)', 'else acc.add(eps).sqrt()', 'logic'),
        # only the sparse set reaches it
        Mutant('adagrad_sparse_div_as_mul', 'Adagrad', 'functional.adagrad', 'vals / denom_vals', 'vals * denom_vals.reciprocal()', 'numerics'),
        Mutant('adagrad_initial_accumulator_ignored', 'Adagrad', 'optim.adagrad', '"sum": torch.full_like(p, fill, memory_format=torch.preserve_format)', '"sum": torch.zeros_like(p, memory_format=torch.preserve_format)', 'option', 'initial_accumulator_value'),
    ),
)
