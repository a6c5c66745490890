"""optparity.functional — the math of each optimizer, one module per algorithm.

Each function takes lists of params, grads and state tensors (torch.optim's functional API)
and dispatches to a for-loop path (`_single_tensor_*`) or a foreach path (`_multi_tensor_*`).
"""
from optparity.functional.adadelta import adadelta
from optparity.functional.adafactor import adafactor
from optparity.functional.adagrad import adagrad
from optparity.functional.adam import adam
from optparity.functional.adamax import adamax
from optparity.functional.adamw import adamw
from optparity.functional.asgd import asgd
from optparity.functional.lbfgs import lbfgs
from optparity.functional.muon import muon
from optparity.functional.nadam import nadam
from optparity.functional.radam import radam
from optparity.functional.rmsprop import rmsprop
from optparity.functional.rprop import rprop
from optparity.functional.sgd import sgd
from optparity.functional.sparseadam import sparse_adam, sparseadam

__all__ = [
    "adadelta", "adafactor", "adagrad", "adam", "adamax", "adamw", "asgd", "lbfgs", "muon", "nadam",
    "radam", "rmsprop", "rprop", "sgd", "sparse_adam", "sparseadam",
]
