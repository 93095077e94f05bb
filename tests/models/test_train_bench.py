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


@pytest.mark.parametrize("args, named", [(["--params", "30Q"], "'30Q'"), (["--compile-mode", "fast"], "'fast'"),
                                         (["--arch", "softmax", "--arch", "transformer", "--out", "t.csv"], "'transformer'")])
def test_bench_train_cli_bad_option_is_one_line_exit_2(tmp_path, args, named):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "sweep.cli", "bench", "train", *args],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and named in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
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
