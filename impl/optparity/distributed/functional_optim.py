"""torch.distributed.optim's functional optimizers, in plain Python over optparity's kernels.

A functional optimizer owns a single parameter list and a state dict keyed by parameter
tensor, but never reads ``param.grad``: gradients are handed to ``step(gradients)`` (one
entry per parameter, ``None`` to skip one) or, for Adam, AdamW and SGD, to
``step_param(param, grad)``. This lets a multithreaded trainer apply updates without
going through accumulated ``.grad`` fields.

Every class mirrors the matching ``torch.distributed.optim.functional_<algo>._Functional<X>``
exactly: constructor signature, defaults, validation, state layout (``step`` as a 0-dim
``torch.tensor(0.0)``), and the arguments handed to the kernel, so that results are bit
for bit the same. Upstream's quirks are kept on purpose and flagged where they occur.
Unlike upstream, nothing here is TorchScript-compiled, so no TorchScript deprecation
warning is emitted.
"""
from __future__ import annotations

import importlib

import torch
from torch import Tensor, optim

from optparity.functional.adadelta import adadelta
from optparity.functional.adagrad import adagrad
from optparity.functional.adam import adam
from optparity.functional.adamax import adamax
from optparity.functional.adamw import adamw
from optparity.functional.rmsprop import rmsprop
from optparity.functional.rprop import rprop
from optparity.functional.sgd import sgd

__all__ = [
    "FunctionalAdadelta",
    "FunctionalAdagrad",
    "FunctionalAdam",
    "FunctionalAdamW",
    "FunctionalAdamax",
    "FunctionalRMSprop",
    "FunctionalRprop",
    "FunctionalSGD",
    "functional_optim_map",
    "register_functional_optim",
    "as_functional_optim",
]


# ---------------------------------------------------------------------------
# helpers shared by the classes
# ---------------------------------------------------------------------------

def _refuse_empty(params: list[Tensor], allow_empty: bool) -> None:
    # as_functional_optim builds optimizers with no params, hence the escape hatch
    if len(params) == 0 and not allow_empty:
        raise ValueError("optimizer got an empty parameter list")


def _check_one_grad_per_param(params: list[Tensor], gradients) -> None:
    # Must run before any state is created or any tensor touched. The wording
    # (including the missing space after "!") is upstream's.
    n_params, n_grads = len(params), len(gradients)
    if n_params != n_grads:
        raise ValueError(
            "the gradients passed in does not equal to the size of the parameters!"
            f"Params length: {n_params}. Gradients length: {n_grads}"
        )


def _check_adam_family(lr, eps, betas, weight_decay) -> None:
    # same checks, same order, same messages as upstream Adam/AdamW/Adamax
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _zeros_like(t: Tensor) -> Tensor:
    return torch.zeros_like(t, memory_format=torch.preserve_format)


def _fresh_step() -> Tensor:
    # upstream uses torch.tensor(0.0): CPU, default dtype, whatever the param is
    return torch.tensor(0.0)


# ---------------------------------------------------------------------------
# Adam / AdamW (they differ only in kernel and weight_decay default)
# ---------------------------------------------------------------------------

class _AdamLike:
    kernel = None  # set by subclasses; swappable for testing

    def _build(self, params, lr, betas, eps, weight_decay, amsgrad, maximize, foreach,
               fused, allow_empty):
        _check_adam_family(lr, eps, betas, weight_decay)
        self.defaults = {
            "lr": lr,
            "eps": eps,
            "beta1": betas[0],
            "beta2": betas[1],
            "weight_decay": weight_decay,
        }
        self.amsgrad = amsgrad
        self.maximize = maximize
        self.foreach = foreach
        self.fused = fused
        self.state: dict[Tensor, dict[str, Tensor]] = {}
        _refuse_empty(params, allow_empty)
        # one group only; the caller's list object is kept, as upstream does
        self.param_group = {"params": params}

    def _state_for(self, param: Tensor) -> dict[str, Tensor]:
        st = self.state.get(param)
        if st is None:
            st = {"step": _fresh_step(), "exp_avg": _zeros_like(param),
                  "exp_avg_sq": _zeros_like(param)}
            if self.amsgrad:
                st["max_exp_avg_sq"] = _zeros_like(param)
            self.state[param] = st
        return st

    def _run(self, params, grads, avgs, avg_sqs, max_avg_sqs, steps, has_complex):
        d = self.defaults
        with torch.no_grad():
            self.kernel(
                params,
                grads,
                avgs,
                avg_sqs,
                max_avg_sqs,
                steps,
                amsgrad=self.amsgrad,
                has_complex=has_complex,
                maximize=self.maximize,
                beta1=d["beta1"],
                beta2=d["beta2"],
                lr=d["lr"],
                weight_decay=d["weight_decay"],
                eps=d["eps"],
                foreach=self.foreach,
                fused=self.fused,
                grad_scale=None,
                found_inf=None,
            )

    def step_param(self, param: Tensor, grad: Tensor | None):
        """Update one parameter with `grad` (None: only make sure its state exists)."""
        # Upstream creates the state even when grad is None, and takes has_complex
        # from the param regardless of the grad.
        has_complex = torch.is_complex(param)
        with_grad = [param] if grad is not None else []
        grads = [grad] if grad is not None else []
        st = self._state_for(param)
        max_sqs = [st["max_exp_avg_sq"]] if self.amsgrad else []
        self._run(with_grad, grads, [st["exp_avg"]], [st["exp_avg_sq"]], max_sqs,
                  [st["step"]], has_complex)

    def step(self, gradients: list[Tensor | None]):
        params = self.param_group["params"]
        _check_one_grad_per_param(params, gradients)
        with_grad, grads, avgs, avg_sqs, max_sqs, steps = [], [], [], [], [], []
        has_complex = False
        for p, g in zip(params, gradients):
            if g is None:
                continue
            has_complex |= torch.is_complex(p)
            with_grad.append(p)
            grads.append(g)
            st = self._state_for(p)
            avgs.append(st["exp_avg"])
            avg_sqs.append(st["exp_avg_sq"])
            if self.amsgrad:
                max_sqs.append(st["max_exp_avg_sq"])
            steps.append(st["step"])
        self._run(with_grad, grads, avgs, avg_sqs, max_sqs, steps, has_complex)


class FunctionalAdam(_AdamLike):
    """Functional Adam (mirrors torch's _FunctionalAdam)."""

    kernel = staticmethod(adam)

    def __init__(
        self,
        params: list[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: bool = False,
        fused: bool = False,
        _allow_empty_param_list: bool = False,
    ):
        self._build(params, lr, betas, eps, weight_decay, amsgrad, maximize, foreach, fused,
                    _allow_empty_param_list)


class FunctionalAdamW(_AdamLike):
    """Functional AdamW (mirrors torch's _FunctionalAdamW)."""

    kernel = staticmethod(adamw)

    def __init__(
        self,
        params: list[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: bool = False,
        fused: bool = False,
        _allow_empty_param_list: bool = False,
    ):
        self._build(params, lr, betas, eps, weight_decay, amsgrad, maximize, foreach, fused,
                    _allow_empty_param_list)


# ---------------------------------------------------------------------------
# Adamax
# ---------------------------------------------------------------------------

class FunctionalAdamax:
    """Functional Adamax (mirrors torch's _FunctionalAdamax)."""

    kernel = staticmethod(adamax)

    def __init__(
        self,
        params: list[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        foreach: bool = False,
        maximize: bool = False,
        _allow_empty_param_list: bool = False,
    ):
        _check_adam_family(lr, eps, betas, weight_decay)
        self.defaults = {
            "lr": lr,
            "eps": eps,
            "beta1": betas[0],
            "beta2": betas[1],
            "weight_decay": weight_decay,
        }
        self.foreach = foreach
        self.maximize = maximize
        self.state: dict[Tensor, dict[str, Tensor]] = {}
        _refuse_empty(params, _allow_empty_param_list)
        self.param_group = {"params": params}

    def step(self, gradients: list[Tensor | None]):
        params = self.param_group["params"]
        _check_one_grad_per_param(params, gradients)
        with_grad, grads, avgs, infs, steps = [], [], [], [], []
        has_complex = False
        for p, g in zip(params, gradients):
            if g is None:
                continue
            has_complex |= torch.is_complex(p)
            with_grad.append(p)
            grads.append(g)
            if p not in self.state:
                self.state[p] = {"step": _fresh_step(), "exp_avg": _zeros_like(p),
                                 "exp_inf": _zeros_like(p)}
            st = self.state[p]
            avgs.append(st["exp_avg"])
            infs.append(st["exp_inf"])
            steps.append(st["step"])
        d = self.defaults
        with torch.no_grad():
            self.kernel(
                with_grad,
                grads,
                avgs,
                infs,
                steps,
                eps=d["eps"],
                beta1=d["beta1"],
                beta2=d["beta2"],
                lr=d["lr"],
                weight_decay=d["weight_decay"],
                foreach=self.foreach,
                maximize=self.maximize,
                has_complex=has_complex,
            )


# ---------------------------------------------------------------------------
# Adadelta
# ---------------------------------------------------------------------------

class FunctionalAdadelta:
    """Functional Adadelta (mirrors torch's _FunctionalAdadelta; no hyperparameter checks)."""

    kernel = staticmethod(adadelta)

    def __init__(
        self,
        params: list[Tensor],
        lr: float = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        foreach: bool = False,
        maximize: bool = False,
        _allow_empty_param_list: bool = False,
    ):
        self.defaults = {"lr": lr, "rho": rho, "eps": eps, "weight_decay": weight_decay}
        self.foreach = foreach
        self.maximize = maximize
        _refuse_empty(params, _allow_empty_param_list)
        self.param_group = {"params": params}
        self.state: dict[Tensor, dict[str, Tensor]] = {}

    def step(self, gradients: list[Tensor | None]):
        params = self.param_group["params"]
        d = self.defaults
        lr, rho, eps, weight_decay = d["lr"], d["rho"], d["eps"], d["weight_decay"]
        _check_one_grad_per_param(params, gradients)
        with_grad, grads, square_avgs, acc_deltas, steps = [], [], [], [], []
        has_complex = False
        for p, g in zip(params, gradients):
            if g is None:
                continue
            has_complex |= torch.is_complex(p)
            with_grad.append(p)
            grads.append(g)
            if p not in self.state:
                self.state[p] = {"step": _fresh_step(), "square_avg": _zeros_like(p),
                                 "acc_delta": _zeros_like(p)}
            st = self.state[p]
            square_avgs.append(st["square_avg"])
            acc_deltas.append(st["acc_delta"])
            steps.append(st["step"])
        with torch.no_grad():
            self.kernel(
                with_grad,
                grads,
                square_avgs,
                acc_deltas,
                steps,
                lr=lr,
                rho=rho,
                eps=eps,
                weight_decay=weight_decay,
                foreach=self.foreach,
                maximize=self.maximize,
                has_complex=has_complex,
            )


# ---------------------------------------------------------------------------
# Adagrad
# ---------------------------------------------------------------------------

class FunctionalAdagrad:
    """Functional Adagrad (mirrors torch's _FunctionalAdagrad).

    State is created eagerly in the constructor for every parameter. The warmup_* and
    coalesce_grad arguments are stored/accepted but unused, as upstream. Unlike
    torch.optim.Adagrad, a complex param's `sum` starts at initial_accumulator_value + 0j.
    """

    kernel = staticmethod(adagrad)

    def __init__(
        self,
        params: list[Tensor],
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        warmup_lr_multiplier: float = 1.0,
        warmup_num_iters: float = 0.0,
        eps: float = 1e-10,
        coalesce_grad: bool = True,
        foreach: bool = False,
        fused: bool = False,
        maximize: bool = False,
        _allow_empty_param_list: bool = False,
    ):
        self.defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "warmup_lr_multiplier": warmup_lr_multiplier,
            "warmup_num_iters": warmup_num_iters,
        }
        self.coalesce_grad = coalesce_grad
        self.foreach = foreach
        self.fused = fused
        self.maximize = maximize
        self.state: dict[Tensor, dict[str, Tensor]] = {}
        _refuse_empty(params, _allow_empty_param_list)
        self.param_group = {"params": params}
        for p in params:
            self.state[p] = {
                "sum": torch.full_like(p.data, initial_accumulator_value),
                "step": _fresh_step(),
            }

    def step(self, gradients: list[Tensor | None]):
        params = self.param_group["params"]
        _check_one_grad_per_param(params, gradients)
        grads, sums, steps = [], [], []
        has_sparse_grad = has_complex = False
        for p, g in zip(params, gradients):
            if g is None:
                continue
            has_sparse_grad |= g.is_sparse
            has_complex |= torch.is_complex(p)
            grads.append(g)
            st = self.state[p]
            sums.append(st["sum"])
            steps.append(st["step"])
        d = self.defaults
        with torch.no_grad():
            # Upstream quirk kept: the kernel gets the FULL parameter list, not just the
            # params that have a gradient, so a None gradient shifts the pairing.
            self.kernel(
                params,
                grads,
                sums,
                steps,
                lr=d["lr"],
                weight_decay=d["weight_decay"],
                lr_decay=d["lr_decay"],
                eps=d["eps"],
                has_sparse_grad=has_sparse_grad,
                foreach=self.foreach,
                maximize=self.maximize,
                has_complex=has_complex,
                fused=self.fused,
                grad_scale=None,
                found_inf=None,
            )


# ---------------------------------------------------------------------------
# RMSprop
# ---------------------------------------------------------------------------

class FunctionalRMSprop:
    """Functional RMSprop (mirrors torch's _FunctionalRMSprop; no hyperparameter checks)."""

    kernel = staticmethod(rmsprop)

    def __init__(
        self,
        params: list[Tensor],
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        foreach: bool = False,
        maximize: bool = False,
        _allow_empty_param_list: bool = False,
    ):
        self.defaults = {
            "lr": lr,
            "alpha": alpha,
            "eps": eps,
            "weight_decay": weight_decay,
            "momentum": momentum,
        }
        self.centered = centered
        self.foreach = foreach
        self.maximize = maximize
        _refuse_empty(params, _allow_empty_param_list)
        self.param_group = {"params": params}
        self.state: dict[Tensor, dict[str, Tensor]] = {}

    def step(self, gradients: list[Tensor | None]):
        params = self.param_group["params"]
        d = self.defaults
        lr, alpha, eps = d["lr"], d["alpha"], d["eps"]
        momentum, weight_decay = d["momentum"], d["weight_decay"]
        _check_one_grad_per_param(params, gradients)
        with_grad, grads, square_avgs, grad_avgs, bufs, steps = [], [], [], [], [], []
        has_complex = False
        for p, g in zip(params, gradients):
            if g is None:
                continue
            has_complex |= torch.is_complex(p)
            with_grad.append(p)
            grads.append(g)
            if p not in self.state:
                st = {"step": _fresh_step(), "square_avg": _zeros_like(p)}
                if momentum > 0:
                    st["momentum_buffer"] = _zeros_like(p)
                if self.centered:
                    st["grad_avg"] = _zeros_like(p)
                self.state[p] = st
            st = self.state[p]
            square_avgs.append(st["square_avg"])
            if momentum > 0:
                bufs.append(st["momentum_buffer"])
            if self.centered:
                grad_avgs.append(st["grad_avg"])
            steps.append(st["step"])
        with torch.no_grad():
            self.kernel(
                with_grad,
                grads,
                square_avgs,
                grad_avgs,
                bufs,
                steps,
                lr=lr,
                alpha=alpha,
                eps=eps,
                weight_decay=weight_decay,
                momentum=momentum,
                centered=self.centered,
                foreach=self.foreach,
                maximize=self.maximize,
                has_complex=has_complex,
            )


# ---------------------------------------------------------------------------
# Rprop
# ---------------------------------------------------------------------------

class FunctionalRprop:
    """Functional Rprop (mirrors torch's _FunctionalRprop; no hyperparameter checks)."""

    kernel = staticmethod(rprop)

    def __init__(
        self,
        params: list[Tensor],
        lr: float = 1e-2,
        etas: tuple[float, float] = (0.5, 1.2),
        step_sizes: tuple[float, float] = (1e-6, 50),
        foreach: bool = False,
        maximize: bool = False,
        _allow_empty_param_list: bool = False,
    ):
        self.defaults = {"lr": lr}
        self.etas = etas
        self.step_sizes = step_sizes
        self.foreach = foreach
        self.maximize = maximize
        _refuse_empty(params, _allow_empty_param_list)
        self.param_group = {"params": params}
        self.state: dict[Tensor, dict[str, Tensor]] = {}

    def step(self, gradients: list[Tensor | None]):
        params = self.param_group["params"]
        lr = self.defaults["lr"]
        # unpacked before the length check, as upstream (a bad tuple fails first)
        etaminus, etaplus = self.etas
        step_size_min, step_size_max = self.step_sizes
        _check_one_grad_per_param(params, gradients)
        with_grad, grads, prevs, step_sizes, steps = [], [], [], [], []
        has_complex = False
        for p, g in zip(params, gradients):
            if g is None:
                continue
            has_complex |= torch.is_complex(p)
            with_grad.append(p)
            grads.append(g)
            if p not in self.state:
                # upstream quirks kept: step_size takes the gradient's dtype/layout, not the
                # param's, and for complex params its imaginary part starts at 0 (torch.optim
                # starts it at lr)
                self.state[p] = {"step": _fresh_step(), "prev": _zeros_like(p),
                                 "step_size": torch.full_like(g, lr)}
            st = self.state[p]
            prevs.append(st["prev"])
            step_sizes.append(st["step_size"])
            steps.append(st["step"])
        with torch.no_grad():
            self.kernel(
                with_grad,
                grads,
                prevs,
                step_sizes,
                steps,
                step_size_min=step_size_min,
                step_size_max=step_size_max,
                etaminus=etaminus,
                etaplus=etaplus,
                foreach=self.foreach,
                maximize=self.maximize,
                has_complex=has_complex,
            )


# ---------------------------------------------------------------------------
# SGD
# ---------------------------------------------------------------------------

class FunctionalSGD:
    """Functional SGD (mirrors torch's _FunctionalSGD; no hyperparameter checks).

    State starts empty per param; `momentum_buffer` appears once the kernel creates it.
    """

    kernel = staticmethod(sgd)

    def __init__(
        self,
        params: list[Tensor],
        lr: float = 1e-2,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        foreach: bool = False,
        fused: bool = False,
        _allow_empty_param_list: bool = False,
    ):
        self.defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
        }
        self.nesterov = nesterov
        self.maximize = maximize
        self.foreach = foreach
        self.fused = fused
        self.state: dict[Tensor, dict[str, Tensor]] = {}
        _refuse_empty(params, _allow_empty_param_list)
        self.param_group = {"params": params}

    def _run(self, params, grads, bufs, has_sparse_grad):
        d = self.defaults
        with torch.no_grad():
            self.kernel(
                params,
                grads,
                bufs,
                weight_decay=d["weight_decay"],
                momentum=d["momentum"],
                lr=d["lr"],
                dampening=d["dampening"],
                nesterov=self.nesterov,
                maximize=self.maximize,
                has_sparse_grad=has_sparse_grad,
                foreach=self.foreach,
                fused=self.fused,
                grad_scale=None,
                found_inf=None,
            )

    def step_param(self, param: Tensor, grad: Tensor | None):
        """Update one parameter with `grad`."""
        # Upstream quirk kept: the param is passed to the kernel even when grad is None
        # (so the kernel sees one param and no grad), and its state is created only
        # when a grad is given.
        grads, bufs = [], []
        has_sparse_grad = False
        if grad is not None:
            grads.append(grad)
            has_sparse_grad = grad.is_sparse
            st = self.state.setdefault(param, {})
            bufs.append(st.get("momentum_buffer"))
        self._run([param], grads, bufs, has_sparse_grad)
        st = self.state[param]
        if bufs[0] is not None:
            st["momentum_buffer"] = bufs[0]

    def step(self, gradients: list[Tensor | None]):
        params = self.param_group["params"]
        _check_one_grad_per_param(params, gradients)
        with_grad, grads, bufs = [], [], []
        has_sparse_grad = False
        for p, g in zip(params, gradients):
            if g is None:
                continue
            with_grad.append(p)
            grads.append(g)
            if g.is_sparse:
                has_sparse_grad = True
            bufs.append(self.state.setdefault(p, {}).get("momentum_buffer"))
        self._run(with_grad, grads, bufs, has_sparse_grad)
        # the kernel fills in buffers it created; keep them for the next step
        for p, buf in zip(with_grad, bufs):
            if buf is not None:
                self.state[p]["momentum_buffer"] = buf


# ---------------------------------------------------------------------------
# optimizer class -> functional class
# ---------------------------------------------------------------------------

# Keyed by optimizer class (exact match, no subclass lookup), as upstream's map.
functional_optim_map: dict = {
    optim.Adagrad: FunctionalAdagrad,
    optim.Adam: FunctionalAdam,
    optim.AdamW: FunctionalAdamW,
    optim.SGD: FunctionalSGD,
    optim.Adadelta: FunctionalAdadelta,
    optim.RMSprop: FunctionalRMSprop,
    optim.Rprop: FunctionalRprop,
    optim.Adamax: FunctionalAdamax,
}

# optparity's drop-in classes, named explicitly by module and class (never matched by
# name alone). They are looked up lazily: optparity.optim may import this module, or a
# class may not exist yet, so absence is tolerated and retried later.
_OPTPARITY_CLASSES = (
    ("adagrad", "Adagrad", FunctionalAdagrad),
    ("adam", "Adam", FunctionalAdam),
    ("adamw", "AdamW", FunctionalAdamW),
    ("sgd", "SGD", FunctionalSGD),
    ("adadelta", "Adadelta", FunctionalAdadelta),
    ("rmsprop", "RMSprop", FunctionalRMSprop),
    ("rprop", "Rprop", FunctionalRprop),
    ("adamax", "Adamax", FunctionalAdamax),
)
_optparity_registered: set[str] = set()


def _register_optparity_classes() -> None:
    for module_name, cls_name, functional_cls in _OPTPARITY_CLASSES:
        if module_name in _optparity_registered:
            continue
        try:
            module = importlib.import_module(f"optparity.optim.{module_name}")
            cls = getattr(module, cls_name)
        except (ImportError, AttributeError):
            continue  # not written yet / partially imported: try again next time
        _optparity_registered.add(module_name)
        # a user registration under the same key wins, as with register_functional_optim
        functional_optim_map.setdefault(cls, functional_cls)


def register_functional_optim(key, optim):
    """Map `key` (any hashable, e.g. an optimizer class) to functional class `optim`.

    An existing entry is left alone (first registration wins), as upstream.
    """
    if key not in functional_optim_map:
        functional_optim_map[key] = optim


def as_functional_optim(optim_cls: type, *args, **kwargs):
    """Build the functional counterpart of `optim_cls` with no params yet.

    `args`/`kwargs` are the functional class's hyperparameters (after `params`).
    """
    if optim_cls not in functional_optim_map:
        _register_optparity_classes()
    try:
        functional_cls = functional_optim_map[optim_cls]
    except KeyError as e:
        raise ValueError(
            f"Optimizer {optim_cls} does not have a functional counterpart!"
        ) from e
    return functional_cls([], *args, **kwargs, _allow_empty_param_list=True)


_register_optparity_classes()
