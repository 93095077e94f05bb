"""The launcher's tolerance of a database that is briefly away, and of a checkpoint folder another worker holds."""

import fcntl
import sqlite3
import time

import pytest
from sqlalchemy.exc import OperationalError

from sweep.launch import transient
from sweep.task import run_lock


def _error(message: str, invalidated: bool = False, orig=None) -> OperationalError:
    return OperationalError("UPDATE runs", {}, orig or Exception(message), connection_invalidated=invalidated)


@pytest.mark.parametrize("error", [
    _error("", orig=sqlite3.OperationalError("database is locked")),
    _error("", orig=sqlite3.OperationalError("database table is locked")),
    _error("SSL SYSCALL error: EOF detected", invalidated=True),  # SQLAlchemy saw the connection drop
    _error("server closed the connection unexpectedly\n\tThis probably means the server terminated abnormally"),
    _error('connection failed: connection to server at "10.0.0.5", port 5432 failed: Connection refused'),
    _error("FATAL:  terminating connection due to administrator command"),
    _error("FATAL:  the database system is starting up"),
])
def test_a_database_briefly_away_is_transient(error):
    assert transient(error)


@pytest.mark.parametrize("error", [
    _error("", orig=sqlite3.OperationalError("no such table: runs")),
    _error("", orig=sqlite3.OperationalError("attempt to write a readonly database")),
    _error("", orig=sqlite3.OperationalError("disk I/O error")),
    _error('connection failed: FATAL:  password authentication failed for user "slab"'),
    _error('FATAL:  database "slab" does not exist'),
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
