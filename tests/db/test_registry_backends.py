"""Only SQLite and PostgreSQL are taken (the writer's inserts are theirs): another database is refused up front."""

import sys

import pytest
from typer.testing import CliRunner

import db.engine
from db.engine import DatabaseError, make_engine, open_db
from sweep.cli import app

#: URLs of databases SQLAlchemy knows and scalinglab does not write, with their drivers' modules.
UNSUPPORTED = [
    ("mysql://u:secret@127.0.0.1/study", "mysql", ("MySQLdb",)),
    ("mysql+pymysql://u:secret@127.0.0.1/study", "mysql", ("pymysql",)),
    ("mssql+pyodbc://u:secret@host/study", "mssql", ("pyodbc",)),
    ("oracle+oracledb://u:secret@host/study", "oracle", ("oracledb",)),
]


@pytest.fixture
def engines_made(monkeypatch):
    """The URLs db.engine made an engine of (none is: each attempt is recorded and refused)."""
    made = []

    def refuse(url, *args, **kwargs):
        made.append(str(url))
        raise RuntimeError("no engine in this test")

    monkeypatch.setattr(db.engine, "create_engine", refuse)
    return made


@pytest.mark.parametrize("url, kind, drivers", UNSUPPORTED)
@pytest.mark.parametrize("opener", [open_db, make_engine])
def test_another_database_is_refused_before_its_driver_is_loaded(engines_made, url, kind, drivers, opener):
    """`slab add` had taken mysql://... (whose driver was installed), and its launch then failed in writer.upsert."""
    loaded = set(sys.modules)
    with pytest.raises(DatabaseError) as info:
        opener(url)
    assert engines_made == []
    message = str(info.value)
    assert message.startswith(f"unsupported database kind {kind!r} in "), message
    assert "sqlite:///FILE" in message and "postgresql+psycopg://USER:PASSWORD@HOST/DB" in message, message
    assert "secret" not in message and "\n" not in message, message
    assert not (set(sys.modules) - loaded) & set(drivers)


def test_another_database_is_refused_whether_or_not_its_driver_is_installed():
    """Without the driver, the refusal comes before "its driver ... is not installed" (install it: still refused)."""
    with pytest.raises(DatabaseError, match=r"^unsupported database kind 'mysql' in 'mysql://u:\*\*\*@127\.0\.0\.1/s'"):
        open_db("mysql://u:secret@127.0.0.1/s")


def test_slab_add_refuses_another_database_in_one_line(write_plan):
    path = write_plan("arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens\nsoftmax,32,2,2,64,4,20k\n")
    result = CliRunner().invoke(app, ["--db", "mssql+pyodbc://u:secret@host/study", "add", str(path)])
    assert result.exit_code == 2, (result.output, result.exception)
    [line] = result.stderr.splitlines()
    assert line.startswith("error: unsupported database kind 'mssql'") and "secret" not in line, line


def test_supported_databases_and_unknown_names_are_told_apart():
    # SQLite and PostgreSQL still get as far as their own checks; a name SQLAlchemy does not know is called unknown
    with pytest.raises(DatabaseError, match="unknown database kind 'foo'"):
        open_db("foo://x/y")
    with pytest.raises(DatabaseError, match="unknown database driver 'nosuch' in 'postgresql\\+nosuch://u:\\*\\*\\*@"):
        open_db("postgresql+nosuch://u:secret@127.0.0.1/s")
    with pytest.raises(DatabaseError, match="names no file"):
        open_db("sqlite://")


def test_a_supported_database_whose_driver_is_not_installed_says_so():
    """The missing-driver message stays for PostgreSQL through a driver not installed here."""
    try:
        import pg8000  # noqa: F401
        pytest.skip("pg8000 is installed")
    except ImportError:
        pass
    with pytest.raises(DatabaseError) as info:
        open_db("postgresql+pg8000://u:secret@127.0.0.1:1/study")
    message = str(info.value)
    assert "its driver, the Python module 'pg8000', is not installed" in message and "secret" not in message, message
