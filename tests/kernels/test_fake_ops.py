"""The custom ops' fake (shape-only) implementations, which torch.compile plans with, against the real outputs: same
shapes, dtypes and strides, for every op and each case that changes what it returns (torch.library.opcheck)."""

from __future__ import annotations

import pytest
import torch

from kernels.fused import triton_ce, triton_norm, triton_swiglu
from kernels.linear_attention import triton_chunk as tc

FAKE = ("test_faketensor",)


def _decay(form, B, T, H, K):
    shape = {"constant": (H,), "token": (B, T, H), "channel": (B, T, H, K)}[form]
    return -torch.rand(shape) * 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["constant", "token", "channel"])
def test_linear_attention_ops_fakes_match(form, dtype):
    B, T, H, K, V = 1, 70, 2, 16, 32  # two chunks, the second cut
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, T, H, K, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g).to(dtype)
    a, h0 = _decay(form, B, T, H, K), torch.randn(B, H, K, V, generator=g)
    torch.library.opcheck(tc._fwd_op, (q, k, v, a, h0, 0.25), test_utils=FAKE)
    o, ht, *made = tc._fwd_op(q, k, v, a, h0, 0.25)
    do, dfinal = torch.randn_like(o), torch.randn_like(ht)
    for need_da, need_dh0 in ((form != "constant", True), (False, False)):
        torch.library.opcheck(tc._bwd_op, (q, k, v, a, h0, *made, do, dfinal, 0.25, need_da, need_dh0), test_utils=FAKE)


@pytest.mark.parametrize("form", ["constant", "token"])
def test_packed_linear_attention_ops_fakes_match(form):
    B, T, H, K = 1, 70, 2, 16
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T, 3, H, K, generator=g).to(torch.bfloat16)
    a, h0 = _decay(form, B, T, H, K), torch.randn(B, H, K, K, generator=g)
    torch.library.opcheck(tc._packed_fwd_op, (qkv, a, h0, 0.25), test_utils=FAKE)
    o, ht, A, b, *_ = tc._packed_fwd_op(qkv, a, h0, 0.25)
    args = (qkv, a, h0, A, b, torch.randn_like(o), torch.randn_like(ht), 0.25, form != "constant", True)
    torch.library.opcheck(tc._packed_bwd_op, args, test_utils=FAKE)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ops_fakes_match(dtype, gated):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 32, generator=g).to(dtype), (1 + torch.randn(32, generator=g)).to(dtype)
    gate = torch.randn(6, 32, generator=g).to(dtype) if gated else None
    torch.library.opcheck(triton_norm._rms_norm_fwd, (x, w, gate, 1e-6), test_utils=FAKE)
    y, rstd = triton_norm._rms_norm_fwd(x, w, gate, 1e-6)
    torch.library.opcheck(triton_norm._rms_norm_bwd, (torch.randn_like(y), x, w, gate, rstd), test_utils=FAKE)
    a, b = torch.randn(6, 32, generator=g).to(dtype), torch.randn(6, 32, generator=g).to(dtype)
    torch.library.opcheck(triton_swiglu._swiglu_fwd, (a, b), test_utils=FAKE)
    torch.library.opcheck(triton_swiglu._swiglu_bwd, (torch.randn_like(a), a, b), test_utils=FAKE)
    W = torch.randn(50, 32, generator=g).to(dtype)
    targets = torch.tensor([1, 4, -100, 49, 0, 7])
    for need_dx, need_dw in ((True, True), (False, False)):
        torch.library.opcheck(triton_ce._linear_ce_fwd, (x, W, targets, -100, 4, need_dx, need_dw), test_utils=FAKE)
