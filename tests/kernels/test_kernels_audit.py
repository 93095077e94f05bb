"""Defects found by an audit of kernels/, each test seen failing before its fix."""

from __future__ import annotations

import pytest
import torch

from kernels.compare import rel_err
from kernels.linear_attention import linear_attention

#: Relative error allowed for fp16 inputs, as in test_linear_attention.py.
FP16_TOL = 5e-3


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("form", ["constant", "token"])
def test_triton_fake_outputs_match_the_real_ones_in_bf16(form, packed):
    """torch.compile plans with the custom op's fake outputs: they must have the real ones' dtypes. Before, for 16-bit
    inputs and scalar decays the fake gave the (empty) per-channel bookkeeping bl and strong q's dtype where the op
    returns fp32 (opcheck: "mismatched tensor metadata for output[7]")."""
    from kernels.linear_attention import triton_chunk as tc

    B, T, H, K = 1, 5, 2, 16
    a = -torch.rand((H,) if form == "constant" else (B, T, H))
    if packed:
        op, args = tc._packed_fwd_op, (torch.randn(B, T, 3, H, K, dtype=torch.bfloat16), a, None, 0.25)
    else:
        q, k, v = (torch.randn(B, T, H, K, dtype=torch.bfloat16) for _ in range(3))
        op, args = tc._fwd_op, (q, k, v, a, None, 0.25)
    torch.library.opcheck(op, args, test_utils=("test_faketensor",))


def _fp16_big_state_inputs(form, big):
    """fp16 inputs whose state (big="state": k, v ~ 35 over 64 tokens, no decay) or state gradient (big="dstate": a
    final-state gradient ~ 1e5) passes fp16's 65504, while o and every gradient stay well inside it."""
    g = torch.Generator().manual_seed(0)
    B, T, H, K = 1, 80, 2, 16
    small, large = 1e-3, 35.0
    if big == "state":
        q = torch.rand(B, T, H, K, generator=g) * small
        k = large + 5 * torch.rand(B, T, H, K, generator=g)
        v = large + 5 * torch.rand(B, T, H, K, generator=g)
        do = torch.randn(B, T, H, K, generator=g) * small
        dht = torch.randn(B, H, K, K, generator=g)
    else:
        q = torch.rand(B, T, H, K, generator=g)
        k = torch.rand(B, T, H, K, generator=g) * small
        v = torch.rand(B, T, H, K, generator=g) * small
        do = torch.randn(B, T, H, K, generator=g)
        dht = 1e5 * (1 + torch.rand(B, H, K, K, generator=g))
    a = torch.zeros((H,) if form == "constant" else (B, T, H))
    a[..., 1] = -0.01  # the second head decays a little
    h0 = torch.zeros(B, H, K, K)
    return [x.half() for x in (q, k, v)], a, h0, do, dht


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("big", ["state", "dstate"])
@pytest.mark.parametrize("form", ["constant", "token"])
def test_triton_fp16_state_beyond_fp16_range(monkeypatch, form, big, fused):
    """fp16 inputs keep their states in fp32 (`_Plan.state_dtype`) because a state can pass fp16's range where the
    output does not: a decay near 1 over a long sequence (lightning's last layers). Before, the scalar decays' kernels
    (chunked and fused) still rounded the state (and its gradient) to fp16 for the dots with q (do, k, v), which made
    o, dq (or dk, dv) inf/NaN where naive's are finite; per channel already took them in fp32."""
    from kernels.linear_attention import triton_chunk as tc

    monkeypatch.setattr(tc, "FUSED_MIN_HEADS_PER_SM", 0 if fused else None)
    (q, k, v), a, h0, do, dht = _fp16_big_state_inputs(form, big)
    results = []
    for backend in ("naive", "triton"):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, h0)]
        o, s = linear_attention(*leaves[:3], a, initial_state=leaves[3], output_final_state=True, backend=backend)
        ((o.float() * do).sum() + (s * dht).sum()).backward()
        results.append([o.detach(), s.detach()] + [x.grad for x in leaves])
    # The premise: the state (or its gradient) passes fp16's range, the results do not.
    ref_state = results[0][1] if big == "state" else results[0][5]
    assert ref_state.abs().max() > 65504
    for name, got, ref in zip(("o", "state", "dq", "dk", "dv", "dh0"), results[1], results[0]):
        if name not in ("state", "dh0"):  # fp16 outputs; the state and dh0 come in fp32
            assert ref.float().abs().max() < 6e4, name
        assert torch.isfinite(got).all() and rel_err(got, ref) <= FP16_TOL, f"{name}: {rel_err(got, ref)}"


def test_triton_ops_under_vmap_when_only_a_later_argument_is_batched():
    """`kernels.dispatch.eager_or_op` sends calls under functorch to the custom ops (which vmap), else to a plain
    autograd Function (which cannot). Before, it looked at the first argument only: vmap over a norm's weight, SwiGLU's
    b or a linear attention's decay (the first argument shared) raised "In order to use an autograd.Function with
    functorch transforms ... it must override the setup_context staticmethod"."""
    from torch.func import vmap

    from kernels.fused import gated_rms_norm, rms_norm, swiglu

    g = torch.Generator().manual_seed(0)
    x, gate = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    w, b = torch.randn(3, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    cases = [
        (lambda wi, backend: rms_norm(x, wi, backend=backend), w),
        (lambda wi, backend: gated_rms_norm(x, gate, wi, backend=backend), w),
        (lambda bi, backend: swiglu(x, bi, backend=backend), b),
    ]
    q, k, v = (torch.randn(1, 10, 2, 16, generator=g) for _ in range(3))
    decays = -torch.rand(3, 2, generator=g)
    cases.append((lambda ai, backend: linear_attention(q, k, v, ai, backend=backend)[0], decays))
    for fn, batched in cases:
        leaf = batched.clone().requires_grad_()
        got = vmap(lambda t: fn(t, "triton"))(leaf)
        got.square().sum().backward()
        ref_leaf = batched.clone().requires_grad_()
        ref = torch.stack([fn(t, "torch") for t in ref_leaf])
        ref.square().sum().backward()
        assert rel_err(got, ref) <= 1e-5 and rel_err(leaf.grad, ref_leaf.grad) <= 1e-4
