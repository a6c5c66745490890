"""optparity.functional — the math of each optimizer, one module per algorithm.

Each function takes lists of params, grads and state tensors (torch.optim's functional API)
and dispatches to a for-loop path (`_single_tensor_*`) or a foreach path (`_multi_tensor_*`).
"""
