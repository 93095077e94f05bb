"""The results database: every table scalinglab stores, as SQLAlchemy 2.0 typed declarative models."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Bumped whenever a table changes; a database written by a newer scalinglab is refused.
SCHEMA_VERSION = 1

RUN_STATUSES = ("pending", "running", "done", "failed", "diverged")


def utcnow() -> datetime:
    """The current time in UTC (stored timestamps are UTC)."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timestamp with its time zone, stored and read back as the instant in UTC on every database (a naive value is
    taken as UTC): SQLite keeps no zone, and had stored a time given in another zone as its wall-clock reading."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        """The value as SQLAlchemy's DateTime binds it, turned to UTC first."""
        return _in_utc(value)

    def process_result_value(self, value, dialect):
        """The stored value in UTC with its zone (SQLite returns it without one)."""
        return _in_utc(value)


def _in_utc(value):
    """A datetime as the same instant in UTC (a naive one taken as UTC); anything else as it is."""
    if not isinstance(value, datetime):
        return value
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


#: What a value cut to fit a column ends with before the hash of its whole (no character of a host name).
CUT_MARK = "~"
#: Hex digits of the SHA-256 of the whole value kept in a cut one: enough to tell hosts of one prefix apart.
CUT_HASH = 12


def fit_text(value: str, length: int) -> str:
    """``value`` where it has at most ``length`` characters, else a prefix of it, ``~`` and a short hash of the whole:
    it fits a ``String(length)`` column and still tells apart values that share the prefix."""
    if len(value) <= length:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:CUT_HASH]
    return f"{value[:length - len(CUT_MARK) - CUT_HASH]}{CUT_MARK}{digest}"


class Base(DeclarativeBase):
    """Declarative base of every scalinglab table."""


class Meta(Base):
    """Key/value facts about the database itself (the schema version)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Plan(Base):
    """A registered plan file: its name, where it came from and the hash of its text."""

    __tablename__ = "plans"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Run(Base):
    """One training run, keyed by the content hash of its spec, with its state and final results."""

    __tablename__ = "runs"
    run_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    arch: Mapped[str] = mapped_column(String(32), index=True)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    host: Mapped[str | None] = mapped_column(String(200), nullable=True)
    gpu: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)  # last step reported
    resumed_from_step: Mapped[int | None] = mapped_column(Integer, nullable=True)  # last attempt's start
    # The newest checkpoint a worker saved, and the --ckpt-dir it went to (resolved): a launch that cannot see it there
    # refuses rather than train the run again from step 0.
    ckpt_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ckpt_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    microbatch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    n_gpus: Mapped[float | None] = mapped_column(Float, nullable=True)  # how many trained it
    final_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    val_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    params: Mapped[int] = mapped_column(BigInteger)
    nonembed_params: Mapped[int] = mapped_column(BigInteger)
    # What the run trains: its plan's budget rounded up to whole steps (RunSpec.trained_tokens).
    tokens: Mapped[int] = mapped_column(BigInteger)
    flops: Mapped[float] = mapped_column(Float)
    wall_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    data_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    spec: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class PlanRun(Base):
    """Which plan (and which row of it) asked for which run; one run may belong to many plans."""

    __tablename__ = "plan_runs"
    plan_id: Mapped[int] = mapped_column(ForeignKey("plans.id", ondelete="CASCADE"), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True)
    row: Mapped[int] = mapped_column(Integer)
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    tags: Mapped[str | None] = mapped_column(Text, nullable=True)


class Metric(Base):
    """A training metric row; (run_id, step) is unique so a resumed run never duplicates a row."""

    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("run_id", "step", name="uq_metrics_run_step"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(BigInteger)
    flops: Mapped[float] = mapped_column(Float)
    loss: Mapped[float] = mapped_column(Float)
    lr: Mapped[float] = mapped_column(Float)
    tokens_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    mfu: Mapped[float | None] = mapped_column(Float, nullable=True)


class Eval(Base):
    """A named evaluation value of a run at a step (validation loss, NIAH cells, MQAR accuracy)."""

    __tablename__ = "evals"
    __table_args__ = (UniqueConstraint("run_id", "step", "name", name="uq_evals_run_step_name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(200))
    value: Mapped[float] = mapped_column(Float)


class Fit(Base):
    """A stored scaling-law fit: what was fitted on which runs, estimates and intervals as JSON."""

    __tablename__ = "fits"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    plan: Mapped[str | None] = mapped_column(String(200), nullable=True)
    arch: Mapped[str | None] = mapped_column(String(32), nullable=True)
    method: Mapped[str] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(Text)  # "db" or the CSV path
    n_points: Mapped[int] = mapped_column(Integer)
    result: Mapped[dict] = mapped_column(JSON)


TABLES = {t.name: t for t in Base.metadata.sorted_tables}
