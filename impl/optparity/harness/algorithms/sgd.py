"""SGD: what the harness, the bench and the mutants know about it."""
from torch import tensor as _t

from optparity.harness.algorithms._spec import Algorithm, Mutant

SPEC = Algorithm(
    name='SGD',
    torch_configs=(
        {},
        {'lr': 0.01},
        {'lr': _t(0.001)},
        {'weight_decay': 0.5},
        {'momentum': 0.9},
        {'weight_decay': 0.1, 'maximize': True},
        {'momentum': 0.9, 'dampening': 0.5},
        {'momentum': 0.9, 'weight_decay': 0.1},
        {'momentum': 0.9, 'nesterov': True, 'weight_decay': 0.1},
    ),
    extra_configs=(
        {'momentum': 0.9, 'nesterov': True, 'maximize': True},
        {'momentum': 0.5, 'dampening': 0.3, 'weight_decay': 0.2},
        {'lr': _t(0.05), 'momentum': 0.9},
        {'differentiable': True, 'momentum': 0.9, 'weight_decay': 0.1},
    ),
    second_group={'lr': 0.02, 'weight_decay': 0.01},
    traffic={'param': 'rw', 'grad': 'r'},
    fused_on_cpu=True,
    fused_on_cuda=True,
    sparse_grads=True,
    functional_upstream=True,
    mutants=(
        Mutant('sgd_nesterov_swapped', 'SGD', 'functional.sgd', 'd_p = d_p.add(buf, alpha=momentum) if nesterov else buf', 'd_p = buf.add(d_p, alpha=momentum) if nesterov else buf', 'option', 'nesterov'),
        Mutant('sgd_dampening_sign', 'SGD', 'functional.sgd', 'buf.mul_(momentum).add_(d_p, alpha=1 - dampening)', 'buf.mul_(momentum).add_(d_p, alpha=1 + dampening)', 'option', 'dampening'),
        # only the sparse set reaches it: foreach's per-tensor update of a group holding a sparse grad
        Mutant('sgd_sparse_update_coalesced_first', 'SGD', 'functional.sgd', 'for p, d_p in zip(g_params, g_grads):\n                p.add_(d_p, alpha=-lr)', 'for p, d_p in zip(g_params, g_grads):\n                p.add_(d_p.coalesce() if d_p.is_sparse else d_p, alpha=-lr)', 'numerics'),
        Mutant('sgd_weight_decay_as_mul_add', 'SGD', 'functional.sgd', 'd_p = d_p.add(p, alpha=weight_decay)', 'd_p = d_p + p * weight_decay', 'option', 'weight_decay'),
    ),
)
