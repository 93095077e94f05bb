"""The FlashAttention 4 wrapper (kernels.flash_attention) on the CPU: FA4 itself needs a Hopper GPU, so its two entry
points are stood in for by exact attention in fp32, which checks what the wrapper hands them and gives back (layouts,
the saved output and log-sum-exp, the custom ops' fakes) and that the softmax mixer takes it only where usable. The
GPU check of FA4 itself against fp32 math is docs/bench/fa4_study.py micro."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import kernels.flash_attention as fa
import models.mixers.softmax as sm
from models.config import ModelConfig
from tests.kernels.conftest import assert_broken_install_warns_once, assert_matches_reference


def _math(q, k, v):
    """Causal attention of (B, T, H, D) in fp32: the output and the rows' log-sum-exp (B, H, T)."""
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))
    t = q.shape[1]
    s = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    lse = s.logsumexp(-1)
    return ((s - lse[..., None]).exp() @ vf).transpose(1, 2), lse


@pytest.fixture
def fake_fa4(monkeypatch):
    """FA4's interface, stood in for by _math; counts its calls and checks what the backward is handed."""
    calls = {"fwd": 0, "bwd": 0}

    def fwd(q, k, v, causal, return_lse):
        assert causal and return_lse and all(x.is_contiguous() for x in (q, k, v))
        calls["fwd"] += 1
        out, lse = _math(q, k, v)
        return out.to(q.dtype).contiguous(), lse, None, None, None  # FA4 writes a new (B, T, H, D) output

    def bwd(q, k, v, out, dout, lse, causal):
        assert causal and dout.is_contiguous()
        calls["bwd"] += 1
        ref_out, ref_lse = _math(q, k, v)
        # The backward must get the forward's own output and log-sum-exp, in that order.
        torch.testing.assert_close(out.float(), ref_out)
        torch.testing.assert_close(lse, ref_lse)
        # Attention's gradients by hand (autograd does not record inside a custom op's body).
        qf, kf, vf, of, do = (x.float().transpose(1, 2) for x in (q, k, v, out, dout))
        t, scale = q.shape[1], 1 / math.sqrt(q.shape[-1])
        s = (qf @ kf.transpose(-1, -2) * scale).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        p = (s - lse[..., None]).exp()
        ds = p * (do @ vf.transpose(-1, -2) - (do * of).sum(-1, keepdim=True))
        grads = (ds @ kf * scale, ds.transpose(-1, -2) @ qf * scale, p.transpose(-1, -2) @ do)
        return tuple(g.transpose(1, 2).to(x.dtype).contiguous() for g, x in zip(grads, (q, k, v)))

    monkeypatch.setattr(fa, "_interface", lambda: SimpleNamespace(_flash_attn_fwd=fwd, _flash_attn_bwd=bwd))
    return calls


def _qkv(B=2, T=9, H=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=g).requires_grad_() for _ in range(3)]


def _sdpa_bthd(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


def test_flash4_is_not_taken_off_a_hopper_gpu():
    q = torch.randn(1, 4, 2, 64, dtype=torch.bfloat16)
    assert not fa.flash4_usable(q)
    assert sm.attention_backend("cpu") == "sdpa"


@pytest.mark.parametrize("compiled", [False, True])
def test_flash4_attention_matches_sdpa_in_output_and_gradients(fake_fa4, compiled):
    q, k, v = _qkv()
    dy = torch.randn_like(q)
    # Strided views, as the mixer hands them: the wrapper makes them contiguous for FA4.
    views = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    assert_matches_reference(fa.flash4_attention, views, (q, k, v), dy, _sdpa_bthd(q, k, v), compiled)
    assert fake_fa4 == {"fwd": 1, "bwd": 1}


def test_flash4_ops_fakes_match(fake_fa4):
    q, k, v = (x.detach() for x in _qkv())
    torch.library.opcheck(fa.flash4_forward, (q, k, v), test_utils=("test_schema", "test_faketensor"))
    out, lse = fa.flash4_forward(q, k, v)
    torch.library.opcheck(fa.flash4_backward, (q, k, v, out, lse, torch.randn_like(out)),
                          test_utils=("test_schema", "test_faketensor"))


def test_softmax_mixer_takes_flash4_only_where_usable(fake_fa4, monkeypatch):
    cfg = ModelConfig("softmax", 32, 1, 4, 64)
    torch.manual_seed(0)
    mixer = sm.Softmax(cfg, 0)
    x = torch.randn(2, 7, 32)
    y_sdpa = mixer(x)
    g_sdpa = torch.autograd.grad(y_sdpa.sum(), mixer.wqkv.weight)[0]
    assert fake_fa4 == {"fwd": 0, "bwd": 0}  # off a Hopper GPU: SDPA
    monkeypatch.setattr(sm, "flash4_usable", lambda q: True)
    y = mixer(x)
    g = torch.autograd.grad(y.sum(), mixer.wqkv.weight)[0]
    assert fake_fa4 == {"fwd": 1, "bwd": 1}
    torch.testing.assert_close(y, y_sdpa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, g_sdpa, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("installed", [True, False])
def test_the_gate_is_a_constant_to_torch_compile(fake_fa4, monkeypatch, installed):
    # On a GPU the gate runs while torch.compile traces the mixer: a graph break there would split every softmax layer.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    if not installed:
        monkeypatch.setattr(fa, "_interface", lambda: None)
    torch._dynamo.reset()  # the gate's value is baked into the graph unguarded: a fresh trace for each case
    fn = torch.compile(lambda x: x + 1 if fa._ready(0) else x - 1, backend="eager", fullgraph=True)
    assert fn(torch.zeros(2)).tolist() == ([1.0, 1.0] if installed else [-1.0, -1.0])


def test_an_installed_fa4_that_does_not_import_is_said_once(monkeypatch, caplog):
    assert_broken_install_warns_once(monkeypatch, caplog, fa._interface, "flash_attn.cute", "kernels.flash_attention")


def test_fa4_not_installed_is_no_warning(monkeypatch, caplog):
    import importlib.util

    fa._interface.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    try:
        with caplog.at_level("DEBUG", logger="kernels.flash_attention"):
            assert fa._interface() is None
    finally:
        fa._interface.cache_clear()
    assert not caplog.records


def test_fa4_compile_warning_about_aux_data_is_silenced_and_no_other(monkeypatch):
    import importlib.util
    import sys
    import warnings

    interface = SimpleNamespace()
    monkeypatch.setitem(sys.modules, "flash_attn", SimpleNamespace(__path__=[]))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", SimpleNamespace(interface=interface))
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", interface)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.delenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", raising=False)  # the wrapper sets it; undone after
    fa._interface.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as seen:  # restores the filters the wrapper adds
            warnings.simplefilter("always")
            assert fa._interface() is interface
            warnings.warn("Argument aux_data (position 17) cannot be converted to a JitArgument for function 'x'",
                          UserWarning)
            warnings.warn("Argument scale (position 3) cannot be converted to a JitArgument", UserWarning)
    finally:
        fa._interface.cache_clear()
    assert [str(w.message) for w in seen] == ["Argument scale (position 3) cannot be converted to a JitArgument"]
