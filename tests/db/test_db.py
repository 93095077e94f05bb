"""The database layer on SQLite and (when SLAB_TEST_PG_URL is set) PostgreSQL."""

import os
import re
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import select, update

from db.engine import DatabaseError, open_db, session
from db.queries import QueryError, export_table, run_sql, runs_frame, status_counts
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
    # a misspelt read is said to be one, not refused as a write ('slab sql is read-only ... not SELEC')
    with pytest.raises(QueryError, match=r"^SELEC is not a statement slab sql knows; did you mean SELECT\?$"):
        run_sql(engine, "selec * from runs")
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

    from sqlalchemy.dialects import sqlite
    from sqlalchemy.schema import CreateTable

    from db.schema import SCHEMA_VERSION, Base

    path = tmp_path / "race.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    for table in Base.metadata.sorted_tables:  # the other launcher creates scalinglab's tables (any other is refused)
        other.execute(str(CreateTable(table).compile(dialect=sqlite.dialect())))
    other.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
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


def test_database_errors_say_what_is_wrong_in_one_line(tmp_path):
    # a folder had given "unable to open database file", an unknown scheme "Can't load plugin: sqlalchemy.dialects:foo",
    # and an unreachable PostgreSQL two lines (psycopg's hint on a line of its own)
    (tmp_path / "afolder").mkdir()
    with pytest.raises(DatabaseError, match=r"is a folder, not a database file") as info:
        open_db(f"sqlite:///{tmp_path}/afolder")
    assert "sqlite:///" in str(info.value)
    with pytest.raises(DatabaseError, match=r"unknown database kind 'foo'.*sqlite:///.*postgresql\+psycopg://"):
        open_db("foo://x/y")
    with pytest.raises(DatabaseError) as info:
        open_db("postgresql+psycopg://me:pw@127.0.0.1:1/z")
    assert "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("url, match", [
    ("postgresql+psycopg://me:s3cret@127.0.0.1:abc/z", "bad database URL 'postgresql\\+psycopg://me:\\*\\*\\*@"),
    ("postgresql+psycopg://me:s3cret@127.0.0.1:1/z", "cannot open database 'postgresql\\+psycopg://me:\\*\\*\\*@"),
])
def test_url_errors_hide_the_password(url, match):
    """A bad port or an unreachable server is a DatabaseError whose message never shows the password."""
    with pytest.raises(DatabaseError, match=match) as info:
        open_db(url)
    assert "s3cret" not in str(info.value) and "Background on this error" not in str(info.value)


@pytest.mark.parametrize("url", ["sqlite://slab.db", "sqlite:///{tmp}/x.db?timeout=abc"])
def test_sqlite_url_sqlalchemy_rejects_is_a_one_line_error(url, tmp_path):
    """`--db sqlite://slab.db` (two slashes) used to escape as SQLAlchemy's ArgumentError, a traceback."""
    url = url.format(tmp=tmp_path)
    with pytest.raises(DatabaseError, match=r"^bad database URL ") as info:
        open_db(url)
    message = str(info.value)
    assert "\n" not in message and f"{url!r}" in message
    assert message.endswith("(a SQLite file is sqlite:///relative/path.db or sqlite:////absolute/path.db)")


@pytest.mark.parametrize("path, want", [("smoke.db", "sqlite:///smoke.db"), ("/data/x.db", "sqlite:////data/x.db")])
def test_a_file_path_given_as_url_gets_the_url_to_write(path, want):
    """`--db smoke.db` had said only that SQLAlchemy could not parse it."""
    with pytest.raises(DatabaseError, match=r"^bad database URL ") as info:
        open_db(path)
    assert f"for a SQLite file write {want} (" in str(info.value)


def test_sqlite_path_expands_home(tmp_path, monkeypatch):
    """`sqlite:///~/x.db` is the file in the home folder, not one under a folder named ~ in the cwd."""
    from db.engine import sqlite_path

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    url = "sqlite:///~/x.db"
    assert sqlite_path(url) == home / "x.db"
    engine = open_db(url)
    assert engine.url.database == str(home / "x.db")
    engine.dispose()
    assert (home / "x.db").exists() and not (cwd / "~").exists()
    open_db(url, create=False).dispose()


@pytest.mark.skipif(os.name != "posix", reason="file modes")
@pytest.mark.parametrize("locked", ["file and folder", "file", "folder"])
def test_read_only_database_can_be_read(locked, shared_tmp, as_other_user, write_plan):
    """A results database on storage this process cannot write (a shared, read-only copy) can still be read:
    no switch to WAL and no write transaction on opening, which SQLite refuses there."""
    folder = shared_tmp / "ro"
    folder.mkdir()
    url = f"sqlite:///{folder}/slab.db"
    engine = open_db(url)
    add_plans(engine, [load_plan(write_plan(PLAN))])
    engine.dispose()
    before = sorted(p.name for p in folder.iterdir())
    # the modes lock what `locked` names for every user, and leave the rest open to every user
    (folder / "slab.db").chmod(0o444 if "file" in locked else 0o666)
    folder.chmod(0o555 if "folder" in locked else 0o777)

    def read():
        engine = open_db(url, create=False)
        assert len(runs_frame(engine)) == 6
        assert status_counts(engine)["runs"].sum() == 6
        assert run_sql(engine, "select count(*) as n from runs")["n"].tolist() == [6]
        with pytest.raises(QueryError, match="read-only"):
            run_sql(engine, "delete from runs")
        with pytest.raises(DatabaseError, match=r"the database \(or its folder\) is not writable here"):
            with session(engine) as s:
                s.execute(update(Run).values(status="done"))
        engine.dispose()
        engine = open_db(url)  # as `slab add` and the benchmarks open it
        assert len(runs_frame(engine)) == 6
        engine.dispose()

    try:
        as_other_user(read)
        assert sorted(p.name for p in folder.iterdir()) == before  # no -shm left that its owner could not write
    finally:
        folder.chmod(0o755)
        (folder / "slab.db").chmod(0o644)
    engine = open_db(url)  # writable again: back to WAL and write transactions
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    add_plans(engine, [load_plan(write_plan(PLAN.replace("0|1|2", "3"), "more.csv"))])
    assert len(runs_frame(engine)) == 8
    engine.dispose()


def test_a_database_taken_for_unwritable_is_read_through_sqlites_read_only_mode(tmp_path, write_plan, monkeypatch):
    """The read-only path as any user runs it (the tests above run it as another user): SQLite's
    mode=ro itself refuses the writes, whatever the file's owner."""
    import db.engine

    url = f"sqlite:///{tmp_path}/slab.db"
    engine = open_db(url)
    add_plans(engine, [load_plan(write_plan(PLAN))])
    engine.dispose()
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(db.engine, "_writable", lambda path: False)
    engine = open_db(url, create=False)
    assert len(runs_frame(engine)) == 6 and run_sql(engine, "select count(*) as n from runs")["n"].tolist() == [6]
    with pytest.raises(DatabaseError, match=r"the database \(or its folder\) is not writable here"):
        with session(engine) as s:
            s.execute(update(Run).values(status="done"))
    engine.dispose()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # immutable: no -shm or -wal made


@pytest.mark.skipif(os.name != "posix", reason="file modes")
def test_read_only_database_follows_its_writer(shared_tmp, as_other_user, write_plan):
    """Watching a database this process cannot write while its owner's launcher writes it: reads go through
    the writer's WAL, so they see its commits."""
    import sqlite3
    import threading

    path = shared_tmp / "slab.db"
    engine = open_db(f"sqlite:///{path}")
    add_plans(engine, [load_plan(write_plan(PLAN))])
    engine.dispose()
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TEMP TABLE keep_wal_open (x)")
    path.chmod(0o444)
    (read_once, wrote), (ask, tell) = os.pipe(), os.pipe()  # the reader asks for the write after its first read

    def write_when_asked():
        if os.read(read_once, 1):
            writer.execute("UPDATE runs SET status = 'done'")
            os.write(tell, b"1")

    def watch():
        reader = open_db(f"sqlite:///{path}", create=False)
        assert set(status_counts(reader)["status"]) == {"pending"}
        os.write(wrote, b"1")
        assert os.read(ask, 1) == b"1"
        assert set(status_counts(reader)["status"]) == {"done"}
        reader.dispose()

    thread = threading.Thread(target=write_when_asked, daemon=True)
    thread.start()
    try:
        as_other_user(watch)
    finally:
        os.close(wrote)  # ends the thread's wait if the reader failed before asking
        thread.join(10)
        writer.close()
        path.chmod(0o644)
        for fd in (read_once, ask, tell):
            os.close(fd)


@pytest.fixture
def runs_db(tmp_path, write_plan):
    """A SQLite database holding six pending runs."""
    engine = open_db(f"sqlite:///{tmp_path}/slab.db")
    add_plans(engine, [load_plan(write_plan(PLAN))])
    yield engine
    engine.dispose()


def test_export_format_follows_the_file_suffix(runs_db, tmp_path):
    """Without a format the suffix chooses it; a format that contradicts a known suffix is refused."""
    out = tmp_path / "runs.csv"
    assert export_table(runs_db, "runs", None, out) == 6
    assert out.read_text().startswith("run_id,")
    assert export_table(runs_db, "runs", None, tmp_path / "runs.txt") == 6  # no known suffix: CSV
    assert (tmp_path / "runs.txt").read_text().startswith("run_id,")
    with pytest.raises(QueryError, match="format csv contradicts the file name .*runs.parquet"):
        export_table(runs_db, "runs", "csv", tmp_path / "runs.parquet")
    with pytest.raises(QueryError, match="format parquet contradicts"):
        export_table(runs_db, "runs", "parquet", tmp_path / "runs.CSV")
    with pytest.raises(QueryError, match="cannot export to json"):
        export_table(runs_db, "runs", None, tmp_path / "runs.json")
    assert not (tmp_path / "runs.parquet").exists() and not (tmp_path / "runs.json").exists()


def test_export_parquet_from_the_suffix(runs_db, tmp_path):
    """`slab export runs --out runs.parquet` used to write CSV text into the .parquet file."""
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "runs.parquet"
    assert export_table(runs_db, "runs", None, out) == 6
    assert out.read_bytes()[:4] == b"PAR1" and pq.read_table(out).num_rows == 6


def test_export_to_a_bad_path_says_so_before_querying(runs_db, tmp_path, monkeypatch):
    """A folder, or a path under a file, is refused before the query, as QueryError naming the path."""
    import db.queries

    def no_query(*_, **__):
        raise AssertionError("the table was read before the path was checked")

    monkeypatch.setattr(db.queries.pd, "read_sql", no_query)
    with pytest.raises(QueryError, match=f"cannot write {tmp_path}: it is a folder"):
        export_table(runs_db, "runs", "csv", tmp_path)
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file" / "x.csv", tmp_path / "file" / "sub" / "x.csv"):
        with pytest.raises(QueryError, match=f"cannot write {out}: {tmp_path / 'file'} is not a folder"):
            export_table(runs_db, "runs", "csv", out)


def test_export_write_error_is_not_hidden_by_the_cleanup(runs_db, tmp_path, monkeypatch):
    """When writing fails, the failed cleanup of the temporary file used to raise instead of the cause."""
    from pathlib import Path

    def refuse(self, *_, **__):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "replace", refuse)
    monkeypatch.setattr(Path, "unlink", refuse)
    out = tmp_path / "runs.csv"
    with pytest.raises(QueryError, match=f"cannot write {out}: Permission denied"):
        export_table(runs_db, "runs", "csv", out)


@pytest.mark.skipif(os.name != "posix", reason="file modes")
def test_export_to_a_read_only_folder(shared_tmp, as_other_user, write_plan):
    url = f"sqlite:///{shared_tmp}/slab.db"
    engine = open_db(url)
    add_plans(engine, [load_plan(write_plan(PLAN))])
    engine.dispose()
    folder = shared_tmp / "ro"
    folder.mkdir(mode=0o555)

    def export():
        engine = open_db(url, create=False)
        with pytest.raises(QueryError, match=f"cannot write {folder / 'runs.csv'}: Permission denied"):
            export_table(engine, "runs", "csv", folder / "runs.csv")
        engine.dispose()

    try:
        as_other_user(export)
    finally:
        folder.chmod(0o755)
    assert list(folder.iterdir()) == []


def test_parquet_export_keeps_column_types_before_results(runs_db, tmp_path):
    """Runs with no results yet have all-NULL columns, which Arrow typed as null: such a file could not be
    concatenated with a later export."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    early = tmp_path / "early.parquet"
    export_table(runs_db, "runs", "parquet", early)
    with session(runs_db) as s:
        run = s.scalars(select(Run)).first()
        run.status, run.step, run.final_loss, run.val_loss, run.host = "done", 100, 3.5, 3.6, "node1"
        run.started_at = run.finished_at = run.heartbeat_at = run.created_at
    late = tmp_path / "late.parquet"
    export_table(runs_db, "runs", "parquet", late)
    early_schema, late_schema = pq.read_schema(early), pq.read_schema(late)
    assert early_schema.field("final_loss").type == pa.float64()
    assert early_schema.field("step").type == pa.int64()
    assert early_schema.field("error").type == pa.string() or pa.types.is_large_string(early_schema.field("error").type)
    assert not any(pa.types.is_null(f.type) for f in early_schema)
    assert early_schema.remove_metadata() == late_schema.remove_metadata()
    both = pa.concat_tables([pq.read_table(early), pq.read_table(late)])
    assert both.num_rows == 12 and both.column("step").drop_null().to_pylist() == [100]


def test_reads_do_not_wait_for_a_writer(runs_db, monkeypatch):
    """In WAL a reader sees the last commit while a writer holds its transaction. Every query took BEGIN IMMEDIATE,
    the write lock, so `slab runs`, `slab status --watch` or a report waited out the launcher's writes (and a long
    read made the launcher's writer wait, failing it after the 30 s busy timeout)."""
    import sqlite3
    import time

    import db.engine
    from db.queries import evals_frame, metrics_frame, plan_names

    monkeypatch.setattr(db.engine, "SQLITE_BUSY_MS", 300)
    engine = open_db(str(runs_db.url))
    writer = sqlite3.connect(runs_db.url.database, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE runs SET status = 'running'")
    try:
        t0 = time.monotonic()
        frame = runs_frame(engine)
        assert set(frame["status"]) == {"pending"}  # the last commit, not the writer's open transaction
        assert status_counts(engine)["runs"].sum() == 6 and plan_names(engine) == ["plan"]
        assert metrics_frame(engine).empty and evals_frame(engine).empty
        assert time.monotonic() - t0 < 1.0
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        engine.dispose()


def test_runs_frame_types_columns_before_results(runs_db):
    """Pending runs have all-NULL result columns, which pandas typed as object (None): frame.val_loss.round()
    and friends failed until some run finished."""
    frame = runs_frame(runs_db)
    for col in ("final_loss", "val_loss", "wall_s", "n_gpus", "flops"):
        assert frame[col].dtype == "float64", col
    for col in ("step", "microbatch", "resumed_from_step"):
        assert frame[col].dtype == "Int64", col
    assert frame["val_loss"].isna().all() and frame["step"].isna().all()
    empty = runs_frame(runs_db, status="done")
    assert empty.empty and empty["val_loss"].dtype == "float64" and empty["params"].dtype == "int64"


def test_a_database_of_the_first_schema_opens(tmp_path, write_plan):
    """runs.resumed_from_step came after the first release without a version bump: its databases (schema 1, no
    such column) failed every query with 'no such column'. The missing column is added on open."""
    import sqlite3

    url = f"sqlite:///{tmp_path}/old.db"
    engine = open_db(url)
    add_plans(engine, [load_plan(write_plan(PLAN))])
    engine.dispose()
    con = sqlite3.connect(tmp_path / "old.db")
    con.execute("ALTER TABLE runs DROP COLUMN resumed_from_step")
    con.commit()
    con.close()
    engine = open_db(url, create=False)
    frame = runs_frame(engine)
    assert len(frame) == 6 and frame["resumed_from_step"].isna().all()
    engine.dispose()


@pytest.mark.parametrize("query", ["commit; delete from plan_runs returning 1", "end; delete from plan_runs",
                                   "select 1; rollback; delete from plan_runs", "set transaction read write; delete from plan_runs"])
def test_sql_cannot_end_its_read_only_transaction(db_url, write_plan, query):
    """A statement that ends the read-only transaction (PostgreSQL runs every statement of a query string sent
    without parameters) must not let the next statement write."""
    engine = open_db(db_url)
    add_plans(engine, [load_plan(write_plan(PLAN))])
    with pytest.raises(QueryError):
        run_sql(engine, query)
    assert run_sql(engine, "select count(*) as n from plan_runs")["n"].tolist() == [6]
    engine.dispose()


def test_runs_in_no_plan_are_found_without_a_scan_per_run(db_url, write_plan):
    """`slab runs --plan -` asked NOT EXISTS (a plan link of this run), which SQLite ran as a scan of plan_runs for
    every run: quadratic, 7 s at 15,000 runs. An anti-join reads each table once."""
    from sqlalchemy import event

    engine = open_db(db_url)
    add_plans(engine, [load_plan(write_plan(PLAN, "p.csv"))])
    add_plans(engine, [load_plan(write_plan(PLAN.replace("0|1|2", "0|1"), "p.csv"))])  # seed 2's runs leave the plan
    statements = []
    event.listen(engine, "before_cursor_execute", lambda conn, cur, stmt, params, *_: statements.append((stmt, params)))
    orphans = runs_frame(engine, plan="-")
    assert sorted(orphans["seed"]) == [2, 2] and set(orphans["plan"]) == {""}
    assert len(runs_frame(engine, plan="p")) == 4 and len(runs_frame(engine, plan="-", status="done")) == 0
    if engine.dialect.name == "sqlite":
        stmt, params = next((s, p) for s, p in statements if "plan_runs" in s and "FROM runs" in s)
        with engine.connect() as conn:
            plan = " / ".join(row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + stmt, params))
        assert "CORRELATED" not in plan and "SCAN plan_runs" not in plan, plan
    engine.dispose()


def test_metrics_and_evals_of_more_runs_than_one_statement_takes(db_url, write_plan):
    """The analysis commands ask for the curves of every finished run: psycopg refuses a statement of more than 65,535
    parameters (SQLite 250,000), so a database of more finished runs failed `slab fit`, `compare` and `report`."""
    from db.queries import evals_frame, metrics_frame
    from db.schema import Eval

    engine = open_db(db_url)
    add_plans(engine, [load_plan(write_plan(PLAN))])
    ids = sorted(runs_frame(engine)["run_id"])
    with session(engine) as s:
        for i, run_id in enumerate(ids):
            s.add_all([Metric(run_id=run_id, step=k, tokens=k, flops=1.0, loss=5.0 - k, lr=i) for k in (2, 1)])
            s.add(Eval(run_id=run_id, step=2, name="mqar/acc", value=i / 10))
    limit = 250_000 if engine.dialect.name == "sqlite" else 65_535  # parameters a statement may have
    asked = [f"{i:016x}" for i in range(limit + 1)] + ids  # run ids the database does not hold, and its own
    metrics = metrics_frame(engine, asked)
    assert metrics["run_id"].tolist() == [r for r in ids for _ in (1, 2)] and metrics["step"].tolist() == [1, 2] * 6
    assert metrics["lr"].tolist() == [i for i in range(6) for _ in (1, 2)] and metrics["step"].dtype == "int64"
    evals = evals_frame(engine, asked)
    assert evals["run_id"].tolist() == ids and evals["value"].tolist() == pytest.approx([i / 10 for i in range(6)])
    engine.dispose()


def test_frames_and_exports_are_read_a_chunk_at_a_time(runs_db, tmp_path, monkeypatch):
    """`slab export metrics` and the analysis commands held every row as Python objects at once, about six times the
    frame: 1.3 GB for 1.5 million metric rows. They read FETCH_ROWS rows at a time, and the result is the same."""
    import db.queries
    from db.queries import evals_frame, metrics_frame

    ids = sorted(runs_frame(runs_db)["run_id"])
    with session(runs_db) as s:
        for i, run_id in enumerate(ids):  # a chunk of rows without throughput must still type it as float
            s.add_all([Metric(run_id=run_id, step=k, tokens=10 * k, flops=1.5 * k, loss=4.0 - k / 10, lr=1e-3,
                              tokens_per_s=None if i < 3 else 100.0 * k) for k in range(1, 4)])
    whole = {t: tmp_path / f"whole-{t}.csv" for t in ("metrics", "runs")}
    for table, out in whole.items():
        export_table(runs_db, table, "csv", out)
    want = metrics_frame(runs_db)
    read_sql, materialized = db.queries.pd.read_sql, []

    def counting(*args, **kwargs):
        got = read_sql(*args, **kwargs)
        if isinstance(got, db.queries.pd.DataFrame):
            materialized.append(len(got))
            return got
        return (materialized.append(len(chunk)) or chunk for chunk in got)

    monkeypatch.setattr(db.queries, "FETCH_ROWS", 4)
    monkeypatch.setattr(db.queries.pd, "read_sql", counting)
    got = metrics_frame(runs_db)
    db.queries.pd.testing.assert_frame_equal(got, want)
    assert got["tokens_per_s"].dtype == "float64" and got["tokens_per_s"].isna().sum() == 9
    assert len(metrics_frame(runs_db, ids[:2])) == 6 and evals_frame(runs_db, ids).empty
    for table, out in whole.items():
        assert export_table(runs_db, table, "csv", tmp_path / f"{table}.csv") == {"metrics": 18, "runs": 6}[table]
        assert (tmp_path / f"{table}.csv").read_bytes() == out.read_bytes()
    assert max(materialized) <= 4
    pq = pytest.importorskip("pyarrow.parquet")
    export_table(runs_db, "metrics", "parquet", tmp_path / "metrics.parquet")
    back = pq.read_table(tmp_path / "metrics.parquet")
    assert back.num_rows == 18 and back.column("tokens_per_s").null_count == 9
    assert str(back.schema.field("tokens_per_s").type) == "double" and str(back.schema.field("step").type) == "int64"


def test_a_database_without_the_checkpoint_columns_gets_them_on_open(db_url, write_plan):
    """runs.ckpt_step and runs.ckpt_dir (a run's newest saved checkpoint, and where) came after schema 1 without a
    version bump: a database without them gets them on open, empty, and they take values."""
    from sqlalchemy import text

    from db.writer import write_results

    engine = open_db(db_url)
    add_plans(engine, [load_plan(write_plan(PLAN))])
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE runs DROP COLUMN ckpt_step"))
        conn.execute(text("ALTER TABLE runs DROP COLUMN ckpt_dir"))
    engine.dispose()
    engine = open_db(db_url, create=False)
    frame = runs_frame(engine)
    assert len(frame) == 6 and frame["ckpt_step"].isna().all() and frame["ckpt_dir"].isna().all()
    run_id = frame["run_id"][0]
    write_results(engine, [], [], {run_id: {"ckpt_step": 201, "ckpt_dir": "/data/ckG"}})
    with engine.connect() as conn:
        assert conn.execute(select(Run.ckpt_step, Run.ckpt_dir).where(Run.run_id == run_id)).one() == (201, "/data/ckG")
    engine.dispose()


def test_a_database_in_a_missing_folder_is_refused_not_made(tmp_path):
    """A misspelt folder in --db had been created, and a fresh, empty database with it: the study trained again."""
    with pytest.raises(DatabaseError, match=r"no folder .*nodir.* make it first"):
        open_db(f"sqlite:///{tmp_path}/nodir/slab.db", create=True)
    assert not (tmp_path / "nodir").exists()
    # the command it gives is one a shell runs as it reads ('mkdir -p a b' had made two folders)
    with pytest.raises(DatabaseError, match=re.escape(f"(mkdir -p '{tmp_path}/a b')")):
        open_db(f"sqlite:///{tmp_path}/a b/slab.db", create=True)
    (tmp_path / "p.csv").write_text("")  # a file where the folder should be: 'mkdir -p p.csv' would fail
    with pytest.raises(DatabaseError, match=r"p.csv is a file, not a folder, so it cannot hold the database slab.db"):
        open_db(f"sqlite:///{tmp_path}/p.csv/slab.db", create=True)


def test_a_long_host_name_fits_the_runs_host_column(db_url, write_plan):
    """A worker on a host of a 253-character name had failed the launcher's write of runs.host on PostgreSQL (value
    too long for varchar(200)); the host and gpu written fit their columns and still tell hosts apart."""
    from db.schema import utcnow
    from db.writer import claim_run, update_run, write_results

    host = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    engine = open_db(db_url)
    add_plans(engine, [load_plan(write_plan(PLAN))])
    first, second = runs_frame(engine)["run_id"][:2]
    write_results(engine, [], [], {first: {"host": host, "gpu": "G" * 300}})
    assert claim_run(engine, second, "me:1:a:120", utcnow()) == 1
    assert update_run(engine, second, "me:1:a:120", host=host[:-1] + "e")
    with engine.connect() as conn:
        rows = dict(conn.execute(select(Run.run_id, Run.host).where(Run.run_id.in_([first, second]))).all())
        gpu = conn.execute(select(Run.gpu).where(Run.run_id == first)).scalar()
    limit = Run.__table__.c.host.type.length
    assert all(len(h) <= limit and h.startswith(host[:100]) for h in rows.values()), rows
    assert rows[first] != rows[second] and len(gpu) <= Run.__table__.c.gpu.type.length
    write_results(engine, [], [], {first: {"host": "node1"}})  # an ordinary name as it is
    with engine.connect() as conn:
        assert conn.execute(select(Run.host).where(Run.run_id == first)).scalar() == "node1"
    engine.dispose()


def _ro_uri(path) -> str:
    """SQLAlchemy's documented URL of a SQLite file opened read-only."""
    return f"sqlite:///file:{path}?mode=ro&uri=true"


@pytest.mark.parametrize("form", ["file:{path}", "file://{path}", "file://localhost{path}", "file:{rel}"])
def test_a_read_only_uri_url_reads_the_file_it_names(form, tmp_path, write_plan, monkeypatch):
    """`sqlite:///file:/path/x.db?mode=ro&uri=true` had been read as a file named "file:/path/x.db" (no database
    there); it opens that file read-only, and a write through it fails in one line naming mode=ro."""
    from db.engine import sqlite_path
    from db.writer import save_fit

    path = tmp_path / "study" / "slab.db"
    path.parent.mkdir()
    engine = open_db(f"sqlite:///{path}")
    add_plans(engine, [load_plan(write_plan(PLAN))])
    engine.dispose()
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{form.format(path=path, rel='study/slab.db')}?mode=ro&uri=true"
    assert sqlite_path(url).resolve() == path
    for create in (False, True):  # as the read commands, and as slab add and the launcher, open it
        engine = open_db(url, create=create)
        assert len(runs_frame(engine)) == 6 and status_counts(engine)["runs"].sum() == 6
        assert run_sql(engine, "select count(*) as n from runs")["n"].tolist() == [6]
        with pytest.raises(DatabaseError, match=r"^cannot write the database: its URL opens it read-only \(mode=ro\)") as info:
            add_plans(engine, [load_plan(write_plan(PLAN.replace("0|1|2", "3"), "more.csv"))])
        assert "\n" not in str(info.value)
        with pytest.raises(DatabaseError, match=r"mode=ro"):
            save_fit(engine, method="approach3", source="db", n_points=1, result={})
        engine.dispose()
    engine = open_db(f"sqlite:///{path}")
    assert len(runs_frame(engine)) == 6  # nothing was written
    engine.dispose()


def test_a_read_only_uri_url_of_a_missing_file_is_a_one_line_error(tmp_path, monkeypatch):
    """mode=ro opens only an existing file: a missing one (or its folder) is said in one line, and nothing is made."""
    monkeypatch.chdir(tmp_path)
    for url, path in [(_ro_uri(tmp_path / "nope.db"), tmp_path / "nope.db"),
                      (_ro_uri(tmp_path / "nodir" / "x.db"), tmp_path / "nodir" / "x.db"),
                      ("sqlite:///file:rel.db?mode=ro&uri=true", Path("rel.db"))]:
        for create in (False, True):
            with pytest.raises(DatabaseError, match=r"^no database at ") as info:
                open_db(url, create=create)
            message = str(info.value)
            assert "\n" not in message and f"no database at {path}" in message and "mode=ro" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_read_only_uri_url_of_an_unwritable_file_makes_no_files(tmp_path, write_plan, monkeypatch):
    """A file this process cannot write, named by a mode=ro URL, is read as the plain URL reads it: immutable when no
    writer has it open, so no -shm or -wal is left that its owner could not write."""
    import db.engine

    path = tmp_path / "slab.db"
    engine = open_db(f"sqlite:///{path}")
    add_plans(engine, [load_plan(write_plan(PLAN))])
    engine.dispose()
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(db.engine, "_writable", lambda path: False)
    engine = open_db(_ro_uri(path), create=False)
    assert len(runs_frame(engine)) == 6
    with pytest.raises(DatabaseError, match=r"the database \(or its folder\) is not writable here"):
        with session(engine) as s:
            s.execute(update(Run).values(status="done"))
    engine.dispose()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_writable_uri_url_is_opened_as_its_file(tmp_path, write_plan):
    """A URI URL without mode=ro (uri=true, e.g. for vfs= or cache=) writes the file it names, in WAL mode."""
    path = tmp_path / "slab.db"
    engine = open_db(f"sqlite:///file:{path}?uri=true")
    add_plans(engine, [load_plan(write_plan(PLAN))])
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()
    assert path.exists() and not (tmp_path / "file:").exists()
    engine = open_db(f"sqlite:///{path}", create=False)
    assert len(runs_frame(engine)) == 6
    engine.dispose()


def test_export_holds_no_transaction_while_it_writes(db_url, write_plan, tmp_path, monkeypatch):
    """`slab export` read every chunk in one transaction held while it wrote the file: on SQLite in WAL no checkpoint
    could reset the WAL a launch was writing to (it grew for the whole export), on PostgreSQL it held a snapshot. Each
    chunk is read in a transaction of its own, and every row is written once, in the order of its unique key."""
    import db.queries

    engine = open_db(db_url)
    add_plans(engine, [load_plan(write_plan(PLAN))])
    with session(engine) as s:
        s.add_all([Metric(run_id=run_id, step=k, tokens=k, flops=k, loss=4.0, lr=1e-3)
                   for run_id in s.scalars(select(Run.run_id)) for k in (3, 1, 2)])
    # A text key, a key of two columns, and metrics by run and step (their unique key, not their id).
    keys = {"runs": ["run_id"], "plan_runs": ["plan_id", "run_id"], "metrics": ["run_id", "step"]}
    want = {t: sorted(map(tuple, run_sql(engine, f"select {', '.join(k)} from {t}").values.tolist()))
            for t, k in keys.items()}
    sqlite = engine.dialect.name == "sqlite"
    if sqlite:
        import sqlite3

        other = sqlite3.connect(engine.url.database, timeout=0, isolation_level=None)  # no wait: busy, not blocked
    else:
        other = engine.connect()
    held = []

    def between_chunks():
        """Another connection writes and then checks that no transaction of the export's is open."""
        if sqlite:
            other.execute("UPDATE runs SET attempts = attempts + 1")
            busy, log, _ = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            held.append((busy, log))  # busy: a reader still used the WAL, which could not be reset
        else:
            with other.begin():
                other.execute(update(Run).values(attempts=Run.attempts + 1))
            open_txns = other.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend' AND xact_start IS NOT NULL").scalar()
            other.rollback()
            held.append((open_txns, 0))

    write_csv = db.queries._write_csv

    def hooked(chunks, path):
        def tapped():
            for chunk in chunks:
                yield chunk  # the writer has written the chunk before it asks for the next
                between_chunks()
        return write_csv(tapped(), path)

    monkeypatch.setattr(db.queries, "FETCH_ROWS", 4)
    monkeypatch.setattr(db.queries, "_write_csv", hooked)
    try:
        for table, key in keys.items():
            out = tmp_path / f"{table}.csv"
            held.clear()
            assert export_table(engine, table, "csv", out) == len(want[table])
            assert held and held == [(0, 0)] * len(held), held
            got = db.queries.pd.read_csv(out)
            assert list(map(tuple, got[key].values.tolist())) == want[table]  # each row once, in key order
    finally:
        other.close()
        engine.dispose()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite:///:memory:?cache=shared",
                                 "sqlite:///file::memory:?uri=true", "sqlite:///file:%3Amemory%3A?uri=true",
                                 "sqlite:///file:x?mode=memory&uri=true", "sqlite:///file:?uri=true",
                                 "sqlite:///file:#frag?uri=true", "sqlite:///file:/x.db?vfs=memdb&uri=true"])
def test_a_database_that_lives_in_memory_is_refused(url, write_plan, tmp_path, monkeypatch):
    """`slab --db sqlite:///:memory: add` had said "1 new run", exit 0, and kept nothing: a launch on it would train
    every run and throw the results away. Each form of SQLite with no file is refused in one line (exit 2)."""
    from typer.testing import CliRunner

    from sweep.cli import app

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatabaseError, match="keeps nothing") as info:
        open_db(url)
    assert "\n" not in str(info.value)
    result = CliRunner().invoke(app, ["--db", url, "add", str(write_plan(PLAN))])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "keeps nothing" in result.stderr
    assert "new run" not in result.stdout and sorted(p.name for p in tmp_path.iterdir()) == ["plan.csv"]


@pytest.mark.parametrize("url", ["sqlite:///file:x?mode=memory", "sqlite:///file:x.db?uri=true"])
def test_a_sqlite_url_naming_a_file_is_not_taken_for_memory(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "mode=" in url:
        # Without uri=true SQLAlchemy drops mode (with a warning) and SQLite makes a file named "file:x": refused, naming
        # the URI form, and nothing made (see test_a_sqlite_option_of_a_plain_path_is_refused_not_ignored).
        with pytest.raises(DatabaseError, match=r"takes no option 'mode'.*\?mode=memory&uri=true"):
            open_db(url)
        assert list(tmp_path.iterdir()) == []
        return
    open_db(url).dispose()
    assert any(p.name.startswith("file:x") or p.name == "x.db" for p in tmp_path.iterdir())


def test_runs_csv_carries_every_spec_field(runs_db, tmp_path):
    """`slab runs --csv` says it prints every column, but warmup, min_lr_ratio, weight_decay, grad_clip, evals,
    eval_every, gpus and vocab_size were left out. The spec's budget, which runs.tokens rounds up to whole steps,
    comes as spec_tokens; evals as a plan cell writes them."""
    import csv
    import io
    from dataclasses import fields

    from typer.testing import CliRunner

    from sweep.cli import app
    from sweep.spec import RunSpec

    result = CliRunner().invoke(app, ["--db", str(runs_db.url), "runs", "--csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 6
    assert {f.name for f in fields(RunSpec)} - {"arch", "tokens"} <= set(rows[0])
    want = {"warmup": "4", "min_lr_ratio": "0.1", "weight_decay": "0.1", "grad_clip": "1.0", "evals": "",
            "eval_every": "0", "gpus": "1.0", "vocab_size": "260", "spec_tokens": "20000", "tokens": "20224"}
    assert all({k: r[k] for k in want} == want for r in rows), rows[0]


def test_a_new_spec_field_becomes_a_runs_column(runs_db, monkeypatch):
    """The spec columns follow RunSpec's fields, so a field added to it shows without a hand-kept list."""
    from dataclasses import dataclass

    import db.queries
    from sweep.spec import RunSpec

    @dataclass(frozen=True)
    class Wider(RunSpec):
        knob: int = 7

    monkeypatch.setattr(db.queries, "RunSpec", Wider)
    frame = runs_frame(runs_db)
    assert "knob" in frame.columns and frame["knob"].isna().all()  # runs registered before the field
    run_id = frame["run_id"][0]
    with session(runs_db) as s:
        run = s.get(Run, run_id)
        run.spec = {**run.spec, "knob": 3, "evals": ["niah", "mqar"]}
    frame = runs_frame(runs_db).set_index("run_id")
    assert frame.loc[run_id, "knob"] == 3 and frame.loc[run_id, "evals"] == "niah|mqar"


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_an_integer_column_holding_a_value_that_is_not_whole_is_exported_as_it_is(runs_db, tmp_path, monkeypatch, fmt):
    """SQLite keeps 768.5 in an INTEGER column (a database built by a script): `slab export metrics` had failed with
    "TypeError: cannot safely cast non-equivalent object to int64", and metrics_frame cut it to 512. The column is
    written and read as floats, in every chunk of the file alike; the table's other integer columns stay integers."""
    import db.queries
    from db.queries import metrics_frame

    if fmt == "parquet":
        pq = pytest.importorskip("pyarrow.parquet")
    run_id = sorted(runs_frame(runs_db)["run_id"])[0]
    with session(runs_db) as s:
        s.add_all([Metric(run_id=run_id, step=k, tokens=256 * k + (0.5 if k == 3 else 0), flops=1.0, loss=4.0, lr=1e-3)
                   for k in (1, 2, 3)])
    monkeypatch.setattr(db.queries, "FETCH_ROWS", 2)  # the first chunk whole, the second not
    out = tmp_path / f"metrics.{fmt}"
    assert export_table(runs_db, "metrics", None, out) == 3
    back = pd.read_csv(out) if fmt == "csv" else pq.read_table(out).to_pandas()
    assert back["tokens"].tolist() == [256, 512, 768.5] and back["step"].tolist() == [1, 2, 3]
    assert str(back["step"].dtype).lower() == "int64"
    assert metrics_frame(runs_db)["tokens"].tolist() == [256, 512, 768.5]


def test_text_in_an_integer_column_is_refused_naming_the_column(runs_db, tmp_path):
    from sqlalchemy import text

    run_id = sorted(runs_frame(runs_db)["run_id"])[0]
    with session(runs_db) as s:
        s.add(Metric(run_id=run_id, step=1, tokens=256, flops=1.0, loss=4.0, lr=1e-3))
        s.execute(text("update metrics set tokens = 'lots'"))
    with pytest.raises(QueryError, match=r"^cannot export metrics: its column tokens holds 'lots', which is not a number"):
        export_table(runs_db, "metrics", None, tmp_path / "metrics.csv")
    assert not list(tmp_path.glob("*metrics.csv*"))


@pytest.mark.skipif(not hasattr(__import__("sqlite3").Connection, "setlimit"), reason="Python 3.11's setlimit")
def test_run_ids_are_asked_for_in_statements_the_linked_sqlite_takes(runs_db):
    """SQLite before 3.32 takes 999 parameters a statement (32,766 since, unless built otherwise), while 10,000 run ids
    were bound at once: the analysis commands failed with "too many SQL variables". The batch follows the limit."""
    import sqlite3

    from sqlalchemy import event

    from db.queries import evals_frame, metrics_frame

    ids = sorted(runs_frame(runs_db)["run_id"])
    with session(runs_db) as s:
        s.add_all([Metric(run_id=run_id, step=1, tokens=1, flops=1.0, loss=5.0, lr=1e-3) for run_id in ids])
    runs_db.dispose()  # the connections made from here on have SQLite 3.31's limit
    event.listen(runs_db, "connect", lambda dbapi, _: dbapi.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999))
    asked = [f"{i:016x}" for i in range(1500)] + ids
    assert metrics_frame(runs_db, asked)["run_id"].tolist() == ids
    assert evals_frame(runs_db, asked).empty


def test_the_id_batch_fits_the_parameters_of_the_linked_sqlite():
    """The comment had SQLite take 32,766 parameters before 3.32: it took 999, and 10,000 ids were bound at once."""
    import sqlite3

    from db.queries import ID_BATCH, ID_MARGIN, id_batch_for, sqlite_default_variables

    assert sqlite_default_variables((3, 31, 1)) == 999 and sqlite_default_variables((3, 32, 0)) == 32_766
    assert id_batch_for((3, 31, 1)) + 2 <= 999 and id_batch_for((3, 45, 0)) == 10_000  # + launch's status filter
    assert ID_BATCH + ID_MARGIN <= sqlite_default_variables(sqlite3.sqlite_version_info)


def test_a_read_of_an_empty_file_refuses_it_without_writing_it(tmp_path):
    # Refused all the same, an empty file had been turned into a 4 kB WAL database by the read that refused it.
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(DatabaseError, match="empty file, with no scalinglab tables"):
        open_db(f"sqlite:///{empty}", create=False)
    assert empty.stat().st_size == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["empty.db"]
    open_db(f"sqlite:///{empty}").dispose()  # add and launch make it a database, as they make a missing one
    assert empty.stat().st_size > 0


def test_a_stale_run_is_claimed_only_from_the_holder_judged(db_url, write_plan):
    """A launcher that judged a run's holder gone claims it with a lease a day ahead, from that holder only: a launcher
    that took the run over in between keeps it (its fresh heartbeat would count as stale against such a lease), and a
    claim whose reply was lost returns the same attempt, not counted again."""
    from datetime import timedelta

    from db.schema import utcnow
    from db.writer import claim_run

    engine = open_db(db_url)
    add_plans(engine, [load_plan(write_plan(PLAN))])
    run_id = runs_frame(engine)["run_id"][0]
    assert claim_run(engine, run_id, "host:1:a", utcnow()) == 1
    ahead = utcnow() + timedelta(days=1)
    assert claim_run(engine, run_id, "host:2:b", ahead, holder="host:1:a") == 2
    assert claim_run(engine, run_id, "host:3:c", ahead, holder="host:1:a") is None  # b holds it now
    assert claim_run(engine, run_id, "host:2:b", ahead, holder="host:1:a") == 2  # b's own claim again
    assert claim_run(engine, run_id, "host:3:c", ahead) == 3  # without a holder, any stale lease is taken
    with session(engine) as s:
        run = s.get(Run, run_id)
        assert (run.lease_owner, run.attempts) == ("host:3:c", 3)
    engine.dispose()
