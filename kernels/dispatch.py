"""Which entry a Triton op is called through: its torch.library custom op, or a plain autograd Function."""

from __future__ import annotations

import torch


def eager_or_op(op, eager: type[torch.autograd.Function], *args):
    """Call the custom op `op` under torch.compile (kept whole in the graph) and functorch (its vmap rule), else
    `eager`, a plain autograd Function with the same forward and backward.

    The custom op's dispatch costs host time on every call: 72-75 us per forward and backward against 35 us for the
    Function, both with empty bodies, on the development CPU (`docs/bench/dispatch_study.py`). An eager training
    step pays it on every norm and gate: 49 calls a step in the 135M lightning model."""
    if torch.compiler.is_compiling() or any(_wrapped(a) for a in args):
        return op(*args)
    return eager.apply(*args)


def _wrapped(x) -> bool:
    """Whether x is a tensor functorch wraps (vmap, grad): any argument, as vmap may batch a later one alone."""
    return isinstance(x, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x)
