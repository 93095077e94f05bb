"""Packed training: a stacked, vmapped pack trains each member exactly as it would train alone."""

import math
from pathlib import Path

import pytest
import torch

from torch.func import stack_module_state

from models.config import ModelConfig
from models.lm import LM
from models.packed import StackedAdamW, pack_key, pretrain_pack, stack_layers, stacked_losses
from models.train import Diverged, Interrupted, checkpoint_steps, load_checkpoint, pretrain
from tests.models.test_train import Recorder, spec


def members(**kw):
    """Three runs of one shape that differ in seed, learning rate, schedule, decay and clipping."""
    return [
        spec(seed=0, lr=3e-3, **kw),
        spec(seed=1, lr=1e-3, schedule="wsd", weight_decay=0.0, **kw),
        spec(seed=2, lr=5e-3, warmup=1, grad_clip=0.0, **kw),
    ]


def train_alone(specs, tmp_path: Path):
    out = []
    for i, s in enumerate(specs):
        rec = Recorder()
        summary = pretrain(s, rec, tmp_path / f"solo{i}", device="cpu", microbatch=4)
        out.append((rec, summary))
    return out


@pytest.mark.parametrize("arch", ["softmax", "hybrid", "hgrn2", "mamba2"])
def test_pack_matches_separate_runs(tmp_path, arch):
    specs = members(arch=arch, tokens=8 * 32 * 6)
    alone = train_alone(specs, tmp_path)
    recs = [Recorder() for _ in specs]
    results = pretrain_pack(specs, recs, [tmp_path / f"pack{i}" for i in range(3)], device="cpu", microbatch=4)
    for (solo_rec, solo), rec, packed in zip(alone, recs, results):
        assert packed.steps == solo.steps == 6 and packed.resumed_from_step == 0
        solo_losses, pack_losses = solo_rec.losses(), rec.losses()
        assert sorted(pack_losses) == sorted(solo_losses) == list(range(1, 7))
        # The README's "about 1e-6 per step" (fp32 rounding alone: up to 1.8e-7 measured on the development CPU).
        for step in solo_losses:
            assert pack_losses[step] == pytest.approx(solo_losses[step], rel=2e-6), step
        assert packed.val_loss == pytest.approx(solo.val_loss, rel=2e-6)
    # the members really differ: different seeds and learning rates give different curves
    assert len({round(r.final_loss, 4) for r in results}) == 3


def test_pack_checkpoints_resume_alone_and_in_a_pack(tmp_path):
    specs = members(tokens=8 * 32 * 8)
    dirs = [tmp_path / f"m{i}" for i in range(3)]
    alone = train_alone(specs, tmp_path)
    # a pack stopped at step 3 by a graceful stop request
    calls = iter(range(100))
    stopped = pretrain_pack(specs, [Recorder() for _ in specs], dirs, device="cpu", microbatch=4,
                            should_stop=lambda: next(calls) >= 2)
    assert all(isinstance(r, Interrupted) and r.step == 3 for r in stopped)
    assert all(checkpoint_steps(d) == [3] for d in dirs)
    # member 0 resumes alone (pretrain reads a pack checkpoint); members 1 and 2 resume as a pack of two
    rec0 = Recorder()
    solo = pretrain(specs[0], rec0, dirs[0], device="cpu", microbatch=4)
    recs = [Recorder(), Recorder()]
    packed = pretrain_pack(specs[1:], recs, dirs[1:], device="cpu", microbatch=4)
    for (ref_rec, ref), rec, got in zip(alone, [rec0, *recs], [solo, *packed]):
        assert got.resumed_from_step == 3
        assert rec.events[0] == ("resume", {"step": 3})  # said first, so the run's row shows it while it trains
        assert sorted(rec.losses()) == list(range(4, 9))
        for step, loss in rec.losses().items():
            assert loss == pytest.approx(ref_rec.losses()[step], rel=2e-4, abs=2e-4), step
        assert got.val_loss == pytest.approx(ref.val_loss, rel=2e-4)


def test_members_at_different_steps_and_a_diverged_member(tmp_path):
    specs = members(tokens=8 * 32 * 6)
    dirs = [tmp_path / f"m{i}" for i in range(3)]
    # member 2 has already trained 4 steps alone
    with pytest.raises(Interrupted):
        pretrain(specs[2], Recorder(), dirs[2], device="cpu", microbatch=4,
                 should_stop=iter([False, False, False, True]).__next__)
    assert load_checkpoint(dirs[2])["step"] == 4
    recs = [Recorder() for _ in specs]
    results = pretrain_pack(specs, recs, dirs, device="cpu", microbatch=4, faults=["nan@2", None, None])
    assert isinstance(results[0], Diverged) and results[0].step == 2
    assert [r.steps for r in results[1:]] == [6, 6]
    assert results[2].resumed_from_step == 4 and sorted(recs[2].losses()) == [5, 6]
    assert sorted(recs[0].losses()) == [1]  # nothing reported after the divergence
    alone = train_alone(specs[1:], tmp_path)
    for (ref_rec, ref), rec, got in zip(alone, recs[1:], results[1:]):
        for step, loss in rec.losses().items():
            assert loss == pytest.approx(ref_rec.losses()[step], rel=2e-4, abs=2e-4), step


def test_a_member_that_learns_nothing_is_diverged_alone(tmp_path):
    specs = [spec(seed=0, lr=3e-3, tokens=8 * 32 * 20), spec(seed=1, lr=1e-9, tokens=8 * 32 * 20)]
    recs = [Recorder() for _ in specs]
    results = pretrain_pack(specs, recs, [tmp_path / "a", tmp_path / "b"], device="cpu", microbatch=4)
    assert results[0].val_loss < math.log(260) and [p["step"] for p in recs[0].of("val")] == [20]
    assert isinstance(results[1], Diverged) and results[1].step == 20 and "uniform guess" in str(results[1])
    [val] = recs[1].of("val")  # recorded, as pretrain records it, before the verdict
    assert val["step"] == 20 and val["val_loss"] >= math.log(260)


def test_pack_refuses_runs_of_different_shapes(tmp_path):
    a, b = spec(seed=0), spec(seed=1, d_model=64)
    assert pack_key(a) != pack_key(b)
    assert pack_key(spec(seed=0, lr=1.0)) == pack_key(spec(seed=5, lr=2.0, gpus=0.5))
    with pytest.raises(ValueError, match="differ only"):
        pretrain_pack([a, b], [Recorder(), Recorder()], [tmp_path / "a", tmp_path / "b"], device="cpu")


def test_stacked_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    w = [torch.randn(5, 3) for _ in range(2)]
    lrs, wds = [1e-2, 3e-2], [0.1, 0.0]
    refs = [torch.nn.Parameter(x.clone()) for x in w]
    opts = [torch.optim.AdamW([p], lr=lr, betas=(0.9, 0.95), weight_decay=wd) for p, lr, wd in zip(refs, lrs, wds)]
    stacked = {"blocks.0.w": torch.stack(w).requires_grad_()}
    ours = StackedAdamW(stacked, 2)
    for step in range(5):
        grads = torch.randn(2, 5, 3)
        for p, o, g in zip(refs, opts, grads):
            p.grad = g.clone()
            o.step()
        stacked["blocks.0.w"].grad = grads.clone()
        ours.step(lrs, wds, [True, step < 2])  # member 1 stops after two steps
        if step == 1:
            frozen = stacked["blocks.0.w"][1].detach().clone()
            torch.testing.assert_close(frozen, refs[1].detach())  # both members trained, in place
    torch.testing.assert_close(stacked["blocks.0.w"][0].detach(), refs[0].detach())
    torch.testing.assert_close(stacked["blocks.0.w"][1].detach(), frozen)


@pytest.mark.parametrize("arch", ["softmax", "lightning", "hybrid", "hgrn2"])
def test_stacked_layers_give_each_members_own_loss_and_gradient(arch):
    cfg = ModelConfig(arch, 32, 2, 2, 260, "LS" if arch == "hybrid" else None)
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(LM(cfg))
    params, _ = stack_module_state(models)
    params = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    stacked = stack_layers(LM(cfg), params)
    x = torch.randint(0, 260, (3, 2, 16))
    y = torch.randint(0, 260, (3, 2, 16))
    y[1, :, :10] = -100  # a member with unlabelled positions averages over its labelled ones only
    losses = stacked_losses(stacked, x, y)
    losses.sum().backward()
    for i, model in enumerate(models):
        _, loss = model(x[i], y[i])
        loss.backward()
        assert losses[i].item() == pytest.approx(loss.item(), rel=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(params[name].grad[i], p.grad, rtol=1e-4, atol=1e-6)


def test_stack_layers_leaves_mamba2_to_vmap():
    """Mamba2 holds weights outside Linear/RMSNorm/Embedding (its SSM scalars and filter): no swap."""
    cfg = ModelConfig("mamba2", 32, 2, 2, 260)
    params, _ = stack_module_state([LM(cfg), LM(cfg)])
    assert stack_layers(LM(cfg), params) is None


def test_a_member_with_a_nan_gradient_diverges_and_the_others_train_on(tmp_path):
    specs = members(tokens=8 * 32 * 4)
    dirs = [tmp_path / f"m{i}" for i in range(3)]
    recs = [Recorder() for _ in specs]
    results = pretrain_pack(specs, recs, dirs, device="cpu", microbatch=4, faults=[None, "nangrad@3", None])
    assert isinstance(results[1], Diverged) and results[1].step == 3
    assert [r.steps for r in (results[0], results[2])] == [4, 4]
    assert all(math.isfinite(r.val_loss) for r in (results[0], results[2]))
    assert not recs[1].of("val")


def test_a_member_that_cannot_resume_fails_alone(tmp_path):
    """A member whose checkpoints are unreadable, or hold another run, fails as it would alone; its pack-mates
    train (the whole pack used to fail, and unreadable checkpoints are not retried: every member stayed failed)."""
    from models.train import CheckpointUnreadable, save_checkpoint

    specs = members(tokens=8 * 32 * 2)
    dirs = [tmp_path / f"m{i}" for i in range(3)]
    dirs[0].mkdir()
    (dirs[0] / "ckpt-000000001.pt").write_bytes(b"cut short by a crash")
    save_checkpoint(dirs[1], 1, {"step": 1, "run": "another-run", "model": {}})
    recs = [Recorder() for _ in specs]
    results = pretrain_pack(specs, recs, dirs, device="cpu", microbatch=4)
    assert isinstance(results[0], CheckpointUnreadable) and str(dirs[0]) in str(results[0])
    assert isinstance(results[1], ValueError) and "another run" in str(results[1])
    assert results[2].steps == 2 and sorted(recs[2].losses()) == [1, 2]
    assert recs[0].events == recs[1].events == []  # nothing reported for the members that did not train
    assert checkpoint_steps(dirs[1]) == [1] and checkpoint_steps(dirs[2]) == [2]  # the foreign checkpoint is left alone


def test_a_pack_on_validation_text_without_a_labelled_token_has_no_val_loss(tmp_path, monkeypatch):
    """As a lone run: no "val" report and a val_loss of None, not a 0 / 0 that made every member diverge."""
    from tests.models.test_train import mask_split

    mask_split(monkeypatch, "val")
    specs = members(tokens=8 * 32 * 4)
    recs = [Recorder() for _ in specs]
    results = pretrain_pack(specs, recs, [tmp_path / f"m{i}" for i in range(3)], device="cpu", microbatch=4)
    for rec, result in zip(recs, results):
        assert not isinstance(result, Exception), result
        assert result.val_loss is None and rec.of("val") == []
        assert math.isfinite(result.final_loss) and sorted(rec.losses()) == [1, 2, 3, 4]


def mask_training(monkeypatch, masked: set) -> None:
    """Leave the training sequences ``masked`` ((seed, index), or (seed, None) for all of a seed's; read at each
    draw, so a test may change it between runs) without a labelled token, as masked data does."""
    import numpy as np

    from models.data import Batches

    unmasked = Batches.sequence

    def sequence(self, index):
        x, y = unmasked(self, index)
        hidden = self.split == "train" and ((self.seed, index) in masked or (self.seed, None) in masked)
        return (x, np.full_like(y, -100)) if hidden else (x, y)

    monkeypatch.setattr(Batches, "sequence", sequence)


def small_corpus_pair(tmp_path: Path, **kw):
    """Two 4-step members (seeds 0 and 1) on the easily learned text of the lone-run unlabelled tests."""
    import dataclasses

    from tests.models.test_train import unlabelled_spec

    base = dataclasses.replace(unlabelled_spec(tmp_path), **kw)
    return [dataclasses.replace(base, seed=0), dataclasses.replace(base, seed=1, lr=5e-3)]


def checkpointing(rec: Recorder, ckpt_dir: Path, after: dict):
    """A reporter that records into ``rec`` and keeps each checkpoint it is told of in ``after`` (step -> state)."""
    def report(kind, payload):
        rec(kind, payload)
        if kind == "ckpt":
            after[payload["step"]] = load_checkpoint(ckpt_dir)
    return report


@pytest.mark.parametrize("arch, hybrid", [("hybrid", "LS"), ("mamba2", "")], ids=["hybrid", "mamba2"])
def test_a_members_step_without_a_labelled_token_updates_nothing_and_reports_no_loss(tmp_path, monkeypatch, arch,
                                                                                      hybrid):
    """Such a step updated the member (AdamW moves weights by momentum and decay) and reported a loss of 0 (0 / the
    clamped count 1); now, as in a lone run, its weights and AdamW state stay as they were, it reports no loss, and
    its pack-mate trains on. A member's microbatch without a labelled token (under vmap, Mamba2: a 0 / 0 mean) must
    not disturb its step either."""
    specs = small_corpus_pair(tmp_path, arch=arch, hybrid=hybrid)
    # member 1 (seed 1): the whole of step 2 unlabelled, and the first microbatch of step 3
    mask_training(monkeypatch, {(1, i) for i in range(8, 20)})
    dirs = [tmp_path / "m0", tmp_path / "m1"]
    recs, after = [Recorder(), Recorder()], [{}, {}]
    results = pretrain_pack(specs, [checkpointing(r, d, a) for r, d, a in zip(recs, dirs, after)], dirs,
                            device="cpu", microbatch=4, ckpt_every_steps=1)
    assert not any(isinstance(r, Exception) for r in results), results
    assert sorted(recs[0].losses()) == [1, 2, 3, 4]
    assert sorted(recs[1].losses()) == [1, 3, 4]  # no loss (not 0) for the unlabelled step
    assert all(loss > 0 for rec in recs for loss in rec.losses().values())
    assert results[1].final_loss == recs[1].losses()[4]
    for name, weight in after[1][1]["model"].items():
        assert torch.equal(after[1][2]["model"][name], weight), name
    moments = [(s["exp_avg"], s["exp_avg_sq"]) for s in after[1][1]["optimizer"]["state"].values()]
    for (m, v), s in zip(moments, after[1][2]["optimizer"]["state"].values()):
        assert torch.equal(s["exp_avg"], m) and torch.equal(s["exp_avg_sq"], v)
    assert not all(torch.equal(after[0][2]["model"][k], w) for k, w in after[0][1]["model"].items())
    updates = [{step: {int(p["step"]) for p in ckpt["optimizer"]["state"].values()} for step, ckpt in a.items()}
               for a in after]
    assert updates == [{1: {1}, 2: {2}, 3: {3}, 4: {4}}, {1: {1}, 2: {1}, 3: {2}, 4: {3}}]
    # each member trains as it would alone on the same data
    for i, (s, rec, got) in enumerate(zip(specs, recs, results)):
        solo_rec = Recorder()
        solo = pretrain(s, solo_rec, tmp_path / f"solo{i}", device="cpu", microbatch=4)
        assert sorted(solo_rec.losses()) == sorted(rec.losses())
        for step, loss in solo_rec.losses().items():
            assert rec.losses()[step] == pytest.approx(loss, rel=2e-6), (i, step)
        assert got.val_loss == pytest.approx(solo.val_loss, rel=2e-6)


def test_a_member_without_a_labelled_training_token_ends_unlabelled(tmp_path, monkeypatch):
    """A member none of whose steps had a labelled token ended "done" with final loss 0; now it ends with
    ``Unlabelled`` (not retried, as for a lone run), on the attempt that trains its last step and on one resumed
    after it, while its pack-mate finishes normally."""
    from models.train import Summary, Unlabelled

    specs = small_corpus_pair(tmp_path)
    mask_training(monkeypatch, {(1, None)})
    dirs = [tmp_path / "m0", tmp_path / "m1"]
    recs = [Recorder(), Recorder()]
    results = pretrain_pack(specs, recs, dirs, device="cpu", microbatch=4)
    assert isinstance(results[0], Summary) and sorted(recs[0].losses()) == [1, 2, 3, 4]
    assert math.isfinite(results[0].final_loss) and results[0].val_loss < math.log(260)
    assert isinstance(results[1], Unlabelled), results[1]
    assert "no training step of the run had a labelled token" in str(results[1]) and specs[1].data in str(results[1])
    assert recs[1].of("train") == [] and recs[1].of("val") == []
    assert checkpoint_steps(dirs[1]) == [4]  # checkpointed as its pack-mate is
    # resumed after its last step, in a pack and alone
    again = pretrain_pack(specs, [Recorder(), Recorder()], dirs, device="cpu", microbatch=4)
    assert isinstance(again[0], Summary) and again[0].final_loss == results[0].final_loss
    assert isinstance(again[1], Unlabelled)
    with pytest.raises(Unlabelled):
        pretrain(specs[1], Recorder(), dirs[1], device="cpu", microbatch=4)


def test_a_member_labelled_in_an_earlier_attempt_only_keeps_that_loss(tmp_path, monkeypatch):
    """Whether a member learned anything counts every attempt (its checkpointed loss), as pretrain counts it: one
    whose resumed steps are all unlabelled ends with the loss of its last labelled step, not 0."""
    from models.train import Summary

    specs = small_corpus_pair(tmp_path)
    masked = set()
    mask_training(monkeypatch, masked)
    dirs = [tmp_path / "m0", tmp_path / "m1"]
    first = [Recorder(), Recorder()]
    calls = iter(range(100))
    stopped = pretrain_pack(specs, first, dirs, device="cpu", microbatch=4, should_stop=lambda: next(calls) >= 1)
    assert all(isinstance(r, Interrupted) and r.step == 2 for r in stopped)
    masked.update((1, i) for i in range(16, 32))  # member 1's steps 3 and 4
    recs = [Recorder(), Recorder()]
    results = pretrain_pack(specs, recs, dirs, device="cpu", microbatch=4)
    assert all(isinstance(r, Summary) for r in results), results
    assert sorted(recs[0].losses()) == [3, 4] and recs[1].losses() == {}
    assert results[1].final_loss == first[1].losses()[2]
    assert load_checkpoint(dirs[1])["loss"] == first[1].losses()[2]
