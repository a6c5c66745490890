"""Planted bugs: single edits to correct optimizers that the harness must catch.

Each mutant rewrites one snippet of an optparity module's source (the snippet must occur
exactly once), executes the result as a fresh module, and checks the mutated optimizer
against torch.optim. A harness that lets one through has lost its teeth. Kinds:
  numerics — mathematically equal to the original, bitwise different
  option   — only shows when one option is on (named in `shows_under`)
  logic    — a plain bug
"""
from __future__ import annotations

import functools
import importlib
import inspect
import types
from dataclasses import dataclass

from optparity.harness.candidates import class_for_kernel


@dataclass(frozen=True)
class Mutant:
    name: str
    algorithm: str  # the torch.optim class it is checked against
    module: str  # "functional.<algo>" or "optim.<algo>" under optparity
    old: str
    new: str
    kind: str  # "numerics", "option" or "logic"
    shows_under: str = ""  # for kind "option": the option that exposes it

    def source(self) -> str:
        original = inspect.getsource(importlib.import_module(f"optparity.{self.module}"))
        count = original.count(self.old)
        if count != 1:
            raise ValueError(f"mutant {self.name}: snippet occurs {count} times in optparity.{self.module}, "
                             f"expected exactly once: {self.old!r}")
        return original.replace(self.old, self.new)

    def build(self):
        """The mutated candidate: an optimizer class (optim mutants) or a kernel (functional ones)."""
        module = types.ModuleType(f"optparity_mutant_{self.name}")
        module.__dict__["__name__"] = module.__name__
        exec(compile(self.source(), f"<mutant {self.name}>", "exec"), module.__dict__)  # noqa: S102
        if self.module.startswith("optim."):
            return getattr(module, self.algorithm)
        if self.algorithm == "AdamW":  # AdamW's math lives in adam(); adamw() only fixes this flag
            return class_for_kernel(functools.partial(module.adam, decoupled_weight_decay=True), "AdamW")
        return class_for_kernel(getattr(module, self.algorithm.lower()), self.algorithm)


MUTANTS: tuple[Mutant, ...] = (
    # --- Adam / AdamW
    Mutant("adam_lerp_as_mul_add", "Adam", "functional.adam",
           "m.lerp_(grad, 1 - b1)", "m.mul_(b1).add_(grad, alpha=1 - b1)", "numerics"),
    Mutant("adam_foreach_div_as_mul", "Adam", "functional.adam",
           "torch._foreach_div_(denom, bc2_sqrt_list)",
           "torch._foreach_mul_(denom, [1 / b for b in bc2_sqrt_list])", "numerics"),
    Mutant("adam_eps_inside_sqrt", "Adam", "functional.adam",
           "denom = (v.sqrt() / bc2_sqrt).add_(eps)", "denom = (v.add(eps).sqrt() / bc2_sqrt)", "logic"),
    Mutant("adam_amsgrad_max_of_wrong_tensor", "Adam", "functional.adam",
           "torch.maximum(max_exp_avg_sqs[i], v, out=max_exp_avg_sqs[i])",
           "torch.maximum(v, v, out=max_exp_avg_sqs[i])", "option", "amsgrad"),
    Mutant("adam_maximize_ignored", "Adam", "functional.adam",
           "grad = -grads[i] if maximize else grads[i]", "grad = grads[i]", "option", "maximize"),
    Mutant("adamw_decay_as_add", "AdamW", "functional.adam",
           "param.mul_(1 - lr * weight_decay)", "param.add_(param, alpha=-lr * weight_decay)",
           "numerics"),
    # --- SGD
    Mutant("sgd_nesterov_swapped", "SGD", "functional.sgd",
           "d_p = d_p.add(buf, alpha=momentum) if nesterov else buf",
           "d_p = buf.add(d_p, alpha=momentum) if nesterov else buf", "option", "nesterov"),
    Mutant("sgd_dampening_sign", "SGD", "functional.sgd",
           "buf.mul_(momentum).add_(d_p, alpha=1 - dampening)",
           "buf.mul_(momentum).add_(d_p, alpha=1 + dampening)", "option", "dampening"),
    Mutant("sgd_weight_decay_as_mul_add", "SGD", "functional.sgd",
           "d_p = d_p.add(p, alpha=weight_decay)", "d_p = d_p + p * weight_decay", "option",
           "weight_decay"),
    # --- Adagrad
    Mutant("adagrad_lr_decay_off_by_one", "Adagrad", "functional.adagrad",
           "clr = lr / (1 + (t - 1) * lr_decay)", "clr = lr / (1 + t * lr_decay)", "option", "lr_decay"),
    Mutant("adagrad_eps_inside_sqrt", "Adagrad", "functional.adagrad",
           "else acc.sqrt().add_(eps)", "else acc.add(eps).sqrt()", "logic"),
    Mutant("adagrad_initial_accumulator_ignored", "Adagrad", "optim.adagrad",
           '"sum": torch.full_like(p, fill, memory_format=torch.preserve_format)',
           '"sum": torch.zeros_like(p, memory_format=torch.preserve_format)', "option",
           "initial_accumulator_value"),
    # --- Adadelta
    Mutant("adadelta_eps_outside_sqrt", "Adadelta", "functional.adadelta",
           "denom = sq.add(eps).sqrt_()", "denom = sq.sqrt().add_(eps)", "logic"),
    Mutant("adadelta_acc_as_lerp", "Adadelta", "functional.adadelta",
           "acc.mul_(rho).addcmul_(update, update, value=1 - rho)",
           "acc.lerp_(update * update, 1 - rho)", "numerics"),
    # --- RMSprop
    Mutant("rmsprop_centered_variance_sign", "RMSprop", "functional.rmsprop",
           "denom = sq.addcmul(mean_g, mean_g, value=-1).sqrt_()",
           "denom = sq.addcmul(mean_g, mean_g, value=1).sqrt_()", "option", "centered"),
    Mutant("rmsprop_momentum_buffer_dampened", "RMSprop", "functional.rmsprop",
           "buf.mul_(momentum).addcdiv_(g, denom)",
           "buf.mul_(momentum).addcdiv_(g, denom, value=1 - momentum)", "option", "momentum"),
    Mutant("rmsprop_foreach_addcdiv_as_div_add", "RMSprop", "functional.rmsprop",
           "torch._foreach_addcdiv_(g_params, g_grads, denoms, value=-lr)",
           "torch._foreach_add_(g_params, torch._foreach_div(g_grads, denoms), alpha=-lr)", "numerics"),
    # --- Adamax
    Mutant("adamax_eps_dropped", "Adamax", "functional.adamax",
           "torch.maximum(u.mul_(beta2), g.abs().add_(eps), out=u)",
           "torch.maximum(u.mul_(beta2), g.abs(), out=u)", "logic"),
    Mutant("adamax_weight_decay_sign", "Adamax", "functional.adamax",
           "g = g.add(param, alpha=weight_decay)", "g = g.add(param, alpha=-weight_decay)", "option",
           "weight_decay"),
    # --- Rprop
    Mutant("rprop_zero_counts_as_positive", "Rprop", "functional.rprop",
           "sign[sign.gt(0)] = etaplus", "sign[sign.ge(0)] = etaplus", "logic"),
    Mutant("rprop_maximize_foreach_ignored", "Rprop", "functional.rprop",
           "        if maximize:\n            torch._foreach_neg_(factors)\n", "", "option", "maximize"),
    Mutant("rprop_step_size_max_ignored", "Rprop", "functional.rprop",
           "delta.mul_(factor).clamp_(step_size_min, step_size_max)",
           "delta.mul_(factor).clamp_(min=step_size_min)", "option", "step_sizes"),
)


def by_name(name: str) -> Mutant:
    for m in MUTANTS:
        if m.name == name:
            return m
    raise KeyError(f"no mutant named {name!r}; known: {', '.join(m.name for m in MUTANTS)}")
