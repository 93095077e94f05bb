"""Softmax attention on FlashAttention 4's Hopper kernels (the flash-attn-4 package, CuTe DSL) against SDPA's cuDNN
and flash backends, at the 135M model's attention shape; and the 135M model trained on each (issue 8's 50% MFU).

    python docs/bench/fa4_study.py micro           # each backend checked against fp32 math, then timed (do_bench)
    python docs/bench/fa4_study.py train sdpa|fa4  # the README's training command, attention on that backend
    python docs/bench/fa4_study.py shapes          # the mixer's attention on FA4 against SDPA at odd shapes

The first measurements (kernels.md, 2026-12-07) ran this script's first version (commit 90edb17) on 51fe8d2, before
the mixer took FA4 itself: it held its own copy of kernels/flash_attention.py's custom ops and patched them in as the
mixer's attention.

flash-attn-4 is not a dependency of scalinglab: this script needs it installed beside torch (its wheels and their
needs, nvidia-cutlass-dsl and cuda-bindings, are too large for one device carry; see kernels.md for how it ran).
"""

import json
import sys

import torch
import torch.nn.functional as F

from kernels.flash_attention import flash4_attention

B, T, H, D = 64, 2048, 12, 64  # one microbatch of the README's command: 64 sequences of 2048, 12 heads of 64


def sdpa_attention(q, k, v, backend):
    """Causal SDPA on (B, T, H, D) tensors handed over as (B, H, T, D) views, as the model does."""
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True).transpose(1, 2)


def _backends():
    from torch.nn.attention import SDPBackend

    return {"cudnn": lambda q, k, v: sdpa_attention(q, k, v, SDPBackend.CUDNN_ATTENTION),
            "flash2": lambda q, k, v: sdpa_attention(q, k, v, SDPBackend.FLASH_ATTENTION),
            "fa4": flash4_attention}


def micro() -> None:
    """Check every backend's output and gradients against fp32 math, then time forward and forward+backward."""
    from triton.testing import do_bench

    torch.manual_seed(0)
    backends = _backends()
    # Correctness on a small batch, against fp32 math on the same bf16 inputs.
    q, k, v = (torch.randn(2, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dy = torch.randn(2, T, H, D, device="cuda", dtype=torch.bfloat16)
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = F.scaled_dot_product_attention(qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2),
                                         is_causal=True).transpose(1, 2)
    ref.backward(dy.float())
    for name, fn in {**backends, "fa4 compiled": torch.compile(flash4_attention)}.items():
        for x in (q, k, v):
            x.grad = None
        y = fn(q, k, v)
        y.backward(dy)
        errs = {n: (a.float() - b).abs().max().item() / b.abs().max().item()
                for n, a, b in (("y", y, ref), ("dq", q.grad, qf.grad), ("dk", k.grad, kf.grad), ("dv", v.grad, vf.grad))}
        ok = all(e < 2e-2 for e in errs.values())
        print("CHECK", json.dumps({"backend": name, "ok": ok, **{n: round(e, 5) for n, e in errs.items()}}), flush=True)
    # Timing at the training shape; causal attention's FLOPs: 4 T^2 D H B / 2 forward, 2.5x that for the backward.
    fwd_flops = 4 * B * H * T * T * D / 2
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dy = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    for rnd in (1, 2):
        for name, fn in backends.items():
            fwd = do_bench(lambda: fn(q, k, v), warmup=50, rep=300)
            bwd_graph = lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dy)  # noqa: E731
            both = do_bench(bwd_graph, warmup=50, rep=300)
            print("TIME", json.dumps({"round": rnd, "backend": name, "fwd_ms": round(fwd, 3), "fwd_bwd_ms": round(both, 3),
                                      "fwd_tflops": round(fwd_flops / fwd / 1e9, 1),
                                      "fwd_bwd_tflops": round(3.5 * fwd_flops / both / 1e9, 1)}), flush=True)


def shapes() -> None:
    """The mixer's own attention (FA4 where usable) against SDPA's at shapes other than training's: lengths that are
    not a multiple of FA4's tiles, one token, heads of 128, with and without gradients."""
    import models.mixers.softmax as sm

    torch.manual_seed(0)
    for b, t, h, d in ((3, 37, 4, 64), (1, 1, 2, 64), (2, 300, 2, 128), (5, 2048, 6, 64)):
        q, k, v = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dy = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16)
        row = {"shape": [b, t, h, d], "ran": "fa4" if sm.flash4_usable(q) else "sdpa"}
        try:
            y = sm.causal_attention(q, k, v)
            grads = torch.autograd.grad(y, (q, k, v), dy)
        except Exception as exc:  # a shape FA4 refuses: say so and go on to the next
            print("SHAPE", json.dumps({**row, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)
            continue
        y_ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        grads_ref = torch.autograd.grad(y_ref, (q, k, v), dy)
        for name, a, r in zip(("y", "dq", "dk", "dv"), (y, *grads), (y_ref, *grads_ref)):
            diff = (a.float() - r.float()).abs().max()
            row[name] = round((diff / r.float().abs().max().clamp_min(1e-6)).item(), 5)
            # Where SDPA's is 0 (one token's dq and dk) the ratio means little: the absolute difference says it.
            row[f"{name}_abs"] = float(f"{diff.item():.3g}")
        with torch.no_grad():
            row["no_grad_same"] = bool(torch.equal(sm.causal_attention(q, k, v), y))
        row["ok"] = all(row[n] < 2e-2 or row[f"{n}_abs"] < 1e-5 for n in ("y", "dq", "dk", "dv"))
        print("SHAPE", json.dumps(row), flush=True)


def train(backend: str, steps: int = 30) -> None:
    """The README's 135M softmax training command with attention on `backend`: fa4, or sdpa (cuDNN)."""
    import models.bench as mb
    import models.mixers.softmax as sm

    if backend == "sdpa":
        sm.flash4_usable = lambda q: False  # the mixer takes FA4 wherever it is installed
    elif backend != "fa4":
        sys.exit(f"train: backend must be sdpa or fa4; got {backend!r}")
    elif sm.attention_backend("cuda") != "fa4":
        sys.exit("train fa4: flash-attn-4 is not usable here (installed, on a Hopper GPU?)")
    spec = mb.bench_spec("softmax", "135M", T, 131072 // T, steps)
    r = mb.bench_train(spec, compile="reduce-overhead", microbatch=64)
    print("RESULT", json.dumps({"backend": backend, "ran": r["attention"], "tps": r["tokens_per_s"], "mfu": r["mfu_989"],
                                "loss": r["final_loss"], "mhz": r.get("sm_clock_mhz")}), flush=True)


if __name__ == "__main__":
    command, *args = sys.argv[1:] or ["help"]
    if command == "micro" and not args:
        micro()
    elif command == "shapes" and not args:
        shapes()
    elif command == "train" and len(args) == 1:
        train(args[0])
    else:
        sys.exit(__doc__)
