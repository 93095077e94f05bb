"""Audit of the sequence mixers against REFERENCES.md section 3, written from the formulas there, independently of
the modules: causality for every arch and hybrid, chunked vs recurrent paths, each mixer against its own paper
recurrence, hybrid layer placement, and config.py's head/state dims, parameter counts and FLOPs vs the built modules."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from models.config import (
    ModelConfig,
    count_params,
    flops_per_token,
    hybrid_pattern,
    hybrid_period,
    mixer_flops_per_token,
)
from models.lm import LM
from models.mixers import HGRN2, Lightning, Mamba2, Softmax

VOCAB = 260


def _cfg(arch, d=32, layers=4, heads=2, pattern=""):
    return ModelConfig(arch, d, layers, heads, VOCAB, pattern)


# ---------------------------------------------------------------------------------------------------- causality
CAUSAL_CASES = [
    ("softmax", ""),
    ("lightning", ""),
    ("hgrn2", ""),
    ("mamba2", ""),
    ("hybrid", "LLLS"),  # MiniMax's placement: softmax last in each period
    ("hybrid", "SLLL"),  # softmax first: its mixing feeds the linear layers after it
]


@pytest.mark.parametrize("arch,pattern", CAUSAL_CASES)
def test_no_position_sees_a_later_token_across_chunk_boundaries(arch, pattern):
    """Perturb one token at positions on and around the kernels' chunk edges (16 per channel, 64 scalar) at T = 70:
    every earlier logit stays bit-identical and the perturbed position's own logits change."""
    torch.manual_seed(0)
    model = LM(_cfg(arch, pattern=pattern)).eval()
    x = torch.randint(0, VOCAB, (2, 70))
    with torch.no_grad():
        base, _ = model(x)
        for t in (0, 15, 16, 40, 63, 64, 69):
            y = x.clone()
            y[:, t] = (y[:, t] + 11) % VOCAB
            out, _ = model(y)
            assert torch.equal(out[:, :t], base[:, :t]), (arch, pattern, t)
            assert not torch.allclose(out[:, t], base[:, t]), (arch, pattern, t)


@pytest.mark.parametrize("arch,pattern", CAUSAL_CASES)
def test_one_token_sequence_matches_the_first_position_of_a_long_one(arch, pattern):
    """T = 1 through the whole LM gives the first position of any longer sequence (no padding leaks into it)."""
    torch.manual_seed(0)
    model = LM(_cfg(arch, pattern=pattern)).eval()
    x = torch.randint(0, VOCAB, (2, 33))
    with torch.no_grad():
        one, _ = model(x[:, :1])
        full, _ = model(x)
    torch.testing.assert_close(one, full[:, :1], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------- each mixer against its paper formula
def _in_float64(cls, arch, d, layers, heads, layer, t):
    """A float64 mixer on its naive recurrence, weights large enough for strong gates, and an input of T = ``t``."""
    torch.manual_seed(0)
    mixer = cls(_cfg(arch, d=d, layers=layers, heads=heads), layer).double()
    mixer.backend = "naive"
    for p in mixer.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.3)
    return mixer, torch.randn(2, t, d, dtype=torch.float64)


def _rms(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def _recurrence(q, k, v, decay):
    """S_t = diag(decay_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t for (B, T, H, K|V) inputs, decay broadcast to (B, T, H, K)."""
    b, t, h, dk = q.shape
    state = torch.zeros(b, h, dk, v.shape[-1], dtype=torch.float64)
    out = []
    for i in range(t):
        state = decay[:, i, :, :, None] * state + k[:, i, :, :, None] * v[:, i, :, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, i], state))
    return torch.stack(out, 1)


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_lightning_is_minimax_recurrence_with_alibi_slopes_scaled_by_depth(layer):
    """MiniMax-01: q, k, v = SiLU(joint projection), S_t = lambda S_{t-1} + k^T v, o = q S, out = wo(sigmoid(wgate x) *
    RMSNorm(o)); lambda_{j,l} = exp(-2^(-8j/H) (1 - l/(L-1) + 1e-5)), j = 1..H."""
    d, layers, h = 32, 4, 4
    mixer, x = _in_float64(Lightning, "lightning", d, layers, h, layer, 21)
    dh = d // h
    q, k, v = F.silu(x @ mixer.wqkv.weight.T).view(2, 21, 3, h, dh).unbind(2)
    j = torch.arange(1, h + 1, dtype=torch.float64)
    lam = torch.exp(-(2.0 ** (-8 * j / h)) * (1 - layer / (layers - 1) + 1e-5))
    o = _recurrence(q, k, v, lam.view(1, 1, h, 1).expand(2, 21, h, dh)).reshape(2, 21, d)
    want = (torch.sigmoid(x @ mixer.wgate.weight.T) * _rms(o, mixer.norm.weight)) @ mixer.wo.weight.T
    torch.testing.assert_close(mixer(x).double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_hgrn2_is_its_paper_recurrence_with_layer_lower_bound_and_state_expansion(layer):
    """HGRN2: f = gamma_l + (1 - gamma_l) sigmoid(wf x) per key channel, k = 1 - f, q = SiLU(wq x), v = wi x,
    S_t = Diag(f_t) S_{t-1} + k_t^T v_t (key width per head d / H), o = q S, out = wo(RMSNorm(o)); gamma_l = l / L is
    the paper's learned bound at its init (softmax of zeros: cumsum(P) - P_0)."""
    d, layers, h = 32, 4, 2
    mixer, x = _in_float64(HGRN2, "hgrn2", d, layers, h, layer, 19)
    p_layers = torch.full((layers,), 1.0 / layers, dtype=torch.float64)  # softmax over layers of a zero Gamma
    gamma = (p_layers.cumsum(0) - p_layers[0])[layer].item()
    assert gamma == pytest.approx(layer / layers)
    heads = (2, 19, h, d // h)
    f = gamma + (1 - gamma) * torch.sigmoid(x @ mixer.wf.weight.T)
    q, k, v = F.silu(x @ mixer.wq.weight.T), 1 - f, x @ mixer.wi.weight.T
    o = _recurrence(q.view(heads), k.view(heads), v.view(heads), f.view(heads)).reshape(2, 19, d)
    want = _rms(o, mixer.norm.weight) @ mixer.wo.weight.T
    torch.testing.assert_close(mixer(x).double(), want, atol=1e-5, rtol=1e-4)


def test_mamba2_is_the_ssd_recurrence_with_causal_conv_dt_a_and_d_skip():
    """Mamba2 / SSD: (z, x, B, C, dt) = in_proj; causal width-4 depthwise conv + SiLU on (x, B, C);
    dt = softplus(dt + bias), A = -exp(A_log); h_t = exp(dt A) h_{t-1} + B_t^T (dt x_t), y = C_t h_t + D x_t;
    out = out_proj(RMSNorm(y * SiLU(z))). The conv is written as an explicit sum over the current and 3 past steps."""
    torch.manual_seed(0)
    d, h = 32, 4
    cfg = _cfg("mamba2", d=d, layers=2, heads=h)
    mixer = Mamba2(cfg, 1).double()
    mixer.backend = "naive"
    with torch.no_grad():
        torch.nn.init.normal_(mixer.in_proj.weight, std=0.3)
        torch.nn.init.normal_(mixer.out_proj.weight, std=0.3)
        mixer.D.uniform_(0.5, 2.0)  # not all ones, so a D applied per head in the wrong order would show
    di, n, t = cfg.mamba_d_inner, cfg.mamba_d_state, 23
    p = di // h
    x = torch.randn(2, t, d, dtype=torch.float64)
    z, xbc, dt = (x @ mixer.in_proj.weight.T).split([di, di + 2 * n, h], -1)
    w = mixer.conv_weight[:, 0]  # (C, 4); tap 3 is the current step
    conv = mixer.conv_bias + sum(
        w[:, 3 - lag] * F.pad(xbc, (0, 0, lag, 0))[:, :t] for lag in range(4)
    )
    xs, bm, cm = F.silu(conv).split([di, n, n], -1)
    dt = F.softplus(dt + mixer.dt_bias)  # (B, T, H)
    a = -torch.exp(mixer.A_log)
    state = torch.zeros(2, h, n, p, dtype=torch.float64)
    ys = []
    xh = xs.view(2, t, h, p)
    for i in range(t):
        state = torch.exp(dt[:, i] * a)[:, :, None, None] * state + bm[:, i, None, :, None] * (
            dt[:, i, :, None, None] * xh[:, i, :, None, :]
        )
        ys.append(torch.einsum("bn,bhnp->bhp", cm[:, i], state) + mixer.D[:, None] * xh[:, i])
    y = torch.stack(ys, 1).reshape(2, t, di)
    want = _rms(y * F.silu(z), mixer.norm.weight) @ mixer.out_proj.weight.T
    torch.testing.assert_close(mixer(x).double(), want, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------- hybrid
def test_hybrid_puts_softmax_at_every_kth_layer_and_lightning_decays_by_global_depth():
    """A period of 8 is softmax at layers 8 and 16 (1-based) of 16; a pattern repeats over the layers; lightning
    layers inside a hybrid take their MiniMax slope from their index among all layers, as in MiniMax-01."""
    assert hybrid_pattern(8, 16) == "LLLLLLLS" * 2
    assert hybrid_pattern("LLLS", 8) == "LLLSLLLS"
    assert hybrid_pattern(8, 12) == "LLLLLLLSLLLL"
    model = LM(_cfg("hybrid", d=32, layers=16, heads=2, pattern=hybrid_pattern(8, 16)))
    kinds = [type(b.mixer) for b in model.blocks]
    assert [i for i, k in enumerate(kinds) if k is Softmax] == [7, 15]
    assert all(k is Lightning for i, k in enumerate(kinds) if i not in (7, 15))
    for i in (0, 6, 8, 14):
        rate = -model.blocks[i].mixer.log_decay
        torch.testing.assert_close(rate[0], torch.tensor(2.0**-4 * (1 - i / 15 + 1e-5)))


def test_hybrid_period_of_an_empty_cell_is_a_value_error():
    """hybrid_period('') had raised StopIteration out of its next() (a library caller sees no ValueError)."""
    with pytest.raises(ValueError, match="hybrid"):
        hybrid_period("")
    with pytest.raises(ValueError, match="hybrid"):
        hybrid_period("  ")
    assert hybrid_period("LLLS") == 4 and hybrid_period(8) == 8


# ------------------------------------------------------------------------------------ dims, counts and FLOPs
SHAPES = [(32, 2, 2), (256, 2, 4), (96, 3, 3)]
COUNT_CASES = [("softmax", ""), ("lightning", ""), ("hgrn2", ""), ("mamba2", ""), ("hybrid", "LS")]


def _state_term(mixer, t):
    """The FLOPs convention's mixing term, read off a built mixer: 12 d T for softmax, 36 H K V for linear ones."""
    if isinstance(mixer, Softmax):
        return 12 * mixer.wo.weight.shape[0] * t
    if isinstance(mixer, Mamba2):
        return 36 * mixer.n_heads * mixer.d_state * (mixer.d_inner // mixer.n_heads)
    d = mixer.wo.weight.shape[0]
    return 36 * mixer.n_heads * (d // mixer.n_heads) ** 2


@pytest.mark.parametrize("arch,pattern", COUNT_CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_config_dims_counts_and_flops_are_those_of_the_built_model(arch, pattern, shape):
    """Head and state dims derived in config.py are the ones the mixers build; count_params equals the module's
    numel; its matmul count equals the built matrices and filters (head included, embedding excluded); the forward's
    measured matmul FLOPs are 2 per matrix weight per token; flops_per_token = 6 N + the per-layer mixing terms."""
    d, layers, heads = shape
    pattern = hybrid_pattern(pattern, layers) if pattern else ""
    cfg = ModelConfig(arch, d, layers, heads, VOCAB, pattern)
    model = LM(cfg)
    counts = count_params(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    built_matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and n != "embed.weight")
    assert counts.matmul == built_matmul
    t = 24
    assert flops_per_token(cfg, t) == 6 * built_matmul + sum(_state_term(b.mixer, t) for b in model.blocks)
    for i, b in enumerate(model.blocks):
        assert mixer_flops_per_token(cfg, cfg.layer_kinds[i], t) == _state_term(b.mixer, t)
        if isinstance(b.mixer, Mamba2):
            assert (b.mixer.d_inner, b.mixer.d_state) == (2 * d, min(64, d))
            assert b.mixer.in_proj.weight.shape[0] == 2 * cfg.mamba_d_inner + 2 * cfg.mamba_d_state + heads
        else:
            assert b.mixer.n_heads == heads and cfg.head_dim == d // heads
    # Measured: every nn.Linear is one (addmm|mm) of 2 x its weights per token; the conv is not a matmul here.
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = "naive"
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, VOCAB, (1, t)))
    by_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    mm = by_op.get("aten.mm", 0) + by_op.get("aten.addmm", 0)
    conv = sum(p.numel() for n, p in model.named_parameters() if n.endswith("conv_weight"))
    assert mm == 2 * (built_matmul - conv) * t


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("arch", ["softmax", "lightning", "hgrn2", "mamba2"])
def test_every_mixer_runs_in_the_dtype_of_its_weights(arch, dtype):
    """A model cast to float64 (for exact reference checks) or to bf16 weights runs outside autocast and returns its
    weights' dtype; HGRN2 and Mamba2 had cast their normed output to fp32 always, which their out projection refused."""
    torch.manual_seed(0)
    model = LM(_cfg(arch, layers=2)).to(dtype)
    logits, loss = model(torch.randint(0, VOCAB, (1, 9)), torch.randint(0, VOCAB, (1, 9)))
    assert logits.dtype == dtype and torch.isfinite(loss)
