"""A run's step count must fit the database's 32-bit step columns (PostgreSQL's Integer): refused at plan time."""

import pytest
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from db.engine import open_db, session
from db.schema import Eval, Metric, Run
from db.writer import write_results
from sweep.cli import app
from sweep.plan import PlanError, load_plan
from sweep.registry import add_plans

MOST_STEPS = 2**31 - 1  # PostgreSQL's integer
HEAD = "arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens\n"
STEP_TOKENS = 4 * 64  # batch_size x seq_len of the rows below


def issues_of(path):
    with pytest.raises(PlanError) as info:
        load_plan(path)
    return info.value.issues


def test_a_run_of_more_steps_than_the_database_holds_is_refused_in_its_budget_cell(write_plan):
    """A run of 2**31 steps had passed slab plan and slab add, and failed its launch on PostgreSQL."""
    path = write_plan(HEAD + f"softmax,32,2,2,64,4,{STEP_TOKENS * MOST_STEPS}\n"
                             f"softmax,32,2,2,64,4,{STEP_TOKENS * (MOST_STEPS + 1)}\n")
    [issue] = issues_of(path)
    assert (issue.row, issue.column) == (3, "tokens"), str(issue)
    assert issue.message == ("the run takes 2,147,483,648 steps of batch_size 4 x seq_len 64 tokens; the database holds "
                             "step numbers up to 2,147,483,647: give fewer tokens, or a larger batch_size or seq_len")


def test_a_budget_given_in_flops_is_blamed_on_flops_and_the_defaults_are_named(write_plan):
    [issue] = issues_of(write_plan("arch,d_model,n_layers,n_heads,flops\nsoftmax,32,2,2,1e20\n"))
    assert (issue.row, issue.column) == (2, "flops"), str(issue)
    assert "steps of batch_size 32 (its default) x seq_len 512 (its default) tokens" in issue.message, str(issue)
    assert "give fewer flops, or a larger batch_size or seq_len" in issue.message, str(issue)


def test_the_largest_run_the_database_holds_is_planned(write_plan):
    [run] = load_plan(write_plan(HEAD + f"softmax,32,2,2,64,4,{STEP_TOKENS * MOST_STEPS}\n")).runs
    assert run.spec.steps == MOST_STEPS


def test_slab_plan_says_so_in_one_line_per_row(write_plan):
    path = write_plan(HEAD + "softmax,32,2,2,64,4,1e15\n")
    result = CliRunner().invoke(app, ["plan", str(path)])
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {path}:2:tokens: the run takes 3,906,250,000,000 steps of batch_size 4 x seq_len 64"), line


def test_every_step_column_holds_the_last_step_of_the_largest_run(db_url, write_plan):
    """runs.step, ckpt_step and resumed_from_step, metrics.step and evals.step take the last step of a run the plan
    lets through; on PostgreSQL one more step does not fit, which is why the plan refuses such runs."""
    plan = load_plan(write_plan(HEAD + f"softmax,32,2,2,64,4,{STEP_TOKENS * MOST_STEPS}\n"))
    engine = open_db(db_url)
    add_plans(engine, [plan])
    run_id = plan.runs[0].spec.run_id
    step = plan.runs[0].spec.steps
    metric = {"run_id": run_id, "step": step, "tokens": STEP_TOKENS * step, "flops": 1.0, "loss": 1.0, "lr": 0.0}
    write_results(engine, [metric], [{"run_id": run_id, "step": step, "name": "val_loss", "value": 1.0}],
                  {run_id: {"step": step, "ckpt_step": step, "resumed_from_step": step}})
    with session(engine) as s:
        assert s.execute(select(Run.step, Run.ckpt_step, Run.resumed_from_step)).one() == (step, step, step)
        assert (s.scalar(select(Metric.step)), s.scalar(select(Eval.step))) == (step, step)
    if engine.dialect.name == "postgresql":
        with pytest.raises(DBAPIError, match="out of range"):
            write_results(engine, [{**metric, "step": step + 1}], [], {})
    engine.dispose()


def test_budgets_of_the_same_whole_steps_are_one_run_across_commands(write_plan, db_url):
    """One load took the first budget for a second that trains the same steps, but `slab add A; slab add B` made two
    runs of one training, and `add B A` gave A's rows B's id where `add A B` gave B's rows A's."""
    small, large = STEP_TOKENS * 3 - 100, STEP_TOKENS * 3  # both train 3 steps
    a = write_plan(HEAD + f"softmax,32,2,2,64,4,{small}\n", "a.csv")
    b = write_plan(HEAD + f"softmax,32,2,2,64,4,{large}\n", "b.csv")
    engine = open_db(db_url, create=True)
    try:
        plan_b = load_plan(b)
        first = add_plans(engine, [load_plan(a)]) + add_plans(engine, [plan_b])
        assert [(r.new, r.known) for r in first] == [(1, 0), (0, 1)]
        [run] = plan_b.runs  # what launch then trains: the registered run, at the budget registered
        assert run.spec.tokens == small and run.spec.gpus == 1.0
        with session(engine) as s:
            assert s.scalars(select(Run.run_id)).all() == [run.spec.run_id]
        plan_c = load_plan(write_plan(HEAD + f"softmax,32,2,2,64,4,{large + 1}\n", "c.csv"))  # a fourth step: its own run
        assert add_plans(engine, [plan_c])[0].new == 1 and plan_c.runs[0].spec.tokens == large + 1
    finally:
        engine.dispose()


def test_where_two_registered_runs_train_alike_a_finished_one_stands_for_a_third_budget(write_plan, db_url, monkeypatch):
    """Runs registered before budgets were matched across commands may train alike: the one already done is taken."""
    import sweep.registry

    engine = open_db(db_url, create=True)
    try:
        plans = [load_plan(write_plan(HEAD + f"softmax,32,2,2,64,4,{STEP_TOKENS * 3 - k}\n", f"p{k}.csv")) for k in (0, 1, 2)]
        with monkeypatch.context() as m:  # as a database of the earlier code holds them
            m.setattr(sweep.registry, "adopt_registered_budgets", lambda engine, plans: 0)
            add_plans(engine, plans[:1])
            add_plans(engine, plans[1:2])
        done = plans[1].runs[0].spec.run_id
        with session(engine) as s:
            s.get(Run, done).status = "done"
        assert add_plans(engine, plans[2:])[0].known == 1 and plans[2].runs[0].spec.run_id == done
    finally:
        engine.dispose()

