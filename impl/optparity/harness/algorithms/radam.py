"""RAdam: what the harness, the bench and the mutants know about it."""
from torch import tensor as _t

from optparity.harness.algorithms._spec import Algorithm, Mutant

SPEC = Algorithm(
    name='RAdam',
    torch_configs=(
        {},
        {'lr': 0.002},
        {'eps': 1e-06},
        {'weight_decay': 0.1},
        {'weight_decay': 0.1, 'decoupled_weight_decay': True},
        {'weight_decay': 0.1, 'maximize': True},
    ),
    # betas (0.7, 0.8): rho_inf = 9, so the rectified branch starts at step 7 instead of 6;
    # betas (0.5, 0.6): rho_inf = 4, never rectified.
    extra_configs=(
        {'lr': _t(0.01)},
        {'lr': _t(0.01), 'weight_decay': 0.1, 'decoupled_weight_decay': True},
        {'betas': (0.7, 0.8), 'eps': 0.0001, 'weight_decay': 0.05, 'maximize': True},
        {'betas': (0.5, 0.6)},
        {'weight_decay': 0.1, 'decoupled_weight_decay': True, 'maximize': True},
        {'differentiable': True, 'weight_decay': 0.1},
        {'differentiable': True, 'betas': (0.7, 0.8), 'weight_decay': 0.1, 'decoupled_weight_decay': True, 'maximize': True},
        {'capturable': True},
    ),
    # torch's tests add these on CUDA only (capturable: state steps on the device, no host sync);
    # torch refuses capturable on the CPU, so they run only when both sides are on CUDA
    cuda_configs=({"capturable": True}, {"capturable": True, "weight_decay": 0.1},
        {"capturable": True, "weight_decay": 0.1, "decoupled_weight_decay": True},
        {"lr": _t(0.001), "capturable": True, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    second_group={'lr': 0.003, 'eps': 1e-06},
    traffic={'param': 'rw', 'grad': 'r', 'exp_avg': 'rw', 'exp_avg_sq': 'rw'},
    mutants=(
        Mutant('radam_rectified_product_regrouped', 'RAdam', 'functional.radam', 'corrected_m * lr * adaptive_lr() * rectification()', 'corrected_m * lr * (adaptive_lr() * rectification())', 'numerics'),
        Mutant('radam_rectifies_too_early', 'RAdam', 'functional.radam', 'elif rho_t > 5.0:', 'elif rho_t > 4.0:', 'logic'),
        Mutant('radam_foreach_decoupled_decay_without_lr', 'RAdam', 'functional.radam', 'torch._foreach_mul_(g_params, 1 - lr * weight_decay)', 'torch._foreach_mul_(g_params, 1 - weight_decay)', 'option', 'decoupled_weight_decay'),
    ),
)
