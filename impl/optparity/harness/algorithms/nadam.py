"""NAdam: what the harness, the bench and the mutants know about it."""
from torch import tensor as _t

from optparity.harness.algorithms._spec import Algorithm, Mutant

SPEC = Algorithm(
    name='NAdam',
    torch_configs=(
        {},
        {'lr': 0.001},
        {'momentum_decay': 0.006},
        {'weight_decay': 0.1},
        {'weight_decay': 0.1, 'momentum_decay': 0.006},
        {'weight_decay': 0.1, 'momentum_decay': 0.006, 'decoupled_weight_decay': True},
        {'weight_decay': 0.1, 'maximize': True},
    ),
    extra_configs=(
        {'lr': _t(0.01)},
        {'lr': _t(0.005), 'weight_decay': 0.1, 'decoupled_weight_decay': True},
        {'weight_decay': 0.05, 'decoupled_weight_decay': True, 'maximize': True, 'momentum_decay': 0.01},
        {'betas': (0.5, 0.6), 'eps': 0.001, 'maximize': True},
        {'differentiable': True, 'weight_decay': 0.1},
        {'differentiable': True, 'weight_decay': 0.1, 'decoupled_weight_decay': True, 'maximize': True},
        {'capturable': True},
    ),
    # torch's tests add these on CUDA only (capturable: state steps on the device, no host sync);
    # torch refuses capturable on the CPU, so they run only when both sides are on CUDA
    cuda_configs=({"capturable": True}, {"weight_decay": 0.9, "momentum_decay": 0.006, "capturable": True},
        {"weight_decay": 0.9, "momentum_decay": 0.006, "decoupled_weight_decay": True, "capturable": True},
        {"lr": _t(0.001), "weight_decay": 0.9, "momentum_decay": 0.006, "decoupled_weight_decay": True,
    "capturable": True}),
    second_group={'lr': 0.003, 'eps': 1e-06},
    traffic={'param': 'rw', 'grad': 'r', 'exp_avg': 'rw', 'exp_avg_sq': 'rw'},
    mutants=(
        Mutant('nadam_bias_correction_after_sqrt', 'NAdam', 'functional.nadam', 'denom = v.div(bias_correction2).sqrt()', 'denom = v.sqrt().div(bias_correction2**0.5)', 'numerics'),
        Mutant('nadam_mu_next_is_mu', 'NAdam', 'functional.nadam', '(0.96 ** ((as_python_number(s) + 1) * momentum_decay))', '(0.96 ** (as_python_number(s) * momentum_decay))', 'logic'),
        Mutant('nadam_decoupled_decay_without_lr', 'NAdam', 'functional.nadam', 'param.mul_(1 - lr * weight_decay)', 'param.mul_(1 - weight_decay)', 'option', 'decoupled_weight_decay'),
        Mutant('nadam_maximize_foreach_ignored', 'NAdam', 'functional.nadam', '        if maximize:\n            g_grads = torch._foreach_neg(g_grads)\n', '', 'option', 'maximize'),
    ),
)
