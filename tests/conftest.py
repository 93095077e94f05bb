"""Shared fixtures: plan files written into a temporary folder, and database URLs to test against."""

import functools
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest

# One torch thread per test process, set before any test module imports torch (subprocesses inherit it): make test's
# two xdist workers on CI's two cores, each with torch's default of a thread per core, made in-process training up to
# 7x slower (test_pack: 195 s against 25 s). Ray's workers set their own from the CPUs a task holds.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """Corpora and digests the tests build are cached in a folder of the test session's, not the user's ~/.cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("SLAB_CACHE_DIR", str(tmp_path_factory.mktemp("slab-cache")))
    yield
    patch.undo()


@pytest.fixture
def write_plan(tmp_path):
    """Write a plan file from text and return its path."""

    def write(text: str, name: str = "plan.csv") -> "os.PathLike":
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@functools.cache
def _pg_url():
    """SLAB_TEST_PG_URL, or under pytest-xdist a database of this worker's own beside it (created if missing):
    the tests drop and create every table, so two workers must not share one."""
    url = os.environ.get("SLAB_TEST_PG_URL")
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not url or not worker:
        return url
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    base = make_url(url)
    name = f"{base.database}_{worker}"
    engine = create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        if not conn.scalar(text("select 1 from pg_database where datname = :name"), {"name": name}):
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return base.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh database URL: a SQLite file, and PostgreSQL when SLAB_TEST_PG_URL is set (CI sets it)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/slab.db"
        return
    url = _pg_url()
    if not url:
        if os.environ.get("CI"):
            pytest.fail("CI must run the database tests against PostgreSQL: SLAB_TEST_PG_URL is unset")
        pytest.skip("SLAB_TEST_PG_URL not set (no PostgreSQL server)")
    from sqlalchemy import create_engine

    from db.schema import Base

    engine = create_engine(url)
    with engine.begin() as conn:
        Base.metadata.drop_all(conn)
    engine.dispose()
    yield url


def pytest_collection_modifyitems(items):
    """Run the files with the most slow tests first, each file's tests together and in order: pytest-xdist
    (make test) hands whole files to its workers in this order, so the long ones start at once, not last."""
    slow: dict[str, int] = {}
    for item in items:
        slow[item.nodeid.split("::")[0]] = slow.get(item.nodeid.split("::")[0], 0) + (item.get_closest_marker("slow") is not None)
    rank = {path: i for i, path in enumerate(sorted(slow, key=lambda p: -slow[p]))}
    items.sort(key=lambda item: rank[item.nodeid.split("::")[0]])


@pytest.fixture
def shared_tmp():
    """A temporary folder any user may enter (tmp_path lies in root's own folder when root runs the tests), for
    files that a test reads as another user through ``as_other_user``."""
    path = Path(tempfile.mkdtemp(prefix="slab-test-"))
    path.chmod(0o755)
    yield path
    for sub in [path, *path.rglob("*")]:  # a test may leave a folder read-only
        if sub.is_dir():
            sub.chmod(0o755)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def as_other_user():
    """Call a function as a user without rights to this test's files: here when the tests run unprivileged, else
    in a forked child as nobody, since root writes files whatever their mode. A failure there fails the test."""

    def call(fn):
        if os.geteuid() != 0:
            fn()
            return
        import pwd

        nobody = pwd.getpwnam("nobody")
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report any failure through the pipe, never return into pytest
            os.close(read)
            code = 0
            try:
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                fn()
            except BaseException:
                os.write(write, traceback.format_exc().encode())
                code = 1
            os._exit(code)
        os.close(write)
        with os.fdopen(read) as pipe:
            report = pipe.read()
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            pytest.fail(f"as user nobody (exit {os.waitstatus_to_exitcode(status)}):\n{report}", pytrace=False)

    return call


@pytest.fixture
def hot_journal():
    """Leave a SQLite file as a writer killed mid-transaction does: an uncommitted update's pages in the file, their
    old contents in a hot -journal beside it."""
    def leave(path: Path) -> None:
        con = sqlite3.connect(path)
        con.execute("PRAGMA journal_mode=delete")
        con.close()
        code = ("import os, sqlite3, sys; con = sqlite3.connect(sys.argv[1], isolation_level=None);"
                "con.execute('PRAGMA cache_size=1'); con.execute('BEGIN');"
                "con.execute(\"update runs set status = 'done', spec = json_set(spec, '$.pad', hex(randomblob(3000)))\");"
                "os._exit(0)")
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
        assert Path(f"{path}-journal").stat().st_size > 0
    return leave


@pytest.fixture
def damage_metrics():
    """Fill a study's SQLite file mostly with metrics, then overwrite some of those pages with garbage: the file
    opens, and fails only when the metrics are read. Returns the path."""
    def damage(path: Path) -> Path:
        con = sqlite3.connect(path)
        ids = [r[0] for r in con.execute("select run_id from runs")]
        con.executemany("insert into metrics (run_id, step, tokens, flops, loss, lr) values (?, ?, ?, ?, 3.0, 0.001)",
                        [(run_id, step, step * 256, step * 1e9) for run_id in ids for step in range(4000)])
        con.commit()
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page, pages = (con.execute(f"PRAGMA {name}").fetchone()[0] for name in ("page_size", "page_count"))
        con.close()
        with open(path, "r+b") as fh:
            for n in range(pages // 3, pages, 16):  # pages of the metrics table and of its index
                fh.seek(page * n)
                fh.write(b"\xa5" * page)
        return path
    return damage


@pytest.fixture
def runs_db(tmp_path):
    """A function that writes finished runs (a frame as analysis.synthetic makes) to a new SQLite file; returns its URL."""

    def make(runs, name: str = "runs.db") -> str:
        from db.engine import open_db, session
        from db.schema import Run

        url = f"sqlite:///{tmp_path / name}"
        engine = open_db(url)
        with session(engine) as db:
            for r in runs.itertuples(index=False):
                db.add(Run(run_id=r.run_id, arch=r.arch, status="done", params=int(r.params),
                           nonembed_params=int(r.nonembed_params), tokens=int(r.tokens), flops=float(r.flops),
                           final_loss=float(r.final_loss), val_loss=float(r.val_loss), spec={"arch": r.arch}))
        engine.dispose()
        return url

    return make
