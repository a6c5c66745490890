"""Adafactor: what the harness, the bench and the mutants know about it."""
from torch import tensor as _t

from optparity.harness.algorithms._spec import Algorithm, Mutant

SPEC = Algorithm(
    name='Adafactor',
    torch_configs=(
        {},
        {'weight_decay': 0.1, 'lr': 0.01},
        {'weight_decay': 0.1, 'maximize': True},
        {'beta2_decay': -1.0},
        {'d': 1.5},
    ),
    extra_configs=(
        # lr above 1/sqrt(t): the relative step size rho_t takes its other branch
        {'lr': 0.5, 'maximize': True, 'beta2_decay': -0.5},
        # eps2 above the params' RMS: the step size is eps2 * rho_t
        {'eps': (None, 2.0), 'weight_decay': 0.05},
        # an explicit eps1, large enough that both clamps bite
        {'eps': (0.05, 1e-3), 'd': 1.2},
        {'eps': (1e-30, 0.0), 'd': 1.01, 'weight_decay': 0.2},
        {'lr': _t(0.02), 'weight_decay': 0.1},
    ),
    # an explicit eps1 in the second group while the first resolves None per dtype
    second_group={'lr': 0.003, 'eps': (1e-4, 1e-3), 'd': 1.3},
    # factored params keep only a row and a column (per element: ~0); vectors a full variance
    traffic={'param': 'rw', 'grad': 'r', 'variance': 'rw'},
    complex=False,
    mutants=(
        Mutant('adafactor_row_mean_as_mean_of_squares', 'Adafactor', 'functional.adafactor',
               'row_mean = torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1))',
               'row_mean = (grad * grad).mean(dim=-1, keepdim=True)', 'numerics'),
        Mutant('adafactor_foreach_div_as_mul', 'Adafactor', 'functional.adafactor',
               'torch._foreach_div_(col_means, [g.size(-2) for g in g_grads])',
               'torch._foreach_mul_(col_means, [1 / g.size(-2) for g in g_grads])', 'numerics'),
        Mutant('adafactor_rho_without_sqrt', 'Adafactor', 'functional.adafactor',
               'rho = min(lr, 1 / (t**0.5))', 'rho = min(lr, 1 / t)', 'logic'),
        Mutant('adafactor_maximize_ignored', 'Adafactor', 'functional.adafactor',
               'grad = -grads[i] if maximize else grads[i]', 'grad = grads[i]', 'option', 'maximize'),
        Mutant('adafactor_weight_decay_without_lr', 'Adafactor', 'functional.adafactor',
               'param.mul_(1 - lr * weight_decay)', 'param.mul_(1 - weight_decay)', 'option', 'weight_decay'),
        Mutant('adafactor_clipping_ignores_d', 'Adafactor', 'functional.adafactor',
               'return max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * d))',
               'return max(1.0, update.norm(2).item() / (update.numel() ** 0.5))', 'option', 'd'),
    ),
)
