"""GPU timings of kernels.fused against the PyTorch reference and its torch.compile, at the 135M LM's shapes.

Each op is first checked on the device itself (the interpreter tests cannot catch compiler bugs): the triton
backend's output and every gradient against the PyTorch reference run in fp32 on the same bf16 inputs. An
op that fails is reported as failing, with no timings.

    python -c "from kernels.fused.bench import bench_fused; print(bench_fused().to_string())"
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F

from ..compare import rel_err
from . import gated_rms_norm, linear_cross_entropy, rms_norm, swiglu

#: Relative error (max|a - b| / max|b|) a bf16 triton result may have against the fp32 reference: the kernels
#: keep fp32 inside, so what is left is the bf16 rounding of inputs and outputs, a few ulps (2^-8 each).
CHECK_TOL = 2e-2


@dataclass(frozen=True)
class Shapes:
    """Token count, d_model, SwiGLU hidden width and vocabulary of the timed ops."""

    n: int = 8 * 2048
    d: int = 768
    hidden: int = 2048
    vocab: int = 32000


#: The 135M LM: 8 sequences of 2048 tokens, d_model 768, SwiGLU hidden 2048, vocab 32000.
LM_135M = Shapes()


def _ops(device: str, s: Shapes):
    """op name -> (fn(*inputs, backend=...), bf16 leaf inputs), random so no kernel sees a shortcut."""
    g = torch.Generator(device).manual_seed(0)

    def leaf(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, device=device, generator=g) * scale + shift
        return t.to(torch.bfloat16).requires_grad_(True)

    targets = torch.randint(0, s.vocab, (s.n,), device=device, generator=g)
    return {
        "rms_norm": (lambda x, w, backend: rms_norm(x, w, backend=backend), [leaf(s.n, s.d), leaf(s.d, scale=0.1, shift=1)]),
        "gated_rms_norm": (
            lambda x, gate, w, backend: gated_rms_norm(x, gate, w, backend=backend),
            [leaf(s.n, s.d), leaf(s.n, s.d, scale=2), leaf(s.d, scale=0.1, shift=1)],
        ),
        "swiglu": (lambda a, b, backend: swiglu(a, b, backend=backend), [leaf(s.n, s.hidden), leaf(s.n, s.hidden)]),
        "linear_cross_entropy": (
            lambda x, w, backend: linear_cross_entropy(x, w, targets, backend=backend),
            [leaf(s.n, s.d), leaf(s.vocab, s.d, scale=0.02)],
        ),
    }


def _out_and_grads(fn, inputs, grad_seed: int = 1):
    """fn(*inputs) and the gradients of <fn(*inputs), r> for a fixed random r, with respect to every input."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    g = torch.Generator(out.device).manual_seed(grad_seed)
    r = torch.randn(out.shape, device=out.device, generator=g) if out.dim() else torch.ones((), device=out.device)
    (out.float() * r).sum().backward()
    return out.detach(), [t.grad for t in inputs]


def check_op(fn, inputs) -> float:
    """Worst relative error of the triton backend's output and gradients against torch's, run in fp32."""
    out, grads = _out_and_grads(lambda *t: fn(*t, backend="triton"), inputs)
    ref, ref_grads = _out_and_grads(lambda *t: fn(*(x.float() for x in t), backend="torch"), inputs)
    return max(rel_err(a, b) for a, b in zip([out, *grads], [ref, *ref_grads]))


def check_fused(device: str = "cuda", shapes: Shapes = LM_135M) -> dict[str, float]:
    """op -> worst relative error of its triton kernels (output and every gradient) against the fp32 reference."""
    return {op: check_op(fn, inputs) for op, (fn, inputs) in _ops(device, shapes).items()}


def _measure(fn, inputs, backward: bool) -> tuple[float, float]:
    """Median ms (triton.testing.do_bench, after a warm-up call that also compiles) and peak extra MiB."""
    import triton.testing

    out = fn(*inputs)
    grad = torch.randn_like(out) if out.dim() else torch.ones_like(out)

    def step():
        y = fn(*inputs)
        if backward:
            y.backward(grad)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(step, grad_to_none=inputs, return_mode="median")
    return ms, peak


def bench_fused(device: str = "cuda", shapes: Shapes = LM_135M) -> pd.DataFrame:
    """Check each op on the device, then time forward and forward+backward (ms, peak extra MiB) of triton,
    torch and torch.compile(torch); an op whose check fails gets one row saying so and no timings."""
    rows = []
    for op, (fn, inputs) in _ops(device, shapes).items():
        err = check_op(fn, inputs)
        check = "pass" if err <= CHECK_TOL else "FAIL"
        if check == "FAIL":
            rows.append(dict(op=op, impl="triton", pass_="check", ms=None, peak_mib=None, check=check, rel_err=err))
            continue
        impls = {
            "triton": lambda *t, fn=fn: fn(*t, backend="triton"),
            "torch": lambda *t, fn=fn: fn(*t, backend="torch"),
            "torch.compile": torch.compile(lambda *t, fn=fn: fn(*t, backend="torch")),
        }
        if op == "rms_norm":  # what nn.RMSNorm runs: torch's own fused kernel where it has one
            impls["F.rms_norm"] = lambda x, w: F.rms_norm(x, (shapes.d,), w, 1e-6)
        for impl, run in impls.items():
            for backward in (False, True):
                ms, peak = _measure(run, inputs, backward)
                rows.append(dict(op=op, impl=impl, pass_="fwd+bwd" if backward else "fwd", ms=ms, peak_mib=peak,
                                 check=check, rel_err=err))
    return pd.DataFrame(rows).rename(columns={"pass_": "pass"})
