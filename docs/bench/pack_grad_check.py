"""One training step's loss and gradients of every member of a pack against the same model trained alone, on the
first batch, under the GPU's bf16 autocast: whether a pack of many members computes each member as it would alone.

    python docs/bench/pack_grad_check.py softmax 512 [MEMBERS]     # on a GPU; seconds

Prints per member the relative difference of its loss and of its whole gradient (packed against alone); the same
numbers for a second lone computation give the noise floor (cuDNN attention's backward is not deterministic).
"""

import sys

import torch
from torch.func import stack_module_state

from models.data import Batches, open_data
from models.evals import autocast
from models.packed import stack_layers, stacked_losses
from models.lm import LM
from models.train import build_model, model_config
from sweep.plan import load_plan


def main(arch: str, d_model: int, members: int | None) -> None:
    """Print each member's loss and gradient difference, packed against alone, and alone against alone."""
    specs = [r.spec for r in load_plan("plans/pack-grid.csv").runs if r.spec.arch == arch and r.spec.d_model == d_model]
    specs = specs[:members] if members else specs
    device = torch.device("cuda")
    cfg = model_config(specs[0])
    data = open_data(specs[0].data, specs[0].vocab_size)
    batches = [Batches(data, s.seq_len, s.batch_size, seed=s.seed).next() for s in specs]

    def alone(i):
        model = build_model(cfg, specs[i].seed, device)
        x, y = (t.to(device) for t in batches[i])
        with autocast(device):
            _, loss = model(x, y)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten().float() for _, p in model.named_parameters()])

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
    print("member lr seed | loss rel diff packed, again | grad rel diff packed, again")
    for i, s in enumerate(specs):
        (l1, g1), (l2, g2) = alone(i), alone(i)
        gp = torch.cat([params[k].grad[i].flatten().float() for k in names])
        rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
        print(i, s.lr, s.seed, "|", f"{abs(losses[i].item() / l1 - 1):.2e} {abs(l2 / l1 - 1):.2e}", "|",
              f"{rel(gp, g1):.2e} {rel(g2, g1):.2e}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
