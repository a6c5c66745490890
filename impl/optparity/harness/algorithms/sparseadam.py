"""SparseAdam: what the harness, the bench and the mutants know about it."""
from torch import tensor as _t

from optparity.harness.algorithms._spec import Algorithm, Mutant

SPEC = Algorithm(
    name='SparseAdam',
    torch_configs=(
        {},
        {'lr': 0.01},
        {'lr': _t(0.001)},
        {'maximize': True},
    ),
    extra_configs=(
        {'betas': (0.5, 0.6), 'eps': 0.001},
        {'betas': (0.0, 0.9), 'lr': 0.05, 'maximize': True},
        {'lr': _t(0.02), 'maximize': True, 'eps': 1e-6},
    ),
    second_group={'lr': 0.003, 'eps': 1e-6},
    # per element the gradient holds (dense state, touched only there)
    traffic={'param': 'rw', 'grad': 'r', 'exp_avg': 'rw', 'exp_avg_sq': 'rw'},
    foreach=False,
    kind='sparse',
    complex=False,
    bench=False,  # the bench feeds dense gradients, which SparseAdam refuses
    mutants=(
        Mutant('sparseadam_step_size_reassociated', 'SparseAdam', 'functional.sparseadam',
               'step_size = lr * math.sqrt(bc2) / bc1', 'step_size = lr / bc1 * math.sqrt(bc2)', 'numerics'),
        Mutant('sparseadam_second_moment_uses_beta1', 'SparseAdam', 'functional.sparseadam',
               'delta_v = values.pow(2).sub_(old_v).mul_(1 - beta2)',
               'delta_v = values.pow(2).sub_(old_v).mul_(1 - beta1)', 'logic'),
        Mutant('sparseadam_empty_grad_not_counted', 'SparseAdam', 'optim.sparseadam',
               '            state["step"] += 1\n', '            state["step"] += int(p.grad._nnz() > 0)\n', 'logic'),
        Mutant('sparseadam_maximize_ignored', 'SparseAdam', 'functional.sparseadam',
               'grad = -grads[i] if maximize else grads[i]', 'grad = grads[i]', 'option', 'maximize'),
    ),
)
