"""GPU check of two guards (2026-12-05): the Triton loss's NaN for a target outside [0, V), and linear attention over
more than 65535 (batch x heads) pairs run in pieces, against the torch backend. Run on a GPU:
    python docs/bench/grid_and_ce_check.py
"""
import torch

from kernels import linear_attention
from kernels.fused import linear_cross_entropy


def rel(x, y):
    return ((x.float() - y.float()).abs().max() / y.float().abs().max()).item()


def main():
    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(64, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1000, 128, device=dev, dtype=torch.bfloat16) * 0.05
    t = torch.randint(0, 1000, (64,), device=dev)
    t[3] = 1000
    loss = linear_cross_entropy(x, w, t, backend="triton")
    loss.backward()
    print("ce: target 1000 of V 1000: loss", loss.item(), "row's gradient NaN", x.grad[3].isnan().all().item(),
          "other rows finite", x.grad[[0, 1, 2, 4]].isfinite().all().item())
    B, T, H, K = 70000, 64, 1, 16
    for form in ("constant", "token", "channel"):
        q, k, v = (torch.randn(B, T, H, K, device=dev, dtype=torch.bfloat16) for _ in range(3))
        a = {"constant": -torch.rand(H, device=dev), "token": -0.5 * torch.rand(B, T, H, device=dev),
             "channel": -0.5 * torch.rand(B, T, H, K, device=dev)}[form]
        q.requires_grad_()
        o, _ = linear_attention(q, k, v, a, backend="triton")
        o.float().sum().backward()
        dq, q.grad = q.grad.clone(), None
        o2, _ = linear_attention(q, k, v, a, backend="torch")
        o2.float().sum().backward()
        print(f"linear attention {form}: B x H = {B * H}, relative error against torch: o {rel(o, o2):.2e}, "
              f"dq {rel(dq, q.grad):.2e}")


if __name__ == "__main__":
    main()
