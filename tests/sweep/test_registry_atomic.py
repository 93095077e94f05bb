"""Registering several plans (slab add A B, slab launch A B) is one transaction: all of them, or none."""

import pytest
from sqlalchemy import func, select, text
from typer.testing import CliRunner

from db.engine import DatabaseError, open_db, session
from db.queries import plan_names
from db.schema import PlanRun, Run
from sweep.cli import app
from sweep.plan import load_plan
from sweep.registry import add_plans

HEAD = "arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens,lr,seed\n"
PLAN_A = HEAD + "softmax,32,2,2,64,4,20k,1e-3,0|1\n"
PLAN_B = HEAD + "softmax,32,2,2,64,4,20k,1e-3,1|2\n"  # seed 1's run is plan a's too


def refuse_plan(engine, name: str) -> None:
    """Make the database itself refuse to insert plan ``name`` (a trigger): an error found only at insert."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(text(f"CREATE TRIGGER refuse_{name} BEFORE INSERT ON plans WHEN NEW.name = '{name}' "
                              f"BEGIN SELECT RAISE(ABORT, 'plan {name} refused by a trigger'); END"))
        else:
            conn.execute(text(f"CREATE OR REPLACE FUNCTION refuse_{name}() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION "
                              f"'plan {name} refused by a trigger'; END $$ LANGUAGE plpgsql"))
            conn.execute(text(f"CREATE TRIGGER refuse_{name} BEFORE INSERT ON plans FOR EACH ROW WHEN "
                              f"(NEW.name = '{name}') EXECUTE FUNCTION refuse_{name}()"))


def counts(engine) -> tuple[list[str], int, int]:
    """The plans registered, and how many runs and plan-run links the database holds."""
    with session(engine) as s:
        runs = s.scalar(select(func.count()).select_from(Run))
        links = s.scalar(select(func.count()).select_from(PlanRun))
    return plan_names(engine), runs, links


def test_a_plan_that_fails_to_register_leaves_none_of_the_others_registered(db_url, write_plan):
    """add_plans had committed plan a, then failed on plan b: a stayed registered and the error did not say so."""
    engine = open_db(db_url)
    refuse_plan(engine, "b")
    plans = [load_plan(write_plan(PLAN_A, "a.csv")), load_plan(write_plan(PLAN_B, "b.csv"))]
    with pytest.raises(Exception) as info:
        add_plans(engine, plans)
    assert counts(engine) == ([], 0, 0)
    message = str(info.value)
    assert isinstance(info.value, DatabaseError) and "\n" not in message, message
    assert message.startswith("cannot register plan b: plan b refused by a trigger"), message
    assert "none of the 2 plans (a, b) was registered" in message, message
    engine.dispose()


def test_a_failed_registration_keeps_an_edited_plan_as_it_was_registered(db_url, write_plan):
    """The relinking of an edited plan a is rolled back with the plan after it that failed."""
    engine = open_db(db_url)
    add_plans(engine, [load_plan(write_plan(PLAN_A, "a.csv"))])
    before = counts(engine)
    refuse_plan(engine, "b")
    edited = load_plan(write_plan(PLAN_A.replace("0|1", "5"), "a.csv"))  # its seed-0 and 1 runs leave it
    with pytest.raises(Exception):
        add_plans(engine, [edited, load_plan(write_plan(PLAN_B, "b.csv"))])
    assert counts(engine) == before == (["a"], 2, 2)
    engine.dispose()


def test_plans_registered_together_count_a_shared_run_once(db_url, write_plan):
    engine = open_db(db_url)
    a, b = add_plans(engine, [load_plan(write_plan(PLAN_A, "a.csv")), load_plan(write_plan(PLAN_B, "b.csv"))])
    assert (a.plan, a.new, a.known, b.plan, b.new, b.known) == ("a", 2, 0, "b", 1, 1)
    assert counts(engine) == (["a", "b"], 3, 4)
    assert add_plans(engine, []) == []
    engine.dispose()


@pytest.mark.parametrize("command", [["add"], ["launch", "--cpu"]])
def test_slab_add_and_launch_register_all_their_plans_or_none(db_url, write_plan, tmp_path, command):
    """`slab add a.csv b.csv` (and `slab launch`, which registers its plans first) had left plan a registered."""
    engine = open_db(db_url)
    refuse_plan(engine, "b")
    engine.dispose()
    files = [write_plan(PLAN_A, "a.csv"), write_plan(PLAN_B, "b.csv")]
    extra = ["--ckpt-dir", str(tmp_path / "ckpt")] if command[0] == "launch" else []
    result = CliRunner().invoke(app, ["--db", db_url, *command, *map(str, files), *extra])
    assert result.exit_code == 2, (result.output, result.exception)
    engine = open_db(db_url, create=False)
    assert counts(engine) == ([], 0, 0)
    engine.dispose()
    [line] = result.stderr.splitlines()
    assert line.startswith("error: cannot register plan b: ") and "none of the 2 plans (a, b) was registered" in line, line


def test_a_locked_database_names_every_plan_left_unregistered(tmp_path, write_plan, monkeypatch):
    import sqlite3

    import db.engine

    monkeypatch.setattr(db.engine, "SQLITE_BUSY_MS", 300)  # fail in a moment, not 20 s
    engine = open_db(f"sqlite:///{tmp_path / 'slab.db'}")
    holder = sqlite3.connect(tmp_path / "slab.db", isolation_level=None, timeout=0)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(DatabaseError) as info:
            add_plans(engine, [load_plan(write_plan(PLAN_A, "a.csv")), load_plan(write_plan(PLAN_B, "b.csv"))])
    finally:
        holder.rollback()
        holder.close()
    message = str(info.value)
    assert message.startswith("cannot register plan a: ") and "is locked: another process" in message, message
    assert message.endswith("none of the 2 plans (a, b) was registered (they are registered together or not at all)")
    assert counts(engine) == ([], 0, 0)
    engine.dispose()
