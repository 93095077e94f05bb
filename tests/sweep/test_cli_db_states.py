"""slab on a database in a bad state: one `error:` line, exit 2, and the database as it was."""

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

import db.engine
from sweep.cli import app

PLAN = "name,arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens,lr\nr{d_model},softmax|lightning,32|64,2,2,64,4,20k,1e-3\n"


def invoke(*args, url):
    return CliRunner().invoke(app, ["--db", url, *map(str, args)])


def _digest(path: Path) -> str:
    """The database's bytes and its non-empty WAL's, as one hash."""
    wal = Path(f"{path}-wal")
    return hashlib.sha256(path.read_bytes() + (wal.read_bytes() if wal.is_file() else b"")).hexdigest()


def _failed_in_one_line(result, *words: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def _study(tmp_path, write_plan) -> tuple[str, Path]:
    """A study's URL and file, 4 runs registered, closed (an engine of slab add run in this process would stay open)."""
    from db.engine import open_db
    from sweep.plan import load_plan
    from sweep.registry import add_plans

    path = tmp_path / "slab.db"
    url = f"sqlite:///{path}"
    engine = open_db(url)
    add_plans(engine, [load_plan(write_plan(PLAN))])
    engine.dispose()
    return url, path


def test_add_into_another_programs_sqlite_file_is_refused(tmp_path, write_plan):
    """`slab add` had written scalinglab's tables into another program's SQLite file and switched it to WAL, exit 0."""
    path = tmp_path / "app.db"
    con = sqlite3.connect(path)
    con.executescript("create table users (id integer primary key, name text); insert into users values (1, 'a')")
    con.close()
    before = path.read_bytes()
    for command in (["add", write_plan(PLAN)], ["status"], ["runs"]):
        _failed_in_one_line(invoke(*command, url=f"sqlite:///{path}"), "is not scalinglab's", "another program's tables (users)")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["app.db", "plan.csv"]


def test_add_to_a_locked_database_is_one_line(tmp_path, write_plan, monkeypatch):
    """`slab add` on a file another process kept locked had printed sqlalchemy's traceback and exited 1."""
    url, path = _study(tmp_path, write_plan)
    monkeypatch.setattr(db.engine, "SQLITE_BUSY_MS", 300)
    holder = sqlite3.connect(path, isolation_level=None, timeout=0)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        before = _digest(path)
        _failed_in_one_line(invoke("add", write_plan(PLAN.replace("32|64", "48"), "more.csv"), url=url),
                            "cannot register plan more:", "is locked: another process")
        assert _digest(path) == before
    finally:
        holder.rollback()
        holder.close()


def test_export_of_a_damaged_database_is_one_line_and_keeps_the_old_file(tmp_path, write_plan, damage_metrics):
    """`slab export metrics` of a database damaged past its first pages had ended in a traceback, exit 1."""
    url, path = _study(tmp_path, write_plan)
    damage_metrics(path)
    out = tmp_path / "metrics.csv"
    out.write_text("the last export\n")
    before = _digest(path)
    _failed_in_one_line(invoke("export", "metrics", "--out", out, url=url), "cannot export metrics: reading it failed:",
                        "is damaged")
    assert out.read_text() == "the last export\n" and _digest(path) == before
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_sql_with_a_result_past_the_cap_is_one_line(tmp_path, write_plan):
    """A result of a million rows and more had been held whole (and drawn as a table for minutes): it is refused."""
    url, _ = _study(tmp_path, write_plan)
    query = "with recursive c(x) as (select 1 union all select x + 1 from c limit 1000001) select x from c"
    _failed_in_one_line(invoke("sql", query, "--csv", url=url), "more than 1,000,000 rows", "slab export")


def test_status_of_a_read_only_file_with_a_hot_journal_is_one_line(tmp_path, write_plan, monkeypatch, hot_journal):
    """A file this process may not write, left by a writer killed mid-transaction, had been read with the killed
    transaction's pages (`slab status` answered from them; `slab runs` printed a 'malformed' traceback)."""
    url, path = _study(tmp_path, write_plan)
    hot_journal(path)
    before = path.read_bytes()
    monkeypatch.setattr(db.engine, "_writable", lambda path: False)
    for command in ("status", "runs"):
        _failed_in_one_line(invoke(command, url=url), "left slab.db-journal", "open it once where it is writable")
    assert path.read_bytes() == before and Path(f"{path}-journal").exists()


def test_reading_a_damaged_page_after_opening_is_one_line(tmp_path, write_plan):
    """A page of the runs table overwritten (the file opens, the read fails): status, runs, report, fit and compare had
    printed sqlalchemy's traceback, exit 1."""
    url, path = _study(tmp_path, write_plan)
    con = sqlite3.connect(path)
    root = con.execute("select rootpage from sqlite_master where name = 'runs'").fetchone()[0]
    page = con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    with open(path, "r+b") as fh:
        fh.seek((root - 1) * page)
        fh.write(b"\xa5" * page)
    before = path.read_bytes()
    for command in ("status", "runs"):
        _failed_in_one_line(invoke(command, url=url), "is damaged", ".recover")
    assert path.read_bytes() == before


def test_sql_draws_at_most_a_thousand_rows_as_a_table(tmp_path, write_plan):
    """A table of 600,000 rows had taken over two minutes and 4 GB to draw: past 1,000 rows it draws the first 1,000
    and says how to print all."""
    url, _ = _study(tmp_path, write_plan)
    result = invoke("sql", "with recursive c(x) as (select 1 union all select x + 1 from c limit 1001) select x from c",
                    url=url)
    assert result.exit_code == 0, result.output
    assert "showing the first 1,000 of 1,001 rows; --csv or --json prints them all" in result.stderr, result.stderr
    assert "1001" not in result.stdout


def test_a_table_of_many_runs_draws_its_first_rows_and_says_so(tmp_path, write_plan):
    """`slab runs` of a 12,000-run study had taken 72 s to draw (rich, cell by cell), and `slab sql "select * from
    runs"` 15 s for its first 1,000 rows of 27 columns: a table draws at most 10,000 cells, CSV and JSON all."""
    from db.engine import open_db
    from sweep.plan import load_plan
    from sweep.registry import add_plans

    url = f"sqlite:///{tmp_path / 'slab.db'}"
    plan = load_plan(write_plan("name,arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens,lr,seed\n"
                                "r{seed},softmax,32,2,2,64,4,20k,1e-3,0..799+1\n"))
    engine = open_db(url)
    add_plans(engine, [plan])
    engine.dispose()
    shown = invoke("runs", url=url)
    assert shown.exit_code == 0, shown.output
    assert "800 runs" in shown.stdout  # the title counts them all
    assert "showing the first 714 of 800 runs; --csv or --json prints them all" in shown.stderr, shown.stderr
    assert len(invoke("runs", "--csv", url=url).stdout.splitlines()) == 801
    wide = invoke("sql", "select * from runs", url=url)
    assert wide.exit_code == 0, wide.output
    assert "showing the first " in wide.stderr and " of 800 rows;" in wide.stderr, wide.stderr


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_statement_timeout_in_a_postgresql_url_ends_a_command_held_by_a_lock(db_url, write_plan):
    """libpq's options in the URL reach the server (the README's advice for a server that stalls): a command waiting on
    another session's lock fails at the statement_timeout in one line, rather than waiting for the lock to go."""
    import threading
    import time

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    assert invoke("add", write_plan(PLAN), url=db_url).exit_code == 0
    engine, locked = create_engine(db_url), threading.Event()

    def hold_the_lock():  # for 4 s: without the timeout, status would wait this out and then succeed
        with engine.begin() as conn:
            conn.execute(text("LOCK TABLE runs IN ACCESS EXCLUSIVE MODE"))
            locked.set()
            conn.execute(text("SELECT pg_sleep(4)"))

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    try:
        assert locked.wait(30)
        bounded = make_url(db_url).update_query_dict({"options": "-c statement_timeout=1000"})
        start = time.monotonic()
        result = invoke("status", url=bounded.render_as_string(hide_password=False))
        waited = time.monotonic() - start
    finally:
        holder.join()
        engine.dispose()
    _failed_in_one_line(result, "statement timeout")
    assert waited < 3.5, waited
