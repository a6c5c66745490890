"""optparity.optim — drop-in replacements for torch.optim's classes."""
from optparity.optim.adadelta import Adadelta
from optparity.optim.adafactor import Adafactor
from optparity.optim.adagrad import Adagrad
from optparity.optim.adam import Adam
from optparity.optim.adamax import Adamax
from optparity.optim.adamw import AdamW
from optparity.optim.asgd import ASGD
from optparity.optim.lbfgs import LBFGS
from optparity.optim.muon import Muon
from optparity.optim.nadam import NAdam
from optparity.optim.radam import RAdam
from optparity.optim.rmsprop import RMSprop
from optparity.optim.rprop import Rprop
from optparity.optim.sgd import SGD
from optparity.optim.sparseadam import SparseAdam

__all__ = [
    "Adadelta", "Adafactor", "Adagrad", "Adam", "Adamax", "AdamW", "ASGD", "LBFGS", "Muon", "NAdam",
    "RAdam", "RMSprop", "Rprop", "SGD", "SparseAdam",
]
