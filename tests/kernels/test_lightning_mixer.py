"""Lightning's mixer as one op (kernels.lightning_mixer) on the CPU: quack's SiLU GEMM stood in for by fp32 math
(test_gemm_epilogue's fake), the packed linear-attention kernels and the gated norm under the Triton interpreter. Checks
that the op, its own backward (the gate's and q, k, v's gradients in one buffer, one GEMM each for the input's and the
weights' gradients) and the LM that takes it compute what the plain mixer does."""

from __future__ import annotations

import pytest
import torch

import kernels.gemm_epilogue as ge
import kernels.lightning_mixer as lmix
import models.lm as lm
import models.mixers.lightning as lt
from kernels.fused.triton_norm import gated_rms_norm_backward, gated_rms_norm_forward
from models.config import ModelConfig
from tests.kernels.conftest import assert_matches_reference
from tests.kernels.test_gemm_epilogue import fake_quack_module


@pytest.fixture
def fake_quack(monkeypatch):
    """quack's GEMMs in fp32 math (test_gemm_epilogue's stand-in); their calls."""
    calls = {"act": 0, "dact": 0}
    quack = fake_quack_module(calls)
    monkeypatch.setattr(ge, "_quack", lambda: quack)
    return calls


def _inputs(b=2, t=70, heads=2, dh=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = heads * dh
    x = torch.randn(b, t, d, generator=g).requires_grad_()
    wqkv = (torch.randn(3 * d, d, generator=g) / d ** 0.5).requires_grad_()
    wgate = (torch.randn(d, d, generator=g) / d ** 0.5).requires_grad_()
    norm_w = (1 + 0.1 * torch.randn(d, generator=g)).requires_grad_()
    log_decay = -torch.rand(heads, generator=g) * 0.5
    return x, wqkv, wgate, norm_w, log_decay, torch.randn(b, t, d, generator=g)


@pytest.mark.parametrize("compiled", [False, True])
def test_lightning_mix_matches_the_plain_mixer_in_output_and_gradients(fake_quack, compiled):
    x, wqkv, wgate, norm_w, log_decay, dy = _inputs()
    args = (x, wqkv, wgate, norm_w, log_decay, 1e-6)
    leaves = (x, wqkv, wgate, norm_w)
    # The packed kernels in fp32 against the naive recurrence: within 1e-5 (assert_matches_reference's bound).
    assert_matches_reference(lmix.lightning_mix, args, leaves, dy, lmix.lightning_mix_reference(*args), compiled)
    assert fake_quack["act"] == 1


def test_gated_norm_writes_the_gate_gradient_into_a_slice_of_a_wider_buffer():
    """The backward kernel's dgate rows may lie further apart than d (the mixer's (M, 4d) buffer): the same values as
    its own dgate, and the buffer's other columns untouched."""
    g = torch.Generator().manual_seed(3)
    m, d = 37, 48
    x, gate, dy = (torch.randn(m, d, generator=g) for _ in range(3))
    w = 1 + 0.1 * torch.randn(d, generator=g)
    _, rstd = gated_rms_norm_forward(x, gate, w, 1e-6)
    xs, gs, ws = (t.clone().requires_grad_() for t in (x, gate, w))
    ref = torch.sigmoid(gs) * torch.nn.functional.rms_norm(xs, (d,), ws, 1e-6)
    dx_ref, dg_ref, dw_ref = torch.autograd.grad(ref, (xs, gs, ws), dy)
    buf = torch.full((m, 4 * d), 7.0)
    dx, dw = gated_rms_norm_backward(dy, x, gate, w, rstd, buf[:, 3 * d:])
    for got, want in ((dx, dx_ref), (buf[:, 3 * d:], dg_ref), (dw, dw_ref)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (buf[:, :3 * d] == 7.0).all()
    with pytest.raises(ValueError, match="contiguous rows"):
        gated_rms_norm_backward(dy, x, gate, w, rstd, buf[:, 3 * d:].T.contiguous().T)


def test_lightning_mix_fakes_match(fake_quack):
    x, wqkv, wgate, norm_w, log_decay, dy = (t.detach() for t in _inputs(t=20))
    scale = 16 ** -0.5
    torch.library.opcheck(lmix.lightning_mix_op, (x, wqkv, wgate, norm_w, log_decay, scale, 1e-6),
                          test_utils=("test_schema", "test_faketensor"))
    _, *saved = lmix.lightning_mix_op(x, wqkv, wgate, norm_w, log_decay, scale, 1e-6)
    torch.library.opcheck(lmix.lightning_mix_backward_op, (x, wqkv, wgate, norm_w, log_decay, *saved, dy, scale),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("compiled", [False, True])
def test_lm_with_the_one_op_mixer_trains_as_the_plain_lm(fake_quack, monkeypatch, compiled):
    """Under "gemm" with Lightning.one_op, each lightning layer runs the one op (the hybrid's softmax layer does not),
    and the loss and every parameter's gradient match the plain LM's."""
    cfg = ModelConfig("hybrid", 32, 2, 2, 64, "LS")
    torch.manual_seed(0)
    plain = lm.LM(cfg)
    fused = lm.LM(cfg, kernels="gemm")
    fused.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    _, loss_ref = plain(idx, idx)
    g_ref = torch.autograd.grad(loss_ref, list(plain.parameters()))
    calls = []
    monkeypatch.setattr(lt.Lightning, "one_op", True)
    monkeypatch.setattr(lmix, "mixer_usable", lambda x, log_decay: calls.append(x.shape) or True)
    torch._dynamo.reset()
    run = torch.compile(fused, backend="aot_eager", fullgraph=True) if compiled else fused
    _, loss = run(idx, idx)
    g = torch.autograd.grad(loss, list(fused.parameters()))
    assert calls == [(2, 24, 32)] and fake_quack["act"] == 1
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    for (name, _), a, b in zip(plain.named_parameters(), g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
