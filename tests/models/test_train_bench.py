"""Training-speed benchmark on the CPU: the real loop, its tokens/s, and the profile it can write."""

import pytest

from models.bench import bench_spec, bench_train


def test_bench_train_reports_speed_and_writes_a_profile(tmp_path):
    spec = bench_spec("lightning", "30K", seq_len=32, batch_size=2, steps=6, vocab=260)
    profile = tmp_path / "prof" / "train.txt"
    result = bench_train(spec, device="cpu", profile=profile)
    assert result["tokens_per_s"] > 0 and result["flops_per_token"] > 0
    assert result["final_loss"] > 0
    table = profile.read_text()
    assert "Self CPU" in table and "aten::" in table  # ops of the profiled training steps
    assert result["attention"] is None  # no softmax layer
    assert result["kernels"] == "auto" and result["epilogues"] is False  # eager training's default kernels


def test_compiled_training_defaults_to_the_gemm_epilogue_kernels():
    from models.train import default_kernels

    assert default_kernels(True) == "gemm" and default_kernels(False) == "auto"


def test_bench_train_takes_named_kernels_and_runs_gemm_unfused_off_a_hopper_gpu():
    spec = bench_spec("lightning", "30K", seq_len=32, batch_size=2, steps=3, vocab=260)
    result = bench_train(spec, device="cpu", kernels="gemm")
    assert result["kernels"] == "gemm" and result["epilogues"] is False and result["final_loss"] > 0
    assert result["epilogue_loss"] is False
    fused = bench_train(spec, device="cpu", fused=True)
    assert fused["kernels"] == "auto" and fused["fused"] is True and result["fused"] is False
    with pytest.raises(ValueError, match="--fused runs the auto kernels"):
        bench_train(spec, device="cpu", fused=True, kernels="loss")


@pytest.mark.parametrize("arch", ["softmax", "hybrid"])
def test_bench_train_says_which_attention_the_softmax_layers_ran_on(arch):
    spec = bench_spec(arch, "30K", seq_len=32, batch_size=2, steps=6, vocab=260)
    assert bench_train(spec, device="cpu")["attention"] == "sdpa"  # FA4 is taken on a Hopper GPU only


@pytest.mark.parametrize("args, named", [(["--params", "30Q"], "'30Q'"), (["--compile-mode", "fast"], "'fast'"),
                                         (["--params", "inf"], "'inf'"), (["--params", "-infM"], "'-infM'"),
                                         (["--arch", "softmax", "--arch", "transformer", "--out", "t.csv"], "'transformer'"),
                                         # a folder had failed after training; a .png had the figure over the table
                                         (["--params", "30K", "--out", "."], "expected a .csv file name"),
                                         (["--params", "30K", "--out", "t.png"], "expected a .csv file name"),
                                         (["--kernels", "quack"], "--kernels 'quack'"),
                                         (["--fused", "--kernels", "gemm"], "cannot go with --kernels gemm")])
def test_bench_train_cli_bad_option_is_one_line_exit_2(tmp_path, monkeypatch, args, named):
    # in process: a subprocess each spent about 5 s importing torch
    from typer.testing import CliRunner

    from sweep.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["bench", "train", *args])
    assert result.exit_code == 2 and named in result.stderr, result.output
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_bench_train_cli_writes_table_and_figure(tmp_path):
    import subprocess
    import sys

    import pandas as pd

    out = tmp_path / "train.csv"
    proc = subprocess.run([sys.executable, "-m", "sweep.cli", "bench", "train", "--arch", "softmax", "--params", "30K",
                           "--seq-len", "32", "--seq-len", "64", "--tokens-per-step", "128", "--steps", "3", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(out)
    assert list(table["seq_len"]) == [32, 64] and (table["tokens_per_s"] > 0).all() and table["mfu_989"].isna().all()
    assert (tmp_path / "train.png").stat().st_size > 10_000


def _fake_nvidia_smi(tmp_path, lines, burst=False):
    """An `nvidia-smi` on PATH that writes its arguments to a file, then each of `lines` (clock, power) behind a
    timestamp as nvidia-smi prints it, every 20 ms until killed; with `burst`, its output reaches the pipe only
    every 0.25 s, as a buffered nvidia-smi's might."""
    import sys

    exe = tmp_path / "bin" / "nvidia-smi"
    exe.parent.mkdir()
    exe.write_text(f"""#!{sys.executable}
import datetime, pathlib, sys, time
pathlib.Path({str(tmp_path / "args")!r}).write_text(" ".join(sys.argv[1:]))
last, held = time.monotonic(), []
while True:
    for line in {list(lines)!r}:
        held.append(datetime.datetime.now().strftime("%Y/%m/%d %H:%M:%S.%f")[:-3] + ", " + line + "\\n")
        if not {burst!r} or time.monotonic() - last > 0.25:
            sys.stdout.write("".join(held))
            sys.stdout.flush()
            last, held = time.monotonic(), []
        time.sleep(0.02)
""")
    exe.chmod(0o755)
    return exe.parent


def _wait_for(condition, timeout=20.0):
    """Poll until condition() holds (the fake's start-up time varies on a loaded machine); fail after timeout."""
    import time

    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_clock_sampler_averages_the_samples_after_mark(tmp_path, monkeypatch):
    import time

    from models.bench import ClockSampler

    monkeypatch.setenv("PATH", str(_fake_nvidia_smi(tmp_path, ["1980, 120.5"])))
    with ClockSampler("GPU-1234", interval_ms=20) as sampler:
        _wait_for(lambda: len(sampler.samples) >= 3)
        before = len(sampler.samples)
        sampler.mark()
        time.sleep(0.05)
        _wait_for(lambda: len(sampler.samples) >= before + 3)
    assert before > 0 and len(sampler.samples) > before
    assert sampler.summary() == {"sm_clock_mhz": 1980.0, "power_w": 120.5}
    # Samples from before mark() are left out: rewrite them and the summary must not move.
    sampler.samples[:before] = [(t, 1.0, 1.0) for t, _, _ in sampler.samples[:before]]
    assert sampler.summary() == {"sm_clock_mhz": 1980.0, "power_w": 120.5}
    args = (tmp_path / "args").read_text()
    assert "--id=GPU-1234" in args and "timestamp,clocks.sm,power.draw" in args and "-lms=20" in args


def test_clock_sampler_leaves_out_samples_after_stop(tmp_path, monkeypatch):
    """The run's final evaluation and checkpoint come after its last timed step: stop() ends the window there."""
    import time

    from models.bench import ClockSampler

    monkeypatch.setenv("PATH", str(_fake_nvidia_smi(tmp_path, ["1700, 650"])))
    with ClockSampler("GPU-1", interval_ms=20) as sampler:
        sampler.mark()
        time.sleep(0.01)
        _wait_for(lambda: len(sampler.samples) >= 3)
        sampler.stop()
        stopped = time.time()
        _wait_for(lambda: any(t > stopped for t, _, _ in sampler.samples))
    times = [t for t, _, _ in sampler.samples]
    assert sampler.summary() == {"sm_clock_mhz": 1700.0, "power_w": 650.0}
    # Rewrite the samples after stop(): the summary must not move. A later stop() takes them in again.
    sampler.samples[:] = [(t, 1700.0, 650.0) if t <= stopped else (t, 300.0, 80.0) for t in times]
    assert sampler.summary() == {"sm_clock_mhz": 1700.0, "power_w": 650.0}
    sampler.stop()
    assert sampler.summary()["power_w"] < 650.0
    sampler.mark()  # a new window, open-ended
    assert sampler.summary() == {"sm_clock_mhz": None, "power_w": None}


def test_clock_sampler_places_samples_by_their_timestamp_not_their_arrival(tmp_path, monkeypatch):
    """Output that arrives in bursts: samples taken before mark() but read after it must still be left out."""
    import time

    from models.bench import ClockSampler

    monkeypatch.setenv("PATH", str(_fake_nvidia_smi(tmp_path, ["1980, 100"], burst=True)))
    with ClockSampler("GPU-1", interval_ms=20) as sampler:
        _wait_for(lambda: len(sampler.samples) >= 3)  # the first burst is in
        sampler.mark()
        marked = time.time()
        _wait_for(lambda: any(t >= marked for t, _, _ in sampler.samples))
    times = [t for t, _, _ in sampler.samples]
    # Taken every 20 ms though read in bursts of about a dozen: the times are when each was taken.
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    assert gaps[len(gaps) // 2] >= 0.01, gaps
    assert any(t < marked for t in times) and any(t >= marked for t in times)
    kept = sum(t >= marked for t in times)
    assert 0 < kept < len(times)
    sampler.samples[:] = [(t, 1.0 if t < marked else 1980.0, 100.0) for t in times]
    assert sampler.summary() == {"sm_clock_mhz": 1980.0, "power_w": 100.0}


def test_clock_sampler_mark_drops_earlier_samples_and_skips_unreadable_lines(tmp_path, monkeypatch):
    import time

    from models.bench import ClockSampler

    monkeypatch.setenv("PATH", str(_fake_nvidia_smi(tmp_path, ["1500, 650", "[N/A], [N/A]", "1700, 690"])))
    with ClockSampler("GPU-1", interval_ms=20) as sampler:
        _wait_for(lambda: len({c for _, c, _ in sampler.samples}) >= 2)
    assert {(c, p) for _, c, p in sampler.samples} == {(1500.0, 650.0), (1700.0, 690.0)}
    assert sampler.summary()["sm_clock_mhz"] == pytest.approx(1600, abs=100)
    sampler.mark()  # after the run: nothing left to average
    assert sampler.summary() == {"sm_clock_mhz": None, "power_w": None}


def test_clock_sampler_without_nvidia_smi_or_gpu_gives_nones(tmp_path, monkeypatch):
    from models.bench import ClockSampler

    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi there
    with ClockSampler("GPU-1") as sampler:
        pass
    assert sampler.summary() == {"sm_clock_mhz": None, "power_w": None}
    monkeypatch.setenv("PATH", str(_fake_nvidia_smi(tmp_path, ["1980, 100"])))
    with ClockSampler(None) as sampler:  # a CPU run: nothing to ask
        pass
    assert sampler.samples == [] and not (tmp_path / "args").exists()


def test_bench_train_refuses_one_step_whose_only_timing_is_the_warm_up(tmp_path):
    # With --steps 1 the "second half" was step 1 itself: compilation and warm-up were timed as the tokens/s (4
    # tokens/s compiled on the CPU, against over 2,000 from step 2 on), with no word that the number was not a median.
    import subprocess
    import sys

    with pytest.raises(ValueError, match="--steps 1"):
        bench_spec("softmax", "30K", seq_len=32, batch_size=2, steps=1)
    assert bench_spec("softmax", "30K", seq_len=32, batch_size=2, steps=2).steps == 2
    proc = subprocess.run([sys.executable, "-m", "sweep.cli", "bench", "train", "--params", "30K", "--seq-len", "32",
                           "--tokens-per-step", "64", "--steps", "1", "--out", "t.csv"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: --steps 1") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not list(tmp_path.iterdir())
