"""The writer under races: launchers that lost a run, leases read a moment before a claim, timestamps in other
zones, and exports racing each other; on SQLite and (when SLAB_TEST_PG_URL is set) PostgreSQL."""

from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
from sqlalchemy import select

from db.engine import open_db
from db.queries import evals_frame, export_table, metrics_frame
from db.schema import Run, utcnow
from db.writer import RunRow, claim_run, heartbeat, register_plan, update_run, write_results

RUN = "0123456789abcdef"
PLUS5 = timezone(timedelta(hours=5))
MINUS7 = timezone(timedelta(hours=-7))


@pytest.fixture
def engine(db_url):
    """An open database holding one pending run (RUN) of one plan."""
    engine = open_db(db_url)
    register_plan(engine, "p", "/p.csv", "0" * 64, [RunRow(run_id=RUN, spec={"arch": "softmax"}, params=10,
                                                             nonembed_params=8, tokens=100, flops=1e9, row=1)])
    yield engine
    engine.dispose()


def _metric(step: int, loss: float) -> dict:
    return {"run_id": RUN, "step": step, "tokens": 64 * step, "flops": 1e6 * step, "loss": loss, "lr": 1e-3,
            "tokens_per_s": None, "mfu": None}


def _eval(step: int, value: float) -> dict:
    return {"run_id": RUN, "step": step, "name": "val_loss", "value": value}


def _row(engine):
    with engine.connect() as conn:
        return conn.execute(select(Run.__table__).where(Run.run_id == RUN)).one()


def test_a_launcher_that_lost_a_run_does_not_overwrite_its_new_owners_curve(engine):
    """Launcher A's lease lapsed (its host slept) and B took the run and re-reported its steps; A's late batch of
    the same steps must not replace B's rows, nor add steps B has not trained."""
    assert claim_run(engine, RUN, "A", utcnow()) == 1
    write_results(engine, [_metric(1, 9.0), _metric(2, 8.0)], [_eval(2, 8.5)], {RUN: {"step": 2}}, owner="A")
    assert claim_run(engine, RUN, "B", utcnow() + timedelta(days=1)) == 2  # A's lease has lapsed
    write_results(engine, [_metric(1, 7.0), _metric(2, 6.0)], [_eval(2, 6.5)], {RUN: {"step": 2}}, owner="B")
    # A wakes up and writes what its sink still held: it no longer holds the run.
    write_results(engine, [_metric(2, 1.0), _metric(3, 0.5)], [_eval(2, 1.5)], {RUN: {"step": 3}}, owner="A")
    assert metrics_frame(engine)[["step", "loss"]].values.tolist() == [[1, 7.0], [2, 6.0]]
    assert evals_frame(engine)["value"].tolist() == [6.5]
    assert _row(engine).step == 2
    # Without an owner (a script, a test) rows are written as before.
    write_results(engine, [_metric(3, 5.0)], [], {})
    assert metrics_frame(engine)["step"].tolist() == [1, 2, 3]


def test_the_owner_still_writes_its_own_runs_rows(engine):
    """The filter keeps what the holder writes, a re-reported step replacing the older row."""
    assert claim_run(engine, RUN, "A", utcnow()) == 1
    write_results(engine, [_metric(1, 9.0), _metric(2, 8.0)], [_eval(2, 8.5)], {}, owner="A")
    write_results(engine, [_metric(2, 7.5), _metric(3, 7.0)], [_eval(2, 7.9)], {RUN: {"step": 3}}, owner="A")
    assert metrics_frame(engine)[["step", "loss"]].values.tolist() == [[1, 9.0], [2, 7.5], [3, 7.0]]
    assert evals_frame(engine)["value"].tolist() == [7.9]
    assert _row(engine).step == 3


def test_a_claim_takes_a_running_run_only_from_the_holder_it_judged_gone(engine):
    """A launcher reads a run held by a launcher gone from its host and so claims it with a lease far in the future;
    if a third launcher took the run in between, the claim must not take it from that live launcher."""
    assert claim_run(engine, RUN, "host:1:dead:120", utcnow()) == 1
    assert claim_run(engine, RUN, "C", utcnow() + timedelta(days=1)) == 2  # C took it over first
    far = utcnow() + timedelta(days=1)  # "its launcher is gone from this host: no need to wait"
    assert claim_run(engine, RUN, "me", far, holder="host:1:dead:120") is None
    row = _row(engine)
    assert (row.lease_owner, row.attempts) == ("C", 2)
    assert heartbeat(engine, "C", [RUN]) == []
    # The holder it judged gone still holds it: taken as before.
    assert claim_run(engine, RUN, "me", far, holder="C") == 3
    assert _row(engine).lease_owner == "me"
    # A pending run is anyone's, whoever held it before.
    update_run(engine, RUN, "me", status="pending")
    assert claim_run(engine, RUN, "D", utcnow(), holder="somebody") == 4


def test_a_stale_before_in_another_zone_judges_the_lease_by_its_instant(engine):
    """stale_before is an instant: given in a zone east of UTC, a lease renewed a moment ago is still live (SQLite
    had compared wall times, and so took over a live run); given west of UTC, a lapsed one is still taken."""
    assert claim_run(engine, RUN, "A", utcnow()) == 1
    assert claim_run(engine, RUN, "B", (utcnow() - timedelta(seconds=60)).astimezone(PLUS5)) is None
    assert _row(engine).lease_owner == "A"
    assert claim_run(engine, RUN, "B", (utcnow() + timedelta(seconds=60)).astimezone(MINUS7)) == 2
    assert _row(engine).lease_owner == "B"


def test_timestamps_in_any_zone_are_stored_as_their_instant(engine):
    """A time given with another zone (or none, taken as UTC) reads back as the same instant on every database,
    in UTC, and is exported so."""
    assert claim_run(engine, RUN, "A", utcnow()) == 1
    finished = datetime(2024, 3, 1, 12, 30, 15, 123456, tzinfo=PLUS5)
    started = datetime(2024, 3, 1, 1, 2, 3)  # naive: UTC, as the schema stores
    assert update_run(engine, RUN, "A", status="done", finished_at=finished, started_at=started)
    row = _row(engine)
    assert row.finished_at.tzinfo is not None and row.finished_at.utcoffset() == timedelta(0)
    assert row.finished_at == finished and row.finished_at.hour == 7
    assert row.started_at == started.replace(tzinfo=timezone.utc)


def test_two_exports_to_one_file_at_once_leave_a_whole_file(engine, tmp_path, monkeypatch):
    """Two exports of one table to one file (a cron job and a person): each writes a file of its own and puts it
    in place whole, so the file is one export's, never the two interleaved in one temporary file."""
    import db.queries as q

    write_results(engine, [_metric(s, 10.0 - s) for s in range(1, 7)], [], {})
    monkeypatch.setattr(q, "FETCH_ROWS", 2)  # three chunks: the second export runs between two of the first's
    out = tmp_path / "metrics.csv"
    real = q._write_csv
    nested = []

    def write_csv(chunks, path):
        def interleaved():
            for i, chunk in enumerate(chunks):
                yield chunk
                if i == 0 and not nested:
                    nested.append(None)
                    nested[0] = export_table(engine, "metrics", "csv", out)

        return real(interleaved(), path)

    monkeypatch.setattr(q, "_write_csv", write_csv)
    assert export_table(engine, "metrics", "csv", out) == 6
    assert nested == [6]
    frame = pd.read_csv(out)
    assert frame["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
