"""`slab bench spread` and `slab bench dp` on CPU workers, the largest-first start order, and --num-gpus."""

from pathlib import Path

import pandas as pd
import pytest

from sweep.launch import LaunchOptions, _unit_order, init_ray
from sweep.plan import load_plan

ROOT = Path(__file__).resolve().parents[2]

# Two workers of 20 sequences against one of 40: the same global batch. Both take microbatches of 10 on CPU,
# so a worker accumulates two before DDP's one all-reduce (no_sync on the first).
DP_PLAN = "name,arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens,lr,seed,warmup,gpus\ntiny,lightning,32,2,2,64,40,=40*64*10,3e-3,0,2,2\n"
SPREAD_PLAN = "name,arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens,lr,seed,warmup\ns-{d_model},softmax,16|32|48,2,2,32,4,=4*32*6,3e-3,0,2\n"


def slab(*args):
    """`slab ARGS` in this process (a subprocess spent seconds importing torch, Ray and pandas before it did anything):
    its exit code, stdout and stderr, as the command's own; each launch starts and shuts down its Ray, as in `slab`."""
    import ray
    from typer.testing import CliRunner

    from sweep.cli import app

    if ray.is_initialized():  # a Ray left running here would be joined, not started with the command's CPU count
        ray.shutdown()
    return CliRunner().invoke(app, [*map(str, args)])


def test_units_start_multi_gpu_first_then_largest(write_plan):
    plan = load_plan(write_plan(
        "name,arch,d_model,n_layers,seq_len,batch_size,tokens,gpus\n"
        "small,softmax,32,2,64,4,10k,0.5\nbig,softmax,64,2,64,4,10k,0.5\ndp,softmax,32,2,64,4,1k,2\nlong,softmax,32,2,64,4,100k,0.5\n"
    ))
    units = [[(r.spec, r.name)] for r in plan.runs]
    assert [u[0][1] for u in sorted(units, key=_unit_order)] == ["dp", "long", "big", "small"]


@pytest.mark.slow
def test_bench_dp_on_cpu_workers(tmp_path, write_plan):
    csv = tmp_path / "dp.csv"
    proc = slab("bench", "dp", write_plan(DP_PLAN), "--cpu", "--gpus", 1, "--gpus", 2, "--csv", csv)
    assert proc.exit_code == 0, (proc.stderr[-3000:], proc.exception)
    curves = pd.read_csv(csv)
    assert set(curves["gpus"]) == {1, 2} and (curves["status"] == "done").all()
    one, two = (curves[curves["gpus"] == g].sort_values("step") for g in (1, 2))
    assert list(one["step"]) == list(two["step"]) == list(range(1, 11))
    # Same sequences and global batch: only the order of float sums differs (gloo all-reduce).
    assert (one["loss"].to_numpy() - two["loss"].to_numpy()).__abs__().max() < 2e-3
    assert "Ray Train" in two["trained_on"].iloc[0] and "Ray Train" not in str(one["trained_on"].iloc[0])
    assert (tmp_path / "dp.png").stat().st_size > 10_000
    assert "data-parallel scaling" in proc.stdout and "speedup" in proc.stdout
    # Ray Train's processes log to this output, but not its placement-group cleaner's warning, which without Ray's
    # dashboard it gave about once a second (11 lines in this run before the launch's setup hook quieted it).
    assert "Started training worker group" in proc.stderr
    assert "Failed to query Ray Train Controller actor state" not in proc.stderr


@pytest.mark.slow
def test_bench_spread_on_cpu(tmp_path, write_plan):
    csv = tmp_path / "spread.csv"
    proc = slab("bench", "spread", write_plan(SPREAD_PLAN), "--cpu", "--csv", csv)
    assert proc.exit_code == 0, (proc.stderr[-3000:], proc.exception)
    table = pd.read_csv(csv)
    assert list(table["gpus"]) == [2, 1] and (table["done"] == 3).all() and (table["runs"] == 3).all()
    assert table.loc[1, "wall_vs_1"] == 1.0 and table.loc[0, "wall_vs_1"] > 0
    # Largest first: the widest run starts before the others on the one-CPU launch.
    starts = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("start ")]
    assert starts[-3:] == ["s-48", "s-32", "s-16"]
    assert (tmp_path / "spread.png").exists()


@pytest.mark.parametrize("args, message", [
    (["bench", "dp", "plans/dp-350m.csv", "--gpus", "2"], "no GPU here"),
    (["bench", "dp", "plans/dp-350m.csv", "--cpu", "--gpus", "0"], "Invalid value for '--gpus'"),  # typer's min=1
    (["bench", "spread", "plans/smoke-h100.csv", "--gpus", "1"], "no GPU here"),
    (["launch", "plans/demo.csv", "--num-gpus", "1", "--address", "auto"], "--num-gpus limits a local Ray"),
    (["launch", "plans/demo.csv", "--num-gpus", "1"], "--num-gpus 1: this host has 0 GPU(s)"),
    (["launch", "plans/demo.csv", "--cpu", "--fsdp-min-params", "lots"], "--fsdp-min-params: expected a count"),
])
def test_bad_counts_exit_2(tmp_path, args, message):
    # In process (a subprocess spent 5 s a case importing torch and Ray): the command's own exit code and stderr.
    from typer.testing import CliRunner

    from sweep.cli import app

    args = [str(ROOT / a) if a.startswith("plans/") else a for a in args]
    full = ["--db", f"sqlite:///{tmp_path}/x.db", *args] if args[0] == "launch" else [*args, "--csv", str(tmp_path / "t.csv")]
    result = CliRunner().invoke(app, full)
    # An exception the command did not turn into its message would exit 1, with result.exception set.
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "t.csv").exists() and not (tmp_path / "x.db").exists()


def test_num_gpus_limits_the_local_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(LaunchOptions(num_gpus=1, num_cpus=1))
    try:
        assert ray.cluster_resources().get("GPU") == 1
    finally:
        ray.shutdown()
