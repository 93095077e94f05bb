"""The epilogue-GEMM wrapper (kernels.gemm_epilogue) on the CPU: quack's kernels need a Hopper GPU, so its gemm_act and
gemm_dact are stood in for by fp32 math with quack's conventions (the gated pre-activation interleaves gate and up
columns), which checks what the wrapper hands them and does with what they give back: the interleaved weight, the
backward's GEMMs, the gradients reaching w1, w3, w2, the custom ops' fakes, and that the LM and the lightning mixer take
them only where usable. The GPU check of quack itself is docs/bench/gemm_epilogue_study.py."""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import kernels.gemm_epilogue as ge
import models.lm as lm
import models.mixers.lightning as lt
from models.config import ModelConfig
from tests.kernels.conftest import assert_broken_install_warns_once, assert_matches_reference


def _act(pre, activation):
    if activation == "swiglu":
        return F.silu(pre[:, ::2]) * pre[:, 1::2]
    assert activation == "silu"
    return F.silu(pre)


def _dswiglu(gate, up, dout):
    """SwiGLU's backward by hand (autograd does not record inside a custom op's body): d gate, d up, silu(gate) * up."""
    s = torch.sigmoid(gate)
    return dout * up * s * (1 + gate * (1 - s)), dout * F.silu(gate), F.silu(gate) * up


def _tiles(config):
    """The pinned tiles the wrapper hands over, as TILES gives them."""
    assert config.pingpong and not config.is_dynamic_persistent and config.device_capacity == 9
    return config.tile_m, config.tile_n, config.cluster_m, config.cluster_n


def fake_quack_module(calls: dict) -> ModuleType:
    """quack's gemm_act / gemm_dact / gemm_add's kernel entry in fp32 math, counting their calls in ``calls`` and
    checking the layouts and tiles the wrapper hands over (also docs/bench/tail_partition_probe.py's stand-in)."""

    def gemm_act(A, B, activation, store_preact, tuned, config):
        assert A.is_contiguous() and B.shape[0] == A.shape[1] and store_preact and not tuned
        assert _tiles(config) == ge.TILES["gated" if activation == "swiglu" else "silu"]
        calls["act"] = calls.get("act", 0) + 1
        pre = A.float() @ B.float()
        return pre.to(A.dtype), _act(pre, activation).to(A.dtype)

    def gemm_dact(A, B, PreAct, activation, tuned, config):
        assert A.is_contiguous() and activation == "swiglu" and not tuned and _tiles(config) == ge.TILES["dgated"]
        calls["dact"] = calls.get("dact", 0) + 1
        dgate, dup, out = _dswiglu(PreAct[:, ::2].float(), PreAct[:, 1::2].float(), A.float() @ B.float())
        return torch.stack((dgate, dup), dim=-1).flatten(1).to(A.dtype), out.to(PreAct.dtype)

    def gemm_add(A, B, out, C, config):  # the residual add in the GEMM's epilogue: out = A @ B + C
        assert A.is_contiguous() and C.is_contiguous() and out.shape == C.shape == (A.shape[0], B.shape[1])
        pinned = {kind: (*ge.TILES[kind][:4], kind == "add_w2") for kind in ("add_wo", "add_w2")}  # w2's swaps A, B
        kind = next(k for k, tiles in pinned.items() if tiles == (*_tiles(config), config.swap_ab))
        calls["add"] = calls.get("add", 0) + 1
        calls[kind] = calls.get(kind, 0) + 1  # which pinned tiles it ran on
        out.copy_(A.float() @ B.float() + C.float())

    quack = ModuleType("fake_quack")  # hashable, as the module quack's interface is
    quack.gemm_act, quack.gemm_dact, quack.GemmConfig = gemm_act, gemm_dact, SimpleNamespace
    quack.gemm_tuned = SimpleNamespace(fn=gemm_add)
    return quack


@pytest.fixture
def fake_quack(monkeypatch):
    """quack's GEMMs and fused-block epilogues in fp32 math (``fake_quack_module``, ``_fake_library``); their calls."""
    calls = {"act": 0, "dact": 0}
    quack = fake_quack_module(calls)
    monkeypatch.setattr(ge, "_quack", lambda: quack)
    monkeypatch.setattr(ge, "_library", lambda: _fake_library(calls))
    return calls


def _fake_library(calls):
    """Our quack epilogues (``kernels.quack_epilogues``: rms_partial, rstd_gated_preact, dswiglu_rstd, rms_bwd_apply,
    dswiglu)
    in fp32 math, with quack's conventions: B as (K, N), gated pairs interleaved, reduces handed back summed, rstd not
    yet applied to D in the forward and applied in the gate's gradient."""

    def mod(kind, fn):
        def call(A, B, C=None, *, tuned, config, dynamic_scheduler=False, **operands):
            assert A.is_contiguous() and B.shape[0] == A.shape[1] and not tuned
            assert config is None if ge.TILES[kind] is None else _tiles(config) == ge.TILES[kind]
            calls[kind] = calls.get(kind, 0) + 1
            out = fn(A.float() @ B.float(), None if C is None else C.float(), **operands)
            return {k: v.to(A.dtype) if k in ("D", "resid_out", "postact") else v for k, v in out.items()}
        return call

    def rms_partial(acc, c, weight):
        y = acc + c
        return {"D": y * weight, "resid_out": y, "sqsum": (y * y).sum(-1)}

    def rstd_gated(acc, _, rstd):
        g, u = acc[:, ::2] * rstd[:, None], acc[:, 1::2] * rstd[:, None]
        return {"D": acc, "postact": F.silu(g) * u}

    def dswiglu_rstd(acc, c, rstd):
        g, u = c[:, ::2], c[:, 1::2]
        dgs, dus, _ = _dswiglu(g * rstd[:, None], u * rstd[:, None], acc)
        d = torch.stack((dgs * rstd[:, None], dus * rstd[:, None]), dim=-1).flatten(1)
        return {"D": d, "dsum": (dgs * g + dus * u).sum(-1)}

    def dswiglu(acc, c):
        dg, du, _ = _dswiglu(c[:, ::2], c[:, 1::2], acc)
        return {"D": torch.stack((dg, du), dim=-1).flatten(1)}

    def rms_bwd_apply(acc, c, y, w, corr):
        return {"D": acc * w + c + y.float() * corr[:, None], "dw": (acc * y.float()).sum(0)}

    return SimpleNamespace(rms_partial_epi=mod("residual", rms_partial),
                           rstd_gated_preact_mod=lambda act: mod("rstd_gated", rstd_gated),
                           dswiglu_rstd_epi=mod("dgated_rstd", dswiglu_rstd),
                           dswiglu_epi=mod("dgated", dswiglu),
                           rms_bwd_apply_epi=mod("norm_bwd", rms_bwd_apply))


def _weights(d=16, f=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*s, generator=g) / s[1] ** 0.5).requires_grad_() for s in ((f, d), (f, d), (d, f))]


@pytest.mark.parametrize("keeps_gate", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_swiglu_mlp_matches_the_plain_mlp_in_output_and_gradients(fake_quack, compiled, keeps_gate, monkeypatch):
    """Whether or not the forward's gate output is kept (MLP_KEEPS_GATE), the gate's gradient comes from one GEMM: with
    it kept, from the epilogue that does not write that output again (dswiglu_epi), else from quack's gemm_dact."""
    monkeypatch.setattr(ge, "MLP_KEEPS_GATE", keeps_gate)
    w1, w3, w2 = _weights()
    x = torch.randn(2, 5, 16, requires_grad=True)
    dy = torch.randn(2, 5, 16)
    inputs = (x, w1, w3, w2)
    assert_matches_reference(ge.swiglu_mlp, inputs, inputs, dy, ge.swiglu_mlp_reference(*inputs), compiled)
    backward = {"dgated": 1} if keeps_gate else {"dact": 1}
    assert fake_quack == {"act": 1, "dact": 0, **backward}


@pytest.mark.parametrize("compiled", [False, True])
def test_linear_silu_matches_silu_of_linear_in_output_and_gradients(fake_quack, compiled):
    w = _weights()[0]
    x = torch.randn(3, 4, 16, requires_grad=True)
    dy = torch.randn(3, 4, 32)
    assert_matches_reference(ge.linear_silu, (x, w), (x, w), dy, F.silu(F.linear(x, w)), compiled)
    assert fake_quack == {"act": 1, "dact": 0}


@pytest.mark.parametrize("compiled", [False, True])
def test_residual_adds_in_the_gemms_match_the_plain_adds(fake_quack, compiled):
    """linear_add (the mixer's output projection plus the residual) and swiglu_mlp with a residual, each on one
    gemm_add's kernel on the tiles pinned for it, match x + F.linear(y, w) and x + MLP(h) in output and gradients."""
    g = torch.Generator().manual_seed(2)
    y, x = (torch.randn(2, 5, 16, generator=g).requires_grad_() for _ in range(2))
    w = (torch.randn(16, 16, generator=g) / 4).requires_grad_()
    dy = torch.randn(2, 5, 16, generator=g)
    assert_matches_reference(ge.linear_add, (y, w, x), (y, w, x), dy, x + F.linear(y, w), compiled)
    assert fake_quack == {"act": 0, "dact": 0, "add": 1, "add_wo": 1}
    w1, w3, w2 = _weights()
    args = (y, w1, w3, w2, x)
    assert_matches_reference(ge.swiglu_mlp, args, args, dy, x + ge.swiglu_mlp_reference(*args[:4]), compiled)
    assert fake_quack == {"act": 1, "dact": 0, "dgated": 1, "add": 2, "add_wo": 1, "add_w2": 1}


@pytest.mark.parametrize("compiled", [False, True])
def test_residual_norm_mlp_matches_the_plain_block_tail_in_output_and_gradients(fake_quack, compiled):
    w1, w3, w2 = _weights()
    g = torch.Generator().manual_seed(1)
    wo = (torch.randn(16, 16, generator=g) / 4).requires_grad_()
    wn = (1 + 0.1 * torch.randn(16, generator=g)).requires_grad_()
    y, x = (torch.randn(2, 5, 16, generator=g).requires_grad_() for _ in range(2))
    dy = torch.randn(2, 5, 16, generator=g)
    args = (y, x, wo, wn, 1e-6, w1, w3, w2)
    leaves = (y, x, wo, wn, w1, w3, w2)
    assert_matches_reference(ge.residual_norm_mlp, args, leaves, dy, ge.residual_norm_mlp_reference(*args), compiled)
    assert {k: fake_quack[k] for k in ("residual", "rstd_gated", "dgated_rstd", "norm_bwd")} == dict.fromkeys(
        ("residual", "rstd_gated", "dgated_rstd", "norm_bwd"), 1)


def test_epilogue_ops_fakes_match(fake_quack):
    w1, w3, w2 = (w.detach() for w in _weights())
    x = torch.randn(10, 16)
    w13 = torch.stack((w1, w3), dim=1).flatten(0, 1)
    torch.library.opcheck(ge.swiglu_mlp_op, (x, w13, w2), test_utils=("test_schema", "test_faketensor"))
    _, pre, gated = ge.swiglu_mlp_op(x, w13, w2)
    for kept in (None, gated):
        torch.library.opcheck(ge.swiglu_mlp_backward_op, (x, w13, w2, pre, torch.randn(10, 16), kept),
                              test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ge.linear_silu_op, (x, w1), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ge.swiglu_mlp_op, (x, w13, w2, torch.randn(10, 16)),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ge.swiglu_mlp_op, (x, w13, w2, None, True), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ge.linear_add_op, (torch.randn(2, 5, 32), w1.T.contiguous(), torch.randn(2, 5, 16)),
                          test_utils=("test_schema", "test_faketensor"))
    y, wo, wn = torch.randn(10, 16), torch.randn(16, 16), torch.ones(16)
    torch.library.opcheck(ge.residual_norm_mlp_op, (y, x, wo, wn, w13, w2, 1e-6),
                          test_utils=("test_schema", "test_faketensor"))
    _, h, hw, pre, gated, rstd = ge.residual_norm_mlp_op(y, x, wo, wn, w13, w2, 1e-6)
    torch.library.opcheck(ge.residual_norm_mlp_backward_op, (y, h, hw, pre, gated, rstd, wo, wn, w13, w2, x),
                          test_utils=("test_schema", "test_faketensor"))
    # The tail op takes and gives (B, T, d), its saved tensors flattened: its fakes keep both shapes.
    y3, x3 = y.view(2, 5, 16), x.view(2, 5, 16)
    torch.library.opcheck(ge.residual_norm_mlp_op, (y3, x3, wo, wn, w13, w2, 1e-6),
                          test_utils=("test_schema", "test_faketensor"))
    out, h, hw, pre, gated, rstd = ge.residual_norm_mlp_op(y3, x3, wo, wn, w13, w2, 1e-6)
    assert out.shape == (2, 5, 16) and h.shape == hw.shape == (10, 16)
    torch.library.opcheck(ge.residual_norm_mlp_backward_op, (y3, h, hw, pre, gated, rstd, wo, wn, w13, w2, x3),
                          test_utils=("test_schema", "test_faketensor"))
    assert [g.shape for g in ge.residual_norm_mlp_backward_op(y3, h, hw, pre, gated, rstd, wo, wn, w13, w2, x3)[:2]] \
        == [(2, 5, 16), (2, 5, 16)]


def test_epilogues_are_not_taken_off_a_hopper_gpu(fake_quack):
    assert not ge.epilogues_usable(torch.randn(2, 16, dtype=torch.bfloat16), 32)
    assert not ge.epilogues_usable(torch.randn(2, 16), 32)


def test_the_vmap_check_traces_under_torch_compile_and_holds_in_eager():
    # On a GPU epilogues_usable runs while torch.compile traces every MLP: a check it cannot trace breaks each graph.
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x + 1 if ge._unwrapped(x) else x - 1, backend="eager", fullgraph=True)
    assert fn(torch.zeros(2)).tolist() == [1.0, 1.0]
    assert ge._unwrapped(torch.zeros(2))
    assert torch.func.vmap(lambda x: torch.tensor(ge._unwrapped(x)))(torch.zeros(3, 2)).tolist() == [False] * 3


def _lm_pair(arch):
    cfg = ModelConfig(arch, 32, 2, 2, 128, "LS" if arch == "hybrid" else "")
    torch.manual_seed(0)
    plain = lm.LM(cfg, kernels="loss")
    fused = lm.LM(cfg, kernels="gemm")
    fused.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 128, (2, 8))
    return plain, fused, idx


def _assert_same_step(plain, got, ref):
    """The (loss, parameter gradients) pair got matches ref's, each gradient named by plain's parameter."""
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    for (name, _), a, b in zip(plain.named_parameters(), got[1], ref[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("arch", ["lightning", "softmax"])
def test_lm_takes_the_epilogues_only_where_usable(fake_quack, monkeypatch, arch):
    plain, fused, idx = _lm_pair(arch)
    monkeypatch.setattr(lt.Lightning, "backend", "torch")
    _, loss_ref = plain(idx, idx)
    g_ref = torch.autograd.grad(loss_ref, list(plain.parameters()))
    _, loss = fused(idx, idx)
    assert fake_quack == {"act": 0, "dact": 0}  # on the CPU: the plain modules, the adds apart
    usable = []
    monkeypatch.setattr(lm, "epilogues_usable", lambda x, *w: usable.append(w) or True)
    monkeypatch.setattr(lt, "epilogues_usable", lambda x, *w: usable.append(w) or True)
    _, loss = fused(idx, idx)
    g = torch.autograd.grad(loss, list(fused.parameters()))
    mlp_hidden = plain.config.mlp_hidden("L" if arch == "lightning" else "S")
    layers = plain.config.n_layers
    silu_calls = layers if arch == "lightning" else 0
    # The residual adds in the GEMMs by default (Block.residual_gemm): both of every block, each on its pinned tiles.
    # The gate's gradient from dswiglu_epi ("dgated"), the forward's gate output kept (MLP_KEEPS_GATE's default).
    assert fake_quack == {"act": layers + silu_calls, "dact": 0, "dgated": layers, "add": 2 * layers,
                          "add_wo": layers, "add_w2": layers}
    # Each block asks once for its tail (the adds' check) and once in its MLP; the SiLU's projection once.
    assert usable.count((mlp_hidden,)) == 2 * layers and usable.count((96,)) == silu_calls
    _assert_same_step(plain, (loss, g), (loss_ref, g_ref))


@pytest.mark.parametrize("arch", ["lightning", "softmax"])
@pytest.mark.parametrize("switch", ["fused_tail", "residual_gemm"])
def test_blocks_on_their_opt_in_epilogues_train_as_the_plain_lm(fake_quack, monkeypatch, arch, switch):
    """The block's tail as one op, or its two residual adds in the GEMMs (Block's opt-in switches), train as the plain
    blocks do."""
    plain, fused, idx = _lm_pair(arch)
    monkeypatch.setattr(lt.Lightning, "backend", "torch")
    monkeypatch.setattr(lm.Block, switch, True)
    _, loss_ref = plain(idx, idx)
    g_ref = torch.autograd.grad(loss_ref, list(plain.parameters()))
    monkeypatch.setattr(lm, "epilogues_usable", lambda x, *w: True)
    monkeypatch.setattr(lt, "epilogues_usable", lambda x, *w: True)
    _, loss = fused(idx, idx)
    g = torch.autograd.grad(loss, list(fused.parameters()))
    layers = plain.config.n_layers
    if switch == "fused_tail":  # its w2 adds h on gemm_add
        assert fake_quack["residual"] == fake_quack["norm_bwd"] == fake_quack["add"] == layers
        assert fake_quack["dact"] == fake_quack.get("dgated", 0) == 0
    else:
        assert fake_quack["add_wo"] == fake_quack["add_w2"] == fake_quack["dgated"] == layers  # both adds, every block
    _assert_same_step(plain, (loss, g), (loss_ref, g_ref))


@pytest.mark.parametrize("switch", [None, "fused_tail", "residual_gemm"])
def test_the_lm_on_epilogues_compiles_whole(fake_quack, fake_lce, monkeypatch, switch):
    # No graph break from the dispatch (the vmap check, the width check, the stacked weight) in any layer, with each
    # of the block's epilogue switches on or with both off (None).
    monkeypatch.setattr(lm.Block, "residual_gemm", switch == "residual_gemm")
    monkeypatch.setattr(lm.Block, "fused_tail", switch == "fused_tail")
    _, fused, idx = _lm_pair("hybrid")
    usable = lambda x, *w: ge._unwrapped(x) and not any(n % 16 for n in (x.shape[-1], *w))  # noqa: E731
    monkeypatch.setattr(lm, "epilogues_usable", usable)
    monkeypatch.setattr(lt, "epilogues_usable", usable)
    monkeypatch.setattr(lt.Lightning, "backend", "torch")
    monkeypatch.setattr(lm, "loss_usable", lambda x, w: True)  # the head + loss on quack's pipeline too
    torch._dynamo.reset()
    _, loss = torch.compile(fused, backend="aot_eager", fullgraph=True)(idx, idx)
    loss.backward()
    tail = switch == "fused_tail"
    assert fake_quack["act"] > 0 and (fake_quack.get("norm_bwd", 0) > 0 if tail else fake_quack["dgated"] > 0)
    assert (fake_quack.get("add", 0) > 0) == (switch is not None)  # the tail's w2 adds h on gemm_add too
    assert fake_lce[0] > 0


def test_an_installed_quack_that_does_not_import_is_said_once(monkeypatch, caplog):
    assert_broken_install_warns_once(monkeypatch, caplog, ge._quack, "quack", "kernels.gemm_epilogue")


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """The ops dispatched while it is on (a custom op as one op, not the ops inside it)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _pre_and_post(op):
    """The op's two outputs and the plain math's, on leaves of the same values: (fused, plain), each (inputs, pre,
    out)."""
    w1, w3, w2 = (w.detach() for w in _weights())
    w13 = torch.stack((w1, w3), dim=1).flatten(0, 1)
    values = (torch.randn(6, 16), *((w13, w2) if op == "mlp" else (w1,)))
    pairs = []
    for fused in (True, False):
        x, *ws = (t.clone().requires_grad_() for t in values)
        if fused:
            out, pre = ge.swiglu_mlp_op(x, *ws)[:2] if op == "mlp" else ge.linear_silu_op(x, *ws)[::-1]
        else:
            pre = x @ ws[0].T
            out = _act(pre, "swiglu") @ ws[1].T if op == "mlp" else F.silu(pre)
        pairs.append(((x, *ws), pre, out))
    return pairs


@pytest.mark.parametrize("op", ["mlp", "silu"])
@pytest.mark.parametrize("used", ["out", "pre", "both"])
def test_each_output_of_the_epilogue_ops_carries_its_gradient(fake_quack, op, used):
    # The callers use only the activation's output; the pre-activation, also an output, must still be differentiable.
    grads = []
    for inputs, pre, out in _pre_and_post(op):
        g = torch.Generator().manual_seed(2)
        loss = 0
        if used in ("out", "both"):
            loss = loss + (out * torch.randn(out.shape, generator=g)).sum()
        if used in ("pre", "both"):
            loss = loss + (pre * torch.randn(pre.shape, generator=g)).sum()
        grads.append(torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op", ["mlp", "silu"])
def test_an_unused_pre_activation_costs_the_backward_nothing(fake_quack, op):
    # Eager autograd hands an unused output a zero gradient unless told not to: a (M, 2F) write and an add per layer.
    (inputs, _, out), _ = _pre_and_post(op)
    with _OpLog() as log:
        torch.autograd.grad(out.sum(), inputs)
    zeros = {"aten.zeros", "aten.zeros_like", "aten.new_zeros", "aten.fill_", "aten.add"}
    assert "aten.expand" in log.ops and not zeros & set(log.ops), log.ops  # (the sum's gradient is seen)


def _fake_lce_module() -> ModuleType:
    """quack's scaled-exp linear cross-entropy as fp32 math, with its contract: rows (M, d), the sum over the rows whose
    target is not ignore_index, chunks a multiple of 128; its calls counted in ``calls``. One module for every test: a
    compiled call keeps the module its import found (torch.compile binds it into the importing module's globals)."""

    def scaled_exp_linear_cross_entropy(x, weight, target, chunk_size, ignore_index, reduction, tile_n1):
        assert tile_n1 is None or not weight.shape[0] % tile_n1
        assert x.dim() == 2 and target.shape == x.shape[:1] and x.dtype == weight.dtype and not chunk_size % 128
        assert reduction == "sum"
        module.calls[0] += 1
        return F.cross_entropy((x.float() @ weight.float().T), target, ignore_index=ignore_index, reduction="sum")

    module = ModuleType("fake_quack_lce")
    module.scaled_exp_linear_cross_entropy, module.calls = scaled_exp_linear_cross_entropy, [0]
    return module


_FAKE_LCE = _fake_lce_module()


@pytest.fixture
def fake_lce(monkeypatch):
    """The stand-in above as quack.linear_cross_entropy, its call count reset; the count (a one-item list)."""
    monkeypatch.setitem(sys.modules, "quack.linear_cross_entropy", _FAKE_LCE)
    _FAKE_LCE.calls[0] = 0
    return _FAKE_LCE.calls


def test_the_lm_takes_the_epilogue_loss_only_when_asked_and_usable(fake_quack, fake_lce, monkeypatch):
    plain, fused, idx = _lm_pair("lightning")
    monkeypatch.setattr(lt.Lightning, "backend", "torch")
    targets = idx.clone()
    targets[0, :3] = -100
    _, loss_ref = plain(idx, targets)
    g_ref = torch.autograd.grad(loss_ref, list(plain.parameters()))
    assert lm.LM.epilogue_loss  # the default
    assert not ge.loss_usable(torch.zeros(2, 8, 32), plain.head.weight)  # on the CPU
    monkeypatch.setattr(lm, "loss_usable", lambda x, w: True)
    monkeypatch.setattr(lm.LM, "epilogue_loss", False)
    fused(idx, targets)
    assert fake_lce == [0]  # not asked for
    monkeypatch.setattr(lm.LM, "epilogue_loss", True)
    _, loss = fused(idx, targets)
    g = torch.autograd.grad(loss, list(fused.parameters()))
    assert fake_lce == [1]
    _assert_same_step(plain, (loss, g), (loss_ref, g_ref))
    with torch.no_grad():  # evaluation keeps kernels.fused's loss
        _, loss_eval = fused(idx, targets)
    assert fake_lce == [1]
    torch.testing.assert_close(loss_eval, loss_ref.detach(), atol=1e-5, rtol=1e-5)
    # Every target ignored: a zero loss and zero gradients, where quack's own mean would divide by zero.
    _, loss = fused(idx, torch.full_like(idx, -100))
    assert loss.item() == 0.0
    assert all(not g.any() for g in torch.autograd.grad(loss, [fused.head.weight]))


def test_the_loss_is_said_ready_only_with_quack_on_a_hopper_gpu_and_a_vocab_its_tiles_divide(monkeypatch):
    cuda = torch.device("cuda", 0)
    assert not ge.loss_ready(torch.device("cpu"), 32000)
    monkeypatch.setattr(ge, "epilogues_ready", lambda device: True)
    monkeypatch.setattr(ge, "_lce_ready", lambda: True)
    assert ge.loss_ready(cuda, 32000) and not ge.loss_ready(cuda, 32001)
    monkeypatch.setattr(ge, "_lce_ready", lambda: False)
    assert not ge.loss_ready(cuda, 32000)
