"""Crash safety and exact resume: a resumed run (lone or packed) trains as an uninterrupted one, a failed or killed
checkpoint write leaves the previous checkpoint to resume from, and a divergence survives the attempt it ended."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models.train as train
from models.packed import pretrain_pack
from models.train import Diverged, Interrupted, checkpoint_steps, load_checkpoint, pretrain
from tests.models.test_packed import members
from tests.models.test_train import ROOT, Recorder, spec


def stop_after(step: int):
    """A ``should_stop`` that asks for a stop at the ``step``-th call (one call per step)."""
    calls = iter(range(1, 10**6))
    return lambda: next(calls) >= step


def assert_same_state(a: dict, b: dict) -> None:
    """Two checkpoints hold bit-identical weights, AdamW moments and step counts, and data position."""
    assert a["step"] == b["step"] and a["data"] == b["data"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for i, entry in a["optimizer"]["state"].items():
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(entry[k], b["optimizer"]["state"][i][k]), (i, k)


def curve(*recs: Recorder, kind: str = "train", value: str = "loss") -> dict[int, float]:
    """Step -> value over several attempts' reports; a step reported twice must carry the same value."""
    out: dict[int, float] = {}
    for rec in recs:
        for p in rec.of(kind):
            assert out.setdefault(p["step"], p[value]) == p[value], p["step"]
    return out


# ---------------------------------------------------------------------------------------------------
# Resume equivalence


def test_a_run_that_fails_after_a_checkpoint_resumes_bit_for_bit(tmp_path):
    """An exception at step 8 after the checkpoint of step 6: the retry resumes at 6, and its curve, evals, lr and
    final weights and AdamW state equal an uninterrupted run's (on CPU, bit for bit); step 7 is reported again, with
    the same loss (the database upserts it)."""
    s = spec(tokens=8 * 32 * 12, eval_every=4, schedule="wsd")
    straight = Recorder()
    pretrain(s, straight, tmp_path / "straight", microbatch=2, ckpt_every_steps=3)
    first, second = Recorder(), Recorder()
    with pytest.raises(RuntimeError, match="injected failure at step 8"):
        pretrain(s, first, tmp_path / "run", microbatch=2, ckpt_every_steps=3, fault="raise@8")
    assert checkpoint_steps(tmp_path / "run") == [3, 6]
    resumed = pretrain(s, second, tmp_path / "run", microbatch=2, ckpt_every_steps=3)
    assert resumed.resumed_from_step == 6 and min(second.losses()) == 7
    assert curve(first, second) == straight.losses()
    assert curve(first, second, value="lr") == curve(straight, value="lr")
    assert curve(first, second, kind="val", value="val_loss") == curve(straight, kind="val", value="val_loss")
    assert sorted(curve(first, second, kind="val", value="val_loss")) == [4, 8, 12]
    assert_same_state(load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "run"))


def test_a_stopped_pack_resumes_bit_for_bit(tmp_path):
    """A pack stopped at step 3 and resumed as a pack equals the uninterrupted pack bit for bit (curves, validation
    losses, weights, moments), member by member, with no curve point missing or reported twice."""
    specs = members(tokens=8 * 32 * 7, eval_every=2)
    straight = [Recorder() for _ in specs]
    pretrain_pack(specs, straight, [tmp_path / f"s{i}" for i in range(3)], device="cpu", microbatch=4)
    dirs = [tmp_path / f"r{i}" for i in range(3)]
    first, second = [Recorder() for _ in specs], [Recorder() for _ in specs]
    stopped = pretrain_pack(specs, first, dirs, device="cpu", microbatch=4, should_stop=stop_after(3))
    assert [type(r) for r in stopped] == [Interrupted] * 3
    pretrain_pack(specs, second, dirs, device="cpu", microbatch=4)
    for i in range(3):
        assert sorted(first[i].losses()) == [1, 2, 3] and sorted(second[i].losses()) == [4, 5, 6, 7]
        assert curve(first[i], second[i]) == straight[i].losses()
        assert curve(first[i], second[i], kind="val", value="val_loss") == curve(straight[i], kind="val", value="val_loss")
        assert_same_state(load_checkpoint(tmp_path / f"s{i}"), load_checkpoint(dirs[i]))


def test_a_pack_member_that_diverged_before_the_stop_stays_diverged(tmp_path):
    """Member 0 diverges at step 2; the pack is stopped at step 4 and resumed (no fault now): member 0 ends as the
    same ``Diverged`` without training or reporting a step (it had resumed from its step-1 checkpoint and trained
    to the end), and its pack-mates equal those of the uninterrupted pack bit for bit."""
    specs = members(tokens=8 * 32 * 6)
    faults = ["nan@2", None, None]
    straight = [Recorder() for _ in specs]
    ref = pretrain_pack(specs, straight, [tmp_path / f"s{i}" for i in range(3)], device="cpu", microbatch=4,
                        faults=faults, ckpt_every_steps=1)
    assert isinstance(ref[0], Diverged) and ref[0].step == 2
    dirs = [tmp_path / f"r{i}" for i in range(3)]
    first, second = [Recorder() for _ in specs], [Recorder() for _ in specs]
    stopped = pretrain_pack(specs, first, dirs, device="cpu", microbatch=4, faults=faults, ckpt_every_steps=1,
                            should_stop=stop_after(4))
    assert isinstance(stopped[0], Diverged) and [type(r) for r in stopped[1:]] == [Interrupted] * 2
    resumed = pretrain_pack(specs, second, dirs, device="cpu", microbatch=4, ckpt_every_steps=1)
    assert isinstance(resumed[0], Diverged), resumed[0]
    assert (resumed[0].step, resumed[0].reason) == (2, ref[0].reason)
    assert second[0].events == [] and checkpoint_steps(dirs[0]) == [1]
    for i in (1, 2):
        assert resumed[i].steps == 6 and resumed[i].resumed_from_step == 4
        assert curve(first[i], second[i]) == straight[i].losses()
        assert_same_state(load_checkpoint(tmp_path / f"s{i}"), load_checkpoint(dirs[i]))


def test_a_stopped_pack_relaunched_without_its_diverged_member_resumes_bit_for_bit(tmp_path):
    """What the launcher does after a stop: the pack's diverged member is not queued again, so its pack-mates resume as
    a pack of two. They still equal the uninterrupted pack of three (whose AdamW masked the diverged member from step 2
    on) bit for bit: a member's update must not depend on whether a pack-mate is masked (it had differed by up to 5e-7
    in the loss within 4 steps)."""
    specs = members(tokens=8 * 32 * 6)
    faults = [None, None, "nan@2"]
    straight = [Recorder() for _ in specs]
    pretrain_pack(specs, straight, [tmp_path / f"s{i}" for i in range(3)], device="cpu", microbatch=4, faults=faults)
    dirs = [tmp_path / f"r{i}" for i in range(3)]
    first, second = [Recorder() for _ in specs], [Recorder(), Recorder()]
    pretrain_pack(specs, first, dirs, device="cpu", microbatch=4, faults=faults, should_stop=stop_after(3))
    resumed = pretrain_pack(specs[:2], second, dirs[:2], device="cpu", microbatch=4)
    for i in (0, 1):
        assert resumed[i].resumed_from_step == 3
        assert curve(first[i], second[i]) == straight[i].losses(), i
        assert_same_state(load_checkpoint(tmp_path / f"s{i}"), load_checkpoint(dirs[i]))


def test_a_diverged_pack_member_retried_alone_after_the_pack_crashed_stays_diverged(tmp_path):
    """A pack whose member 0 diverged at step 2 then crashes at step 4 (the launcher retries every member alone):
    member 0 alone raises the same ``Diverged`` at once, and does not train on from its step-1 checkpoint."""
    specs = members(tokens=8 * 32 * 6)
    dirs = [tmp_path / f"m{i}" for i in range(3)]
    with pytest.raises(RuntimeError, match="injected failure at step 4"):
        pretrain_pack(specs, [Recorder() for _ in specs], dirs, device="cpu", microbatch=4,
                      faults=["nan@2", "raise@4", None], ckpt_every_steps=1)
    rec = Recorder()
    with pytest.raises(Diverged) as err:
        pretrain(specs[0], rec, dirs[0], device="cpu", microbatch=4, ckpt_every_steps=1)
    assert err.value.step == 2 and "NaN" in err.value.reason
    assert rec.events == [] and checkpoint_steps(dirs[0]) == [1]
    assert pretrain(specs[1], Recorder(), dirs[1], device="cpu", microbatch=4).resumed_from_step == 3


def test_a_diverged_run_stays_diverged_and_its_record_is_its_own(tmp_path):
    """A lone run diverged at step 3 raises that ``Diverged`` again on a retry, without training; the record names
    its run, so another run's folder holding it is refused as another run's checkpoint is."""
    s = spec(tokens=8 * 32 * 6)
    with pytest.raises(Diverged):
        pretrain(s, Recorder(), tmp_path / "run", fault="nan@3", ckpt_every_steps=1)
    rec = Recorder()
    with pytest.raises(Diverged) as err:
        pretrain(s, rec, tmp_path / "run", ckpt_every_steps=1)
    assert err.value.step == 3 and rec.events == [] and checkpoint_steps(tmp_path / "run") == [1, 2]
    with pytest.raises(ValueError, match="another run"):
        pretrain(spec(tokens=8 * 32 * 6, lr=1e-3), Recorder(), tmp_path / "run")


# ---------------------------------------------------------------------------------------------------
# Resuming with another microbatch (the launcher halves it after an out-of-memory)


@pytest.mark.parametrize("after", [4, 2])
def test_a_run_resumed_with_a_smaller_microbatch_keeps_its_tokens_and_curve(tmp_path, after):
    s = spec(tokens=8 * 32 * 10, eval_every=4)
    straight = Recorder()
    pretrain(s, straight, tmp_path / "straight", microbatch=8)
    first, second = Recorder(), Recorder()
    with pytest.raises(Interrupted):
        pretrain(s, first, tmp_path / "run", microbatch=8, should_stop=stop_after(5))
    summary = pretrain(s, second, tmp_path / "run", microbatch=after)
    assert summary.microbatch == after and summary.resumed_from_step == 5
    assert curve(first, second, value="tokens") == curve(straight, value="tokens")  # 256 tokens a step throughout
    losses, ref = curve(first, second), straight.losses()
    assert sorted(losses) == sorted(ref)
    assert max(abs(losses[k] - ref[k]) for k in ref) < 2e-6  # float rounding of the microbatch sums alone
    vals, ref_vals = curve(first, second, kind="val", value="val_loss"), curve(straight, kind="val", value="val_loss")
    assert sorted(vals) == sorted(ref_vals) == [4, 8, 10]
    assert max(abs(vals[k] - ref_vals[k]) for k in ref_vals) < 2e-6
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "run")
    assert a["data"] == b["data"] and max((a["model"][k] - b["model"][k]).abs().max() for k in a["model"]) < 1e-6


def test_a_pack_resumed_with_a_smaller_microbatch_keeps_its_curves(tmp_path):
    specs = members(tokens=8 * 32 * 6, eval_every=3)
    straight = [Recorder() for _ in specs]
    pretrain_pack(specs, straight, [tmp_path / f"s{i}" for i in range(3)], device="cpu", microbatch=4)
    dirs = [tmp_path / f"r{i}" for i in range(3)]
    first, second = [Recorder() for _ in specs], [Recorder() for _ in specs]
    pretrain_pack(specs, first, dirs, device="cpu", microbatch=4, should_stop=stop_after(3))
    results = pretrain_pack(specs, second, dirs, device="cpu", microbatch=2)
    for i in range(3):
        assert results[i].microbatch == 2 and results[i].resumed_from_step == 3
        losses, ref = curve(first[i], second[i]), straight[i].losses()
        assert sorted(losses) == sorted(ref) and max(abs(losses[k] - ref[k]) for k in ref) < 2e-6
        assert curve(first[i], second[i], value="tokens") == curve(straight[i], value="tokens")
        vals = curve(first[i], second[i], kind="val", value="val_loss")
        ref_vals = curve(straight[i], kind="val", value="val_loss")
        assert sorted(vals) == sorted(ref_vals) and max(abs(vals[k] - ref_vals[k]) for k in ref_vals) < 2e-6


# ---------------------------------------------------------------------------------------------------
# Checkpoint writes that fail or are killed


def full_disk_at(monkeypatch, step: int) -> None:
    """torch.save of the checkpoint of ``step`` writes a few bytes and fails as a full disk does."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == step:
            f.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(train.torch, "save", save)


def test_a_full_disk_while_checkpointing_leaves_no_partial_file_and_the_previous_checkpoint_resumes(
        tmp_path, monkeypatch):
    """ENOSPC while step 6's checkpoint is written: the error is raised, the partial temp file is removed (it held
    the space the next save needs, until that save), and the step-3 checkpoint resumes to the uninterrupted curve."""
    s = spec(tokens=8 * 32 * 9)
    straight = Recorder()
    pretrain(s, straight, tmp_path / "straight", ckpt_every_steps=3)
    first = Recorder()
    with monkeypatch.context() as m:
        full_disk_at(m, 6)
        with pytest.raises(OSError) as err:
            pretrain(s, first, tmp_path / "run", ckpt_every_steps=3)
    assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["ckpt-000000003.pt", "ckpt-000000003.pt.sha256"]
    assert [p["step"] for p in first.of("ckpt")] == [3]  # the failed checkpoint was never announced
    second = Recorder()
    assert pretrain(s, second, tmp_path / "run", ckpt_every_steps=3).resumed_from_step == 3
    assert curve(first, second) == straight.losses()
    assert_same_state(load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "run"))


def test_a_full_disk_while_a_pack_checkpoints_leaves_no_partial_file(tmp_path, monkeypatch):
    specs = members(tokens=8 * 32 * 4)
    dirs = [tmp_path / f"m{i}" for i in range(3)]
    with monkeypatch.context() as m:
        full_disk_at(m, 4)
        with pytest.raises(OSError):
            pretrain_pack(specs, [Recorder() for _ in specs], dirs, device="cpu", microbatch=4, ckpt_every_steps=2)
    for d in dirs:
        assert sorted(p.name for p in d.iterdir()) == ["ckpt-000000002.pt", "ckpt-000000002.pt.sha256"]
    results = pretrain_pack(specs, [Recorder() for _ in specs], dirs, device="cpu", microbatch=4, ckpt_every_steps=2)
    assert [r.resumed_from_step for r in results] == [2, 2, 2]


def test_a_process_killed_inside_a_checkpoint_write_resumes_from_the_previous_one(tmp_path):
    """os._exit halfway through writing step 6's checkpoint: the folder keeps step 3's, complete and verified, and a
    temp file; the retry resumes at 3 to the uninterrupted curve, and its next save removes the temp file."""
    s = spec(tokens=8 * 32 * 9)
    code = (
        "import os, sys, torch; import models.train as T; from sweep.spec import RunSpec\n"
        "torch.set_num_threads(1)\n"
        "real = torch.save\n"
        "def save(obj, f, *a, **k):\n"
        "    if isinstance(obj, dict) and obj.get('step') == 6:\n"
        "        f.write(b'partial' * 1000); f.flush(); os._exit(3)\n"
        "    return real(obj, f, *a, **k)\n"
        "T.torch.save = save\n"
        f"T.pretrain(RunSpec.from_json({s.canonical_json()!r}), lambda k, p: None, sys.argv[1], ckpt_every_steps=3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 3, proc.stderr[-2000:]
    left = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert left[1:] == ["ckpt-000000003.pt", "ckpt-000000003.pt.sha256"] and left[0].endswith(".tmp")
    torch.set_num_threads(1)  # the killed attempt trained single-threaded: so do these, for bit-identical losses
    straight, again = Recorder(), Recorder()
    pretrain(s, straight, tmp_path / "straight", ckpt_every_steps=3)
    assert pretrain(s, again, tmp_path / "run", ckpt_every_steps=3).resumed_from_step == 3
    assert again.losses() == {k: v for k, v in straight.losses().items() if k > 3}
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "run").iterdir())


def test_a_checkpoint_of_a_run_with_another_learning_rate_is_refused_and_left_alone(tmp_path):
    """A spec differing from the checkpoint's in one optimisation setting is another run: refused, alone and in a
    pack, and its files are kept as they are."""
    s = spec(tokens=8 * 32 * 2)
    pretrain(s, Recorder(), tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    other = spec(tokens=8 * 32 * 2, lr=1e-3)
    with pytest.raises(ValueError, match="another run"):
        pretrain(other, Recorder(), tmp_path / "run")
    [refused] = pretrain_pack([other], [Recorder()], [tmp_path / "run"], device="cpu", microbatch=4)
    assert isinstance(refused, ValueError) and "another run" in str(refused)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_the_run_key_covers_every_field_that_changes_training():
    """The run key covers every field that changes training (so no other spec resumes a run's checkpoint)."""
    base = spec()
    for field, value in (("lr", 1e-3), ("warmup", 5), ("schedule", "wsd"), ("min_lr_ratio", 0.5),
                         ("weight_decay", 0.0), ("grad_clip", 0.5), ("seed", 3), ("batch_size", 4),
                         ("seq_len", 64), ("tokens", 8 * 32 * 21), ("data", "mqar")):
        assert train._run_key(spec(**{field: value})) != train._run_key(base), field


def test_stale_temp_files_are_ignored_on_load(tmp_path):
    pretrain(spec(tokens=8 * 32 * 2), Recorder(), tmp_path / "run")
    (tmp_path / "run" / ".ckpt-000000009.pt.123.tmp").write_bytes(b"cut short")
    assert load_checkpoint(tmp_path / "run")["step"] == 2
    assert Path(tmp_path / "run" / ".ckpt-000000009.pt.123.tmp").exists()  # removed by the next save, not by a load


def test_a_divergence_that_cannot_be_recorded_is_still_raised(tmp_path, monkeypatch):
    """A full disk when the divergence is recorded: the run still ends as ``Diverged`` (an OSError in its place would
    have the launcher retry it as a crash), and the pack's member too."""
    real = train._write_synced

    def full(path, data):
        if "diverged" in Path(path).name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(train, "_write_synced", full)
    with pytest.raises(Diverged) as err:
        pretrain(spec(tokens=8 * 32 * 4), Recorder(), tmp_path / "run", fault="nan@2")
    assert err.value.step == 2 and sorted(p.name for p in (tmp_path / "run").iterdir()) == []
    results = pretrain_pack(members(tokens=8 * 32 * 3), [Recorder() for _ in range(3)],
                            [tmp_path / f"m{i}" for i in range(3)], device="cpu", microbatch=4,
                            faults=["nan@2", None, None])
    assert isinstance(results[0], Diverged) and results[1].steps == 3
