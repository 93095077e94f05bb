"""Host time of a custom op with autograd against a plain autograd Function, both with empty bodies (no kernel):
what `kernels.dispatch.eager_or_op` saves an eager call. Runs on the CPU; the dispatch cost does not depend on the
device.

    python docs/bench/dispatch_study.py    # us per forward + backward, three rounds after a warm-up round
"""

import time

import torch


@torch.library.custom_op("dispatch_study::fwd", mutates_args=())
def _op_fwd(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), x.new_empty(x.shape[0])


@torch.library.custom_op("dispatch_study::bwd", mutates_args=())
def _op_bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(w)


@_op_fwd.register_fake
def _(x, w, g, eps):
    return torch.empty_like(x), x.new_empty(x.shape[0])


@_op_bwd.register_fake
def _(dy, x, w, r):
    return torch.empty_like(x), torch.empty_like(w)


def _setup(ctx, inputs, output):
    x, w, _, _ = inputs
    ctx.save_for_backward(x, w, output[1])


def _backward(ctx, dy, _dr, run=_op_bwd):
    x, w, r = ctx.saved_tensors
    dx, dw = run(dy, x, w, r)
    return dx, dw, None, None


_op_fwd.register_autograd(_backward, setup_context=_setup)


class _Plain(torch.autograd.Function):
    """The same empty forward and backward as a plain Function, as `kernels.fused` calls its kernels eagerly."""

    @staticmethod
    def forward(ctx, x, w, g, eps):
        y, r = torch.empty_like(x), x.new_empty(x.shape[0])
        _setup(ctx, (x, w, g, eps), (y, r))
        ctx.mark_non_differentiable(r)
        return y, r

    @staticmethod
    def backward(ctx, dy, dr):
        return _backward(ctx, dy, dr, run=lambda dy, x, w, r: (torch.empty_like(x), torch.empty_like(w)))


def _us_per_call(call, n: int = 3000) -> float:
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(8, requires_grad=True)
    start = time.perf_counter()
    for _ in range(n):
        y, _ = call(x, w)
        y.sum().backward()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    """Print us per forward + backward for the custom op, the Function, and a plain multiply for scale."""
    calls = {"custom op": lambda x, w: _op_fwd(x, w, None, 1e-6),
             "autograd Function": lambda x, w: _Plain.apply(x, w, None, 1e-6),
             "x * 1.0 (for scale)": lambda x, w: (x * 1.0, None)}
    for round_ in range(4):
        times = {name: _us_per_call(call) for name, call in calls.items()}
        label = "warm-up" if round_ == 0 else f"round {round_}"
        print(label, ", ".join(f"{name} {us:.1f} us" for name, us in times.items()), flush=True)


if __name__ == "__main__":
    main()
