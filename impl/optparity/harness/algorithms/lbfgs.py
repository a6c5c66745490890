"""LBFGS: what the harness, the bench and the mutants know about it.

Closure-only (kind "closure"): every step is step(closure) on the objective of
harness/objectives.py, and the closure calls per step are compared too. One parameter group
only: the "groups" sets check that both refuse the second group the same way (at construction,
or at the first step when it came through add_param_group). No foreach/fused argument.
"""
from torch import tensor as _t

from optparity.harness.algorithms._spec import Algorithm, Mutant

_F = 'functional.lbfgs'

SPEC = Algorithm(
    name='LBFGS',
    torch_configs=(
        {},
        {'lr': 0.01},
        {'lr': _t(0.001)},
        {'tolerance_grad': 1e-06},
        {'line_search_fn': 'strong_wolfe'},
    ),
    extra_configs=(
        # (ordered so the cheap stop configurations come first: mutants are caught sooner)
        # a gradient tolerance met mid-step and at the start of later steps (no iteration
        # then), with a history that wraps
        {'tolerance_grad': 0.5, 'history_size': 3},
        # the tolerance stops on loss and on step change end iterations early
        {'tolerance_change': 1e-4},
        {'tolerance_change': 1e-5, 'line_search_fn': 'strong_wolfe'},
        # max_eval stops the iterations, and bounds the line search (max_eval - evals so far)
        {'max_iter': 6, 'max_eval': 4},
        {'max_iter': 8, 'max_eval': 9, 'line_search_fn': 'strong_wolfe'},
        {'history_size': 3, 'line_search_fn': 'strong_wolfe'},
        # a budget of one call: the line search falls back to [0, t] without bracketing
        {'max_eval': 1, 'line_search_fn': 'strong_wolfe'},
        {'tolerance_grad': 0.05, 'line_search_fn': 'strong_wolfe', 'history_size': 4},
        # tensor lr with the line search; a single iteration (no re-evaluation at the end)
        {'lr': _t(0.5), 'line_search_fn': 'strong_wolfe', 'history_size': 5},
        {'lr': 0.3, 'max_iter': 1},
        # an unknown line search is refused at the first step, after the first closure call
        {'line_search_fn': 'backtracking'},
        # history of two (the scheduler cases run this one)
        {'history_size': 2},
        # steps smaller than the tolerance while the loss still moves by more: only the step-change
        # stop (tested before the loss-change one) ends these iterations (last: the indices above,
        # and so their seeds, stay as they were)
        {'lr': 0.05, 'tolerance_change': 0.01},
    ),
    second_group={'lr': 0.5},
    traffic={'param': 'rw', 'grad': 'r'},
    foreach=False,
    kind='closure',
    bench=False,  # a step is a whole inner optimisation: not comparable with the others
    # a step is up to max_iter (20) iterations with a history of up to 100 pairs: 9 steps are
    # 180 iterations, past the history's wrap, and every reload and the lr change still happen
    steps=9,
    mutants=(
        Mutant('lbfgs_cubic_interpolation_sign', 'LBFGS', _F,
               'min_pos = far - (far - near) *', 'min_pos = far + (far - near) *', 'logic'),
        Mutant('lbfgs_wolfe_curvature_without_abs', 'LBFGS', _F,
               'return abs(gtd_new) <= -c2 * gtd', 'return gtd_new <= -c2 * gtd', 'logic'),
        Mutant('lbfgs_zoom_keeps_low_end_on_wrong_slope', 'LBFGS', _F,
               'elif gtd_new * (ts[high] - ts[low]) >= 0:', 'elif gtd_new * (ts[high] - ts[low]) <= 0:', 'logic'),
        Mutant('lbfgs_history_drops_newest', 'LBFGS', _F,
               'memory.pop(0)', 'memory.pop()', 'logic'),
        Mutant('lbfgs_two_loop_wrong_order', 'LBFGS', _F,
               'for i in reversed(range(count)):', 'for i in range(count):', 'logic'),
        Mutant('lbfgs_hdiag_as_reciprocal_mul', 'LBFGS', _F,
               'H_diag = ys / y.dot(y)', 'H_diag = ys * y.dot(y).reciprocal()', 'numerics'),
        Mutant('lbfgs_first_step_unscaled', 'LBFGS', _F,
               't = min(1.0, 1.0 / flat_grad.abs().sum()) * lr if first_ever else lr', 't = lr', 'logic'),
        Mutant('lbfgs_max_eval_ignored', 'LBFGS', _F,
               'if n_iter == max_iter or current_evals >= max_eval or opt_cond:',
               'if n_iter == max_iter or opt_cond:', 'logic'),
        Mutant('lbfgs_optimal_start_not_returned', 'LBFGS', _F,
               'if opt_cond:  # already optimal', 'if False:  # already optimal', 'logic'),
        Mutant('lbfgs_gradient_stop_ignored', 'LBFGS', _F,
               'current_evals >= max_eval or opt_cond:', 'current_evals >= max_eval:', 'logic'),
        Mutant('lbfgs_step_change_stop_ignored', 'LBFGS', _F,
               'if d.mul(t).abs().max() <= tolerance_change:', 'if False:', 'logic'),
        Mutant('lbfgs_loss_change_stop_ignored', 'LBFGS', _F,
               'if abs(loss - prev_loss) < tolerance_change:', 'if False:', 'logic'),
        Mutant('lbfgs_line_search_gets_group_tolerance_change', 'LBFGS', _F,
               'x_init, t, d, loss, flat_grad, gtd,\n',
               'x_init, t, d, loss, flat_grad, gtd, tolerance_change=tolerance_change,\n', 'logic'),
        # numbers unchanged, one closure call too many: only the call count shows it
        Mutant('lbfgs_extra_closure_call', 'LBFGS', _F,
               'loss = float(closure())\n    flat_grad = flat.gather_grad()\n    flat.restore(x)',
               'closure()\n    loss = float(closure())\n    flat_grad = flat.gather_grad()\n    flat.restore(x)',
               'logic'),
        Mutant('lbfgs_reevaluates_after_last_iteration', 'LBFGS', _F,
               'if n_iter != max_iter:', 'if True:', 'logic'),
        Mutant('lbfgs_state_on_last_param', 'LBFGS', 'optim.lbfgs',
               'self.state[self._params[0]]', 'self.state[self._params[-1]]', 'logic'),
        Mutant('lbfgs_complex_grad_imaginary_dropped', 'LBFGS', 'optim.lbfgs',
               'pieces.append(torch.view_as_real(flat).view(-1) if torch.is_complex(flat) else flat)',
               'pieces.append(torch.view_as_real(flat).view(-1) if torch.is_complex(flat) else flat)\n'
               '            if torch.is_complex(flat):\n'
               '                pieces[-1] = torch.stack([flat.real, torch.zeros_like(flat.real)], -1).view(-1)',
               'logic'),
    ),
)
