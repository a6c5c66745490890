"""Muon: what the harness, the bench and the mutants know about it."""
from torch import tensor as _t

from optparity.harness.algorithms._spec import Algorithm, Mutant

SPEC = Algorithm(
    name='Muon',
    torch_configs=(
        {},
        {'lr': 0.01},
        {'lr': _t(0.001)},
        {'weight_decay': 0.2},
        {'momentum': 0.8},
        {'ns_steps': 6},
        {'ns_coefficients': (3.4, -4.7, 2.0)},
    ),
    extra_configs=(
        {'nesterov': False, 'momentum': 0.5},
        {'adjust_lr_fn': 'match_rms_adamw', 'weight_decay': 0.0},
        {'adjust_lr_fn': 'original', 'lr': 0.02, 'momentum': 0.0},
        {'eps': 0.5, 'ns_steps': 1},  # eps above the norm: the clamp decides the scaling
        {'ns_steps': 0},
        {'ns_steps': 100},  # refused at the first step, with torch's message
        {'ns_coefficients': (3.0, -4.0)},  # refused at the first step
    ),
    second_group={'lr': 0.02, 'momentum': 0.9, 'nesterov': False, 'ns_steps': 3},
    traffic={'param': 'rw', 'grad': 'r', 'momentum_buffer': 'rw'},
    foreach=False,
    kind='matrix',
    complex=False,
    bench=False,  # the bench workloads hold 1-D tensors, which Muon refuses
    mutants=(
        Mutant('muon_ns_coefficients_swapped', 'Muon', 'functional.muon',
               'poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)',
               'poly = torch.addmm(gram, gram, gram, beta=c, alpha=b)', 'logic'),
        Mutant('muon_ns_addmm_as_mul_add', 'Muon', 'functional.muon',
               'x = torch.addmm(x, poly, x, beta=a)', 'x = a * x + poly @ x', 'numerics'),
        Mutant('muon_tall_not_transposed', 'Muon', 'functional.muon',
               'tall = grad.size(0) > grad.size(1)', 'tall = False', 'numerics'),
        Mutant('muon_nesterov_lerp_reversed', 'Muon', 'functional.muon',
               'update = grad.lerp(buf, momentum) if nesterov else buf',
               'update = buf.lerp(grad, 1 - momentum) if nesterov else buf', 'numerics'),
        Mutant('muon_match_rms_uses_min', 'Muon', 'functional.muon',
               'ratio = 0.2 * math.sqrt(max(rows, cols))', 'ratio = 0.2 * math.sqrt(min(rows, cols))',
               'option', 'adjust_lr_fn'),
    ),
)
