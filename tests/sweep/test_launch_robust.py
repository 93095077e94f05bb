"""The launcher's tolerance of a database that is briefly away, and of a checkpoint folder another worker holds."""

import fcntl
import sqlite3
import time

import pytest
from sqlalchemy.exc import OperationalError

from sweep.launch import cancel_unfinished, transient
from sweep.task import run_lock


def _error(message: str, invalidated: bool = False, orig=None) -> OperationalError:
    return OperationalError("UPDATE runs", {}, orig or Exception(message), connection_invalidated=invalidated)


class _PgError(Exception):
    """A driver error carrying a SQLSTATE, as psycopg's do."""

    def __init__(self, message: str, sqlstate: str):
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize("error", [
    _error("", orig=sqlite3.OperationalError("database is locked")),
    _error("", orig=sqlite3.OperationalError("database table is locked")),
    _error("SSL SYSCALL error: EOF detected", invalidated=True),  # SQLAlchemy saw the connection drop
    _error("server closed the connection unexpectedly\n\tThis probably means the server terminated abnormally"),
    _error('connection failed: connection to server at "10.0.0.5", port 5432 failed: Connection refused'),
    _error("FATAL:  terminating connection due to administrator command"),
    _error("FATAL:  the database system is starting up"),
    _error("", orig=_PgError("canceling statement due to statement timeout", "57014")),
    _error("", orig=_PgError("canceling statement due to lock timeout", "55P03")),
])
def test_a_database_briefly_away_is_transient(error):
    assert transient(error)


@pytest.mark.parametrize("error", [
    _error("", orig=sqlite3.OperationalError("no such table: runs")),
    _error("", orig=sqlite3.OperationalError("attempt to write a readonly database")),
    _error("", orig=sqlite3.OperationalError("disk I/O error")),
    _error('connection failed: FATAL:  password authentication failed for user "slab"'),
    _error('FATAL:  database "slab" does not exist'),
    _error("", orig=_PgError('relation "runs" does not exist', "42P01")),
])
def test_an_error_no_wait_cures_is_not_transient(error):
    assert not transient(error)


def test_a_locked_checkpoint_folder_times_out_with_one_clear_line(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    with open(folder / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"is still locked after 1 s") as caught:
            with run_lock(folder, timeout_s=1.0):
                pass
        assert 1.0 <= time.monotonic() - t0 < 3
    assert "\n" not in str(caught.value)
    with run_lock(folder, timeout_s=1.0):  # free again once the holder let go
        pass


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_statement_cut_short_by_the_urls_statement_timeout_is_transient(db_url):
    """A launch on a URL with a statement_timeout (the README's advice for a stalling server) rides out another
    session's lock as it does SQLite's locked file, rather than ending as if the database were lost: the error psycopg
    raises for it is taken as transient."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    engine = create_engine(make_url(db_url).update_query_dict({"options": "-c statement_timeout=100"}))
    try:
        with pytest.raises(OperationalError) as caught, engine.connect() as conn:
            conn.execute(text("SELECT pg_sleep(2)"))
    finally:
        engine.dispose()
    assert "statement timeout" in str(caught.value) and transient(caught.value)


def test_only_unfinished_tasks_are_cancelled():
    """Force-cancelling a task Ray had just seen finish aborted the whole driver (after the database was lost, the
    tasks asked to stop had finished by the time the launcher cancelled what was left): finished ones are skipped."""

    class FakeRay:
        def __init__(self):
            self.cancelled = []

        def wait(self, refs, num_returns, timeout, fetch_local):
            assert timeout == 0 and num_returns == len(refs) and not fetch_local
            return [r for r in refs if r.startswith("done")], [r for r in refs if not r.startswith("done")]

        def cancel(self, ref, force):
            self.cancelled.append((ref, force))

    ray = FakeRay()
    cancel_unfinished(ray, ["done-a", "running-b", "done-c", "running-d"])
    assert ray.cancelled == [("running-b", True), ("running-d", True)]
    cancel_unfinished(ray, [])  # nothing running: no call at all
    assert len(ray.cancelled) == 2
