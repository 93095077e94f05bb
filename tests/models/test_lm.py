"""The LM shell and the four mixers: shapes, gradients, causality, exact counts, kernel paths agree."""

import math

import pytest
import torch

import kernels
from models.config import ModelConfig, count_params, hybrid_pattern
from models.lm import LM, MIXERS
from models.mixers.hgrn2 import HGRN2
from models.mixers.lightning import Lightning, lightning_slopes
from models.mixers.mamba2 import DT_MAX, DT_MIN, Mamba2
from models.mixers.softmax import rotary

ARCHS = ["softmax", "lightning", "hybrid", "hgrn2", "mamba2"]


def tiny(arch, d=32, layers=2, heads=2, vocab=260):
    return ModelConfig(arch, d, layers, heads, vocab, hybrid_pattern(2, layers) if arch == "hybrid" else "")


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_and_every_parameter_gets_a_gradient(arch):
    torch.manual_seed(0)
    model = LM(tiny(arch))
    x = torch.randint(0, 260, (2, 24))
    logits, loss = model(x, x)
    assert logits.shape == (2, 24, 260)
    assert math.isclose(loss.item(), math.log(260), rel_tol=0.05)  # small init: near-uniform predictions
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_rotary_scores_depend_on_relative_position_only():
    # One q and one k vector at every position, per head: after RoPE on (B, T, H, D) their dot product may
    # depend on the time offset alone, not on the absolute position or on the head.
    torch.manual_seed(0)
    b, t, h, d = 1, 12, 3, 8
    q = rotary(torch.randn(1, 1, h, d).expand(b, t, h, d))
    k = rotary(torch.randn(1, 1, h, d).expand(b, t, h, d))
    scores = torch.einsum("bihd,bjhd->bhij", q, k)[0]  # (H, T, T)
    for offset in (0, 1, 5):
        diag = torch.diagonal(scores, offset=-offset, dim1=-2, dim2=-1)  # score(i, i - offset), per head
        torch.testing.assert_close(diag, diag[:, :1].expand_as(diag), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scores[:, 5, 5], scores[:, 5, 0])  # it does depend on the offset


def test_residual_stream_kept_in_the_autocast_dtype():
    model = LM(tiny("softmax"))
    x = torch.randint(0, 260, (2, 8))
    assert model.trunk(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.trunk(x).dtype == torch.bfloat16
        _, loss = model(x, x)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("arch", ARCHS)
def test_causal(arch):
    torch.manual_seed(0)
    model = LM(tiny(arch)).eval()
    x = torch.randint(0, 260, (1, 40))
    t = 23
    y = x.clone()
    y[0, t] = (x[0, t] + 1) % 260
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(y)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])  # the change does reach later positions
    with torch.no_grad():
        last, _ = model(x, last_only=True)
    assert torch.allclose(last, a[:, -1:], atol=1e-6)


SHAPES = [(32, 2, 2), (64, 3, 4), (96, 4, 3)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_counts_equal_numel(arch, shape):
    d, layers, heads = shape
    pattern = hybrid_pattern("LS" if layers % 2 == 0 else "LLS", layers) if arch == "hybrid" else ""
    cfg = ModelConfig(arch, d, layers, heads, 260, pattern)
    model = LM(cfg)
    counts = count_params(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.nonembed == counts.total - model.embed.weight.numel() - model.head.weight.numel()
    assert counts.nonembed == model.num_params(nonembed=True)
    for i, kind in enumerate(cfg.layer_kinds):
        block = model.blocks[i]
        # Names match config.mixer_shapes up to nn.Linear's / nn.RMSNorm's ".weight".
        got = {n.removesuffix(".weight"): tuple(p.shape) for n, p in block.mixer.named_parameters()}
        assert got == cfg.mixer_shapes(kind)
        assert type(block.mixer) is MIXERS[kind]
        assert block.mlp.w1.weight.shape == (cfg.mlp_hidden(kind), d)


def test_hybrid_places_mixers_by_pattern():
    model = LM(ModelConfig("hybrid", 32, 4, 2, 260, "LLLS"))
    assert [type(b.mixer).__name__ for b in model.blocks] == ["Lightning"] * 3 + ["Softmax"]


def test_scaled_init_on_residual_projections():
    torch.manual_seed(0)
    layers = 8
    model = LM(ModelConfig("softmax", 256, layers, 4, 260))
    out_std = 0.02 / math.sqrt(2 * layers)
    assert model.blocks[0].mixer.wo.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert model.blocks[0].mlp.w2.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert model.blocks[0].mixer.wqkv.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_lightning_slopes_follow_minimax():
    h, layers = 8, 4
    s0, s_last = lightning_slopes(h, 0, layers), lightning_slopes(h, layers - 1, layers)
    assert s0[0].item() == pytest.approx(2 ** (-1) * (1 + 1e-5))
    assert s0[-1].item() == pytest.approx(2 ** (-8) * (1 + 1e-5))
    assert torch.all(s0[:-1] > s0[1:])  # later heads decay more slowly
    assert torch.allclose(s_last, 2.0 ** (-8 * torch.arange(1, h + 1) / h) * 1e-5)  # last layer barely decays
    assert torch.allclose(lightning_slopes(h, 0, 1), s0)  # one layer: no division by zero
    mixer = Lightning(ModelConfig("lightning", 32, layers, h // 4, 260), 1)
    assert torch.allclose(mixer.log_decay, -lightning_slopes(h // 4, 1, layers))
    assert "log_decay" not in mixer.state_dict()


def test_hgrn2_forget_gate_respects_layer_lower_bound(monkeypatch):
    cfg = ModelConfig("hgrn2", 32, 4, 2, 260)
    seen = {}
    real = kernels.linear_attention

    def spy(q, k, v, log_decay, **kw):
        seen["log_f"], seen["k"] = log_decay, k
        return real(q, k, v, log_decay, **kw)

    monkeypatch.setattr(kernels, "linear_attention", spy)
    for layer, gamma in [(0, 0.0), (3, 0.75)]:
        torch.manual_seed(0)
        mixer = HGRN2(cfg, layer)
        torch.nn.init.normal_(mixer.wf.weight, std=3.0)  # push gates towards both saturations
        mixer(torch.randn(2, 10, 32))
        f = seen["log_f"].exp()
        assert f.shape == (2, 10, 2, 16)
        assert f.min().item() >= gamma - 1e-6 and f.max().item() <= 1.0
        assert f.min().item() < gamma + 0.05  # the bound is reached, not just respected
        assert torch.allclose(seen["k"], 1 - f, atol=1e-6)


def test_mamba2_init_ranges():
    torch.manual_seed(0)
    mixer = Mamba2(ModelConfig("mamba2", 64, 2, 8, 260), 0)
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert dt.min() >= DT_MIN * 0.999 and dt.max() <= DT_MAX * 1.001
    a = mixer.A_log.exp()
    assert a.min() >= 1 and a.max() <= 16
    assert torch.all(mixer.D == 1)


@pytest.mark.parametrize("cls,arch,t,std", [(Lightning, "lightning", 70, None), (HGRN2, "hgrn2", 37, None),
                                            (Mamba2, "mamba2", 70, None)]
                         + [(c, a, t, 0.5) for c, a in ((Lightning, "lightning"), (HGRN2, "hgrn2"), (Mamba2, "mamba2"))
                            for t in (1, 17, 65)])
def test_chunked_path_equals_recurrent(cls, arch, t, std):
    """The kernels' chunked torch backend and its naive recurrence give the mixer the same output and input gradient,
    also at T = 1 and one past a chunk (16 per channel, 64 scalar) with weights (``std``) that give strong decays."""
    torch.manual_seed(0)
    mixer = cls(ModelConfig(arch, 32, 3, 2, 260), 1 if std is None else 0)
    for p in mixer.parameters() if std is not None else ():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=std)
    x = torch.randn(2, t, 32, requires_grad=True)
    outs, grads = [], []
    for backend in ("naive", "torch"):
        mixer.backend = backend
        y = mixer(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        outs.append(y.detach())
        grads.append(gx)
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-3)
