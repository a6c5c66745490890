"""ASGD: what the harness, the bench and the mutants know about it."""
from torch import tensor as _t

from optparity.harness.algorithms._spec import Algorithm, Mutant

SPEC = Algorithm(
    name='ASGD',
    torch_configs=(
        {},
        {'lambd': 0.1},
        {'lr': 0.02},
        {'t0': 100},
        {'maximize': True},
        {'weight_decay': 0.1},
        {'weight_decay': 0.1, 'maximize': True},
    ),
    # torch's t0 values (1e6, 100) never start the averaging within a run: small t0 does.
    extra_configs=(
        {'t0': 3, 'lambd': 0.01},
        {'t0': 0.5, 'alpha': 0.5, 'weight_decay': 0.05, 'maximize': True},
        {'lr': _t(0.02), 't0': 4},
        {'lr': _t(0.02), 'lambd': 0.1, 'weight_decay': 0.1, 'maximize': True},
        {'differentiable': True, 't0': 2, 'weight_decay': 0.1},
        {'differentiable': True, 'maximize': True, 'lambd': 0.01},
        {'capturable': True},
    ),
    # torch's tests add these on CUDA only (capturable: state steps on the device, no host sync);
    # torch refuses capturable on the CPU, so they run only when both sides are on CUDA
    cuda_configs=({"capturable": True}, {"maximize": True, "capturable": True}, {"weight_decay": 0.1, "capturable": True},
        {"weight_decay": 0.1, "maximize": True, "capturable": True},
        {"lr": _t(0.001), "weight_decay": 0.1, "maximize": True, "capturable": True}),
    second_group={'lr': 0.02, 'lambd': 0.001},
    traffic={'param': 'rw', 'grad': 'r', 'ax': 'rw'},
    mutants=(
        Mutant('asgd_decay_folded_into_grad', 'ASGD', 'functional.asgd', 'param.mul_(1 - lambd * eta_value)\n            param.add_(grad, alpha=-eta_value)', 'param.add_(grad.add(param, alpha=lambd), alpha=-eta_value)', 'numerics'),
        Mutant('asgd_foreach_decay_lost_with_weight_decay', 'ASGD', 'functional.asgd', 'torch._foreach_add_(update, g_params, alpha=lambd)', 'pass', 'option', 'weight_decay'),
        Mutant('asgd_averaging_starts_late', 'ASGD', 'functional.asgd', 'mu.copy_(torch.as_tensor(1 / max(1, step - t0)))', 'mu.copy_(torch.as_tensor(1 / max(1, step - t0 + 1)))', 'option', 't0'),
    ),
)
