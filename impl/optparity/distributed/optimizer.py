"""DistributedOptimizer: torch.distributed.optim.DistributedOptimizer over RPC, without TorchScript.

The caller hands over RRefs to parameters that live on any number of workers. One local
optimizer is built on each owning worker (over RPC); `step(context_id)` asks every worker to
apply the gradients that distributed autograd recorded there for that context.

As upstream, optimizer classes with a functional form (see
``optparity.distributed.functional_optim.functional_optim_map``: torch.optim's eight classes and
optparity.optim's) run as functional optimizers fed the context's gradients directly; any other
torch.optim-style class runs as an ordinary optimizer through ``param.grad``. Upstream compiles
the functional optimizers with TorchScript; here they stay plain Python, so the maths (and so
every bit of the result) is the same while nothing is scripted. (Upstream also drops to the
plain path when TorchScript is disabled, e.g. PYTORCH_JIT=0; with nothing to script, the
functional path is used regardless.)
"""
from __future__ import annotations

import logging
import threading
from collections import defaultdict

import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc

import optparity.distributed.functional_optim as _functional
from optparity import versions

__all__ = ["DistributedOptimizer"]

logger = logging.getLogger(__name__)

# Steps on one worker run one at a time, whichever client asked for them: the optimizers
# update their parameters in place, and the plain-optimizer path also writes param.grad.
_worker_step_lock = threading.Lock()


class _TorchScriptPairingAdagrad(_functional.FunctionalAdagrad):
    """FunctionalAdagrad paired the way upstream's DistributedOptimizer runs it.

    The functional Adagrad hands its kernel every parameter but only the gradients that
    exist. Eager Python then fails (the kernel zips with strict=True), but upstream runs the
    optimizer under TorchScript, whose zip ignores `strict` and stops at the shortest list:
    the first len(grads) parameters are paired with the gradients, in order. When the
    parameters without gradient come last that is the right update (they stay unchanged);
    otherwise gradients land on their neighbours. We pair exactly the same way, so results
    match upstream bit for bit, and warn once when the pairing is off.
    """

    _warned = False

    @staticmethod
    def kernel(params, grads, *args, **kwargs):
        # looked up at call time so a kernel swapped on FunctionalAdagrad still applies
        return _functional.FunctionalAdagrad.kernel(params[: len(grads)], grads, *args, **kwargs)

    def step(self, gradients):
        first_missing = next((i for i, g in enumerate(gradients) if g is None), None)
        if (not _TorchScriptPairingAdagrad._warned and first_missing is not None
                and any(g is not None for g in gradients[first_missing + 1:])):
            _TorchScriptPairingAdagrad._warned = True
            logger.warning(
                "Adagrad: a parameter without gradient precedes parameters with one; like "
                "torch's DistributedOptimizer, gradients are applied to the parameters in "
                "order, so they land on the wrong parameters. Put parameters that may lack a "
                "gradient last."
            )
        super().step(gradients)


def _functional_form(optimizer_class):
    """The functional class standing in for `optimizer_class`, or None (exact class match)."""
    if optimizer_class not in _functional.functional_optim_map:
        # optparity.optim classes register themselves lazily; give them a chance first
        register = getattr(_functional, "_register_optparity_classes", None)
        if register is not None:
            register()
    functional_cls = _functional.functional_optim_map.get(optimizer_class)
    if functional_cls is _functional.FunctionalAdagrad and not versions.at_least("2.14"):
        # torch 2.14 dropped TorchScript from DistributedOptimizer: its eager strict zip then
        # refuses a parameter without gradient (ValueError), and so does the plain class
        return _TorchScriptPairingAdagrad
    return functional_cls


class _FunctionalLocalOptimizer:
    """Lives on a worker: a functional optimizer over that worker's parameters."""

    def __init__(self, functional_cls, local_params_rref, *args, **kwargs):
        self._local_params = [rref.local_value() for rref in local_params_rref]
        self.optim = functional_cls(self._local_params, *args, **kwargs)

    def step(self, autograd_ctx_id: int) -> None:
        grads_by_param = dist_autograd.get_gradients(autograd_ctx_id)
        # one entry per parameter, None where this context left no gradient
        grads = [grads_by_param[p] if p in grads_by_param else None for p in self._local_params]
        with _worker_step_lock:
            self.optim.step(grads)


class _LocalOptimizer:
    """Lives on a worker: an ordinary optimizer, fed through param.grad."""

    def __init__(self, optim_cls, local_params_rref, *args, **kwargs):
        self._local_params = [rref.local_value() for rref in local_params_rref]
        self.optim = optim_cls(self._local_params, *args, **kwargs)

    def step(self, autograd_ctx_id: int) -> None:
        grads_by_param = dist_autograd.get_gradients(autograd_ctx_id)
        with _worker_step_lock:
            # Upstream behaviour kept: every gradient the context holds on this worker is
            # written to .grad (even for params of other optimizers), and nothing clears
            # .grad afterwards, so a param left out of a later context steps on its old grad.
            for param, grad in grads_by_param.items():
                param.grad = grad
            self.optim.step()


# --- run on the workers through RPC (module level so RPC can pickle them by name) ---

def _new_functional_local_optimizer(functional_cls, local_params_rref, *args, **kwargs):
    return rpc.RRef(_FunctionalLocalOptimizer(functional_cls, local_params_rref, *args, **kwargs))


def _new_local_optimizer(optim_cls, local_params_rref, *args, **kwargs):
    return rpc.RRef(_LocalOptimizer(optim_cls, local_params_rref, *args, **kwargs))


def _local_optimizer_step(local_optim_rref, autograd_ctx_id: int) -> None:
    local_optim_rref.local_value().step(autograd_ctx_id)


def _wait_for_all(futures, workers):
    """Wait for every future (no worker is left running behind our back), then raise if any failed.

    As upstream, the exception raised is the last failure's; RPC already prefixes its message
    with the worker it came from. Other failures are attached as notes.
    """
    results, failures = [], []
    for fut, worker in zip(futures, workers):
        try:
            results.append(fut.wait())
        except Exception as exc:  # noqa: BLE001 - re-raised below
            results.append(exc)
            failures.append((worker, exc))
    if failures:
        _, raised = failures[-1]
        if len(failures) > 1 and hasattr(raised, "add_note"):
            for worker, exc in failures[:-1]:
                raised.add_note(f"{_worker_name(worker)} failed too: {type(exc).__name__}: "
                                f"{_first_line(exc)}")
        raise raised
    return results


def _worker_name(worker) -> str:
    return getattr(worker, "name", str(worker))


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("On WorkerInfo")]
    return lines[0] if lines else ""


class DistributedOptimizer:
    """Optimize parameters spread over RPC workers, each on the worker that owns it.

    Args:
        optimizer_class: the optimizer class to build on every worker (torch.optim-style;
            classes with a functional form run functionally, others through ``param.grad``).
        params_rref: RRefs to the parameters (local or remote) to optimize.
        args, kwargs: passed to the optimizer constructor on every worker.

    Concurrent ``step`` calls are serialized on each worker, but nothing orders whole
    forward/backward/step sequences of different clients, nor steps across workers.
    """

    def __init__(self, optimizer_class, params_rref, *args, **kwargs):
        params_by_owner = defaultdict(list)
        for param_rref in params_rref:
            params_by_owner[param_rref.owner()].append(param_rref)

        functional_cls = _functional_form(optimizer_class)
        self.is_functional_optim = functional_cls is not None
        if self.is_functional_optim:
            ctor, new_local = functional_cls, _new_functional_local_optimizer
        else:
            logger.warning(
                "Optimizer %s has no functional form: each worker will run it as a regular "
                "optimizer, writing the context's gradients to param.grad and stepping under a "
                "per-worker lock.",
                optimizer_class,
            )
            ctor, new_local = optimizer_class, _new_local_optimizer

        workers = list(params_by_owner)
        futures = [
            rpc.rpc_async(worker, new_local, args=(ctor, params_by_owner[worker]) + args,
                          kwargs=kwargs)
            for worker in workers
        ]
        self.remote_optimizers = _wait_for_all(futures, workers)

    def step(self, context_id):
        """Step every worker's optimizer with the gradients of autograd context `context_id`.

        Blocks until all workers are done; if any failed, raises (after all have finished).
        """
        # an unknown context fails here, before any worker is asked to step
        dist_autograd._is_valid_context(context_id)
        workers = [local_optim.owner() for local_optim in self.remote_optimizers]
        futures = [
            rpc.rpc_async(worker, _local_optimizer_step, args=(local_optim, context_id))
            for worker, local_optim in zip(workers, self.remote_optimizers)
        ]
        _wait_for_all(futures, workers)
