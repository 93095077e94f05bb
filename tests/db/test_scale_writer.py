"""The writer at the scale of a study: a batch of results for hundreds of runs is a few statements, not one per run;
on SQLite and (when SLAB_TEST_PG_URL is set) PostgreSQL."""

from datetime import datetime, timedelta, timezone

from sqlalchemy import event, select

from db.engine import open_db
from db.schema import Run
from db.writer import RunRow, claim_run, register_plan, write_results

RUNS = 300


def _ids(n: int) -> list[str]:
    return [f"{i:016x}" for i in range(n)]


def _updates(engine) -> list[str]:
    """The UPDATE statements sent to the driver from now on (an executemany counts once)."""
    sent: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def count(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("UPDATE"):
            sent.append(statement)

    return sent


def test_a_batch_of_run_fields_is_a_few_statements_not_one_per_run(db_url):
    """A launcher training hundreds of runs writes each one's step and results every batch: it had sent an UPDATE per
    run (about 0.7 s a batch of 200 runs on PostgreSQL); runs with the same fields now share one executemany."""
    engine = open_db(db_url)
    ids = _ids(RUNS)
    register_plan(engine, "p", "/p.csv", "0" * 64, [RunRow(run_id=r, spec={"arch": "softmax"}, params=10,
                                                           nonembed_params=8, tokens=100, flops=1e9, row=1) for r in ids])
    for r in ids[:-1]:  # the last one stays pending, held by nobody
        assert claim_run(engine, r, "me", datetime.now(timezone.utc)) == 1
    when = datetime(2024, 5, 1, 12, tzinfo=timezone(timedelta(hours=5)))
    runs = {r: {"step": i, "val_loss": 1.0 + i} for i, r in enumerate(ids)}
    runs[ids[0]] = {"status": "done", "finished_at": when, "host": "h" * 300}  # other fields: a group of its own
    sent = _updates(engine)
    write_results(engine, [], [], runs, owner="me")
    assert len(sent) <= 3, f"{len(sent)} UPDATE statements for {RUNS} runs"
    with engine.connect() as conn:
        rows = {r.run_id: r for r in conn.execute(select(Run))}
    assert all(rows[r].step == i and rows[r].val_loss == 1.0 + i for i, r in enumerate(ids[1:-1], start=1))
    first = rows[ids[0]]
    assert first.status == "done" and first.finished_at == when.astimezone(timezone.utc) and len(first.host) == 200
    assert rows[ids[-1]].step is None, "a run this owner does not hold was written"
    engine.dispose()
