"""Audit regressions: bad specs refused before the first step, mixture weights that are not numbers, checkpoints that
match their checksum but do not load, and MQAR scoring the number of sequences it is asked for."""

import dataclasses

import pytest
import torch
from torch import nn

from models.config import ModelConfig
from models.data import open_data
from models.evals import mqar_accuracy
from models.packed import pretrain_pack
from models.sources import parse_data
from models.train import CheckpointUnreadable, checkpoint_path, checkpoint_steps, check_spec, load_checkpoint, pretrain, save_checkpoint
from tests.models.test_train import Recorder, spec

CPU = torch.device("cpu")


@pytest.mark.parametrize("bad, match", [
    # check_spec asked lr_at(1), which returns during the warmup before it looks at the schedule: the run trained
    # its warmup steps, then failed at step warmup + 1
    (dict(schedule="linear", warmup=3), "schedule"),
    (dict(warmup=-2), "warmup"),  # trained on a shifted cosine
    (dict(min_lr_ratio=1.5), "min_lr_ratio"),  # the learning rate rose after the warmup
    (dict(lr=0.0), "lr"),  # trained every step without moving, then ended as 'diverged'
    (dict(grad_clip=-1.0), "grad_clip"),  # no clipping, without a word
    (dict(eval_every=-5), "eval_every"),  # evaluated every 5 steps (step % -5 == 0)
])
def test_a_bad_spec_fails_before_the_first_step(tmp_path, bad, match):
    s = spec(tokens=8 * 32 * 6, **bad)
    with pytest.raises(ValueError, match=match):
        check_spec(s)
    rec = Recorder()
    with pytest.raises(ValueError, match=match):
        pretrain(s, rec, tmp_path / "lone")
    assert rec.events == [] and checkpoint_steps(tmp_path / "lone") == []
    recs = [Recorder(), Recorder()]
    with pytest.raises(ValueError, match=match):
        pretrain_pack([dataclasses.replace(s, seed=1), s], recs, [tmp_path / "a", tmp_path / "b"], device="cpu")
    assert recs[0].events == recs[1].events == []


@pytest.mark.parametrize("data", ["stdlib@inf", "stdlib@inf+passkey@1", "stdlib@1e308+passkey@1e308",
                                  "stdlib+passkey@inf"])
def test_mixture_weights_that_are_not_finite_are_refused(data):
    # they gave weights of nan or 0 (inf / inf, 1e308 / inf), which sampled one part only or at random
    with pytest.raises(ValueError, match="weight"):
        parse_data(data)


def test_mixture_weights_still_normalise():
    assert parse_data("stdlib@1e300+passkey@3e300") == [("stdlib", pytest.approx(0.25)), ("passkey", pytest.approx(0.75))]


def _two_checkpoints(tmp_path):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"step": step, "model": {"w": torch.full((4,), float(step))}})


@pytest.mark.parametrize("error", [RuntimeError("DefaultCPUAllocator: can't allocate memory"), MemoryError()])
def test_a_checkpoint_matching_its_checksum_that_does_not_load_here_is_kept(tmp_path, monkeypatch, error):
    """Its bytes are those written, so it is not corrupt: it was renamed *.corrupt and the older one loaded (or, that
    failing too, CheckpointUnreadable said to remove both and train from step 0)."""
    _two_checkpoints(tmp_path)
    real = torch.load

    def load(path, *args, **kw):
        if str(path).endswith("ckpt-000000002.pt"):
            raise error
        return real(path, *args, **kw)

    monkeypatch.setattr(torch, "load", load)
    expected = MemoryError if isinstance(error, MemoryError) else CheckpointUnreadable
    with pytest.raises(expected) as err:
        load_checkpoint(tmp_path)
    if expected is CheckpointUnreadable:
        assert "ckpt-000000002.pt" in str(err.value) and "can't allocate memory" in str(err.value)
        assert "matches" in str(err.value)
    assert checkpoint_steps(tmp_path) == [1, 2] and not list(tmp_path.glob("*.corrupt"))
    monkeypatch.setattr(torch, "load", real)
    assert load_checkpoint(tmp_path)["step"] == 2  # once it loads, the run resumes where it was


def test_a_checkpoint_without_a_checksum_that_does_not_load_is_still_set_aside(tmp_path):
    _two_checkpoints(tmp_path)
    path = checkpoint_path(tmp_path, 2)
    path.with_name(path.name + ".sha256").unlink()
    path.write_bytes(path.read_bytes()[:40])
    assert load_checkpoint(tmp_path)["step"] == 1
    assert checkpoint_steps(tmp_path) == [1] and path.with_name(path.name + ".corrupt").exists()


class _Counting(nn.Module):
    """Predicts nothing; counts the sequences it is shown."""

    def __init__(self, vocab):
        super().__init__()
        self.config = ModelConfig("softmax", 8, 1, 1, vocab)
        self.rows = 0

    def forward(self, idx, targets=None, last_only=False):
        self.rows += idx.shape[0]
        return torch.zeros(*idx.shape, self.config.vocab_size), None


def test_mqar_accuracy_scores_exactly_the_sequences_asked_for():
    model = _Counting(512)
    mqar_accuracy(model, open_data("mqar", 512), 64, device=CPU, sequences=40, batch=16)
    assert model.rows == 40  # was 48: three whole batches of 16
    model.rows = 0
    mqar_accuracy(model, open_data("mqar", 512), 64, device=CPU)
    assert model.rows == 256


def test_a_checkpoint_without_a_run_key_is_refused_as_another_runs_alone_and_in_a_pack(tmp_path):
    """A file of the checkpoint's name that is not one of this run's (another program's, or written by hand) raised
    KeyError: 'run', which a pack does not catch as one member's refusal: every pack-mate failed with it."""
    s = spec(tokens=8 * 32 * 2)
    save_checkpoint(tmp_path / "b", 1, {"step": 1, "model": {}})
    with pytest.raises(ValueError, match="another run"):
        pretrain(s, Recorder(), tmp_path / "b")
    recs = [Recorder(), Recorder()]
    out = pretrain_pack([dataclasses.replace(s, seed=1), s], recs, [tmp_path / "a", tmp_path / "b"], device="cpu")
    assert out[0].steps == 2 and isinstance(out[1], ValueError) and "another run" in str(out[1])
    assert checkpoint_steps(tmp_path / "b") == [1]  # left as it was
