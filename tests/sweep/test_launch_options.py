"""Launch options without training: --where as a plan writes values, runs.n_gpus on CPU, --address checked first."""

import os
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from db.engine import open_db
from db.schema import Run
from sweep.cli import app
from sweep.launch import Driver, Flight, LaunchError, LaunchOptions, _check_reachable, _matches, gpus_held, launch, parse_where
from sweep.plan import load_plan
from sweep.progress import LaunchView

HEADER = "name,arch,d_model,n_layers,n_heads,hybrid,seq_len,batch_size,tokens,lr,evals,tags,gpus\n"
PLAN = (
    HEADER
    + "s-{d_model}-{tokens},softmax,32|64,2,2,,128,4,12k|20k,3e-4,niah,base,0.25\n"
    + "h-{d_model}-{tokens},hybrid,64,4,2,2,64,4,1.5M,1e-3,,ablation|v2,2\n"
)


def quiet():
    from rich.console import Console

    return LaunchView(Console(file=open(os.devnull, "w")), live=False)


def names(plan, text):
    """Labels of the plan's runs that ``--where text`` selects."""
    where = parse_where(text)
    return sorted(r.name for r in plan.runs if _matches(r, where))


@pytest.fixture
def plan(write_plan):
    return load_plan(write_plan(PLAN))


def test_where_reads_numbers_as_a_plan_writes_them(plan):
    twelve = ["s-32-12000", "s-64-12000"]
    assert names(plan, "tokens=12k") == names(plan, "tokens=12000") == names(plan, "tokens=1.2e4") == twelve
    assert names(plan, "tokens=1.5M") == ["h-64-1500000"]
    assert names(plan, "d_model=64.0,tokens=12k") == ["s-64-12000"]  # an int field matches its float spelling
    assert names(plan, "lr=3e-4") == names(plan, "lr=0.0003") == ["s-32-12000", "s-32-20000", "s-64-12000", "s-64-20000"]
    assert names(plan, "gpus=0.25") == names(plan, "lr=3e-4")
    assert names(plan, "arch=hybrid") == ["h-64-1500000"]  # strings stay strings


def test_where_accepts_the_plan_column_names_and_derived_names(plan):
    hybrid = next(r.spec for r in plan.runs if r.spec.arch == "hybrid")
    derived = hybrid.derived()
    assert names(plan, "vocab=260") == names(plan, "vocab_size=260") and len(names(plan, "vocab=260")) == 5
    assert names(plan, "hybrid=2") == names(plan, "hybrid=LSLS") == ["h-64-1500000"]
    assert names(plan, f"params={derived['params']}") == ["h-64-1500000"]
    assert names(plan, f"nonembed_params={derived['nonembed_params']}") == ["h-64-1500000"]
    assert names(plan, f"flops_per_token={derived['flops_per_token']}") == ["h-64-1500000"]
    assert names(plan, "evals=niah") == names(plan, "tags=base") and len(names(plan, "evals=niah")) == 4
    assert names(plan, "tags=v2") == names(plan, "evals=") == ["h-64-1500000"]


def test_where_params_and_flops_match_the_plan_cells_that_made_the_runs(write_plan):
    """params is a plan's target size (resolved to a shape), flops a budget (resolved to tokens)."""
    text = "name,arch,params,seq_len,batch_size,flops\np{params}-{flops},softmax,1M|3M,64,4,1e12|3e12\n"
    plan = load_plan(write_plan(text))
    assert len({r.spec.d_model for r in plan.runs}) == 2
    by_cells = [r.name for r in plan.runs]  # row order: params 1M (flops 1e12, 3e12), then 3M
    assert names(plan, "params=1M") == sorted(by_cells[:2]) and names(plan, "params=3M") == sorted(by_cells[2:])
    assert names(plan, "params=3M,flops=1e12") == [by_cells[2]]
    assert names(plan, "flops=1e12") == sorted(by_cells[::2])
    # a value that is no row's target and no run's count selects nothing: params=1 had matched every run whose
    # shape that size would resolve to (the smallest), and params=83648 a hybrid of another count
    tiny = load_plan(write_plan("name,arch,params,seq_len,batch_size,tokens\np-{arch},softmax|hybrid,30k,64,4,600\n"))
    assert names(tiny, "params=1") == []
    assert names(tiny, "params=30k") == ["p-hybrid", "p-softmax"]
    soft = next(r for r in tiny.runs if r.spec.arch == "softmax")
    assert names(tiny, f"params={soft.spec.derived()['params']}") == ["p-softmax"]


def test_a_hybrid_ladder_by_params_keeps_whole_periods_and_where_finds_its_sizes(write_plan):
    text = "name,arch,params,hybrid,seq_len,batch_size,tokens\nh{params},hybrid,30M|70M|110M|250M,8,64,4,1000\n"
    plan = load_plan(write_plan(text))
    layers = [r.spec.n_layers for r in plan.runs]
    assert all(n % 8 == 0 for n in layers) and all(r.spec.hybrid.count("S") * 8 == r.spec.n_layers for r in plan.runs)
    assert sorted(set(layers)) == [8, 16]  # the rule alone would give 9, 11, 13 and 17 layers
    for target, run in zip(("30M", "70M", "110M", "250M"), plan.runs):
        assert names(plan, f"params={target}") == [run.name]
    # a pattern that ends in L repeats whole too (LLSL: 4 layers, not the 3 after which its start recurs)
    plan = load_plan(write_plan(text.replace(",8,", ",LLSL,").replace("30M|70M|110M|250M", "3M|8M|20M|40M")))
    assert [r.spec.n_layers for r in plan.runs] == [4, 4, 8, 8]
    assert all(r.spec.hybrid == "LLSL" * (r.spec.n_layers // 4) for r in plan.runs)
    for target, run in zip(("3M", "8M", "20M", "40M"), plan.runs):
        assert names(plan, f"params={target}") == [run.name]


def test_where_rejects_unknown_names_and_bad_numbers():
    with pytest.raises(LaunchError, match=r"unknown field 'vocb'; expected one of .*\bparams\b.*\bvocab\b.*\bvocab_size\b"):
        parse_where("vocb=260")
    with pytest.raises(LaunchError, match='--where tokens=12x: expected a number, got "12x"'):
        parse_where("tokens=12x")
    assert parse_where("arch=mamba2, tokens = 12k") == (("arch", "mamba2"), ("tokens", "12k"))


def test_launch_where_with_a_suffix_selects_the_runs(write_plan, tmp_path, no_ray):
    db = tmp_path / "slab.db"
    result = CliRunner().invoke(app, ["--db", f"sqlite:///{db}", "launch", str(write_plan(PLAN)), "--cpu", "--where",
                                      "tokens=12k,vocab=260", "--ckpt-dir", str(tmp_path / "ckpt")])
    assert isinstance(result.exception, RayStarted), result.output  # selected, checked, and on to train
    assert "2 runs to train" in result.output and "no run" not in result.output


@pytest.mark.parametrize("cpu,held", [(True, [0.0, 0.0]), (False, [0.25, 2.0])])
def test_n_gpus_records_the_gpus_a_run_held(plan, tmp_path, cpu, held):
    """A CPU run holds no GPU, a data-parallel one (gpus 2, CPU workers) neither; on GPUs the plan's share."""
    specs = [plan.runs[0].spec, plan.runs[-1].spec]  # gpus 0.25 and 2
    assert [gpus_held(s, cpu) for s in specs] == held
    engine = open_db(f"sqlite:///{tmp_path}/slab.db")
    from sweep.registry import add_plans

    add_plans(engine, [plan])
    from db.schema import utcnow
    from db.writer import claim_run

    for s in specs:  # the driver writes events of the runs it holds
        claim_run(engine, s.run_id, "me", utcnow())
    driver = Driver.__new__(Driver)  # only the event writer: no Ray
    driver.engine, driver.opts, driver.view, driver.owner = engine, LaunchOptions(cpu=cpu), quiet(), "me"
    driver.db_away_since = None
    driver.flights = {s.run_id: Flight(spec=s, name=None, attempt=1, tries=1, microbatch=None) for s in specs}
    driver._write_events([(s.run_id, 1, "start", {"host": "h", "gpu": "cpu"}) for s in specs])
    with engine.connect() as conn:
        recorded = dict(conn.execute(select(Run.run_id, Run.n_gpus)).all())
    engine.dispose()
    assert [recorded[s.run_id] for s in specs] == held


@pytest.fixture
def no_ray_cluster(monkeypatch):
    """Ray as on a host with no cluster, whatever runs on this machine: ray.init finds nothing to join."""
    import ray

    def init(*args, address=None, **kwargs):
        assert address == "auto", address
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to.")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)


def test_address_auto_without_a_cluster_fails_before_the_database_is_written(no_ray_cluster, write_plan, tmp_path):
    db = tmp_path / "slab.db"
    result = CliRunner().invoke(app, ["--db", f"sqlite:///{db}", "launch", str(write_plan(PLAN)), "--cpu",
                                      "--address", "auto", "--ckpt-dir", str(tmp_path / "ckpt")])
    assert result.exit_code == 2, result.output
    assert "error: cannot join the Ray cluster at auto: Could not find any running Ray instance" in result.stderr
    assert "to train" not in result.output
    assert not db.exists() and not (tmp_path / "ckpt").exists()


def test_address_auto_with_ray_address_where_nothing_listens_fails_fast(write_plan, tmp_path, monkeypatch):
    """"auto" joins RAY_ADDRESS; nothing listening there fails in seconds, before anything is written."""
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    db = tmp_path / "slab.db"
    opts = LaunchOptions(db_url=f"sqlite:///{db}", address="auto", cpu=True, ckpt_dir=tmp_path / "ckpt")
    with pytest.raises(LaunchError, match=rf"cluster at auto \(RAY_ADDRESS=127.0.0.1:{port}\): nothing answers there"):
        launch([load_plan(write_plan(PLAN))], opts, quiet())
    assert not db.exists()


def test_a_done_run_records_the_tokens_it_trained_not_the_plans_budget(plan, tmp_path):
    """Training runs whole steps: the runs table, which the fits read, holds what was trained."""
    from datetime import datetime, timezone

    from db.writer import claim_run
    from sweep.registry import add_plans

    s = plan.runs[0].spec  # 12k tokens in steps of 4 x 128: 24 steps, 12,288 tokens
    trained = s.steps * s.batch_size * s.seq_len
    assert trained > s.tokens
    engine = open_db(f"sqlite:///{tmp_path}/slab.db")
    add_plans(engine, [plan])
    assert claim_run(engine, s.run_id, "me", datetime.now(timezone.utc)) == 1
    driver = Driver.__new__(Driver)  # only the settling of an outcome: no Ray
    driver.engine, driver.owner, driver.view, driver.outcome = engine, "me", quiet(), {}
    driver.opts, driver.db_away_since = LaunchOptions(cpu=True), None
    driver.flights = {s.run_id: Flight(spec=s, name=None, attempt=1, tries=1, microbatch=None)}
    fpt = s.derived()["flops_per_token"]
    driver._settle(s.run_id, {"steps": s.steps, "tokens": trained, "flops": fpt * trained, "final_loss": 3.0,
                              "val_loss": 3.1, "wall_s": 1.0, "data_sha256": "x", "microbatch": 4,
                              "resumed_from_step": 0})
    with engine.connect() as conn:
        row = conn.execute(select(Run.status, Run.tokens, Run.flops).where(Run.run_id == s.run_id)).one()
    engine.dispose()
    assert tuple(row) == ("done", trained, pytest.approx(fpt * trained))


@pytest.mark.parametrize("reply", [b"HTTP/1.0 400 Bad request\r\n\r\n", None])
def test_address_where_something_else_listens_fails_fast(write_plan, tmp_path, reply):
    """A port held by another service (a web server, or one that never answers) is not a Ray cluster: Ray would
    retry it for many minutes (deaf to SIGTERM); the launch says so in seconds and writes nothing."""
    import socket
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    held = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)
            if reply is not None:
                conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    db = tmp_path / "slab.db"
    address = f"127.0.0.1:{port}"
    opts = LaunchOptions(db_url=f"sqlite:///{db}", address=address, cpu=True, ckpt_dir=tmp_path / "ckpt")
    t0 = time.monotonic()
    try:
        with pytest.raises(LaunchError, match=rf"cluster at {address}: something answers there, but not a Ray cluster"):
            _check_reachable(address, timeout_s=2.0)
        with pytest.raises(LaunchError, match=rf"cluster at {address}: .*not a Ray cluster"):
            launch([load_plan(write_plan(PLAN))], opts, quiet())
    finally:
        server.close()
        for conn in held:
            conn.close()
    assert time.monotonic() - t0 < 20
    assert not db.exists() and not (tmp_path / "ckpt").exists()


def test_where_tokens_matches_a_budget_merged_into_an_earlier_run(write_plan):
    """A budget within the same whole steps as an earlier row's trains that run (and takes its id): --where with either
    budget, or with the tokens it trains (what slab runs shows), selects it; a budget a step away does not."""
    text = ("name,arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens\n"  # 256 tokens a step
            "a,softmax,32,2,2,64,4,5000\nb,softmax,32,2,2,64,4,5100\nc,softmax,32,2,2,64,4,5200\n")
    plan = load_plan(write_plan(text))
    a, b, c = plan.runs
    assert a.spec.run_id == b.spec.run_id != c.spec.run_id and b.spec.tokens == 5000 and a.spec.trained_tokens == 5120
    assert names(plan, "tokens=5000") == names(plan, "tokens=5100") == names(plan, "tokens=5120") == ["a", "b"]
    assert names(plan, "tokens=4864") == [] and names(plan, "tokens=5121") == ["c"]
    fpt = a.spec.derived()["flops_per_token"]
    assert names(plan, f"flops={5100 * fpt}") == ["a", "b"] and names(plan, f"flops={5200 * fpt}") == ["c"]


class Said(LaunchView):
    """A quiet view that keeps its log lines."""

    def __init__(self):
        from rich.console import Console

        super().__init__(Console(file=open(os.devnull, "w")), live=False)
        self.lines: list[str] = []

    def log(self, message, markup=False):
        self.lines.append(message)


class RayStarted(Exception):
    """Raised in place of starting Ray: the launch got past its checks."""


@pytest.fixture
def no_ray(monkeypatch):
    """Ray as if it were never needed: starting it raises RayStarted."""
    import sweep.launch

    def init_ray(opts):
        raise RayStarted

    monkeypatch.setattr(sweep.launch, "init_ray", init_ray)


def _recorded(engine, steps: dict, ckpt_dir: str):
    """Record, as a launcher's worker reports, the newest checkpoint step of some runs."""
    from db.writer import write_results

    write_results(engine, [], [], {run_id: {"ckpt_step": step, "ckpt_dir": ckpt_dir} for run_id, step in steps.items()})


def test_a_saved_checkpoint_is_recorded_per_run(plan, tmp_path):
    """A worker's "ckpt" event (sent once save_checkpoint completed) sets the run's ckpt_step and the folder it went to."""
    from db.schema import utcnow
    from db.writer import claim_run
    from sweep.registry import add_plans

    engine = open_db(f"sqlite:///{tmp_path}/slab.db")
    add_plans(engine, [plan])
    s = plan.runs[0].spec
    claim_run(engine, s.run_id, "me", utcnow())
    driver = Driver.__new__(Driver)  # only the event writer: no Ray
    driver.engine, driver.opts, driver.view, driver.owner = engine, LaunchOptions(cpu=True, ckpt_dir=tmp_path / "ck"), quiet(), "me"
    driver.db_away_since = None
    driver.flights = {s.run_id: Flight(spec=s, name=None, attempt=1, tries=1, microbatch=None)}
    train = {"tokens": 256, "flops": 1.0, "loss": 2.0, "lr": 1e-3}
    driver._write_events([(s.run_id, 1, "ckpt", {"step": 40}), (s.run_id, 1, "train", {"step": 78, **train}),
                          (s.run_id, 1, "ckpt", {"step": 80})])
    with engine.connect() as conn:
        row = conn.execute(select(Run.ckpt_step, Run.ckpt_dir, Run.step).where(Run.run_id == s.run_id)).one()
    engine.dispose()
    # the run's step is the checkpoint's, not the last one logged: after a Ctrl-C the summary had said 78 of a run
    # that resumes from 80
    assert tuple(row) == (80, str((tmp_path / "ck").resolve()), 80)


def test_launch_refuses_runs_whose_recorded_checkpoints_it_cannot_see(plan, tmp_path, no_ray, monkeypatch):
    """Two runs checkpointed under another --ckpt-dir (steps 201 and 141), a third whose checkpoint is here: the launch
    refuses in one line (exit 2) before Ray starts or the checkpoint folder is made, naming the runs, the steps lost,
    where it looked and where they were checkpointed; --restart trains them from step 0."""
    from sweep.registry import add_plans

    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path}/slab.db"
    engine = open_db(db)
    add_plans(engine, [plan])
    a, b, c = (r.spec.run_id for r in plan.runs[:3])
    _recorded(engine, {a: 201, b: 141}, "/data/ckG")
    _recorded(engine, {c: 30}, str(tmp_path / ".slab" / "ckpt"))
    here = tmp_path / ".slab" / "ckpt" / c
    here.mkdir(parents=True)
    (here / "ckpt-000000030.pt").write_bytes(b"x")
    engine.dispose()
    result = CliRunner().invoke(app, ["--db", db, "launch", str(tmp_path / "plan.csv"), "--cpu"])
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: 2 runs have checkpoints recorded up to step 201 but none under "
                           f"{tmp_path / '.slab' / 'ckpt'}/<run_id>/"), line
    assert "--ckpt-dir /data/ckG" in line and "relative to the working folder" in line and "--restart" in line, line
    assert "runs to train" not in result.stdout  # refused before anything trained
    assert not (tmp_path / "other").exists()
    opts = LaunchOptions(db_url=db, cpu=True, ckpt_dir=Path("other"))
    with pytest.raises(LaunchError, match=rf"none under {tmp_path / 'other'}/<run_id>/"):
        launch([plan], opts, quiet())
    assert not (tmp_path / "other").exists()  # no checkpoint folder made in the wrong place
    view = Said()
    with pytest.raises(RayStarted):  # --restart lets them start over
        launch([plan], LaunchOptions(db_url=db, cpu=True, ckpt_dir=Path("other"), restart=True), view)
    assert any("--restart" in line and "3 runs" in line and "step 201" in line for line in view.lines), view.lines
    restarted = CliRunner().invoke(app, ["--db", db, "launch", str(tmp_path / "plan.csv"), "--cpu", "--restart"])
    assert isinstance(restarted.exception, RayStarted), restarted.output  # the CLI's --restart gets past the check


def test_on_a_cluster_an_unchecked_checkpoint_folder_is_a_warning(plan, tmp_path, no_ray, monkeypatch):
    """With --address the driver asks a worker which checkpoints it sees; when it cannot, it warns and goes on."""
    import sweep.launch
    from sweep.registry import add_plans

    db = f"sqlite:///{tmp_path}/slab.db"
    engine = open_db(db)
    add_plans(engine, [plan])
    _recorded(engine, {plan.runs[0].spec.run_id: 201}, "/data/ckG")
    engine.dispose()

    def unanswered(root, run_ids):
        raise TimeoutError("no worker answered in 60 s")

    import ray

    monkeypatch.setattr(sweep.launch, "_ray_running", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})  # the joined cluster's
    monkeypatch.setattr(sweep.launch, "_checkpoints_on_workers", unanswered)
    view = Said()
    with pytest.raises(RayStarted):
        launch([plan], LaunchOptions(db_url=db, cpu=True, address="auto", ckpt_dir=tmp_path / "ck"), view)
    [warning] = [line for line in view.lines if line.startswith("warning")]
    assert "could not check" in warning and "no worker answered" in warning and "step 0" in warning, warning


def test_a_relaunch_of_a_finished_plan_says_nothing_is_left(plan, tmp_path, no_ray):
    from sqlalchemy import update

    from db.engine import session
    from sweep.registry import add_plans

    db = f"sqlite:///{tmp_path}/slab.db"
    engine = open_db(db)
    add_plans(engine, [plan])
    with session(engine) as s:
        s.execute(update(Run).values(status="done"))
        s.execute(update(Run).where(Run.run_id == plan.runs[0].spec.run_id).values(status="diverged"))
    engine.dispose()
    view = Said()
    assert launch([plan], LaunchOptions(db_url=db, cpu=True, ckpt_dir=tmp_path / "ck"), view).rows == []
    assert "nothing to train: all 5 selected runs are finished (4 done, 1 diverged)" in view.lines, view.lines
    view = Said()
    launch([plan], LaunchOptions(db_url=db, cpu=True, ckpt_dir=tmp_path / "ck", where=(("arch", "hybrid"),)), view)
    assert "nothing to train: the 1 selected run is done" in view.lines, view.lines


def test_a_resumed_runs_start_line_says_from_which_step(plan):
    from rich.console import Console
    import io

    view = LaunchView(Console(file=io.StringIO(), width=200), live=False)
    spec = plan.runs[0].spec
    view.begin([(spec, "r")])
    view.run_started(spec.run_id, spec, "r", 2, from_step=201)
    view.run_started(plan.runs[1].spec.run_id, plan.runs[1].spec, "q", 1)
    text = view.console.file.getvalue()
    assert "start r (softmax 32x2, attempt 2, resumes from step 201)" in text, text
    assert "start q (softmax 32x2, attempt 1)" in text, text
    assert view.running[spec.run_id]["step"] == 201


def test_a_run_stopped_by_ctrl_c_says_which_ckpt_dir_resumes_it(plan, tmp_path):
    """A relaunch resumes a stopped run only from the same --ckpt-dir (the default is relative to the working folder):
    the stop names the folder."""
    from db.schema import utcnow
    from db.writer import claim_run
    from models.train import Interrupted
    from sweep.registry import add_plans

    engine = open_db(f"sqlite:///{tmp_path}/slab.db")
    add_plans(engine, [plan])
    s = plan.runs[0].spec
    claim_run(engine, s.run_id, "me", utcnow())
    view = Said()
    driver = Driver.__new__(Driver)  # only the settling of an outcome: no Ray
    driver.engine, driver.owner, driver.view, driver.outcome = engine, "me", view, {}
    driver.opts, driver.db_away_since = LaunchOptions(cpu=True, ckpt_dir=tmp_path / "ckG"), None
    driver.flights = {s.run_id: Flight(spec=s, name="r", attempt=1, tries=1, microbatch=None)}
    driver._settle(s.run_id, Interrupted(201))
    engine.dispose()
    assert any(f"stopped at step 201; a relaunch with --ckpt-dir {(tmp_path / 'ckG').resolve()} resumes it" in line
               for line in view.lines), view.lines


def test_a_run_whose_data_has_no_labelled_token_fails_once_without_retrying(plan, tmp_path):
    """`Unlabelled` (no training step had a labelled token) fails the run at once: a retry would read the same data."""
    from db.schema import utcnow
    from db.writer import claim_run
    from models.train import Unlabelled
    from sweep.registry import add_plans

    engine = open_db(f"sqlite:///{tmp_path}/slab.db")
    add_plans(engine, [plan])
    s = plan.runs[0].spec
    claim_run(engine, s.run_id, "me", utcnow())
    driver = Driver.__new__(Driver)  # only the settling of an outcome: no Ray
    driver.engine, driver.owner, driver.view, driver.outcome = engine, "me", Said(), {}
    driver.opts, driver.db_away_since = LaunchOptions(cpu=True, ckpt_dir=tmp_path / "ck", max_attempts=3), None
    driver.stopping, driver.queue = False, []
    driver.flights = {s.run_id: Flight(spec=s, name="r", attempt=1, tries=1, microbatch=None)}
    driver._settle(s.run_id, Unlabelled("no training step of the run had a labelled token"))
    assert driver.queue == [] and driver.outcome[s.run_id] == "failed"
    with engine.connect() as conn:
        [(status, error)] = conn.execute(select(Run.status, Run.error).where(Run.run_id == s.run_id)).all()
    engine.dispose()
    assert status == "failed" and "labelled token" in error


# ---------------------------------------------------------------- refused before anything is written


def _host_cpus() -> int:
    """The CPUs a local Ray started here would have."""
    import ray._private.utils

    return ray._private.utils.get_num_cpus()


@pytest.mark.parametrize("case", ["cpus-per-run", "dp-workers"])
def test_a_run_larger_than_this_host_is_refused_before_anything_is_written(write_plan, tmp_path, no_ray, monkeypatch, case):
    """`--cpus-per-run 3` on a 2-core host, or a run of gpus 4 with --cpu, was refused (exit 2) only after the database was
    made, the plan registered, the checkpoint folder made and Ray started."""
    monkeypatch.chdir(tmp_path)
    n = _host_cpus() + 1
    if case == "cpus-per-run":
        path, extra = write_plan(PLAN), ["--cpus-per-run", str(n)]
    else:  # a data-parallel run of n CPU workers; its batch splits evenly across them
        path, extra = write_plan(HEADER + f"dp,softmax,32,2,2,,64,{2 * n},5k,1e-3,,,{n}\n"), []
    db = tmp_path / "slab.db"
    result = CliRunner().invoke(app, ["--db", f"sqlite:///{db}", "launch", str(path), "--cpu", *extra])
    assert result.exit_code == 2, (result.output, result.exception)
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: run ") and f"needs {n} CPUs" in line, line
    assert not db.exists() and not (tmp_path / ".slab").exists()


def test_a_run_asking_for_more_gpus_than_the_running_cluster_has_is_refused_before_the_database(write_plan, tmp_path, no_ray,
                                                                                            monkeypatch):
    """In a Ray already running (or joined), its resources are known before anything is written."""
    import ray

    import sweep.launch

    monkeypatch.setattr(sweep.launch, "_ray_running", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0})
    db = tmp_path / "slab.db"
    opts = LaunchOptions(db_url=f"sqlite:///{db}", ckpt_dir=tmp_path / "ck")
    with pytest.raises(LaunchError, match=r"run h-64-1500000 asks for 2 GPUs but the cluster has 1"):
        launch([load_plan(write_plan(PLAN))], opts, quiet())
    assert not db.exists() and not (tmp_path / "ck").exists()
    # a run that large which is done already trains no more: the others go on
    from sqlalchemy import update

    from db.engine import session
    from sweep.registry import add_plans

    plan = load_plan(write_plan(PLAN))
    engine = open_db(f"sqlite:///{db}")
    add_plans(engine, [plan])
    with session(engine) as s:
        s.execute(update(Run).where(Run.run_id == plan.runs[-1].spec.run_id).values(status="done"))
    engine.dispose()
    with pytest.raises(RayStarted):
        launch([plan], opts, quiet())


def _settled_after(plan, tmp_path, events, outcome):
    """A run's first attempt that sent ``events`` and ended in ``outcome``: (queued again, its status, its error)."""
    from db.schema import utcnow
    from db.writer import claim_run
    from sweep.registry import add_plans

    tmp_path.mkdir(exist_ok=True)
    engine = open_db(f"sqlite:///{tmp_path}/slab.db")
    add_plans(engine, [plan])
    s = plan.runs[0].spec
    claim_run(engine, s.run_id, "me", utcnow())
    driver = Driver.__new__(Driver)  # only the event writer and the settling of an outcome: no Ray
    driver.engine, driver.owner, driver.view, driver.outcome = engine, "me", Said(), {}
    driver.opts, driver.db_away_since = LaunchOptions(cpu=True, ckpt_dir=tmp_path / "ck", max_attempts=3), None
    driver.stopping, driver.queue = False, []
    driver.flights = {s.run_id: Flight(spec=s, name="r", attempt=1, tries=1, microbatch=None)}
    driver._write_events([(s.run_id, 1, kind, payload) for kind, payload in events])
    driver._settle(s.run_id, outcome)
    with engine.connect() as conn:
        status, error = conn.execute(select(Run.status, Run.error).where(Run.run_id == s.run_id)).one()
    engine.dispose()
    return bool(driver.queue), status, error


TRAIN = {"step": 1, "tokens": 512, "flops": 1e6, "loss": 5.0, "lr": 1e-3}


def test_a_data_error_before_the_first_training_step_is_not_retried(plan, tmp_path):
    """A corpus too short for seq_len failed every attempt the same way (--max-attempts of them, with waits between)."""
    error = ValueError("the train split of /x/e.txt holds 0 tokens, fewer than the 65 a window needs")
    queued, status, text = _settled_after(plan, tmp_path, [("start", {"host": "h"})], error)
    assert not queued and status == "failed" and "holds 0 tokens" in text
    # steps replayed from an earlier attempt's journal are not this attempt's training
    queued, _, _ = _settled_after(plan, tmp_path / "replayed", [("train", {**TRAIN, "replayed": True})], error)
    assert not queued


def test_an_error_after_training_started_is_still_retried(plan, tmp_path):
    queued, status, _ = _settled_after(plan, tmp_path, [("train", TRAIN)], ValueError("something at step 7"))
    assert queued and status == "failed"
    queued, _, _ = _settled_after(plan, tmp_path / "runtime", [], RuntimeError("a worker died"))
    assert queued


# ---------------------------------------------------------------- --where data=


def test_where_data_takes_a_path_as_the_plan_writes_it(tmp_path, no_ray, monkeypatch):
    """The stored data path is absolute: `--where data=corpus.txt`, as the plan writes it, matched nothing."""
    from sweep.launch import _chosen

    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "corpus.txt").write_text("some text to train on\n" * 200)
    path = tmp_path / "study" / "p.csv"
    path.write_text("name,arch,d_model,n_layers,seq_len,batch_size,tokens,data\n"
                    "c,softmax,32,2,64,4,5k,corpus.txt\ns,softmax,32,2,64,4,5k,stdlib\n"
                    "m,softmax,32,2,64,4,5k,stdlib+corpus.txt@0.5\n")
    plan = load_plan(path)
    monkeypatch.chdir(tmp_path)

    def chosen(value):
        return sorted(name for _, name in _chosen([plan], (("data", value),)).values())

    assert chosen("corpus.txt") == ["c"]  # relative to the plan's folder, as the plan reads it
    assert chosen("study/corpus.txt") == ["c"]  # or to the working folder
    assert chosen(str(tmp_path / "study" / "corpus.txt")) == ["c"]
    assert chosen("stdlib+corpus.txt@0.5") == ["m"] and chosen("stdlib") == ["s"]
    assert chosen("other.txt") == []
    with pytest.raises(RayStarted):  # the launch's own check finds it too
        launch([plan], LaunchOptions(db_url=f"sqlite:///{tmp_path}/slab.db", cpu=True, ckpt_dir=tmp_path / "ck",
                                     where=(("data", "corpus.txt"),)), quiet())


# ---------------------------------------------------------------- runs.resumed_from_step


class Sink:
    """An EventSink without Ray: keeps what reporters put."""

    def __init__(self):
        from types import SimpleNamespace

        self.events: list[tuple] = []
        self.put = SimpleNamespace(remote=lambda batch: self.events.extend(batch) or False)


def test_a_resumed_run_records_its_resume_step_while_it_trains(write_plan, tmp_path, monkeypatch):
    """resumed_from_step was set only when a run finished: the driver handles a "resume" event that no worker sent, so a
    run that resumed and was stopped again showed nothing there."""
    import sweep.task
    from db.schema import utcnow
    from db.writer import claim_run
    from models.train import Interrupted, pretrain
    from sweep.registry import add_plans
    from sweep.task import Reporter

    monkeypatch.setattr(sweep.task.ray, "get", lambda ref: ref)  # the fake sink's put answers at once
    (tmp_path / "corpus.txt").write_text("a small corpus of text for a tiny model to read\n" * 100)
    plan = load_plan(write_plan("arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens,data\n"
                                "softmax,32,2,2,64,4,2560,corpus.txt\n"))  # 10 steps
    spec, ckpt = plan.runs[0].spec, tmp_path / "ck" / plan.runs[0].spec.run_id
    ckpt.mkdir(parents=True)  # as the worker's run lock makes it

    def attempt(number: int, steps: int) -> list[tuple]:
        sink, polls = Sink(), iter(range(10**6))
        reporter = Reporter(sink, spec.run_id, number, journal=ckpt / "events.jsonl")
        with pytest.raises(Interrupted):
            pretrain(spec, reporter, ckpt, device="cpu", should_stop=lambda: next(polls) + 1 >= steps)
        reporter.flush()
        return sink.events

    first = attempt(1, 3)
    assert not [e for e in first if e[2] == "resume"]  # a fresh start resumes nothing
    second = attempt(2, 2)
    assert [e[3] for e in second if e[2] == "resume"] == [{"step": 3}]
    kinds = [e[2] for e in second]
    assert kinds.index("resume") < kinds.index("train")
    engine = open_db(f"sqlite:///{tmp_path}/slab.db")
    add_plans(engine, [plan])
    claim_run(engine, spec.run_id, "me", utcnow())
    driver = Driver.__new__(Driver)  # only the event writer: no Ray
    driver.engine, driver.opts, driver.view, driver.owner = engine, LaunchOptions(cpu=True, ckpt_dir=tmp_path / "ck"), quiet(), "me"
    driver.db_away_since = None
    driver.flights = {spec.run_id: Flight(spec=spec, name=None, attempt=2, tries=1, microbatch=None)}
    driver._write_events(second)
    with engine.connect() as conn:
        assert conn.execute(select(Run.resumed_from_step).where(Run.run_id == spec.run_id)).scalar_one() == 3
    engine.dispose()


def test_where_tells_large_seeds_apart(write_plan):
    # compared within a relative 1e-9, seed=2**60 had also matched seed 2**60 + 1 (and every seed within ~1e9 of it)
    big = 2**60
    plan = load_plan(write_plan(f"name,arch,d_model,n_layers,seq_len,batch_size,tokens,seed\n"
                                f"r-{{seed}},softmax,32,2,64,4,5120,{big}|{big + 1}\n"))
    assert names(plan, f"seed={big}") == [f"r-{big}"]
    assert names(plan, f"seed={big + 1}") == [f"r-{big + 1}"]
    assert names(plan, "seed=1.152921504606846976e18") == [f"r-{big}"]  # a float spelling still reads as a number


def test_ray_s_token_notice_is_not_shown_amid_a_local_launch(monkeypatch, caplog):
    """Ray 2.5x logged "Token authentication is enabled ..." (a WARNING) in the middle of every local launch's progress;
    the authentication stays on, its notice is dropped, and Ray's other warnings still show."""
    import logging

    import ray

    from sweep.launch import init_ray

    name = "ray._private.authentication.authentication_token_setup"

    def fake_init(**kwargs):
        logging.getLogger(name).warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=...")
        logging.getLogger(name).warning("something else worth seeing")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    with caplog.at_level(logging.WARNING, logger=name):
        init_ray(LaunchOptions(cpu=True))
    assert [r.getMessage() for r in caplog.records if r.name == name] == ["something else worth seeing"]
    assert not logging.getLogger(name).filters  # only while this launch's Ray starts
