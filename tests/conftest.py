"""Shared fixtures: plan files written into a temporary folder, and database URLs to test against."""

import os

import pytest


@pytest.fixture
def write_plan(tmp_path):
    """Write a plan file from text and return its path."""

    def write(text: str, name: str = "plan.csv") -> "os.PathLike":
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def _pg_url():
    return os.environ.get("SLAB_TEST_PG_URL")


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
