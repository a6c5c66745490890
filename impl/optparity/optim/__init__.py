"""optparity.optim — drop-in replacements for torch.optim's classes."""
from optparity.optim.adadelta import Adadelta
from optparity.optim.adagrad import Adagrad
from optparity.optim.adam import Adam
from optparity.optim.adamax import Adamax
from optparity.optim.adamw import AdamW
from optparity.optim.rmsprop import RMSprop
from optparity.optim.rprop import Rprop
from optparity.optim.sgd import SGD

__all__ = ["Adadelta", "Adagrad", "Adam", "AdamW", "Adamax", "RMSprop", "Rprop", "SGD"]
