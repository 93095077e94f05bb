"""One training step's loss and gradients of every member of a pack against the same model trained alone, on the
first batch, under the GPU's bf16 autocast: whether a pack of many members computes each member as it would alone.

    python docs/bench/pack_grad_check.py softmax 512 [MEMBERS]     # on a GPU; seconds
    SLAB_NO_CUDNN_SDP=1 python docs/bench/pack_grad_check.py softmax 512   # the same without cuDNN attention
    SLAB_NO_REDUCED_BF16=1 python docs/bench/pack_grad_check.py softmax 512  # cuBLAS bf16 GEMMs reduce in fp32
    python docs/bench/pack_grad_check.py attention                  # each SDPA backend at batch 16 and 256

Prints per member the relative error of its loss and of its whole gradient against the same step in fp64, computed
alone as pretrain computes it (fused kernels), alone on plain torch layers (what a pack stacks) and packed: whether
a pack's bf16 step is less accurate than a lone one, or only rounded differently. A second lone computation's
difference from the first gives the noise floor (cuDNN attention's backward need not be deterministic).
``attention`` checks each SDPA backend's bf16 output and gradients against fp64 at a lone run's batch (16 sequences)
and a pack of 16's (256), in the model's (B, T, H, D) layout: a kernel chosen by shape is the first suspect for a
member that trains differently in a large pack (pytorch/pytorch#150700 reports odd cuDNN gradients on H100).
"""

import contextlib
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.func import stack_module_state

from models.data import Batches, open_data
from models.evals import autocast
from models.packed import stack_layers, stacked_losses
from models.lm import LM
from models.train import build_model, model_config
from sweep.plan import load_plan


def main(arch: str, d_model: int, members: int | None) -> None:
    """Print each member's loss and gradient error against fp64: trained alone as pretrain does (fused kernels),
    alone on plain torch layers (what a pack stacks), packed, and a second lone computation's difference."""
    specs = [r.spec for r in load_plan("plans/pack-grid.csv").runs if r.spec.arch == arch and r.spec.d_model == d_model]
    specs = specs[:members] if members else specs
    device = torch.device("cuda")
    cfg = model_config(specs[0])
    data = open_data(specs[0].data, specs[0].vocab_size)
    batches = [Batches(data, s.seq_len, s.batch_size, seed=s.seed).next() for s in specs]

    def alone(i, kernels="torch", exact=False):
        model = build_model(cfg, specs[i].seed, device, kernels)
        x, y = (t.to(device) for t in batches[i])
        if exact:
            model.double()
        with contextlib.nullcontext() if exact else autocast(device):
            _, loss = model(x, y)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten().double() for _, p in model.named_parameters()])

    models = [build_model(cfg, s.seed, device) for s in specs]
    names = [k for k, _ in models[0].named_parameters()]
    params, _ = stack_module_state(models)
    params = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    with torch.device(device):
        stacked = stack_layers(LM(cfg), params)
    x = torch.stack([b[0] for b in batches]).to(device)
    y = torch.stack([b[1] for b in batches]).to(device)
    with autocast(device):
        losses = stacked_losses(stacked, x, y)
    losses.sum().backward()
    print("member lr seed | loss err vs fp64: alone fused, alone plain, packed | grad err vs fp64: alone fused, "
          "alone plain, packed | alone plain again vs alone plain: loss, grad")
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    for i, s in enumerate(specs):
        try:
            l64, g64 = alone(i, exact=True)
        except Exception as exc:  # a mixer without an fp64 path (a Triton kernel) has no exact reference here
            print(i, s.lr, s.seed, f"| no fp64 reference: {str(exc).splitlines()[0][:80]}")
            l64, g64 = float("nan"), None
        (lf, gf), (l1, g1), (l2, g2) = alone(i, "auto"), alone(i), alone(i)
        gp = torch.cat([params[k].grad[i].flatten().double() for k in names])
        err = lambda g: rel(g, g64) if g64 is not None else float("nan")  # noqa: E731
        print(i, s.lr, s.seed, "|", " ".join(f"{abs(v / l64 - 1):.2e}" for v in (lf, l1, losses[i].item())), "|",
              " ".join(f"{err(g):.2e}" for g in (gf, g1, gp)), "|", f"{abs(l2 / l1 - 1):.2e} {rel(g2, g1):.2e}")


def attention(batches=(16, 256), heads: int = 8, seq_len: int = 512, dim: int = 64) -> None:
    """Print each SDPA backend's relative error (output, dq, dk, dv) in bf16 against fp64, causal, per batch size."""
    dev = torch.device("cuda")
    for b in batches:
        torch.manual_seed(0)
        qkv, do = torch.randn(b, seq_len, 3, heads, dim, device=dev), torch.randn(b, heads, seq_len, dim, device=dev)
        exact = [t.double().transpose(1, 2).requires_grad_(True) for t in qkv.unbind(2)]
        out = F.scaled_dot_product_attention(*exact, is_causal=True)
        out.backward(do.double())
        want = [out.detach()] + [t.grad for t in exact]
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            x = qkv.bfloat16().requires_grad_(True)
            try:
                with sdpa_kernel([backend]):
                    o = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in x.unbind(2)), is_causal=True)
                o.backward(do.bfloat16())
            except RuntimeError as exc:
                print(f"B {b} {name}: {str(exc).splitlines()[0][:100]}")
                continue
            got = [o.detach()] + [t.transpose(1, 2) for t in x.grad.unbind(2)]
            err = [((g.double() - w).norm() / w.norm()).item() for g, w in zip(got, want)]
            print(f"B {b} {name}: o {err[0]:.2e} dq {err[1]:.2e} dk {err[2]:.2e} dv {err[3]:.2e}")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit(f"{sys.argv[0]}: needs a GPU (it compares packed and lone training as a GPU runs them)")
    if os.environ.get("SLAB_NO_CUDNN_SDP"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    if os.environ.get("SLAB_NO_REDUCED_BF16"):
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    if sys.argv[1] == "attention":
        attention()
    else:
        main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
