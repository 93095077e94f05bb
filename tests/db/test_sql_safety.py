"""`slab sql` runs exactly one read statement, whatever the database and driver; see db.queries.run_sql."""

import uuid
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from db.engine import open_db
from db.queries import QueryError, run_sql, sole_statement_word
from sweep.plan import load_plan
from sweep.registry import add_plans

PLAN = "arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens,lr,seed\nsoftmax|hgrn2,32,2,2,64,4,20k,1e-3,0|1|2\n"


@pytest.fixture
def engines(db_url, write_plan):
    """The test database with a plan in it, opened through each of its drivers: on PostgreSQL also psycopg2, which
    sends a whole query string at once (CI installs it with the dev extra)."""
    urls = [db_url]
    if db_url.startswith("postgresql"):
        urls.append(make_url(db_url).set(drivername="postgresql+psycopg2").render_as_string(hide_password=False))
    engines = [open_db(u) for u in urls]
    add_plans(engines[0], [load_plan(write_plan(PLAN))])
    yield engines
    for engine in engines:
        engine.dispose()


def _plan_runs(engine) -> int:
    return int(run_sql(engine, "select count(*) as n from plan_runs")["n"][0])


@pytest.mark.parametrize("query", ["commit; delete from plan_runs", "end; delete from plan_runs",
                                   "select 1; commit; delete from plan_runs", "rollback; delete from plan_runs",
                                   "select ';'; commit; delete from plan_runs"])
def test_no_driver_runs_a_second_statement(engines, query):
    """psycopg2 sends a query string whole and PostgreSQL runs each statement in it: a COMMIT or ROLLBACK ends the
    read-only transaction and the next statement writes."""
    for engine in engines:
        with pytest.raises(QueryError, match="one statement"):
            run_sql(engine, query)
        assert _plan_runs(engine) == 6


@pytest.mark.parametrize("query", [
    # a backslash ends a standard string but not an E'' one, continued on a new line
    "select E'x'\n'\\' '; commit; delete from plan_runs; --'",
    "select $q$ ' $q$; commit; delete from plan_runs; --'",
])
def test_postgresql_quoting_cannot_hide_a_second_statement(engines, query):
    """PostgreSQL reads these as three statements (SQLite as one it cannot run): refused either way, nothing deleted."""
    for engine in engines:
        # SQLite's refusal is its own parse error, whose words are SQLite's: any QueryError, and nothing deleted.
        with pytest.raises(QueryError, match="one statement" if engine.dialect.name == "postgresql" else None):
            run_sql(engine, query)
        assert _plan_runs(engine) == 6


@pytest.mark.parametrize("query", ["select ';' as x", "select 1 as x; ", "select 1 as x; -- done", "/* ; */ select 1 as x",
                                   "with t as (select 1 as x) select x from t", "values (1)",
                                   "explain select 1"])
def test_one_read_statement_runs(engines, query):
    for engine in engines:
        assert len(run_sql(engine, query)) >= 1


def test_copy_to_program_is_refused(engines):
    """A superuser's read-only transaction still runs COPY ... TO PROGRAM, a shell command on the server."""
    marker = Path(f"/tmp/slab-copy-{uuid.uuid4().hex}")
    for engine in engines:
        with pytest.raises(QueryError, match="read-only.*not COPY"):
            run_sql(engine, f"copy (select 1) to program 'touch {marker}'")
        assert not marker.exists()


@pytest.mark.parametrize("query", ["do $$ begin perform 1 end $$", "set role postgres", "call nothing()",
                                   "pragma query_only=off", "pragma journal_mode=delete", "vacuum into '/tmp/slab-x.db'",
                                   "attach database '/tmp/slab-x.db' as x", "delete from plan_runs"])
def test_statements_other_than_reads_are_refused(engines, query):
    for engine in engines:
        with pytest.raises(QueryError, match="read-only"):
            run_sql(engine, query)
        assert _plan_runs(engine) == 6 and not Path("/tmp/slab-x.db").exists()


def test_pragma_refusal_names_the_function_form(tmp_path):
    engine = open_db(f"sqlite:///{tmp_path}/slab.db")
    with pytest.raises(QueryError, match=r"pragma_table_info\('runs'\)"):
        run_sql(engine, "pragma table_info(runs)")
    assert "spec" in run_sql(engine, "select name from pragma_table_info('runs')")["name"].tolist()
    engine.dispose()


@pytest.mark.parametrize("dialect, query, word", [
    ("postgresql", "  -- c\n/* a /* nested */ ; */ ((Select 1))", "select"),
    ("postgresql", "select e'\\';' as x", "select"),
    ("postgresql", "select U&'\\' as x", "select"),  # a standard string: the backslash is a character
    ("postgresql", "select $a$ $b$ ; $a$ as x", "select"),
    ("postgresql", "select a$b$c from t", "select"),
    ("postgresql", "select E'x' " + "--" * 5000, "select"),  # read in linear time
    ("sqlite", "select [;] from t; -- x", "select"),
    ("sqlite", "select `a;``b` from t", "select"),
    ("sqlite", "\n\t", ""),
])
def test_sole_statement_word(dialect, query, word):
    assert sole_statement_word(query, dialect) == word


@pytest.mark.parametrize("dialect, query", [
    ("postgresql", "select 'a\\'; delete from t; --'"),  # standard strings: the backslash does not escape
    ("postgresql", "select 1$a$'$a$; delete from t; --'"),  # a number ends before $: a dollar quote begins
    ("postgresql", "select 1e'\\''; delete from t; --'"),  # PostgreSQL 14 reads 1 then e'...'
    ("postgresql", "select 1 -- x\r; delete from t"),  # a carriage return ends a comment
    ("sqlite", "/* /* */ ; */ select 1"),  # SQLite does not nest comments
    ("sqlite", "select [']; delete from t; --']"),
    ("postgresql", "select 1 ;; "),
])
def test_a_second_statement_is_found(dialect, query):
    with pytest.raises(QueryError, match="one statement"):
        sole_statement_word(query, dialect)


def test_sql_names_every_column_apart_and_prints_any_value_as_json(engines):
    """PostgreSQL names an unnamed aggregate after its function (select min(tokens), min(flops): two columns named
    min) and a join selects run_id twice: `slab sql --json` died on such columns in a traceback, as it did on a
    blob or a uuid."""
    import json

    from typer.testing import CliRunner

    from sweep.cli import app

    join = "select r.run_id, p.run_id, r.arch from runs r join plan_runs p on p.run_id = r.run_id order by r.run_id"
    for engine in engines:
        pg = engine.dialect.name == "postgresql"
        url = engine.url.render_as_string(hide_password=False)
        # SQLite names an unnamed column after its expression: named alike by hand there
        mins = ("select min(tokens), min(flops) from runs" if pg else
                "select min(tokens) as min, min(flops) as min from runs")
        values = ("select '\\x00ff'::bytea as b, '12345678-1234-5678-1234-567812345678'::uuid as u" if pg else
                  "select x'00ff' as b, '12345678-1234-5678-1234-567812345678' as u")
        for query in (join, mins, values):
            result = CliRunner().invoke(app, ["--db", url, "sql", query, "--json"])
            assert result.exit_code == 0, (query, result.output, result.exception)
            rows = json.loads(result.stdout)
            assert rows and len(rows[0]) == len(run_sql(engine, query).columns), query
        assert json.loads(CliRunner().invoke(app, ["--db", url, "sql", values, "--json"]).stdout) == [
            {"b": "\\x00ff", "u": "12345678-1234-5678-1234-567812345678"}]
        frame = run_sql(engine, join)
        assert list(frame.columns) == ["run_id", "run_id_2", "arch"] and len(frame) == 6
        assert (frame["run_id"] == frame["run_id_2"]).all()
        assert list(run_sql(engine, mins).columns) == ["min", "min_2"]


def test_sql_keeps_large_whole_numbers_beside_reals_and_nulls(engines):
    # a column of integers beside a real or a NULL turned float64: 9007199254740993 (2**53 + 1) had read ...992
    big = 2**53 + 1
    for engine in engines:
        query = f"select {big} as v union all select 1.5 union all select null order by 1"
        got = run_sql(engine, query)["v"].tolist()
        assert big in got and 1.5 in got, got
        assert run_sql(engine, "select 3 as v union all select 1.5 order by 1")["v"].tolist() == [1.5, 3.0]
