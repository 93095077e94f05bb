"""Databases in a bad state (another program's, locked, damaged, half-written, unreachable) and exports to odd places:
each is one DatabaseError or QueryError line, and the database and any file already there are left as they were."""

import hashlib
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import db.engine
import db.queries
from db.engine import DatabaseError, open_db
from db.queries import QueryError, export_table, run_sql, runs_frame
from db.writer import save_fit
from sweep.plan import load_plan
from sweep.registry import add_plans

PLAN = "arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens,lr,seed\nsoftmax|hgrn2,32,2,2,64,4,20k,1e-3,0|1|2\n"


def _digest(path: Path) -> str:
    """The bytes of a database and of its WAL and journal files, as one hash (an empty WAL, which SQLite removes when
    the last connection closes, counts as none)."""
    h = hashlib.sha256()
    for suffix in ("", "-wal", "-journal"):
        part = Path(f"{path}{suffix}")
        h.update(part.read_bytes() if part.is_file() and part.stat().st_size else b"-")
    return h.hexdigest()


def _study(path: Path, write_plan) -> Path:
    """A scalinglab database of 6 runs at ``path``, closed (no -wal or -shm left)."""
    engine = open_db(f"sqlite:///{path}")
    add_plans(engine, [load_plan(write_plan(PLAN))])
    engine.dispose()
    return path


def _one_line(message: str) -> str:
    assert "\n" not in message and "[SQL" not in message and "Background on this error" not in message, message
    return message


@pytest.mark.parametrize("create", [False, True])
def test_another_programs_sqlite_file_is_refused_and_not_written(create, tmp_path):
    """`slab add --db sqlite:///app.db` on another program's SQLite file had added scalinglab's seven tables to it and
    switched it to WAL (exit 0); `slab status` on it said to run `slab add`. Both now say it is another program's."""
    path = tmp_path / "app.db"
    con = sqlite3.connect(path)
    con.executescript("create table users (id integer primary key, name text); insert into users values (1, 'a');"
                      "create table orders (id integer primary key, user_id int); create view v as select * from users")
    con.close()
    before = _digest(path)
    with pytest.raises(DatabaseError) as info:
        open_db(f"sqlite:///{path}", create=create).dispose()
    message = _one_line(str(info.value))
    assert "is not scalinglab's: it holds another program's tables (orders, users, v)" in message, message
    assert "slab add" not in message, message
    assert _digest(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    con.close()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # a SQLite file of other tables is refused (above)
def test_a_postgresql_database_shared_with_other_tables_still_takes_scalinglabs(db_url, write_plan):
    """A PostgreSQL database is often shared: one holding another program's table gets scalinglab's beside it."""
    from sqlalchemy import create_engine, text

    other = create_engine(db_url)
    with other.begin() as conn:
        conn.execute(text("create table if not exists slab_test_other_app (id int)"))
    try:
        engine = open_db(db_url)
        add_plans(engine, [load_plan(write_plan(PLAN))])
        assert len(runs_frame(engine)) == 6
        engine.dispose()
    finally:
        with other.begin() as conn:
            conn.execute(text("drop table slab_test_other_app"))
        other.dispose()


@pytest.fixture
def fast_lock(monkeypatch):
    """A busy timeout of 0.3 s, so that a test of a locked file fails in a moment."""
    monkeypatch.setattr(db.engine, "SQLITE_BUSY_MS", 300)


def _lock(path: Path) -> sqlite3.Connection:
    """Another connection holding the file's exclusive lock (as another program's long transaction does)."""
    holder = sqlite3.connect(path, isolation_level=None, timeout=0, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    return holder


def test_a_write_to_a_locked_database_is_one_line_naming_the_lock(fast_lock, tmp_path, write_plan):
    """`slab add` (and `slab fit`'s store, and a launch's registration) on a file another process kept locked past the
    busy timeout had ended in a traceback of sqlalchemy's OperationalError, exit 1."""
    path = _study(tmp_path / "slab.db", write_plan)
    engine = open_db(f"sqlite:///{path}")  # WAL: reading is not blocked, writing is
    holder = _lock(path)
    try:
        before = _digest(path)
        with pytest.raises(DatabaseError) as info:
            add_plans(engine, [load_plan(write_plan(PLAN.replace("0|1|2", "7"), "more.csv"))])
        message = _one_line(str(info.value))
        assert message.startswith("cannot register plan more: ") and f"{path} is locked: another process has held a " \
            "lock on it for over 0.3 s" in message, message
        with pytest.raises(DatabaseError, match=r"^cannot store the fit: .* is locked: another process"):
            save_fit(engine, method="power", source="db", n_points=3, result={})
        assert _digest(path) == before
    finally:
        holder.rollback()
        holder.close()
        engine.dispose()


def test_opening_a_locked_database_says_it_is_locked_and_who_may_hold_it(fast_lock, tmp_path, write_plan):
    """A file in rollback-journal mode (another tool switched it, or it was only ever read) that another process keeps
    locked: reading it fails at once with a line that says so, not with 'OperationalError: (sqlite3.OperationalError)
    database is locked'."""
    path = _study(tmp_path / "slab.db", write_plan)
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=delete")
    con.close()
    holder = _lock(path)
    try:
        before = _digest(path)
        for create in (False, True):
            with pytest.raises(DatabaseError) as info:
                open_db(f"sqlite:///{path}", create=create)
            message = _one_line(str(info.value))
            assert message.startswith("cannot open database ") and "is locked: another process has held a lock on it" \
                in message and "OperationalError" not in message, message
        assert _digest(path) == before
    finally:
        holder.rollback()
        holder.close()


def test_a_locked_database_fails_a_command_within_30_seconds():
    """The busy timeout bounds a command's wait on a file another program keeps locked: at 30 s, with the interpreter's
    start and the open before it, a command took 31-32 s, as if hung."""
    assert db.engine.SQLITE_BUSY_MS <= 25_000


@pytest.mark.parametrize("damage, said", [
    ("truncated", "is damaged (database disk image is malformed)"),
    ("random", "is not a SQLite database"),
])
@pytest.mark.parametrize("create", [False, True])
def test_a_damaged_or_foreign_file_says_what_it_is_and_what_to_do(damage, said, create, tmp_path, write_plan):
    """A file cut short (its first 4 KiB) or of random bytes had given 'DatabaseError: (sqlite3.DatabaseError) database
    disk image is malformed' or '... file is not a database', with no word of what to do."""
    path = _study(tmp_path / "slab.db", write_plan)
    path.write_bytes(path.read_bytes()[:4096] if damage == "truncated" else os.urandom(65536))
    before = _digest(path)
    with pytest.raises(DatabaseError) as info:
        open_db(f"sqlite:///{path}", create=create)
    message = _one_line(str(info.value))
    assert f"{path} {said}" in message and "(sqlite3." not in message, message
    if damage == "truncated":
        assert f"sqlite3 {path} .recover" in message, message
    assert _digest(path) == before


def test_an_export_that_fails_reading_the_database_is_one_line_and_keeps_the_old_file(tmp_path, write_plan,
                                                                                       damage_metrics):
    """`slab export metrics` of a database damaged past its first pages had ended in a traceback (sqlalchemy's
    DatabaseError, exit 1): the error is a QueryError line, the file already at --out is kept and no temporary is left."""
    path = damage_metrics(_study(tmp_path / "slab.db", write_plan))
    engine = open_db(f"sqlite:///{path}", create=False)
    assert len(runs_frame(engine)) == 6  # the runs are readable: only the metrics are damaged
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.csv").write_text("the last export\n")
    before = _digest(path)
    with pytest.raises(QueryError) as info:
        export_table(engine, "metrics", None, out / "metrics.csv")
    message = _one_line(str(info.value))
    assert message.startswith("cannot export metrics: reading it failed: ") and "is damaged" in message, message
    assert (out / "metrics.csv").read_text() == "the last export\n" and os.listdir(out) == ["metrics.csv"]
    engine.dispose()
    assert _digest(path) == before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_export_into_a_named_pipe_writes_into_it_and_leaves_the_pipe(tmp_path, write_plan):
    """`--out` naming a device or a pipe (/dev/null, a FIFO) had replaced it with a plain file (as root, /dev/null
    itself): the rows go into it, and it stays what it was."""
    engine = open_db(f"sqlite:///{_study(tmp_path / 'slab.db', write_plan)}", create=False)
    fifo = tmp_path / "runs.csv"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # open first, so that the export's open does not wait
    try:
        assert export_table(engine, "runs", None, fifo) == 6  # a few KiB: within the pipe's buffer
        try:
            got = os.read(reader, 1 << 20)
        except BlockingIOError:  # nothing was written into the pipe
            got = b""
    finally:
        os.close(reader)
        engine.dispose()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert got.startswith(b"run_id,") and got.decode().count("\n") == 7, got[:200]
    assert sorted(os.listdir(tmp_path)) == ["plan.csv", "runs.csv", "slab.db"]


def test_export_through_a_symbolic_link_writes_the_file_it_names(tmp_path, write_plan):
    """A --out that is a symbolic link (into a shared folder, say) had been replaced by a plain file, leaving the file
    it named as it was."""
    engine = open_db(f"sqlite:///{_study(tmp_path / 'slab.db', write_plan)}", create=False)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "runs.csv").write_text("old\n")
    link = tmp_path / "runs.csv"
    link.symlink_to(shared / "runs.csv")
    assert export_table(engine, "runs", None, link) == 6
    engine.dispose()
    assert link.is_symlink() and os.readlink(link) == str(shared / "runs.csv")
    assert (shared / "runs.csv").read_text().startswith("run_id,") and os.listdir(shared) == ["runs.csv"]


def test_export_over_a_file_keeps_its_mode(tmp_path, write_plan):
    """The export replacing a file had the umask's mode (0644): a private export (0600) became readable by all."""
    engine = open_db(f"sqlite:///{_study(tmp_path / 'slab.db', write_plan)}", create=False)
    out = tmp_path / "runs.csv"
    out.write_text("old\n")
    out.chmod(0o600)
    umask = os.umask(0o022)
    try:
        assert export_table(engine, "runs", None, out) == 6
    finally:
        os.umask(umask)
        engine.dispose()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and out.read_text().startswith("run_id,")


def test_export_over_a_file_this_user_may_not_write_is_refused(shared_tmp, as_other_user, write_plan):
    """A file the user may not write (chmod a-w), in a folder they may, had been replaced all the same (a rename needs
    only the folder)."""
    path = _study(shared_tmp / "slab.db", write_plan)
    out = shared_tmp / "out"
    out.mkdir()
    out.chmod(0o777)
    (out / "runs.csv").write_text("kept\n")
    (out / "runs.csv").chmod(0o444)

    def export_as_other():
        engine = open_db(f"sqlite:///{path}", create=False)  # read-only here: the file is root's
        with pytest.raises(QueryError, match=r"^cannot write .*runs.csv: the file is read-only \(its mode is -r--r--r--\)"):
            export_table(engine, "runs", None, out / "runs.csv")
        engine.dispose()

    as_other_user(export_as_other)
    assert (out / "runs.csv").read_text() == "kept\n" and os.listdir(out) == ["runs.csv"]


def test_sql_refuses_a_result_larger_than_it_holds(db_url, write_plan, monkeypatch):
    """A result of millions of rows was held whole (a GB a million rows), and a query with no end (a recursive WITH
    without a LIMIT) grew until the system killed the command: past the cap it is a QueryError line."""
    engine = open_db(db_url)
    add_plans(engine, [load_plan(write_plan(PLAN))])
    endless = "with recursive c(x) as (select 1 union all select x + 1 from c) select x from c"
    with pytest.raises(QueryError, match=r"^the query returns more than 1,000 rows, .* slab export TABLE --out FILE"):
        run_sql(engine, endless + (" limit 100000" if db_url.startswith("postgresql") else ""), max_rows=1_000)
    assert len(run_sql(engine, endless + " limit 1000", max_rows=1_000)) == 1_000
    assert len(run_sql(engine, "select * from runs", max_rows=None)) == 6
    engine.dispose()


def test_sql_caps_a_result_at_a_million_rows_by_default(tmp_path, write_plan):
    """The default cap: 1,000,001 rows had been returned as a frame (and at 600,000 rows `slab sql`'s table took over
    two minutes and 4 GB)."""
    engine = open_db(f"sqlite:///{_study(tmp_path / 'slab.db', write_plan)}", create=False)
    query = "with recursive c(x) as (select 1 union all select x + 1 from c limit {n}) select x from c"
    with pytest.raises(QueryError, match=r"^the query returns more than 1,000,000 rows"):
        run_sql(engine, query.format(n=1_000_001))
    assert len(run_sql(engine, query.format(n=1_000_000))) == 1_000_000
    engine.dispose()


def test_a_hot_journal_of_a_file_it_may_not_write_is_refused_not_read_half_written(tmp_path, write_plan, monkeypatch,
                                                                                   hot_journal):
    """A database this process may not write was opened immutable, which ignores a hot journal: the pages of a killed
    writer's uncommitted transaction were read as data (`slab status` answered from them, `slab runs` failed with a
    'malformed' traceback). It is refused, saying that a writable open rolls the journal back."""
    path = _study(tmp_path / "slab.db", write_plan)
    hot_journal(path)
    before = _digest(path)
    monkeypatch.setattr(db.engine, "_writable", lambda path: False)
    with pytest.raises(DatabaseError) as info:
        engine = open_db(f"sqlite:///{path}", create=False)
        runs_frame(engine)  # the old code opened it: reading it shows what it read
        engine.dispose()
    message = _one_line(str(info.value))
    assert "a writer stopped in the middle of a transaction and left slab.db-journal" in message, message
    assert _digest(path) == before
    monkeypatch.undo()
    engine = open_db(f"sqlite:///{path}", create=False)  # writable, SQLite rolls it back: the committed runs
    frame = runs_frame(engine)
    assert len(frame) == 6 and "torn" not in set(frame["arch"])
    engine.dispose()


def test_a_wal_it_cannot_read_in_a_read_only_folder_says_why(shared_tmp, as_other_user, write_plan):
    """A -wal left by a killed launcher without its -shm, in a folder this user may not write: the error had been
    'unable to open database file [SQL: PRAGMA main.table_info("meta")]'."""
    path = _study(shared_tmp / "slab.db", write_plan)
    code = ("import os, sqlite3, sys; con = sqlite3.connect(sys.argv[1]); con.execute('PRAGMA wal_autocheckpoint=0');"
            "con.execute(\"update runs set error = 'x'\"); con.commit(); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    Path(f"{path}-shm").unlink()
    for p in shared_tmp.iterdir():
        p.chmod(0o644)
    shared_tmp.chmod(0o755)
    before = _digest(path)

    def open_as_other():
        with pytest.raises(DatabaseError) as info:
            open_db(f"sqlite:///{path}", create=False)
        message = _one_line(str(info.value))
        assert "slab.db-wal holds commits not yet in" in message and "slab.db-shm file, which cannot be made here" \
            in message, message

    as_other_user(open_as_other)
    assert _digest(path) == before


def test_a_postgresql_server_that_never_answers_fails_within_the_connect_timeout(monkeypatch):
    """A server that takes the connection and never answers (stopped with SIGSTOP, a dead proxy) had held every
    command forever: libpq waits without end unless connect_timeout is set."""
    monkeypatch.setattr(db.engine, "PG_CONNECT_TIMEOUT_S", 1, raising=False)  # raising: the old code had none
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    errors: list[Exception] = []

    def connect():
        try:
            open_db(f"postgresql+psycopg://me:pw@127.0.0.1:{port}/study").dispose()
        except Exception as exc:
            errors.append(exc)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout=20)
    server.close()
    assert not worker.is_alive(), "open_db still waits on a server that never answers"
    assert len(errors) == 1 and isinstance(errors[0], DatabaseError), errors
    message = _one_line(str(errors[0]))
    assert "the server did not answer within 1 s; add ?connect_timeout=SECONDS" in message and "pw" not in message, message


def test_a_statements_own_error_is_not_called_damage(tmp_path, write_plan):
    """SQLite's 'malformed JSON' is the statement's, not the file's: it is not said to be a damaged database."""
    engine = open_db(f"sqlite:///{_study(tmp_path / 'slab.db', write_plan)}", create=False)
    with pytest.raises(QueryError) as info:
        run_sql(engine, "select json_extract('x', '$')")
    assert str(info.value) == "malformed JSON"
    engine.dispose()
