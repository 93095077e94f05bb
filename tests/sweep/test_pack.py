"""Choosing packs: same-shape runs group, auto sizing by work and memory, the GPU share a pack asks for."""

from pathlib import Path

import pytest

from sweep.pack import MAX_PACK, auto_pack_size, pack_gpus, parse_pack, plan_packs
from tests.models.test_train import spec

GIB = 2**30


def names(packs):
    return [[n for _, n in p] for p in packs]


def slab(*args):
    """`slab ARGS` in this process, as test_multi_gpu_bench's usage errors are: a subprocess spent seconds a call
    importing torch, pandas and matplotlib before it did anything. The command's exit code and stderr are its own; an
    exception it did not turn into its message would exit 1, with ``exception`` set."""
    from typer.testing import CliRunner

    from sweep.cli import app

    return CliRunner().invoke(app, list(args))


def test_parse_pack():
    assert parse_pack("auto") is None and parse_pack("off") == 1 and parse_pack("4") == 4
    for bad in ("0", "-1", "many", ""):
        with pytest.raises(ValueError, match="--pack expects"):
            parse_pack(bad)


def test_same_shape_runs_pack_in_plan_order():
    runs = [(spec(seed=s, lr=lr), f"x{s}-{lr}") for s in range(3) for lr in (1e-3, 3e-3)]
    runs.insert(2, (spec(seed=0, d_model=64), "wide"))
    runs.append((spec(seed=0, gpus=2), "dp"))  # a data-parallel run never packs
    packs = plan_packs(runs, 4, cpu=True, gpu_mem_bytes=80 * GIB)
    # packs of one shape come together, at the place of that shape's first run, as even as up to 4 a pack allows
    assert names(packs) == [["x0-0.001", "x0-0.003", "x1-0.001"], ["x1-0.003", "x2-0.001", "x2-0.003"], ["wide"], ["dp"]]
    assert names(plan_packs(runs, 1, cpu=False, gpu_mem_bytes=80 * GIB)) == [[n] for _, n in runs]
    # auto packs on GPUs only
    assert all(len(p) == 1 for p in plan_packs(runs, None, cpu=True, gpu_mem_bytes=80 * GIB))
    assert len(plan_packs(runs, None, cpu=False, gpu_mem_bytes=80 * GIB)[0]) == 6


@pytest.mark.parametrize("n, size, want", [(17, 16, [9, 8]), (64, 16, [16] * 4), (33, 16, [11] * 3), (5, 4, [3, 2]),
                                           (3, 16, [3]), (16, 16, [16])])
def test_a_shapes_runs_split_into_as_few_and_as_even_packs_as_the_size_allows(n, size, want):
    # 17 runs had been packed 16 + 1: the lone one trained beside, or after, a pack sixteen times its work
    runs = [(spec(seed=s), f"r{s}") for s in range(n)]
    packs = plan_packs(runs, size, cpu=False, gpu_mem_bytes=80 * GIB)
    assert [len(p) for p in packs] == want
    assert [n for p in names(packs) for n in p] == [n for _, n in runs]  # plan order kept


def test_auto_size_by_work_and_memory():
    tiny = spec(arch="softmax", d_model=64, n_layers=2, n_heads=1)
    assert auto_pack_size(tiny, 80 * GIB) == MAX_PACK  # far below a 135M-model step: as many as allowed
    big = spec(arch="softmax", d_model=768, n_layers=12, n_heads=12, vocab_size=32768, seq_len=2048, batch_size=16)
    assert auto_pack_size(big, 80 * GIB) == 1  # already a full step's work
    mid = spec(arch="softmax", d_model=512, n_layers=6, n_heads=8, vocab_size=32768, seq_len=1024, batch_size=16)
    by_work = auto_pack_size(mid, 80 * GIB)
    assert 1 < by_work < MAX_PACK
    assert auto_pack_size(mid, 2 * GIB) < by_work  # a small GPU holds fewer


def test_pack_gpus():
    runs = [(spec(seed=s, gpus=0.25), None) for s in range(3)]
    assert pack_gpus(runs) == 0.75 and pack_gpus(runs[:1]) == 0.25
    assert pack_gpus([(spec(seed=s), None) for s in range(3)]) == 1.0


def test_bench_pack_trains_the_same_runs_both_ways(tmp_path):
    from sweep.bench import bench_pack
    from sweep.plan import load_plan

    plan = tmp_path / "grid.csv"
    plan.write_text("name,arch,d_model,n_layers,seq_len,batch_size,tokens,lr,warmup,seed\n"
                    "t-{lr}-{seed},lightning,32,2,64,4,10000,1e-3|3e-3,2,0..1+1\n")
    result = bench_pack(load_plan(plan), steps=3, pack=4, device="cpu")
    assert result["runs"] == 4 and result["tasks_packed"] == 1 and result["largest_pack"] == 4
    assert result["serial_s"] > 0 and result["packed_s"] > 0
    assert result["max_rel_loss_diff"] < 1e-4  # fp32 on CPU: the same training, up to rounding
    assert result["median_rel_loss_diff"] <= result["max_rel_loss_diff"]
    assert result["worst_run"].startswith("t-")
    assert result["worst_run_alone_twice_rel_diff"] == 0.0  # CPU training is deterministic


def test_bench_pack_warm_up_does_not_fail_on_the_end_of_run_rule(tmp_path, monkeypatch):
    # a two-step warm-up of a run alone may end no better than a uniform guess (an audit's tiny plan did), which raised
    # Diverged out of slab bench pack before anything was timed (plans/pack-grid.csv's first shape ends at 4.71 < ln 260)
    import models.train
    from sweep.bench import bench_pack
    from sweep.plan import load_plan

    real, finals = models.train.rejected_validation, []

    def first_end_rejected(val_loss, vocab_size, final):  # the warm-up's lone run is the first to end
        finals.append(final)
        if final and finals.count(True) == 1:
            return "no better than a uniform guess (this test)"
        return real(val_loss, vocab_size, final)

    monkeypatch.setattr(models.train, "rejected_validation", first_end_rejected)
    plan = tmp_path / "grid.csv"
    plan.write_text("name,arch,d_model,n_layers,seq_len,batch_size,tokens,lr,warmup,seed\n"
                    "t-{seed},lightning,32,2,64,4,10000,3e-3,2,0..1+1\n")
    result = bench_pack(load_plan(plan), steps=3, pack=2, device="cpu")
    assert finals.count(True) >= 2 and result["runs"] == 2 and result["packed_s"] > 0


def test_bench_pack_names_a_run_of_a_plan_without_names_by_its_id(tmp_path):
    """A plan with no name column printed 'alone: None done' and a worst_run of None."""
    from sweep.bench import bench_pack
    from sweep.plan import load_plan

    plan = tmp_path / "grid.csv"
    plan.write_text("arch,d_model,n_layers,seq_len,batch_size,tokens,lr,warmup,seed\nsoftmax,32,2,64,4,10000,3e-3,2,0..1+1\n")
    said: list[str] = []
    result = bench_pack(load_plan(plan), steps=3, pack=2, device="cpu", progress=said.append)
    ids = set(load_plan(plan).unique_specs())
    assert result["worst_run"] in ids and "alone: None done" not in said
    assert {line.split()[1] for line in said if line.startswith("alone:")} <= ids


def test_bench_pack_cli_bad_input(tmp_path, monkeypatch):
    """A missing plan file and a bad --pack are one-line errors with exit 2 and write no CSV."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "pack.csv"
    for args, expect in ((["nosuch.csv"], "cannot read the file"), (["--pack", "0"], "--pack expects")):
        result = slab("bench", "pack", *args, "--csv", str(out))
        assert result.exit_code == 2 and expect in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not out.exists()


def test_bench_pack_cli_appends_a_row_and_draws_the_table(tmp_path, monkeypatch):
    """Two calls: two rows in the CSV and a PNG beside it, redrawn from the whole table."""
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    plan = tmp_path / "grid.csv"
    plan.write_text("name,arch,d_model,n_layers,seq_len,batch_size,tokens,lr,warmup,seed\n"
                    "t-{seed},lightning,32,2,64,4,10000,1e-3,2,0..1+1\n")
    out = tmp_path / "res" / "pack.csv"
    for _ in range(2):
        result = slab("bench", "pack", str(plan), "--steps", "2", "--pack", "2", "--csv", str(out))
        assert result.exit_code == 0, (result.stderr, result.exception)
    table = pd.read_csv(out)
    assert len(table) == 2 and (table["runs"] == 2).all() and (table["speedup"] > 0).all()
    assert (out.parent / "pack.png").stat().st_size > 10_000


def test_append_csv_widens_the_table_for_new_columns(tmp_path):
    import pandas as pd

    from sweep.bench import append_csv

    path = tmp_path / "out" / "pack.csv"
    append_csv({"plan": "a", "speedup": 1.5}, path)
    append_csv({"plan": "b", "speedup": 3.5, "worst_run": "r1"}, path)
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["plan", "speedup", "worst_run"]
    assert frame["speedup"].tolist() == [1.5, 3.5]
    assert frame["worst_run"].isna().tolist() == [True, False]
    assert sorted(p.name for p in path.parent.iterdir()) == ["pack.csv"]  # no temp file left


def test_bench_output_paths_fail_before_any_training(tmp_path, monkeypatch):
    """A --csv, --out or --profile that cannot be written is a one-line error with exit 2, up front."""
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_bytes(b"\xff\xfe\x00bad")
    cases = (
        (["bench", "pack", "--csv", str(blocker / "pack.csv")], "--csv"),
        (["bench", "pack", "--csv", str(bad_csv)], "not a readable CSV"),
        (["bench", "train", "--profile", str(blocker)], "--profile"),
        (["bench", "train", "--out", str(blocker / "t.csv")], "--out"),
    )
    plan = Path(__file__).resolve().parents[2] / "plans" / "pack-grid.csv"
    for args, expect in cases:
        full = args[:2] + ([str(plan)] if args[1] == "pack" else []) + args[2:]
        result = slab(*full)
        assert result.exit_code == 2 and expect in result.stderr and "Traceback" not in result.stderr, (
            args, result.stderr)
