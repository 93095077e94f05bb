"""The training loop: learning, schedules, exact resume, checkpoints, faults and reporter payloads."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.data import open_data
from models.evals import validation_loss
from models.lm import LM
from models.sources import content_digest
from models.train import (
    CheckpointUnreadable,
    Diverged,
    Interrupted,
    OutOfMemory,
    Unlabelled,
    checkpoint_path,
    checkpoint_steps,
    check_resumable,
    default_microbatch,
    largest_divisor_at_most,
    load_checkpoint,
    lr_at,
    pretrain,
    rejected_validation,
    save_checkpoint,
    verify_checkpoint,
)
from sweep.spec import RunSpec

ROOT = Path(__file__).resolve().parents[2]


def spec(**kw):
    base = dict(
        arch="hybrid", d_model=32, n_layers=2, n_heads=2, hybrid="LS", vocab_size=260, seq_len=32,
        batch_size=8, tokens=8 * 32 * 20, lr=3e-3, warmup=3, schedule="cosine", min_lr_ratio=0.1,
        weight_decay=0.1, grad_clip=1.0, seed=0, data="stdlib", evals=(), eval_every=0,
    )
    base.update(kw)
    if base["arch"] != "hybrid":
        base["hybrid"] = ""
    return RunSpec(**base)


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, kind, payload):
        self.events.append((kind, dict(payload)))

    def of(self, kind):
        return [p for k, p in self.events if k == kind]

    def losses(self):
        return {p["step"]: p["loss"] for p in self.of("train")}


def test_lr_schedules():
    s = spec(tokens=8 * 32 * 100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(5, s) == pytest.approx(0.5)
    assert lr_at(10, s) == pytest.approx(1.0)
    assert lr_at(55, s) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(100, s) == pytest.approx(0.1)
    w = spec(tokens=8 * 32 * 100, warmup=10, lr=1.0, min_lr_ratio=0.1, schedule="wsd")
    assert lr_at(80, w) == 1.0 and lr_at(90, w) == pytest.approx(0.55) and lr_at(100, w) == pytest.approx(0.1)
    two = spec(tokens=8 * 32 * 2, warmup=0, lr=1.0, min_lr_ratio=0.1, schedule="wsd")  # round(0.2 * 2) is 0
    assert (lr_at(1, two), lr_at(2, two)) == (1.0, pytest.approx(0.1))  # it ends at min_lr, as cosine does
    c = spec(tokens=8 * 32 * 100, warmup=10, lr=1.0, schedule="constant")
    assert lr_at(100, c) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_at(50, spec(schedule="linear", warmup=0))


@pytest.mark.parametrize("arch", ["softmax", "lightning", "hybrid", "hgrn2", "mamba2"])
def test_short_training_lowers_validation_loss(arch, tmp_path):
    """40 steps of 8 x 32 bytes: validation loss falls by at least 1.5 nats from the untrained model."""
    s = spec(arch=arch, tokens=8 * 32 * 40, lr=1e-2, warmup=4)
    torch.manual_seed(s.seed)
    untrained = validation_loss(LM(s.model_config()), open_data("stdlib", 260), 32, device=torch.device("cpu"))
    rec = Recorder()
    summary = pretrain(s, rec, tmp_path)
    assert untrained == pytest.approx(math.log(260), rel=0.05)
    assert summary.val_loss < untrained - 1.5
    assert summary.steps == 40 and summary.tokens == 40 * 256
    assert summary.params == sum(p.numel() for p in LM(s.model_config()).parameters())
    assert rec.of("val")[-1]["val_loss"] == summary.val_loss


def test_reporter_payloads_and_summary(tmp_path):
    s = spec(tokens=8 * 32 * 6, eval_every=3, data="mqar", vocab_size=512, evals=("mqar",))
    rec = Recorder()
    summary = pretrain(s, rec, tmp_path, microbatch=4)
    train = rec.of("train")
    assert [p["step"] for p in train] == [1, 2, 3, 4, 5, 6]
    assert set(train[0]) == {"step", "tokens", "flops", "loss", "lr", "tokens_per_s", "mfu"}
    assert train[-1]["tokens"] == 6 * 256 and train[-1]["mfu"] is None
    assert train[-1]["flops"] == pytest.approx(summary.flops) and summary.flops == s.derived()["flops"]
    assert [p["step"] for p in rec.of("val")] == [3, 6]
    assert [(p["step"], p["name"]) for p in rec.of("eval")] == [(3, "mqar/acc"), (6, "mqar/acc")]
    assert rec.of("ckpt") == [{"step": 6}]
    assert summary.microbatch == 4 and summary.resumed_from_step == 0
    assert summary.final_loss == train[-1]["loss"]
    assert summary.data_sha256 == open_data("mqar", 512).sha256
    assert summary.nonembed_params == s.derived()["nonembed_params"]


def test_gradient_accumulation_matches_full_batch(tmp_path):
    a, b = Recorder(), Recorder()
    pretrain(spec(tokens=8 * 32 * 5), a, tmp_path / "a", microbatch=8)
    pretrain(spec(tokens=8 * 32 * 5), b, tmp_path / "b", microbatch=2)
    for step, loss in a.losses().items():
        assert b.losses()[step] == pytest.approx(loss, rel=1e-4)
    with pytest.raises(ValueError, match="divide"):
        pretrain(spec(), Recorder(), tmp_path / "c", microbatch=3)


def test_stop_and_resume_gives_identical_losses(tmp_path):
    s = spec(tokens=8 * 32 * 20, eval_every=5)
    straight = Recorder()
    full = pretrain(s, straight, tmp_path / "straight")

    first = Recorder()
    with pytest.raises(Interrupted) as err:
        pretrain(s, first, tmp_path / "resumed", should_stop=lambda: len(first.of("train")) >= 10)
    assert err.value.step == 10 and checkpoint_steps(tmp_path / "resumed") == [10]
    second = Recorder()
    resumed = pretrain(s, second, tmp_path / "resumed")
    assert resumed.resumed_from_step == 10
    assert {**first.losses(), **second.losses()} == straight.losses()  # bit-identical on CPU
    assert min(second.losses()) == 11
    assert resumed.val_loss == full.val_loss and resumed.final_loss == full.final_loss
    vals = [(p["step"], p["val_loss"]) for p in first.of("val") + second.of("val")]
    assert vals == [(p["step"], p["val_loss"]) for p in straight.of("val")]
    assert [step for step, _ in vals] == [5, 10, 15, 20]  # the eval due at the stop is not lost


@pytest.mark.parametrize("arch", ["softmax", "lightning", "hgrn2", "mamba2"])
def test_resume_gives_bit_identical_weights_and_optimizer_state(tmp_path, arch):
    """Every mixer (hybrid above): stopped at step 3 and resumed, the final weights, AdamW moments and step count,
    learning rates and data position equal a straight run's bit for bit on CPU."""
    s = spec(arch=arch, tokens=8 * 32 * 6, warmup=2)
    straight = Recorder()
    pretrain(s, straight, tmp_path / "straight")
    first, second = Recorder(), Recorder()
    with pytest.raises(Interrupted):
        pretrain(s, first, tmp_path / "resumed", should_stop=lambda: len(first.of("train")) >= 3)
    pretrain(s, second, tmp_path / "resumed")
    assert [p["lr"] for p in first.of("train") + second.of("train")] == [p["lr"] for p in straight.of("train")]
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert a["step"] == b["step"] == 6 and a["data"] == b["data"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    moments = [(i, k) for i in a["optimizer"]["state"] for k in ("step", "exp_avg", "exp_avg_sq")]
    assert all(torch.equal(a["optimizer"]["state"][i][k], b["optimizer"]["state"][i][k]) for i, k in moments)


def _pretrain_in_subprocess(s: RunSpec, run_dir: Path, fault: str | None) -> tuple[subprocess.CompletedProcess, dict]:
    """``pretrain`` in a fresh Python process: its exit and, when it finishes, its losses by step and summary."""
    code = (
        "import json, sys, torch; from sweep.spec import RunSpec; from models.train import pretrain\n"
        "torch.set_num_threads(1)\n"
        "losses = {}\n"
        "def report(kind, payload):\n"
        "    if kind == 'train': losses[payload['step']] = payload['loss']\n"
        f"summary = pretrain(RunSpec.from_json({s.canonical_json()!r}), report, sys.argv[1], fault={fault!r})\n"
        "print('RESULT ' + json.dumps({'losses': losses, 'resumed_from_step': summary.resumed_from_step,"
        " 'steps': summary.steps}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, str(run_dir)], env=env, cwd=ROOT, timeout=120,
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(lines[-1][len("RESULT "):]) if lines else {}
    result["losses"] = {int(k): v for k, v in result.get("losses", {}).items()}
    return proc, result


def test_process_kill_and_retry(tmp_path):
    """fault="exit@K" kills the process after checkpointing K; the retry, a new process, goes past K and matches a
    straight run, with bit-identical losses. All three run in fresh single-threaded processes: with two threads on
    a 2-core machine, one test run in eight had the retry differ from the straight run in the 7th digit, while 12
    straight runs in a row agreed bit for bit (so the cross-process resume is exact only up to that rounding when
    training is multi-threaded)."""
    s = spec(tokens=8 * 32 * 12)
    killed, _ = _pretrain_in_subprocess(s, tmp_path / "run", "exit@7")
    assert killed.returncode == 1, killed.stderr[-2000:]
    assert checkpoint_steps(tmp_path / "run") == [7]
    retried, retry = _pretrain_in_subprocess(s, tmp_path / "run", "exit@7")  # a checkpoint at 7 exists: no exit
    assert retried.returncode == 0, retried.stderr[-2000:]
    assert retry["resumed_from_step"] == 7 and retry["steps"] == 12
    _, straight = _pretrain_in_subprocess(s, tmp_path / "straight", None)
    assert sorted(retry["losses"]) == list(range(8, 13))
    assert retry["losses"] == {k: v for k, v in straight["losses"].items() if k > 7}


def test_nan_fault_raises_diverged(tmp_path):
    with pytest.raises(Diverged) as err:
        pretrain(spec(), Recorder(), tmp_path, fault="nan@3")
    assert err.value.step == 3 and "step 3" in str(err.value)
    with pytest.raises(ValueError, match="fault"):
        pretrain(spec(), Recorder(), tmp_path, fault="boom@3")


def test_a_run_that_ends_no_better_than_a_uniform_guess_is_diverged(tmp_path):
    # lr 1e-9 leaves the random model as it was: its validation loss stays at ln 260 or above, so the run is no
    # result for a fit (before, it was recorded done)
    rec = Recorder()
    with pytest.raises(Diverged) as err:
        pretrain(spec(arch="softmax", lr=1e-9, tokens=8 * 32 * 2), rec, tmp_path)
    assert err.value.step == 2 and "uniform guess" in str(err.value) and "ln 260 = 5.561" in str(err.value)
    # the loss that decided it is recorded (it had been dropped, leaving runs.val_loss at an earlier validation)
    [val] = rec.of("val")
    assert val["step"] == 2 and val["val_loss"] >= math.log(260)


def test_an_eval_the_data_cannot_feed_fails_before_the_first_step(tmp_path):
    text = tmp_path / "small.txt"
    text.write_bytes(b"some filler text, short. " * 120)  # NIAH at twice 128 needs more filler than its 150 bytes
    rec = Recorder()
    with pytest.raises(ValueError, match="niah evals at length 256"):
        pretrain(spec(data=f"{text}+passkey@0.1", evals=("niah",), seq_len=128), rec, tmp_path / "run")
    assert rec.events == [] and checkpoint_steps(tmp_path / "run") == []


def test_a_loss_that_blows_up_and_recovers_is_not_diverged(tmp_path):
    # lr 3 with no warm-up: the loss spends many steps above 2 ln V, then ends far below ln V. Only the end
    # decides, since a run's result can still be worth having (the high-lr end of a learning-rate sweep).
    rec = Recorder()
    summary = pretrain(spec(arch="softmax", lr=3.0, warmup=1, tokens=8 * 32 * 60), rec, tmp_path)
    assert max(p["loss"] for p in rec.of("train")) > 2 * math.log(260)
    assert summary.val_loss < math.log(260) - 1


def test_overlapped_readback_reports_and_saves_the_same(tmp_path):
    """Reading each loss back one step late (what CUDA runs do) changes no report, eval or checkpoint."""
    s = spec(tokens=8 * 32 * 12, eval_every=5)
    at_once, late = Recorder(), Recorder()
    a = pretrain(s, at_once, tmp_path / "a", ckpt_every_steps=4, overlap_readback=False)
    b = pretrain(s, late, tmp_path / "b", ckpt_every_steps=4, overlap_readback=True)
    strip = lambda rec: [(k, {n: v for n, v in p.items() if n not in ("tokens_per_s", "mfu")}) for k, p in rec.events]  # noqa: E731
    assert strip(late) == strip(at_once) and len(late.of("train")) == 12
    assert (b.final_loss, b.val_loss) == (a.final_loss, a.val_loss)
    assert checkpoint_steps(tmp_path / "b") == checkpoint_steps(tmp_path / "a") == [8, 12]
    assert load_checkpoint(tmp_path / "b")["loss"] == load_checkpoint(tmp_path / "a")["loss"] == a.final_loss


def test_overlapped_readback_diverges_at_the_nan_step_and_saves_no_later_checkpoint(tmp_path):
    with pytest.raises(Diverged) as err:
        pretrain(spec(), Recorder(), tmp_path, fault="nan@3", ckpt_every_steps=1, overlap_readback=True)
    assert err.value.step == 3
    assert checkpoint_steps(tmp_path) == [1, 2]  # step 3's checkpoint waited for its loss, which was NaN
    assert math.isfinite(load_checkpoint(tmp_path)["loss"])


def test_truncated_newest_checkpoint_falls_back_to_previous(tmp_path):
    s = spec(tokens=8 * 32 * 12)
    first = Recorder()
    pretrain(s, first, tmp_path / "run", ckpt_every_steps=4)
    assert checkpoint_steps(tmp_path / "run") == [8, 12]  # only the newest two are kept
    newest = tmp_path / "run" / "ckpt-000000012.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    assert load_checkpoint(tmp_path / "run")["step"] == 8
    again = Recorder()
    summary = pretrain(s, again, tmp_path / "run", ckpt_every_steps=4)
    assert summary.resumed_from_step == 8
    assert again.losses() == {k: v for k, v in first.losses().items() if k > 8}
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "run").iterdir())


def test_checkpoint_of_another_run_is_refused(tmp_path):
    pretrain(spec(tokens=8 * 32 * 2), Recorder(), tmp_path)
    with pytest.raises(ValueError, match="another run"):
        pretrain(spec(tokens=8 * 32 * 2, seed=1), Recorder(), tmp_path)


def test_time_based_checkpoints(tmp_path):
    rec = Recorder()
    pretrain(spec(tokens=8 * 32 * 3), rec, tmp_path, ckpt_every_steps=0, ckpt_every_s=0.0)
    assert [p["step"] for p in rec.of("ckpt")] == [1, 2, 3]


def test_cuda_oom_becomes_out_of_memory(tmp_path, monkeypatch):
    def oom(self, idx, targets=None):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(LM, "forward", oom)
    with pytest.raises(OutOfMemory) as err:
        pretrain(spec(), Recorder(), tmp_path, microbatch=4)
    assert (err.value.step, err.value.microbatch) == (1, 4)


def test_unknown_eval_is_refused_before_training(tmp_path):
    t = time.perf_counter()
    with pytest.raises(ValueError, match="unknown eval"):
        pretrain(spec(evals=("hellaswag",)), Recorder(), tmp_path)
    assert time.perf_counter() - t < 5 and not checkpoint_steps(tmp_path)


def test_default_microbatch_on_cpu():
    cpu = torch.device("cpu")
    assert largest_divisor_at_most(48, 16) == 16 and largest_divisor_at_most(20, 16) == 10
    assert largest_divisor_at_most(7, 16) == 7 and largest_divisor_at_most(13, 4) == 1
    s = spec(batch_size=24)
    assert default_microbatch(s, s.model_config(), cpu) == 12


def test_compile_model_merges_the_mode_with_the_inductor_options(monkeypatch):
    """torch.compile takes a mode or options, not both: compile_model passes the mode's options plus INDUCTOR_OPTIONS,
    leaving out a key this torch's inductor does not know (which torch.compile would refuse)."""
    import models.train as train

    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: seen.append(kwargs) or model)
    monkeypatch.setattr(train, "INDUCTOR_OPTIONS", {"triton.mix_order_reduction_allow_multi_stages": True,
                                                    "triton.no_such_setting": True})
    model = torch.nn.Linear(2, 2)
    assert train.compile_model(model, "reduce-overhead") is model
    assert train.compile_model(model) is model
    assert seen == [{"options": {"triton.cudagraphs": True, "triton.mix_order_reduction_allow_multi_stages": True}},
                    {"options": {"triton.mix_order_reduction_allow_multi_stages": True}}]


@pytest.mark.parametrize("overlap", [False, True])
def test_a_nan_gradient_under_a_finite_loss_diverges_before_the_weights_are_touched(tmp_path, overlap):
    # the last step: before, the update made every weight NaN and the run was recorded done with val_loss NaN
    s = spec(tokens=8 * 32 * 4)
    rec = Recorder()
    with pytest.raises(Diverged) as err:
        pretrain(s, rec, tmp_path, fault="nangrad@4", ckpt_every_steps=1, overlap_readback=overlap)
    assert err.value.step == 4
    assert checkpoint_steps(tmp_path) == [2, 3] and not rec.of("val")  # no result of the poisoned model
    assert all(torch.isfinite(v).all() for v in load_checkpoint(tmp_path)["model"].values())


def test_a_corrupt_checkpoint_is_set_aside_and_stale_temp_files_removed(tmp_path):
    s = spec(tokens=8 * 32 * 12)
    pretrain(s, Recorder(), tmp_path, ckpt_every_steps=4)
    (tmp_path / ".ckpt-000000004.pt.999.tmp").write_bytes(b"half a checkpoint")  # a writer killed mid-save
    newest = checkpoint_path(tmp_path, 12)
    newest.write_bytes(b"garbage")
    assert load_checkpoint(tmp_path)["step"] == 8
    assert checkpoint_steps(tmp_path) == [8] and newest.with_name(newest.name + ".corrupt").exists()
    save_checkpoint(tmp_path, 13, {"step": 13, "model": {}})
    assert not list(tmp_path.glob(".ckpt-*.tmp")) and checkpoint_steps(tmp_path) == [8, 13]


def test_resuming_on_other_data_is_refused(tmp_path):
    s = spec(tokens=8 * 32 * 12)
    with pytest.raises(Interrupted):
        pretrain(s, Recorder(), tmp_path, should_stop=iter([False, True]).__next__)
    state = load_checkpoint(tmp_path)
    state["data_sha256"] = "0" * 64  # as if trained on another Python's stdlib
    save_checkpoint(tmp_path, state["step"], state)
    with pytest.raises(ValueError, match="resuming would train on other data"):
        pretrain(s, Recorder(), tmp_path)


def test_a_run_whose_every_checkpoint_is_unreadable_fails_rather_than_restarting_from_step_0(tmp_path):
    # Before, an unreadable lone checkpoint was set aside and the run trained again from step 0 with a log line
    # alone (its earlier steps and wall time gone); a retry did the same, the set-aside file no longer counted.
    s = spec(tokens=8 * 32 * 2)
    checkpoint_path(tmp_path, 1).write_bytes(b"half a checkpoint")
    for _ in range(2):  # the retry, finding only the set-aside file, refuses too
        rec = Recorder()
        with pytest.raises(CheckpointUnreadable, match=r"no readable checkpoint.*ckpt-000000001.pt.corrupt"):
            pretrain(s, rec, tmp_path)
        assert rec.events == [] and checkpoint_steps(tmp_path) == []
    checkpoint_path(tmp_path, 1).with_name("ckpt-000000001.pt.corrupt").unlink()  # what the message says to do
    assert load_checkpoint(tmp_path) is None  # a fresh start


def test_a_run_resumes_on_its_corpus_moved_elsewhere(tmp_path):
    # The run id knows a corpus by its contents, so a moved checkout or corpus asks for the same run in the same
    # checkpoint folder; the data hash its checkpoints carry named the path too, and the resume was refused as
    # "trained on other data" (and runs.data_sha256 differed between two copies of one file).
    text = b"".join(b"line %d of a small corpus\n" % i for i in range(400))
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "corpus.txt").write_bytes(text)
    at = {w: spec(data=str(tmp_path / w / "corpus.txt"), data_digest=content_digest(tmp_path / w / "corpus.txt"),
                  tokens=8 * 32 * 3) for w in ("a", "b")}
    assert at["a"].run_id == at["b"].run_id
    assert open_data(at["a"].data, 260).sha256 == open_data(at["b"].data, 260).sha256
    with pytest.raises(Interrupted):
        pretrain(at["a"], Recorder(), tmp_path / "ckpt", should_stop=lambda: True)
    with pytest.raises(Interrupted) as err:  # it resumes at step 2 (stopped there, to skip the final validation)
        pretrain(at["b"], Recorder(), tmp_path / "ckpt", should_stop=lambda: True)
    assert err.value.step == 2
    # a checkpoint of the older, path-named hash still resumes where its corpus lies
    data = open_data(at["b"].data, 260)
    assert data.sha256_by_path() != data.sha256
    check_resumable({"run": at["b"].run_id, "data_sha256": data.sha256_by_path()}, at["b"], data, tmp_path / "ckpt")


def test_a_checkpoint_of_a_folder_read_without_newlines_between_its_files_is_not_resumed(tmp_path, monkeypatch):
    # A folder's files are now joined with a newline: its checkpoints from before trained on another byte stream,
    # under the same run id (which hashes the files, not the stream), and must not be continued on the new one.
    from models import data as D

    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_bytes(b"".join(b"file %d line %d." % (i, j) for j in range(200)))
    s = spec(data=str(folder), data_digest=content_digest(folder), tokens=8 * 32 * 3)
    with pytest.raises(Interrupted):
        pretrain(s, Recorder(), tmp_path / "ckpt", should_stop=lambda: True)
    with monkeypatch.context() as m:
        m.setattr(D, "DOC_SEP", b"", raising=False)
        old = open_data(s.data, 260).sha256  # the hash the stream joined without a separator had
    state = load_checkpoint(tmp_path / "ckpt")
    save_checkpoint(tmp_path / "ckpt", state["step"], {**state, "data_sha256": old})
    with pytest.raises(ValueError, match="resuming would train on other data"):
        pretrain(s, Recorder(), tmp_path / "ckpt")


def _flip_a_byte_mid_file(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # inside a tensor's bytes: torch.load reads the file without a complaint
    path.write_bytes(bytes(raw))


def test_a_bit_flipped_checkpoint_fails_its_checksum_and_the_previous_one_is_resumed(tmp_path, caplog):
    s = spec(tokens=8 * 32 * 12)
    pretrain(s, Recorder(), tmp_path, ckpt_every_steps=4)
    newest = checkpoint_path(tmp_path, 12)
    _flip_a_byte_mid_file(newest)
    assert torch.load(newest, map_location="cpu", weights_only=True)["step"] == 12  # what went unnoticed before
    with caplog.at_level("WARNING", logger="models.train"):
        assert load_checkpoint(tmp_path)["step"] == 8
    assert re.search(r"ckpt-000000012.pt: its sha256 is \w+, not the \w+ recorded", caplog.text)
    assert checkpoint_steps(tmp_path) == [8] and newest.with_name(newest.name + ".corrupt").exists()


def test_a_lone_corrupt_checkpoint_raises_checkpoint_unreadable_naming_it(tmp_path):
    save_checkpoint(tmp_path, 5, {"step": 5, "model": {"w": torch.arange(4096.0)}})
    path = checkpoint_path(tmp_path, 5)
    _flip_a_byte_mid_file(path)
    with pytest.raises(CheckpointUnreadable, match=r"sha256 .* not the .* recorded"):
        verify_checkpoint(path)
    with pytest.raises(CheckpointUnreadable, match=r"no readable checkpoint, only ckpt-000000005.pt.corrupt"):
        load_checkpoint(tmp_path)


def test_checkpoints_without_a_checksum_still_load_and_old_checksums_go_with_their_files(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"step": step, "model": {"w": torch.full((8,), float(step))}})
    # the newest two and their checksums, nothing else (no temp file, no checksum of a pruned checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-000000002.pt", "ckpt-000000002.pt.sha256", "ckpt-000000003.pt", "ckpt-000000003.pt.sha256"]
    checkpoint_path(tmp_path, 3).with_name("ckpt-000000003.pt.sha256").unlink()  # as written before checksums
    assert torch.equal(load_checkpoint(tmp_path)["model"]["w"], torch.full((8,), 3.0))


#: One of two gloo ranks training a tiny run whose ranks see different numbers of labelled tokens (argv: rank, port,
#: checkpoint folder, the spec's JSON[, a JSON object of options: "unlabelled", training sequences to leave without
#: a labelled token; "fsdp_min_params"; "stop_at", a step to stop at as ``stopping_at`` does]); rank 0 prints its
#: losses by step.
GLOO_RANK = """
import json, os, sys
from datetime import timedelta
import torch, torch.distributed as dist
from models.train import Interrupted, pretrain
from sweep.spec import RunSpec
torch.set_num_threads(1)
rank, port, ckpt_dir, spec = int(sys.argv[1]), sys.argv[2], sys.argv[3], RunSpec.from_json(sys.argv[4])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=30))
options = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
if options.get("unlabelled"):  # as the unlabelled fixture does
    from models.data import Batches
    mask = set(options["unlabelled"])
    unmasked = Batches.sequence
    def sequence(self, index):
        x, y = unmasked(self, index)
        return (x, y * 0 - 100) if self.split == "train" and index in mask else (x, y)
    Batches.sequence = sequence
losses = {}
def report(kind, payload):
    if kind == "train": losses[payload["step"]] = payload["loss"]
asked = iter(range(1, spec.steps + 1))
stop = (lambda: next(asked) == options["stop_at"]) if options.get("stop_at") else None
try:
    pretrain(spec, report, ckpt_dir, device="cpu", microbatch=2, fsdp_min_params=options.get("fsdp_min_params"),
             should_stop=stop)
except Interrupted:
    pass
if rank == 0:
    print("LOSSES " + json.dumps(losses))
dist.destroy_process_group()
"""


def train_on_two_gloo_ranks(s, ckpt_dir: Path, **options) -> dict[int, float]:
    """Train ``s`` on two gloo ranks of two subprocesses (microbatch 2) with GLOO_RANK's ``options``; rank 0's train
    losses by step."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", GLOO_RANK, str(rank), str(port), str(ckpt_dir),
                               s.canonical_json(), json.dumps(options)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    [line] = [x for x in outs[0][0].splitlines() if x.startswith("LOSSES ")]
    return {int(k): v for k, v in json.loads(line[len("LOSSES "):]).items()}


def test_data_parallel_ranks_weight_their_loss_by_the_global_labelled_tokens(tmp_path):
    """MQAR labels a few positions of a sequence, text all of them: two ranks see different numbers of labelled
    tokens, and the step must still be the mean over the global batch's tokens, as one worker trains it. Each rank
    averaged over its own tokens and DDP then averaged the ranks, which weighted the two ranks' tokens unequally."""
    s = spec(data="stdlib+mqar@0.5", vocab_size=512, tokens=8 * 32 * 3, lr=1e-2, seed=1)
    one = Recorder()
    pretrain(s, one, tmp_path / "one", device="cpu", microbatch=2)
    two = train_on_two_gloo_ranks(s, tmp_path / "two")
    assert sorted(two) == [1, 2, 3]
    for step, loss in one.losses().items():  # the same sequences; only the order of float sums differs
        assert two[step] == pytest.approx(loss, rel=1e-5), step


def stopping_at(step: int):
    """A ``should_stop`` that stops the run at ``step`` (checkpointed), sparing it the final validation."""
    asked = iter(range(1, step + 1))
    return lambda: next(asked) == step


#: Training sequences left without a labelled token (batch 8, two ranks of 4, microbatches of 2): at step 1 all of
#: rank 1's, at step 2 the whole batch, at step 3 rank 0's first microbatch.
UNLABELLED = (4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17)


def unlabelled_spec(tmp_path: Path):
    """A 4-step run on a small, easily learned text, whose loss falls below ln V in 3 updates."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"".join(b"line %d of a small corpus\n" % (i % 50) for i in range(400)))
    return spec(data=str(corpus), data_digest=content_digest(corpus), tokens=8 * 32 * 4, lr=1e-2, seed=1)


@pytest.fixture
def unlabelled(monkeypatch):
    """Leave the UNLABELLED training sequences without a labelled token (every target ignored), as masked data does."""
    from models.data import Batches

    unmasked = Batches.sequence

    def sequence(self, index):
        x, y = unmasked(self, index)
        return (x, np.full_like(y, -100)) if self.split == "train" and index in UNLABELLED else (x, y)

    monkeypatch.setattr(Batches, "sequence", sequence)


def test_a_step_without_a_labelled_token_updates_nothing_and_reports_no_loss(tmp_path, unlabelled):
    """A batch whose every target is ignored has no loss to learn from: its mean (0 / 0) raised ZeroDivisionError, or
    under data parallelism became NaN and poisoned every weight. Now the step leaves the weights and the optimizer as
    they were, reports no loss, and the run goes on."""
    after = {}

    def record(kind, payload):
        rec(kind, payload)
        if kind == "ckpt":
            after[payload["step"]] = load_checkpoint(tmp_path / "one")

    rec = Recorder()
    summary = pretrain(unlabelled_spec(tmp_path), record, tmp_path / "one", device="cpu", microbatch=2,
                       ckpt_every_steps=1)
    assert sorted(rec.losses()) == [1, 3, 4] and all(math.isfinite(v) for v in rec.losses().values())
    assert math.isfinite(summary.final_loss) and math.isfinite(summary.val_loss)
    for name, weight in after[1]["model"].items():
        assert torch.equal(after[2]["model"][name], weight), name
    updates = {step: {int(p["step"]) for p in ckpt["optimizer"]["state"].values()} for step, ckpt in after.items()}
    assert updates == {1: {1}, 2: {1}, 3: {2}, 4: {3}}
    assert all(torch.isfinite(w).all() for w in after[4]["model"].values())


@pytest.mark.parametrize("fsdp", [None, 1], ids=["ddp", "fsdp"])
def test_data_parallel_ranks_without_a_labelled_token_contribute_nothing(tmp_path, unlabelled, fsdp):
    """A rank whose slice holds no labelled token divided by zero (and a batch without one, 0 / 0 on every rank, made
    NaN weights); it must join the gradient reduction (which waits for every rank) with a zero gradient, so two ranks
    train as one worker does, under DDP and FSDP."""
    s = unlabelled_spec(tmp_path)
    one = Recorder()
    with pytest.raises(Interrupted):  # at the last step, checkpointed: the final validation has no bearing here
        pretrain(s, one, tmp_path / "one", device="cpu", microbatch=2, should_stop=stopping_at(s.steps))
    two = train_on_two_gloo_ranks(s, tmp_path / "two", unlabelled=UNLABELLED, fsdp_min_params=fsdp, stop_at=s.steps)
    assert sorted(two) == sorted(one.losses()) == [1, 3, 4]
    for step, loss in one.losses().items():
        assert two[step] == pytest.approx(loss, rel=1e-5), step
    # Summed in another order, the weights differ by about 1e-7; a rank's wrong gradient or a wrong update moves them
    # by about the learning rate (1e-2), and NaN fails allclose.
    for name, weight in load_checkpoint(tmp_path / "one")["model"].items():
        assert torch.allclose(load_checkpoint(tmp_path / "two")["model"][name], weight, rtol=1e-4, atol=1e-5), name


def mask_split(monkeypatch, split: str) -> None:
    """Leave every sequence of ``split`` without a labelled token (every target ignored), as fully masked data does."""
    from models.data import Batches

    unmasked = Batches.sequence

    def sequence(self, index):
        x, y = unmasked(self, index)
        return (x, np.full_like(y, -100)) if self.split == split else (x, y)

    monkeypatch.setattr(Batches, "sequence", sequence)


def test_validation_text_without_a_labelled_token_gives_no_val_loss_and_no_divergence(tmp_path, monkeypatch):
    """Validation text with no labelled token divided by zero at the first validation; now there is no "val" report
    and the run ends with val_loss None (not NaN, so not Diverged), its training loss intact."""
    mask_split(monkeypatch, "val")
    rec = Recorder()
    s = dataclasses.replace(unlabelled_spec(tmp_path), eval_every=2)
    summary = pretrain(s, rec, tmp_path / "run", device="cpu", microbatch=4)
    assert summary.val_loss is None and rec.of("val") == []
    assert summary.final_loss == rec.of("train")[-1]["loss"] < math.log(260)
    assert rejected_validation(None, 260, final=True) is None


def test_a_run_without_a_labelled_training_token_raises_unlabelled(tmp_path, monkeypatch):
    """A run none of whose steps had a labelled token ended with final_loss NaN; now it raises Unlabelled (a
    ValueError) saying so, on the attempt that trains the last step and on one resumed after it."""
    mask_split(monkeypatch, "train")
    s, rec = unlabelled_spec(tmp_path), Recorder()
    with pytest.raises(Unlabelled, match="no training step of the run had a labelled token"):
        pretrain(s, rec, tmp_path / "run", device="cpu", microbatch=4)
    assert rec.of("train") == [] and rec.of("val") == []
    with pytest.raises(ValueError, match="no training step"):  # resumed from the last step's checkpoint
        pretrain(s, Recorder(), tmp_path / "run", device="cpu", microbatch=4)
