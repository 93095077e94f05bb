"""The database layer on SQLite and (when SLAB_TEST_PG_URL is set) PostgreSQL."""

import pytest
from sqlalchemy import select, update

from db.engine import DatabaseError, open_db, session
from db.queries import QueryError, run_sql, runs_frame, status_counts
from db.schema import SCHEMA_VERSION, Meta, Metric, Plan, PlanRun, Run
from sweep.plan import load_plan
from sweep.registry import add_plans

PLAN = "arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens,lr,seed\nsoftmax|hgrn2,32,2,2,64,4,20k,1e-3,0|1|2\n"


def test_round_trip(db_url, write_plan):
    engine = open_db(db_url)
    plan = load_plan(write_plan(PLAN, "rt.csv"))
    [reg] = add_plans(engine, [plan])
    assert (reg.new, reg.known) == (6, 0)
    [again] = add_plans(engine, [plan])
    assert (again.new, again.known) == (0, 6)
    frame = runs_frame(engine, plan="rt")
    assert len(frame) == 6 and set(frame["arch"]) == {"softmax", "hgrn2"}
    spec_ids = set(plan.unique_specs())
    assert set(frame["run_id"]) == spec_ids
    with session(engine) as s:
        run = s.get(Run, next(iter(spec_ids)))
        assert run.spec == plan.unique_specs()[run.run_id].to_dict()
        s.add(Metric(run_id=run.run_id, step=1, tokens=256, flops=1e9, loss=5.0, lr=1e-3))
    counts = status_counts(engine)
    assert counts["runs"].sum() == 6
    assert run_sql(engine, "select count(*) as n from metrics")["n"].tolist() == [1]
    with pytest.raises(QueryError, match="read-only"):
        run_sql(engine, "delete from runs")
    assert len(runs_frame(engine)) == 6
    engine.dispose()


def test_metrics_unique_per_step(db_url, write_plan):
    from sqlalchemy.exc import IntegrityError

    engine = open_db(db_url)
    add_plans(engine, [load_plan(write_plan(PLAN))])
    run_id = runs_frame(engine)["run_id"][0]
    with session(engine) as s:
        s.add(Metric(run_id=run_id, step=1, tokens=1, flops=1.0, loss=1.0, lr=1.0))
    with pytest.raises(IntegrityError):
        with session(engine) as s:
            s.add(Metric(run_id=run_id, step=1, tokens=1, flops=1.0, loss=2.0, lr=1.0))
    engine.dispose()


def test_newer_schema_is_refused(db_url):
    engine = open_db(db_url)
    with session(engine) as s:
        s.execute(update(Meta).where(Meta.key == "schema_version").values(value=str(SCHEMA_VERSION + 1)))
    engine.dispose()
    with pytest.raises(DatabaseError, match="newer than this scalinglab"):
        open_db(db_url)


def test_sqlite_pragmas(tmp_path):
    engine = open_db(f"sqlite:///{tmp_path}/x.db")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
        assert conn.execute(select(Meta.value).where(Meta.key == "schema_version")).scalar() == str(SCHEMA_VERSION)


def test_opening_waits_for_another_process_creating_the_file(tmp_path):
    """Two `slab launch` of a plan on a new database race to create it: the one that finds the file
    write-locked by the other must wait for it, not fail with "database is locked" (SQLite skips the busy
    handler when switching to WAL)."""
    import sqlite3
    import threading
    import time

    path = tmp_path / "race.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE t (x)")
    threading.Timer(0.5, other.execute, ("COMMIT",)).start()
    t0 = time.monotonic()
    engine = open_db(f"sqlite:///{path}")
    assert time.monotonic() - t0 >= 0.4  # it waited for the other writer
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()
    other.close()


def _open_at_barrier(url, barrier, errors):
    barrier.wait()
    try:
        open_db(url).dispose()
    except Exception as exc:  # sent to the parent, which asserts there were none
        errors.put(f"{type(exc).__name__}: {exc}"[:300])


def test_launchers_creating_one_database_at_once_all_open_it(db_url):
    """Several launchers start on a new database at once: every one opens it (on PostgreSQL their CREATE
    TABLEs used to collide in the catalog, failing most of them)."""
    import multiprocessing as mp

    from sqlalchemy import create_engine

    from db.schema import Base

    ctx = mp.get_context("fork")
    errors = ctx.Queue()
    for _ in range(5):
        engine = create_engine(db_url)
        with engine.begin() as conn:
            Base.metadata.drop_all(conn)
        engine.dispose()
        barrier = ctx.Barrier(4)
        procs = [ctx.Process(target=_open_at_barrier, args=(db_url, barrier, errors)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 4
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == []


def _register_at_barrier(url, plan, barrier, errors):
    engine = open_db(url)
    barrier.wait()
    try:
        add_plans(engine, [plan])
    except Exception as exc:  # sent to the parent, which asserts there were none
        errors.put(f"{type(exc).__name__}: {exc}"[:300])
    engine.dispose()


def test_one_plan_registered_by_several_launchers_at_once(db_url, write_plan):
    """Two `slab launch` of one plan register it at the same moment: both go on, the plan is there once."""
    import multiprocessing as mp

    plan = load_plan(write_plan(PLAN, "race.csv"))
    ctx = mp.get_context("fork")
    errors = ctx.Queue()
    for _ in range(3):
        engine = open_db(db_url)
        with session(engine) as s:  # a new plan each round: every launcher finds it missing
            s.execute(PlanRun.__table__.delete())
            s.execute(Plan.__table__.delete())
        barrier = ctx.Barrier(4)
        procs = [ctx.Process(target=_register_at_barrier, args=(db_url, plan, barrier, errors)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 4
        assert len(runs_frame(engine, plan="race")) == 6
        engine.dispose()
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == []


def test_bad_urls(tmp_path):
    with pytest.raises(DatabaseError, match="no database"):
        open_db(f"sqlite:///{tmp_path}/missing.db", create=False)
    with pytest.raises(DatabaseError):
        open_db("notadb://x")


@pytest.mark.parametrize("url, match", [
    ("postgresql+psycopg://me:s3cret@127.0.0.1:abc/z", "bad database URL 'postgresql\\+psycopg://me:\\*\\*\\*@"),
    ("postgresql+psycopg://me:s3cret@127.0.0.1:1/z", "cannot open database 'postgresql\\+psycopg://me:\\*\\*\\*@"),
])
def test_url_errors_hide_the_password(url, match):
    """A bad port or an unreachable server is a DatabaseError whose message never shows the password."""
    with pytest.raises(DatabaseError, match=match) as info:
        open_db(url)
    assert "s3cret" not in str(info.value) and "Background on this error" not in str(info.value)
