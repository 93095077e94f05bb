"""More of the slab CLI's refusals: option values a float type lets through, an empty --db, one-line errors."""

import json

import pytest
from typer.testing import CliRunner

from sweep.cli import app

PLAN = "name,arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens,lr\nr{d_model},softmax|lightning,32|64,2,2,64,4,20k,1e-3\n"


def invoke(*args, db=None, **kwargs):
    pre = ["--db", db] if db is not None else []
    return CliRunner().invoke(app, [*pre, *map(str, args)], **kwargs)


@pytest.mark.parametrize("value", ["inf", "nan"])
@pytest.mark.parametrize("as_json", [False, True])
def test_plan_refuses_a_peak_that_is_not_a_finite_positive_number(write_plan, value, as_json):
    """--gpu-tflops inf priced every plan at '0 GPU-hours' (nan at nan), and --json wrote Infinity/NaN, which is not
    JSON."""
    result = invoke("plan", write_plan(PLAN), "--gpu-tflops", value, *(["--json"] if as_json else []))
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"error: --gpu-tflops must be a positive number of TFLOP/s, got {value}"]


@pytest.mark.parametrize("value", ["inf", "1e300"])
def test_status_watch_refuses_an_interval_it_cannot_sleep(write_plan, tmp_path, value):
    """slab status --watch --interval inf printed the table, then a traceback (OverflowError from time.sleep)."""
    db = f"sqlite:///{tmp_path}/slab.db"
    assert invoke("add", write_plan(PLAN), db=db).exit_code == 0  # pending runs: the watch would sleep
    result = invoke("status", "--watch", "--interval", value, db=db)
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: --interval must be a number of seconds from 0.1 to 1e+09, got {float(value):g}"]


@pytest.mark.parametrize("value", ["inf", "1e20"])
def test_launch_refuses_a_lease_it_cannot_keep_before_writing(write_plan, tmp_path, monkeypatch, value):
    """--lease-timeout inf registered the plan, started Ray and then failed in a traceback (OverflowError from
    timedelta) when claiming the first run."""
    import sweep.launch

    def init_ray(opts):
        raise AssertionError("Ray started")

    monkeypatch.setattr(sweep.launch, "init_ray", init_ray)
    db = tmp_path / "slab.db"
    result = invoke("launch", write_plan(PLAN), "--cpu", "--lease-timeout", value, "--ckpt-dir", tmp_path / "ckpt",
                    db=f"sqlite:///{db}")
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.strip().splitlines() == [
        f"error: --lease-timeout must be a number of seconds from 5 to 1e+09, got {float(value):g}"]
    assert not db.exists() and not (tmp_path / "ckpt").exists()


def test_an_empty_db_option_is_refused_rather_than_read_as_the_default(write_plan, tmp_path, monkeypatch):
    """slab --db "$STUDY_DB" add PLAN, the variable unset, registered the plan into ./slab.db without a word."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLAB_DB", raising=False)
    for args in (["add", write_plan(PLAN)], ["status"]):
        result = invoke(*args, db="")
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines() == [
            "error: --db is empty: expected a database URL such as sqlite:///slab.db (leave --db out for that default, "
            "or set SLAB_DB)"], result.stderr
        assert not (tmp_path / "slab.db").exists()
    # an empty SLAB_DB is the shell's unset variable: the default, as before
    assert invoke("add", write_plan(PLAN), env={"SLAB_DB": ""}).exit_code == 0
    assert (tmp_path / "slab.db").exists()


def test_an_error_that_spans_lines_is_printed_on_one(tmp_path):
    """slab fit --csv on a ragged file printed 'error: ...: not a readable CSV (Error tokenizing data. C error: ...'
    with its closing ')' on a second line (pandas' message ends in a newline)."""
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("params,tokens,loss\n1e6,2e7,3.0\n2e6,4e7,2.9,7\n")
    result = invoke("fit", "--csv", ragged)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {ragged}: not a readable CSV"), result.stderr
    assert lines[0].endswith(")")


def test_plan_json_is_strict_json(write_plan):
    """Every number slab plan --json writes is one JSON can hold (no NaN or Infinity)."""
    result = invoke("plan", write_plan(PLAN), "--json")
    assert result.exit_code == 0, result.output
    json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))


def test_json_records_keep_every_digit_of_a_float_as_csv_does(write_plan, tmp_path):
    """slab sql --json and slab runs --json wrote floats to 10 significant digits (pandas' to_json default): an lr of
    0.000123456789012345 read 0.0001234568, a float32 loss 3.0310134887695312 read 3.0310134888; --csv kept them."""
    import sqlite3

    db = tmp_path / "slab.db"
    assert invoke("add", write_plan(PLAN), db=f"sqlite:///{db}").exit_code == 0
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE runs SET status = 'done', final_loss = 3.0310134887695312, val_loss = 1.0 / 3")
    query = "select 0.000123456789012345 as lr, 1.0 / 3 as third, 1e308 * 10 as big, null as gone, 'é/x' as name, 7 as n"
    result = invoke("sql", query, "--json", db=f"sqlite:///{db}")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [{"lr": 0.000123456789012345, "third": 1 / 3, "big": None, "gone": None,
                                          "name": "é/x", "n": 7}]
    runs = json.loads(invoke("runs", "--json", db=f"sqlite:///{db}").stdout)
    assert {(r["final_loss"], r["val_loss"]) for r in runs} == {(3.0310134887695312, 1 / 3)}
    assert all(isinstance(r["step"], type(None)) and isinstance(r["attempts"], int) for r in runs)
    assert all(r["created_at"].startswith("20") and "T" in r["created_at"] for r in runs)  # dates as before: ISO


def test_plan_columns_with_plan_files_is_refused_rather_than_ignoring_them(write_plan, tmp_path):
    """slab plan FILE --columns printed the column list and never read FILE: a misspelt or broken plan passed unseen."""
    for path in (write_plan(PLAN), tmp_path / "missing.csv"):
        result = invoke("plan", path, "--columns")
        assert result.exit_code == 2, result.output
        assert result.stdout == ""
        assert result.stderr.strip().splitlines() == [
            "error: --columns lists the columns every plan may have and reads no plan: give it without plan files"]
    assert invoke("plan", "--columns").exit_code == 0
