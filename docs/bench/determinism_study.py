"""Where run-to-run differences of GPU training come from: the linear-attention kernels, the model's gradients
(eager and compiled), and 20 seeded training steps run twice (docs/bench/kernels.md, third H200 session of
2026-12-03). GPU only.

    python docs/bench/determinism_study.py kernels model compiled train

kernels: each decay form's forward and backward run eight times on one input, compared bit for bit with the first
run. model / compiled: the 135M model's loss and every parameter's gradient, three runs on one batch (softmax and
lightning eager; lightning under torch.compile), naming the differing parameters nearest the output. train: the
per-step losses of two seeded 20-step trainings (lightning and softmax eager, lightning under CUDA graphs).
"""

import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import kernels

T0 = time.time()


def log(*parts) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *parts, flush=True)


def kernel_check(form: str, B: int, T: int, H: int, D: int, reps: int = 8) -> None:
    """Run the Triton kernels' forward and backward `reps` times on one input; report any output that changes."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", generator=g).mul(0.5).to(torch.bfloat16).requires_grad_()
               for _ in range(3))
    learned = form != "fixed"
    if form in ("fixed", "constant"):
        a = -torch.rand(H, device="cuda", generator=g) * 0.2
    elif form == "token":
        a = F.logsigmoid(torch.randn(B, T, H, device="cuda", generator=g) + 3)
    else:
        a = F.logsigmoid(torch.randn(B, T, H, D, device="cuda", generator=g) + 3)
    a = a.requires_grad_(learned)
    do = torch.randn(B, T, H, D, device="cuda", generator=g).to(torch.bfloat16)
    ref, worst = None, {}
    for _ in range(reps):
        for x in (q, k, v, a):
            x.grad = None
        o, _ = kernels.linear_attention(q, k, v, a, backend="triton")
        o.backward(do)
        outs = dict(o=o.detach().clone(), dq=q.grad.clone(), dk=k.grad.clone(), dv=v.grad.clone())
        if learned:
            outs["da"] = a.grad.clone()
        if ref is None:
            ref = outs
            continue
        for n, x in outs.items():
            d = (x.float() - ref[n].float()).abs().max().item()
            if d:
                worst[n] = max(worst.get(n, 0), d)
    log(f"kernel {form} B{B} T{T} H{H} D{D}: {'bitwise identical' if not worst else 'DIFFERS ' + str(worst)}")


def model_check(arch: str, kernels_mode: str, compiled: bool = False, reps: int = 3) -> None:
    """The 135M model's loss and gradients on one batch, `reps` times; which parameters' gradients change."""
    from models.config import ModelConfig
    from models.lm import LM

    torch.manual_seed(0)
    model = LM(ModelConfig(arch, 768, 12, 12, 32000, ""), kernels=kernels_mode).cuda()
    fn = torch.compile(model) if compiled else model
    g = torch.Generator(device="cuda").manual_seed(1)
    idx = torch.randint(0, 32000, (16, 2048), device="cuda", generator=g)
    tgt = torch.randint(0, 32000, (16, 2048), device="cuda", generator=g)
    ref = None
    order = [n for n, _ in model.named_parameters()]
    for r in range(reps):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = fn(idx, tgt)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        grads["<loss>"] = loss.detach().reshape(1).clone()
        if ref is None:
            ref = grads
            continue
        diffs = {n: (x.float() - ref[n].float()).abs().max().item() for n, x in grads.items()}
        bad = {n: d for n, d in diffs.items() if d}
        # Backward runs from the output down: the differing parameter nearest the output is where it starts.
        first = [n for n in reversed(order) if n in bad][:4]
        log(f"model {arch} kernels={kernels_mode} compiled={compiled} rep {r}: {len(bad)} of {len(diffs)} differ;"
            f" loss diff {diffs['<loss>']:.3g}; nearest the output: {[(n, f'{bad[n]:.3g}') for n in first]}")


def train_check(arch: str, mode, steps: int = 20, reps: int = 2) -> None:
    """Two seeded trainings of the 135M model (32k tokens per step); their per-step losses and the first that differs."""
    from models.bench import bench_spec
    from models.train import pretrain

    spec = bench_spec(arch, "135M", 2048, 16, steps)
    runs = []
    for r in range(reps):
        losses = []

        def report(kind, payload):
            if kind == "train":
                losses.append(payload["loss"])

        with tempfile.TemporaryDirectory() as ckpt:
            pretrain(spec, report, ckpt, device="cuda", compile=mode, ckpt_every_steps=10**9, ckpt_every_s=1e9,
                     overlap_readback=False)
        runs.append(losses)
        log(f"train {arch} compile={mode} rep {r}: " + " ".join(f"{x:.4f}" for x in losses))
    first = next((i for i, (x, y) in enumerate(zip(*runs)) if x != y), None)
    log(f"train {arch} compile={mode}: first differing step index {first}")


PARTS = ("kernels", "model", "compiled", "train")

if __name__ == "__main__":
    parts = sys.argv[1:] or list(PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        sys.exit(f"determinism_study: unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
    if not torch.cuda.is_available():
        sys.exit("determinism_study: needs a CUDA GPU (it measures GPU run-to-run differences)")
    if "kernels" in parts:
        for form in ("fixed", "constant", "token", "channel"):
            kernel_check(form, 16, 2048, 12, 64)
        kernel_check("fixed", 4, 8192, 8, 128)
        kernel_check("channel", 4, 8192, 8, 128)
    if "model" in parts:
        model_check("softmax", "loss")
        model_check("lightning", "loss")
        model_check("lightning", "torch")
    if "compiled" in parts:
        model_check("lightning", "loss", compiled=True)
    if "train" in parts:
        train_check("lightning", False)
        train_check("softmax", False)
        train_check("lightning", "reduce-overhead")
