"""The LM shell on the fused kernels (Triton in the interpreter) trains the same model as on plain modules."""

import pytest
import torch

from models.config import ModelConfig
from models.lm import LM


@pytest.mark.parametrize("arch", ["softmax", "lightning"])
def test_fused_lm_matches_plain_lm(arch):
    torch.manual_seed(0)
    cfg = ModelConfig(arch, 32, 2, 2, 67)  # an odd vocab: the loss kernel's masked tail
    plain = LM(cfg)
    fused = LM(cfg, kernels="triton")
    fused.load_state_dict(plain.state_dict())  # same parameters, same names
    idx = torch.randint(0, 67, (2, 12))
    targets = torch.randint(0, 67, (2, 12))
    targets[0, :5] = -100
    _, loss_plain = plain(idx, targets)
    logits, loss_fused = fused(idx, targets)
    assert logits is None  # the fused loss never builds them
    torch.testing.assert_close(loss_fused, loss_plain, rtol=1e-5, atol=1e-6)
    loss_plain.backward()
    loss_fused.backward()
    grads = dict(fused.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # decoding needs logits: without targets the fused model returns them, as the plain one does
    torch.testing.assert_close(fused(idx, last_only=True)[0], plain(idx, last_only=True)[0], rtol=1e-5, atol=1e-6)


def test_unknown_kernels_backend_is_refused():
    with pytest.raises(ValueError, match="kernels must be one of"):
        LM(ModelConfig("softmax", 32, 2, 2, 67), kernels="cuda")


@pytest.mark.parametrize("arch", ["softmax", "lightning"])
def test_fused_lm_compiles_as_one_graph(arch):
    """The fused ops are custom ops: torch.compile keeps the whole model in one graph (fullgraph=True fails
    on any graph break) and trains the same numbers as eager."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch, 32, 2, 2, 67)
    eager = LM(cfg, kernels="triton")
    compiled_model = LM(cfg, kernels="triton")
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    idx, targets = torch.randint(0, 67, (2, 12)), torch.randint(0, 67, (2, 12))
    _, loss_eager = eager(idx, targets)
    _, loss_compiled = compiled(idx, targets)
    torch.testing.assert_close(loss_compiled, loss_eager)
    loss_eager.backward()
    loss_compiled.backward()
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_loss_kernels_fuse_only_the_head_and_loss(monkeypatch):
    """kernels="loss" (what training uses) keeps plain norms and MLPs and sends the head + loss to
    linear_cross_entropy on its "auto" backend: plain PyTorch off CUDA, so CPU training is unchanged."""
    import models.lm as lm

    calls = []
    real = lm.linear_cross_entropy
    monkeypatch.setattr(lm, "linear_cross_entropy", lambda *a, **k: calls.append(k["backend"]) or real(*a, **k))
    torch.manual_seed(0)
    cfg = ModelConfig("softmax", 32, 2, 2, 67)
    plain, loss_model = LM(cfg), LM(cfg, kernels="loss")
    loss_model.load_state_dict(plain.state_dict())
    assert loss_model.shell == "torch" and all(b.mlp.kernels == "torch" for b in loss_model.blocks)
    idx, targets = torch.randint(0, 67, (2, 12)), torch.randint(0, 67, (2, 12))
    logits, loss = loss_model(idx, targets)
    assert logits is None and calls == ["auto"]
    torch.testing.assert_close(loss, plain(idx, targets)[1])
