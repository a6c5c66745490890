"""RMSprop: what the harness, the bench and the mutants know about it."""
from torch import tensor as _t

from optparity.harness.algorithms._spec import Algorithm, Mutant

SPEC = Algorithm(
    name='RMSprop',
    torch_configs=(
        {},
        {'lr': 0.001},
        {'weight_decay': 0.1},
        {'maximize': True},
        {'weight_decay': 0.1, 'centered': True},
        {'maximize': True, 'weight_decay': 0.1},
        {'weight_decay': 0.1, 'centered': True, 'momentum': 0.1},
        {'weight_decay': 0.1, 'centered': True, 'momentum': 0.1, 'maximize': True},
    ),
    extra_configs=(
        {'momentum': 0.5, 'alpha': 0.9},
        {'centered': True, 'maximize': True, 'lr': _t(0.01)},
        {'differentiable': True, 'centered': True, 'momentum': 0.2, 'weight_decay': 0.1},
    ),
    # torch's tests add these on CUDA only (capturable: state steps on the device, no host sync);
    # torch refuses capturable on the CPU, so they run only when both sides are on CUDA
    cuda_configs=({"capturable": True}, {"weight_decay": 0.1, "maximize": True, "capturable": True},
        {"lr": _t(0.001), "capturable": True}),
    second_group={'lr': 0.003, 'alpha': 0.9},
    traffic={'param': 'rw', 'grad': 'r', 'square_avg': 'rw'},
    functional_upstream=True,
    mutants=(
        Mutant('rmsprop_centered_variance_sign', 'RMSprop', 'functional.rmsprop', 'denom = sq.addcmul(mean_g, mean_g, value=-1).sqrt_()', 'denom = sq.addcmul(mean_g, mean_g, value=1).sqrt_()', 'option', 'centered'),
        Mutant('rmsprop_momentum_buffer_dampened', 'RMSprop', 'functional.rmsprop', 'buf.mul_(momentum).addcdiv_(g, denom)', 'buf.mul_(momentum).addcdiv_(g, denom, value=1 - momentum)', 'option', 'momentum'),
        Mutant('rmsprop_foreach_addcdiv_as_div_add', 'RMSprop', 'functional.rmsprop', 'torch._foreach_addcdiv_(g_params, g_grads, denoms, value=-lr)', 'torch._foreach_add_(g_params, torch._foreach_div(g_grads, denoms), alpha=-lr)', 'numerics'),
    ),
)
