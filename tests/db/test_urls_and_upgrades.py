"""URLs a user may write by hand, and databases of an older schema read without writing them."""

import sqlite3
import warnings

import pytest

from db.engine import DatabaseError, make_engine, open_db, shown_url
from db.queries import run_sql, runs_frame, status_counts
from sweep.plan import load_plan
from sweep.registry import add_plans

PLAN = "arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens,lr,seed\nsoftmax|hgrn2,32,2,2,64,4,20k,1e-3,0|1|2\n"


@pytest.mark.parametrize("query", ["mode=ro", "immutable=1", "mode=ro&uri=false", "timout=5"])
def test_a_sqlite_option_of_a_plain_path_is_refused_not_ignored(query, tmp_path, write_plan):
    """`sqlite:///slab.db?mode=ro` (no uri=true) had opened the file read-write with only a SAWarning: SQLAlchemy
    drops options a plain path does not take, so `slab add` wrote the database the user had named read-only."""
    path = tmp_path / "slab.db"
    engine = open_db(f"sqlite:///{path}")
    engine.dispose()
    before = path.read_bytes()
    url = f"sqlite:///{path}?{query}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DatabaseError, match=r"^bad database URL ") as info:
            open_db(url)
    assert not caught, [str(w.message) for w in caught]  # refused before SQLAlchemy warns
    message = str(info.value)
    name = query.partition("=")[0]
    assert "\n" not in message and repr(name) in message, message
    if name != "timout":  # SQLite's own options: the URI form that reads them
        assert f"sqlite:///file:{path}?{query.replace('&uri=false', '')}&uri=true" in message, message
    assert path.read_bytes() == before
    # the options pysqlite takes from a plain path still work
    engine = open_db(f"sqlite:///{path}?timeout=5")
    add_plans(engine, [load_plan(write_plan(PLAN))])
    engine.dispose()


@pytest.mark.parametrize("password", ["pw@tail9", "s3c@ret/xy", "a@b@c"])
def test_a_password_with_an_unescaped_at_sign_is_never_shown(password):
    """A password holding a raw @ is cut there by the URL grammar, the rest taken for the host: its errors showed that
    rest ('u:***@tail9@dbhost', and psycopg's "failed to resolve host 'tail9@dbhost'"). It is refused before connecting,
    saying to escape the @, and no part of the password is shown."""
    url = f"postgresql+psycopg://user:{password}@dbhost:5432/study"
    tail = password.split("@", 1)[1]
    assert tail not in shown_url(url) and "user:***@" in shown_url(url)
    with pytest.raises(DatabaseError, match=r"^bad database URL ") as info:
        make_engine(url)
    message = str(info.value)
    assert tail not in message and "%40" in message and "\n" not in message, message
    # an escaped @ is the password it means
    assert "tail9" not in shown_url("postgresql+psycopg://user:pw%40tail9@dbhost/study")
    make_engine("postgresql+psycopg://user:pw%40tail9@dbhost/study").dispose()
    # and so is a user name with an @ (Azure's user@server) before a password without one
    assert shown_url("postgresql+psycopg://me@srv:pw@dbhost/study") == "postgresql+psycopg://me%40srv:***@dbhost/study"
    make_engine("postgresql+psycopg://me@srv:pw@dbhost/study").dispose()


def _old_database(tmp_path, write_plan):
    """A database of the first release's runs table (no resumed_from_step, ckpt_step, ckpt_dir), not in WAL mode."""
    path = tmp_path / "old.db"
    engine = open_db(f"sqlite:///{path}")
    add_plans(engine, [load_plan(write_plan(PLAN))])
    engine.dispose()
    con = sqlite3.connect(path)
    for column in ("resumed_from_step", "ckpt_step", "ckpt_dir"):
        con.execute(f"ALTER TABLE runs DROP COLUMN {column}")
    con.execute("PRAGMA journal_mode=DELETE")
    con.commit()
    con.close()
    return path


@pytest.mark.parametrize("how", ["mode=ro", "unwritable"])
def test_an_older_database_opened_read_only_is_read_without_upgrading_it(how, tmp_path, write_plan, monkeypatch):
    """The README's no-risk URL (mode=ro) on a database from before runs.ckpt_step had refused every read command
    ('attempt to write a readonly database [SQL: ALTER TABLE runs ADD COLUMN ...]'): open_db upgraded it first. Read
    read-only, the columns it lacks read as empty, and the file is not touched."""
    import db.engine

    path = _old_database(tmp_path, write_plan)
    before = path.read_bytes()
    url = f"sqlite:///file:{path}?mode=ro&uri=true"
    if how == "unwritable":  # a shared copy this user may not write, named by its plain URL
        url = f"sqlite:///{path}"
        monkeypatch.setattr(db.engine, "_writable", lambda path: False)
    for create in (False, True):
        engine = open_db(url, create=create)
        frame = runs_frame(engine)
        assert len(frame) == 6 and frame["ckpt_step"].isna().all() and frame["resumed_from_step"].isna().all()
        assert frame["params"].dtype == "int64"
        assert status_counts(engine)["runs"].sum() == 6
        sql = run_sql(engine, "select count(*) as n, count(ckpt_dir) as c, count(arch) as a from runs")
        assert sql.to_dict("records") == [{"n": 6, "c": 0, "a": 6}]
        with pytest.raises(DatabaseError, match=r"^cannot write the database"):
            add_plans(engine, [load_plan(write_plan(PLAN.replace("0|1|2", "3"), "more.csv"))])
        engine.dispose()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["more.csv", "old.db", "plan.csv"]
    # opened writable, it is upgraded as before
    monkeypatch.undo()
    engine = open_db(f"sqlite:///{path}", create=False)
    assert len(runs_frame(engine)) == 6
    engine.dispose()
    con = sqlite3.connect(path)
    assert "ckpt_step" in {row[1] for row in con.execute("PRAGMA table_info(runs)")}
    con.close()


@pytest.mark.parametrize("create", [False, True])
@pytest.mark.parametrize("meta", ["create table meta (k text, v text)",
                                  "create table meta (key text primary key, value text); "
                                  "insert into meta values ('schema_version', 'v2-beta')"])
def test_a_database_whose_meta_table_is_not_ours_is_refused_saying_so(meta, create, tmp_path):
    """Another tool's database with a table named meta had given SQLAlchemy's 'no such column: meta.value [SQL: SELECT
    ...]' (or a ValueError from int()): it is refused as not scalinglab's, and left as it was."""
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.executescript(meta)
    con.close()
    before = path.read_bytes()
    with pytest.raises(DatabaseError, match=r"is not scalinglab's") as info:
        open_db(f"sqlite:///{path}", create=create)
    message = str(info.value)
    assert "\n" not in message and "[SQL" not in message and str(path) in message, message
    assert path.read_bytes() == before


@pytest.mark.parametrize("create", [False, True])
def test_another_programs_database_is_refused_without_changing_it(create, tmp_path):
    """Every connection had switched the file to WAL mode (a persistent change of its header, with -wal and -shm files
    beside it) before open_db found that the database was not scalinglab's: `slab status --db` on another program's
    SQLite file changed it. WAL is set only once the tables are known to be ours."""
    path = tmp_path / "app.db"
    con = sqlite3.connect(path)
    con.executescript("create table runs (id integer primary key, name text); insert into runs (name) values ('x')")
    con.close()
    before = path.read_bytes()
    with pytest.raises(DatabaseError, match=r"is not scalinglab's: it has a table named runs but no meta table"):
        open_db(f"sqlite:///{path}", create=create)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    con.close()
