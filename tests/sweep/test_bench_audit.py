"""Audit of the sweep benchmarks (`slab bench pack`, `dp`): results that must not come out silently wrong."""

import pytest

from sweep.plan import load_plan

TINY = ("name,arch,d_model,n_layers,seq_len,batch_size,tokens,lr,warmup,seed\n"
        "t-{seed},lightning,32,2,64,4,10000,1e-3,2,0..1+1\n")


def test_bench_pack_refuses_a_member_that_diverged_in_its_timed_pack(tmp_path, monkeypatch):
    # A member that diverged in the pack came back as a Diverged, not a Summary: its loss difference was NaN, which
    # max() and the median then passed on (max_rel_loss_diff nan or another run's, median nan) into the table, as
    # a speedup over a pack that had not trained every run. Alone, the same run raises and the command exits 1.
    import models.packed
    from models.train import Diverged
    from sweep.bench import bench_pack

    real = models.packed.pretrain_pack

    def first_member_diverges(specs, reporters, dirs, **kw):
        out = real(specs, reporters, dirs, **kw)
        if "warm" not in str(dirs[0]):  # the timed pack, not the warm-up
            out[0] = Diverged(3, "the loss became NaN (this test)")
        return out

    monkeypatch.setattr(models.packed, "pretrain_pack", first_member_diverges)
    plan = tmp_path / "grid.csv"
    plan.write_text(TINY)
    with pytest.raises(Diverged, match="this test"):
        bench_pack(load_plan(plan), steps=2, pack=2, device="cpu")


def _fake_launch(monkeypatch, gpu_of=lambda n, cpu: None):
    """Replace the launches of `bench_data_parallel` with registering the plan and writing four steps per run, each
    run's `gpu` what ``gpu_of(count, cpu)`` says the worker recorded (None: a lone CPU run records none)."""
    from types import SimpleNamespace

    import sweep.bench
    from db.engine import open_db
    from db.schema import Metric, Run
    from sweep.registry import add_plans

    def launch(plans, root, tag, view, **options):
        db = f"sqlite:///{root / tag}.db"
        engine = open_db(db)
        add_plans(engine, plans)
        rows = []
        with engine.begin() as conn:
            for r in plans[0].runs:
                conn.execute(Run.__table__.update().where(Run.run_id == r.spec.run_id)
                             .values(status="done", gpu=gpu_of(r.spec.gpus, options.get("cpu", False))))
                for step in range(1, 5):
                    conn.execute(Metric.__table__.insert().values(run_id=r.spec.run_id, step=step, tokens=step * 256,
                                                                  flops=1.0, loss=5.0 - step / 10, lr=1e-3,
                                                                  tokens_per_s=1000.0 * step, mfu=None))
                rows.append({"run_id": r.spec.run_id, "name": r.name, "status": "done", "error": None})
        engine.dispose()
        return SimpleNamespace(rows=rows), 1.0, db

    monkeypatch.setattr(sweep.bench, "_launch_fresh", launch)


def test_bench_dp_on_one_cpu_worker_says_cpu_in_its_table_and_figure(tmp_path, monkeypatch):
    # A lone run records no GPU on the CPU: trained_on was blank, so `slab bench dp --cpu --gpus 1` drew "1 GPU"
    # under its bar and named no device, a CPU figure labelled as a GPU one.
    from analysis.bench_figures import bench_figure
    from sweep.bench import bench_data_parallel

    _fake_launch(monkeypatch, lambda n, cpu: f"{n:g} CPU workers (Ray Train, DDP)" if n > 1 else None)
    plan = tmp_path / "dp.csv"
    plan.write_text("name,arch,d_model,n_layers,seq_len,batch_size,tokens,lr,warmup,seed\n"
                    "tiny,lightning,32,2,64,4,10000,1e-3,2,0\n")
    curves, outcomes = bench_data_parallel(load_plan(plan), [1], steps=4, view=None, cpu=True)
    assert [o["status"] for o in outcomes] == ["done"]
    assert curves["trained_on"].notna().all() and curves["trained_on"].str.contains("CPU").all()
    labels = []
    import matplotlib.axes

    real = matplotlib.axes.Axes.set_xticks
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xticks",
                        lambda self, ticks, tick_labels=None, **kw: (labels.extend(tick_labels or []),
                                                                     real(self, ticks, tick_labels, **kw))[1])
    csv = tmp_path / "out" / "dp.csv"
    csv.parent.mkdir()
    curves.to_csv(csv, index=False)
    bench_figure(csv)
    assert labels == ["1 CPU worker"]


def test_append_csv_interrupted_keeps_the_old_table_and_leaves_no_temp_file(tmp_path, monkeypatch):
    # The write goes to .pack.csv.tmp and is renamed: interrupted mid-write (Ctrl-C, a full disk), the old table
    # stayed, but so did the half-written .pack.csv.tmp beside it, in docs/bench/ under make bench.
    import pandas as pd

    from sweep.bench import append_csv

    path = tmp_path / "pack.csv"
    append_csv({"plan": "a", "speedup": 1.5}, path)
    before = path.read_text()

    def torn(self, target, **kw):
        with open(target, "w") as f:
            f.write("plan,spe")
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", torn)
    with pytest.raises(KeyboardInterrupt):
        append_csv({"plan": "b", "speedup": 2.5}, path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack.csv"]


def test_bench_pack_trains_a_run_two_rows_ask_for_once(tmp_path):
    # Two rows of a plan may ask for the same run (Plan.unique_specs): both trained into one checkpoint folder, so
    # alone the second resumed the first's finished run (no steps, yet its tokens counted in the tokens/s) and in a
    # pack the two members wrote the same checkpoint files (a FileNotFoundError traceback).
    from sweep.bench import bench_pack

    plan = tmp_path / "grid.csv"
    plan.write_text(TINY + "again,lightning,32,2,64,4,10000,1e-3,2,0\n")
    loaded = load_plan(plan)
    assert len(loaded.runs) == 3 and len(loaded.unique_specs()) == 2
    result = bench_pack(loaded, steps=2, pack=4, device="cpu")
    assert result["runs"] == 2 and result["largest_pack"] == 2
    assert result["serial_tokens_per_s"] * result["serial_s"] == pytest.approx(2 * 2 * 4 * 64)


def test_append_csv_adds_several_rows_in_one_write(tmp_path, monkeypatch):
    # spread's rows (a launch and its 1-GPU baseline) had been appended one write each: an interrupt between the two
    # left the table with a launch and no baseline
    import pandas as pd

    import sweep.bench as bench

    path = tmp_path / "spread.csv"
    bench.append_csv({"gpus": 4, "wall_s": 10.0, "runs": 8}, path)
    writes = []
    real = pd.DataFrame.to_csv
    monkeypatch.setattr(pd.DataFrame, "to_csv", lambda self, *a, **k: (writes.append(len(self)), real(self, *a, **k))[1])
    bench.append_csv([{"gpus": 2, "wall_s": 12.0, "runs": 8}, {"gpus": 1, "wall_s": 20.0, "runs": 8, "done": 8}], path)
    assert writes == [3]
    table = pd.read_csv(path)
    assert table["gpus"].tolist() == [4, 2, 1] and table["done"].isna().tolist() == [True, True, False]


def test_append_csv_keeps_the_old_rows_digits(tmp_path):
    """Appending rewrites the table: the rows already there must come back as they were written (on the H100's pandas
    the default float parser turned 0.019555476659693413 into 0.0195554766596934 in docs/bench/pack.csv), whatever
    another program wrote in them (1e-3, 1.50)."""
    from sweep.bench import append_csv

    path = tmp_path / "pack.csv"
    path.write_text("plan,serial_mfu,speedup\na,0.019555476659693413,1.50\nb,1e-3,\n")
    first = path.read_text()
    append_csv({"plan": "c", "serial_mfu": 0.5, "worst_run": "r1"}, path)
    assert path.read_text() == ("plan,serial_mfu,speedup,worst_run\na,0.019555476659693413,1.50,\nb,1e-3,,\n"
                                "c,0.5,,r1\n"), path.read_text()
    assert first != path.read_text()
