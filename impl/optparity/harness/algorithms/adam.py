"""Adam: what the harness, the bench and the mutants know about it."""
from torch import tensor as _t

from optparity.harness.algorithms._spec import Algorithm, Mutant

SPEC = Algorithm(
    name='Adam',
    torch_configs=(
        {},
        {'lr': 0.01},
        {'weight_decay': 0.1},
        {'weight_decay': 0.1, 'maximize': True},
        {'weight_decay': 0.1, 'amsgrad': True},
    ),
    extra_configs=(
        {'amsgrad': True, 'maximize': True, 'weight_decay': 0.05},
        {'lr': _t(0.01)},
        {'betas': (_t(0.8), _t(0.95)), 'lr': _t(0.02)},
        {'betas': (0.5, 0.6), 'eps': 0.001},
        {'weight_decay': 0.1, 'decoupled_weight_decay': True, 'amsgrad': True},
        {'differentiable': True, 'weight_decay': 0.1, 'amsgrad': True},
        {'capturable': True},
    ),
    # torch's tests add these on CUDA only (capturable: state steps on the device, no host sync);
    # torch refuses capturable on the CPU, so they run only when both sides are on CUDA
    cuda_configs=({"capturable": True}, {"weight_decay": 0.1, "amsgrad": True, "capturable": True},
        {"lr": _t(0.001), "amsgrad": True, "capturable": True},
        {"lr": _t(0.001), "betas": (_t([[[0.9]]]), _t([[0.99]])), "amsgrad": True, "capturable": True},
        {"lr": _t(0.001), "betas": (_t(0.9), _t(0.99)), "amsgrad": False, "capturable": True}),
    second_group={'lr': 0.003, 'eps': 1e-06},
    traffic={'param': 'rw', 'grad': 'r', 'exp_avg': 'rw', 'exp_avg_sq': 'rw'},
    fused_on_cpu=True,
    fused_on_cuda=True,
    functional_upstream=True,
    mutants=(
        Mutant('adam_lerp_as_mul_add', 'Adam', 'functional.adam', 'm.lerp_(grad, 1 - b1)', 'm.mul_(b1).add_(grad, alpha=1 - b1)', 'numerics'),
        Mutant('adam_foreach_div_as_mul', 'Adam', 'functional.adam', 'torch._foreach_div_(denom, bc2_sqrt_list)', 'torch._foreach_mul_(denom, [1 / b for b in bc2_sqrt_list])', 'numerics'),
        Mutant('adam_eps_inside_sqrt', 'Adam', 'functional.adam', 'denom = (v.sqrt() / bc2_sqrt).add_(eps)', 'denom = (v.add(eps).sqrt() / bc2_sqrt)', 'logic'),
        Mutant('adam_amsgrad_max_of_wrong_tensor', 'Adam', 'functional.adam', 'torch.maximum(max_exp_avg_sqs[i], v, out=max_exp_avg_sqs[i])', 'torch.maximum(v, v, out=max_exp_avg_sqs[i])', 'option', 'amsgrad'),
        Mutant('adam_maximize_ignored', 'Adam', 'functional.adam', 'grad = -grads[i] if maximize else grads[i]', 'grad = grads[i]', 'option', 'maximize'),
    ),
)
