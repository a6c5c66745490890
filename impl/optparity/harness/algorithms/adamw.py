"""AdamW: what the harness, the bench and the mutants know about it."""
from torch import tensor as _t

from optparity.harness.algorithms._spec import Algorithm, Mutant

SPEC = Algorithm(
    name='AdamW',
    torch_configs=(
        {},
        {'lr': 0.01},
        {'weight_decay': 0.1},
        {'weight_decay': 0.1, 'maximize': True},
        {'weight_decay': 0.1, 'amsgrad': True},
    ),
    extra_configs=(
        {'amsgrad': True, 'maximize': True},
        {'lr': _t(0.01), 'weight_decay': 0.2},
        {'betas': (0.5, 0.6), 'eps': 0.001, 'weight_decay': 0.0},
        {'differentiable': True, 'amsgrad': True},
    ),
    # torch's tests add these on CUDA only (capturable: state steps on the device, no host sync);
    # torch refuses capturable on the CPU, so they run only when both sides are on CUDA
    cuda_configs=({"capturable": True}, {"weight_decay": 0.1, "amsgrad": True, "capturable": True},
        {"lr": _t(0.001), "amsgrad": True, "capturable": True},
        {"lr": _t(0.001), "betas": (_t([[[0.9]]]), _t([[0.99]])), "amsgrad": True, "capturable": True},
        {"lr": _t(0.001), "betas": (_t(0.9), _t(0.99)), "amsgrad": False, "capturable": True}),
    second_group={'lr': 0.003, 'weight_decay': 0.05},
    traffic={'param': 'rw', 'grad': 'r', 'exp_avg': 'rw', 'exp_avg_sq': 'rw'},
    fused_on_cpu=True,
    fused_on_cuda=True,
    functional_upstream=True,
    mutants=(
        Mutant('adamw_decay_as_add', 'AdamW', 'functional.adam', 'param.mul_(1 - lr * weight_decay)', 'param.add_(param, alpha=-lr * weight_decay)', 'numerics', kernel='adam', kernel_kwargs=(('decoupled_weight_decay', True),)),
    ),
)
