"""GPU timings of kernels.fused against the PyTorch reference and its torch.compile, at the 135M LM's shapes.

    python -c "from kernels.fused.bench import bench_fused; print(bench_fused().to_string())"
"""

from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F

from . import linear_cross_entropy, rms_norm, swiglu

#: 8 sequences of 2048 tokens, d_model 768, SwiGLU hidden 2048, vocab 32000.
N, D, HIDDEN, VOCAB = 8 * 2048, 768, 2048, 32000


def _ops(device: str):
    """op name -> (fn(*inputs, backend=...), bf16 leaf inputs), random so no kernel sees a shortcut."""
    g = torch.Generator(device).manual_seed(0)

    def leaf(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, device=device, generator=g) * scale + shift
        return t.to(torch.bfloat16).requires_grad_(True)

    targets = torch.randint(0, VOCAB, (N,), device=device, generator=g)
    return {
        "rms_norm": (lambda x, w, backend: rms_norm(x, w, backend=backend), [leaf(N, D), leaf(D, scale=0.1, shift=1)]),
        "swiglu": (lambda a, b, backend: swiglu(a, b, backend=backend), [leaf(N, HIDDEN), leaf(N, HIDDEN)]),
        "linear_cross_entropy": (
            lambda x, w, backend: linear_cross_entropy(x, w, targets, backend=backend),
            [leaf(N, D), leaf(VOCAB, D, scale=0.02)],
        ),
    }


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


def bench_fused(device: str = "cuda") -> pd.DataFrame:
    """Forward and forward+backward ms and peak extra memory of each op: triton, torch, torch.compile(torch)."""
    rows = []
    for op, (fn, inputs) in _ops(device).items():
        impls = {
            "triton": lambda *t, fn=fn: fn(*t, backend="triton"),
            "torch": lambda *t, fn=fn: fn(*t, backend="torch"),
            "torch.compile": torch.compile(lambda *t, fn=fn: fn(*t, backend="torch")),
        }
        if op == "rms_norm":  # what nn.RMSNorm runs: torch's own fused kernel where it has one
            impls["F.rms_norm"] = lambda x, w: F.rms_norm(x, (D,), w, 1e-6)
        for impl, run in impls.items():
            for backward in (False, True):
                ms, peak = _measure(run, inputs, backward)
                rows.append(dict(op=op, impl=impl, pass_="fwd+bwd" if backward else "fwd", ms=ms, peak_mib=peak))
    return pd.DataFrame(rows).rename(columns={"pass_": "pass"})
