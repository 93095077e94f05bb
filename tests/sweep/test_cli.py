"""The slab CLI: dry run, registration, queries, exports, errors and exit codes."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from sweep.cli import app

PLAN = "name,arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens,lr\nr{d_model},softmax|lightning,32|64,2,2,64,4,20k,1e-3\n"


@pytest.fixture
def runner():
    return CliRunner()


def invoke(runner, *args, db=None):
    pre = ["--db", db] if db else []
    return runner.invoke(app, [*pre, *map(str, args)])


def test_plan_prints_blocks_totals_and_writes_nothing(runner, write_plan, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_plan(PLAN)
    result = invoke(runner, "plan", path)
    assert result.exit_code == 0, result.output
    assert "4 runs" in result.output and "GPU-hours" in result.output
    assert not (tmp_path / "slab.db").exists()
    data = json.loads(invoke(runner, "plan", path, "--json").stdout)
    assert data["totals"]["runs"] == 4 and len(data["runs"]) == 4
    assert sum(r["flops"] for r in data["runs"]) == pytest.approx(data["totals"]["flops"])
    assert data["totals"]["gpu_hours"] == pytest.approx(data["totals"]["flops"] / (0.3 * 989e12) / 3600)


def test_plan_notes_rows_whose_runs_were_given_before(runner, write_plan):
    path = write_plan(PLAN + PLAN.splitlines()[1].replace("32|64", "64") + "\n")  # row 3 repeats one run of row 2
    result = invoke(runner, "plan", path)
    assert result.exit_code == 0, result.output
    assert ":3: its 2 runs are all given before" in result.output and "4 runs" in result.output
    data = json.loads(invoke(runner, "plan", path, "--json").stdout)
    assert data["repeats"] == [{"plan": path.stem, "row": 3, "repeated": 2, "runs": 2}]
    assert json.loads(invoke(runner, "plan", write_plan(PLAN, "plain.csv"), "--json").stdout)["repeats"] == []


def test_bad_plan_exits_2_and_leaves_database_unchanged(runner, write_plan, tmp_path):
    db = f"sqlite:///{tmp_path}/slab.db"
    good = write_plan(PLAN, "good.csv")
    assert invoke(runner, "add", good, db=db).exit_code == 0
    before = (tmp_path / "slab.db").read_bytes()
    bad = write_plan(PLAN + "x,rwkv,64,2,2,64,4,20k,1e-3\n", "bad.csv")
    result = invoke(runner, "add", good, bad, db=db)
    assert result.exit_code == 2
    assert "bad.csv:3:arch: expected one of" in result.stderr
    assert invoke(runner, "plan", bad).exit_code == 2
    assert json.loads(invoke(runner, "sql", "select count(*) as n from plans", "--json", db=db).stdout) == [{"n": 1}]
    # a fresh path is never created by a failing add
    assert invoke(runner, "add", bad, db=f"sqlite:///{tmp_path}/other.db").exit_code == 2
    assert not (tmp_path / "other.db").exists()
    assert before  # the good registration is intact
    assert json.loads(invoke(runner, "sql", "select count(*) as n from runs", "--json", db=db).stdout) == [{"n": 4}]


def test_add_twice_is_a_noop_and_overlap_counts(runner, write_plan, tmp_path):
    db = f"sqlite:///{tmp_path}/slab.db"
    a = write_plan(PLAN, "a.csv")
    first = invoke(runner, "add", a, db=db)
    assert "4 new runs, 0 already known" in first.output
    again = invoke(runner, "add", a, db=db)
    assert "0 new runs, 4 already known" in again.output
    b = write_plan(PLAN.replace("32|64", "64|128"), "b.csv")
    assert "2 new runs, 2 already known" in invoke(runner, "add", b, db=db).output
    runs = json.loads(invoke(runner, "runs", "--json", db=db).stdout)
    assert len(runs) == 6 and all(r["status"] == "pending" for r in runs)
    only_b = json.loads(invoke(runner, "runs", "--plan", "b", "--arch", "softmax", "--json", db=db).stdout)
    assert sorted(r["d_model"] for r in only_b) == [64, 128]
    status = invoke(runner, "status", db=db)
    assert status.exit_code == 0 and "pending" in status.output
    csv_out = invoke(runner, "runs", "--csv", db=db).stdout
    assert csv_out.splitlines()[0].startswith("run_id,") and len(csv_out.splitlines()) == 7


def test_sql_is_read_only(runner, write_plan, tmp_path):
    db = f"sqlite:///{tmp_path}/slab.db"
    invoke(runner, "add", write_plan(PLAN), db=db)
    for stmt in ("delete from runs", "update runs set status='done'", "drop table runs", "insert into meta values ('a','b')"):
        result = invoke(runner, "sql", stmt, db=db)
        assert result.exit_code == 2, stmt
        assert "read-only" in result.stderr
    rows = json.loads(invoke(runner, "sql", "select status, count(*) as n from runs group by status", "--json", db=db).stdout)
    assert rows == [{"status": "pending", "n": 4}]
    bad = invoke(runner, "sql", "select nope from runs", db=db)
    assert bad.exit_code == 2 and "error:" in bad.stderr
    # ATTACH would create the file it names, which query_only alone does not stop.
    attached = tmp_path / "other.db"
    result = invoke(runner, "sql", f"attach database '{attached}' as other", db=db)
    assert result.exit_code == 2 and "read-only" in result.stderr
    assert not attached.exists()
    empty = invoke(runner, "sql", "  ", db=db)
    assert empty.exit_code == 2 and "needs a statement" in empty.stderr
    # The pooled connection is writable again for the commands that write.
    assert invoke(runner, "add", write_plan(PLAN.replace("r{d_model}", "s{d_model}"), "second.csv"), db=db).exit_code == 0


def test_a_read_only_uri_url_reads_and_refuses_writes_in_one_line(runner, write_plan, tmp_path):
    """`--db 'sqlite:///file:PATH?mode=ro&uri=true'` (SQLite's read-only form): runs reads it, add exits 2 with one
    line saying why, and the file is not changed."""
    path = tmp_path / "slab.db"
    assert invoke(runner, "add", write_plan(PLAN), db=f"sqlite:///{path}").exit_code == 0
    ro = f"sqlite:///file:{path}?mode=ro&uri=true"
    result = invoke(runner, "runs", "--json", db=ro)
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 4
    result = invoke(runner, "add", write_plan(PLAN.replace("r{d_model}", "s{d_model}"), "second.csv"), db=ro)
    assert result.exit_code == 2
    assert "error: cannot write the database: its URL opens it read-only (mode=ro)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    plans = invoke(runner, "sql", "select count(*) as n from plans", "--json", db=f"sqlite:///{path}")
    assert json.loads(plans.stdout) == [{"n": 1}]


def test_export_csv_and_parquet(runner, write_plan, tmp_path):
    db = f"sqlite:///{tmp_path}/slab.db"
    invoke(runner, "add", write_plan(PLAN), db=db)
    out = tmp_path / "runs.csv"
    assert invoke(runner, "export", "runs", "--out", out, db=db).exit_code == 0
    assert len(out.read_text().splitlines()) == 5
    pytest.importorskip("pyarrow")
    import pandas as pd

    pq = tmp_path / "runs.parquet"
    assert invoke(runner, "export", "runs", "--format", "parquet", "--out", pq, db=db).exit_code == 0
    assert len(pd.read_parquet(pq)) == 4
    bad = invoke(runner, "export", "nope", "--out", out, db=db)
    assert bad.exit_code == 2 and "unknown table" in bad.stderr


def test_read_commands_on_missing_database(runner, tmp_path):
    db = f"sqlite:///{tmp_path}/none.db"
    for args in (["runs"], ["status"], ["sql", "select 1"]):
        result = invoke(runner, *args, db=db)
        assert result.exit_code == 2
        assert "no database" in result.stderr
    assert not (tmp_path / "none.db").exists()


def test_help_has_examples_and_version(runner):
    for cmd in ("plan", "add", "runs", "status", "sql", "export"):
        result = runner.invoke(app, [cmd, "--help"])
        assert result.exit_code == 0 and "Example:" in result.output, cmd
    assert "scalinglab" in runner.invoke(app, ["--version"]).output


def test_help_and_plan_do_not_import_torch_or_ray(write_plan):
    path = write_plan(PLAN)
    code = (
        "import sys\nfrom sweep.cli import app\n"
        f"try:\n    app(['plan', {str(path)!r}])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'ray' not in sys.modules, [m for m in sys.modules if m in ('torch', 'ray')]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_launch_to_an_address_where_nothing_listens_fails_fast(write_plan, tmp_path):
    """A mistyped --address is a one-line error in seconds (Ray alone retries it for minutes), and
    nothing is registered."""
    import socket
    import time

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = tmp_path / "slab.db"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "sweep.cli", "--db", f"sqlite:///{db}", "launch", str(write_plan(PLAN)), "--cpu",
         "--address", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"cannot join the Ray cluster at 127.0.0.1:{port}: nothing answers there" in proc.stderr
    assert "Traceback" not in proc.stderr and time.monotonic() - t0 < 60
    assert not db.exists()


def test_launch_where_that_matches_no_run_exits_2_and_writes_nothing(runner, write_plan, tmp_path):
    db = tmp_path / "slab.db"
    result = invoke(runner, "launch", write_plan(PLAN), "--cpu", "--ckpt-dir", tmp_path / "ckpt", "--where",
                    "arch=lightnin", db=f"sqlite:///{db}")
    assert result.exit_code == 2, result.output
    assert "--where arch=lightnin: no run of" in result.stderr
    assert not db.exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("command,option,target", [("fused", "--csv", "fused.csv"), ("kernels", "--out", "bench")])
def test_gpu_benchmarks_without_a_gpu_say_so_and_write_nothing(runner, tmp_path, command, option, target):
    result = invoke(runner, "bench", command, option, tmp_path / target)
    assert result.exit_code == 2 and f"slab bench {command} times GPU kernels" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / target).exists()


def test_filters_that_name_nothing_exit_2(runner, write_plan, tmp_path):
    db = f"sqlite:///{tmp_path}/slab.db"
    invoke(runner, "add", write_plan(PLAN), db=db)
    for args, says in ((["runs", "--plan", "nosuch"], "no plan named 'nosuch'"),
                       (["runs", "--arch", "transformer"], "unknown arch 'transformer'"),
                       (["status", "--plan", "nosuch"], "no plan named 'nosuch'"),
                       (["fit", "--arch", "transformer"], "unknown arch 'transformer'")):
        result = invoke(runner, *args, db=db)
        assert result.exit_code == 2, args
        assert says in result.stderr, (args, result.stderr)
    one = invoke(runner, "runs", "--arch", "lightning", "--csv", db=db)
    assert one.exit_code == 0 and len(one.stdout.splitlines()) == 3  # header + the two lightning runs


def test_a_plan_named_by_its_file_path_is_pointed_to_its_name(runner, write_plan, tmp_path):
    # --plan plans/demo.csv had said only "no plan named 'plans/demo.csv'": a plan is named by its file's stem
    db = f"sqlite:///{tmp_path}/slab.db"
    invoke(runner, "add", write_plan(PLAN, "demo.csv"), db=db)
    for command in (["runs"], ["status"], ["compare"], ["report", "--out", tmp_path / "r"]):
        for given in ("plans/demo.csv", "demo.csv"):
            result = invoke(runner, *command, "--plan", given, db=db)
            assert result.exit_code == 2, (command, given)
            assert f"no plan named '{given}' in the database; known: demo" in result.stderr
            assert "a plan is named by its file's stem: --plan demo" in result.stderr, result.stderr
    other = invoke(runner, "runs", "--plan", "other.csv", db=db)  # a stem the database does not hold: no such hint
    assert other.exit_code == 2 and "--plan other" not in other.stderr


def test_status_of_runs_in_no_plan_when_there_are_none(runner, write_plan, tmp_path):
    # it had said "no runs registered yet: slab add PLAN" of a database holding the plan's runs
    db = f"sqlite:///{tmp_path}/slab.db"
    invoke(runner, "add", write_plan(PLAN), db=db)
    result = invoke(runner, "status", "--plan", "-", db=db)
    assert result.exit_code == 0, result.output
    said = " ".join(result.stdout.split())  # the table's caption wraps at its width
    assert "no runs registered yet" not in said and "no runs outside a plan: every run belongs to one" in said


def test_a_missing_default_database_says_how_to_name_another(runner, tmp_path, monkeypatch):
    # after `make demo` a plain `slab status` said only "no database at slab.db; register a plan first"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLAB_DB", raising=False)
    result = invoke(runner, "status")
    assert result.exit_code == 2 and "no database at slab.db" in result.stderr
    assert "or name one with --db URL (or SLAB_DB)" in result.stderr, result.stderr
    assert "demo-out" not in result.stderr
    (tmp_path / "demo-out").mkdir()
    (tmp_path / "demo-out" / "slab.db").write_bytes(b"")  # make demo's database
    result = invoke(runner, "runs")
    assert result.exit_code == 2 and "make demo's is --db sqlite:///demo-out/slab.db" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    named = invoke(runner, "status", db="sqlite:///other.db")  # a database named by the user: no hint of the default
    assert named.exit_code == 2 and "no database at other.db" in named.stderr and "--db URL" not in named.stderr


def test_bench_train_refuses_zero_sizes(runner, tmp_path):
    for option in ("--seq-len", "--steps", "--tokens-per-step", "--microbatch"):
        result = invoke(runner, "bench", "train", option, "0")
        assert result.exit_code == 2, option
    # a bad --arch is refused before --out's folder is made
    result = invoke(runner, "bench", "train", "--arch", "transformer", "--out", tmp_path / "new" / "train.csv")
    assert result.exit_code == 2 and "unknown arch 'transformer'" in result.stderr
    assert not (tmp_path / "new").exists()


def test_piped_tables_keep_every_digit_and_name(capsys):
    """A wide table piped into a file is printed at its natural width: cut to the console's, cells lost digits."""
    import pandas as pd

    from sweep.cli import Format, _emit

    frame = pd.DataFrame([{f"a_long_column_name_{i}": 1234.56789 + i for i in range(18)} | {"C": 1.7e11, "gap": None}])
    _emit(frame, Format.table, title="wide")
    printed = capsys.readouterr().out
    assert "…" not in printed
    assert all(f"a_long_column_name_{i}" in printed and f"{1234.56789 + i:.6g}" in printed for i in range(18))
    assert "1.7e+11" in printed


def test_brackets_in_names_and_data_are_printed_as_they_are(runner, write_plan, tmp_path):
    bad = write_plan(PLAN.replace("softmax|lightning", "[red]softmax"), "plan[v2].csv")
    result = invoke(runner, "plan", bad)
    assert result.exit_code == 2
    assert "plan[v2].csv:2:arch" in result.stderr and "'[red]softmax'" in result.stderr
    db = f"sqlite:///{tmp_path}/slab.db"
    invoke(runner, "add", write_plan(PLAN), db=db)
    shown = invoke(runner, "sql", "select '[b]x[/b]' as \"[i]col\"", db=db)
    assert shown.exit_code == 0 and "[b]x[/b]" in shown.stdout and "[i]col" in shown.stdout


def test_two_plan_files_of_one_name_are_refused(runner, tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.csv").write_text(PLAN)
    db = tmp_path / "slab.db"
    result = invoke(runner, "add", tmp_path / "a" / "x.csv", tmp_path / "b" / "x.csv", db=f"sqlite:///{db}")
    assert result.exit_code == 2 and "would both be plan 'x'" in result.stderr
    assert not db.exists()
    twice = invoke(runner, "plan", tmp_path / "a" / "x.csv", tmp_path / "a" / "x.csv")  # one file named twice: one plan
    assert twice.exit_code == 0 and "given before" not in twice.stdout and "4 runs" in twice.stdout


def test_launch_into_a_checkpoint_path_that_is_a_file_exits_2_before_writing(runner, write_plan, tmp_path):
    (tmp_path / "ckpt").write_text("not a folder")
    db = tmp_path / "slab.db"
    result = invoke(runner, "launch", write_plan(PLAN), "--cpu", "--ckpt-dir", tmp_path / "ckpt", db=f"sqlite:///{db}")
    assert result.exit_code == 2 and "is a file, not a folder" in result.stderr
    assert not db.exists()


def test_launch_into_a_checkpoint_folder_under_a_file_exits_2_before_writing(runner, write_plan, tmp_path):
    """A --ckpt-dir whose parent is a file passed the is-a-file check and ended in a NotADirectoryError traceback,
    exit 1, after the plan had been registered in a new database."""
    (tmp_path / "notes.txt").write_text("not a folder")
    db = tmp_path / "slab.db"
    result = invoke(runner, "launch", write_plan(PLAN), "--cpu", "--ckpt-dir", tmp_path / "notes.txt" / "ckpt",
                    db=f"sqlite:///{db}")
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "--ckpt-dir" in result.stderr and "notes.txt is a file, not a folder" in result.stderr
    assert "Traceback" not in result.output and not db.exists()


def test_bench_tables_refuse_a_file_of_another_kind_before_training(runner, write_plan, tmp_path):
    plan = write_plan(PLAN)
    before = plan.read_text()
    result = invoke(runner, "bench", "pack", plan, "--csv", plan)  # the plan itself, a CSV but no bench table
    assert result.exit_code == 2 and "not a benchmark table" in result.stderr
    assert plan.read_text() == before
    train = tmp_path / "train.csv"
    train.write_text("arch,seq_len,tokens_per_s\nsoftmax,2048,1000\n")
    result = invoke(runner, "bench", "dp", plan, "--cpu", "--csv", train)
    assert result.exit_code == 2 and "a `slab bench train` table" in result.stderr
    assert train.read_text() == "arch,seq_len,tokens_per_s\nsoftmax,2048,1000\n"


def test_bench_spread_without_a_gpu_says_so(runner, write_plan, monkeypatch):
    import sweep.launch

    monkeypatch.setattr(sweep.launch, "host_gpus", lambda: 0)
    result = invoke(runner, "bench", "spread", write_plan(PLAN))
    assert result.exit_code == 2 and "no GPU here (pass --cpu" in result.stderr


def test_launch_without_a_gpu_or_cpu_flag_refuses_before_writing(runner, write_plan, tmp_path, monkeypatch):
    """It had registered the plan's runs and started Ray (seconds) before saying the cluster had no GPU."""
    import sweep.launch

    monkeypatch.setattr(sweep.launch, "host_gpus", lambda: 0)
    db = tmp_path / "slab.db"
    result = invoke(runner, "--db", f"sqlite:///{db}", "launch", write_plan(PLAN))
    assert result.exit_code == 2 and "no GPU here: pass --cpu" in result.stderr
    assert not db.exists()


@pytest.mark.parametrize("command", ["plan", "add", "launch"])
def test_max_runs_below_one_is_refused(runner, write_plan, command):
    # it had read "the plan expands to more than -1 runs (raise --max-runs)"
    result = invoke(runner, command, write_plan(PLAN), "--max-runs", "-1")
    assert result.exit_code == 2 and "Invalid value for '--max-runs'" in result.output


def test_add_says_when_an_edited_plan_no_longer_holds_runs(runner, write_plan, tmp_path):
    db = f"sqlite:///{tmp_path}/slab.db"
    path = write_plan(PLAN)
    assert invoke(runner, "add", path, db=db).exit_code == 0
    path.write_text(PLAN.replace("32|64", "64"))
    result = invoke(runner, "add", path, db=db)
    assert result.exit_code == 0 and "0 new runs, 2 already known; 2 runs of its last registration no longer in it" in result.stdout
    # the status table shows the two under '-' and says how to list them; runs and status take --plan -
    table = invoke(runner, "status", db=db).stdout
    assert "runs in no plan" in table and "slab runs --plan -" in table
    orphans = json.loads(invoke(runner, "runs", "--plan", "-", "--json", db=db).stdout)
    assert len(orphans) == 2 and {r["plan"] for r in orphans} == {""} and {r["d_model"] for r in orphans} == {32}
    only = invoke(runner, "status", "--plan", "-", db=db)
    rows = [line.split("│")[1:-1] for line in only.stdout.splitlines() if line.startswith("│")]
    assert only.exit_code == 0 and [[c.strip() for c in r] for r in rows] == [["-", "2", "0", "0", "0", "0", "2"]]
    refused = invoke(runner, "compare", "--plan", "-", db=db)
    assert refused.exit_code == 2 and "is taken by slab runs and slab status" in refused.output


def test_a_plan_of_the_same_name_from_another_file_is_named_so(runner, tmp_path, monkeypatch):
    # it had read "(the file changed)" for a file that never changed
    db = f"sqlite:///{tmp_path}/slab.db"
    for folder, arch in (("a", "softmax"), ("b", "lightning")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.csv").write_text(PLAN.replace("softmax|lightning", arch).replace("32|64", "32"))
    assert invoke(runner, "add", tmp_path / "a" / "x.csv", db=db).exit_code == 0
    result = invoke(runner, "add", tmp_path / "b" / "x.csv", db=db)
    assert result.exit_code == 0
    assert f"1 run of its last registration no longer in it (registered before from {tmp_path / 'a' / 'x.csv'})" in result.stdout
    assert "rename one file to keep both" in result.stderr
    monkeypatch.chdir(tmp_path / "a")  # the same file through a relative path from elsewhere: no warning
    again = invoke(runner, "add", "../b/x.csv", db=db)
    assert again.exit_code == 0 and "registered before" not in again.output and "warning" not in again.stderr


def test_runs_csv_prints_whole_numbers_beside_nulls_as_whole(runner, write_plan, tmp_path):
    # a null step among the runs had turned every step into a float: 3.0
    import csv
    import io
    import sqlite3

    db = tmp_path / "slab.db"
    assert invoke(runner, "add", write_plan(PLAN), db=f"sqlite:///{db}").exit_code == 0
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE runs SET step = 3, attempts = 1 WHERE run_id = (SELECT min(run_id) FROM runs)")
    rows = list(csv.DictReader(io.StringIO(invoke(runner, "runs", "--csv", db=f"sqlite:///{db}").stdout)))
    assert sorted(r["step"] for r in rows) == ["", "", "", "3"]
    assert {r["d_model"] for r in rows} == {"32", "64"} and all("." not in r["tokens"] for r in rows)
    records = json.loads(invoke(runner, "runs", "--json", db=f"sqlite:///{db}").stdout)
    assert sorted(r["step"] for r in records if r["step"] is not None) == [3] and sum(r["step"] is None for r in records) == 3
    # timestamps in UTC with the zone, as slab export writes them (runs had printed them without it)
    assert invoke(runner, "export", "runs", "--out", tmp_path / "runs.csv", db=f"sqlite:///{db}").exit_code == 0
    exported = {r["run_id"]: r["created_at"] for r in csv.DictReader(open(tmp_path / "runs.csv"))}
    assert {r["run_id"]: r["created_at"] for r in rows} == exported and all(v.endswith("+00:00") for v in exported.values())
    assert all(r["created_at"].endswith("Z") for r in records)


def test_runs_table_shows_pending_runs_beside_started_ones(runner, write_plan, tmp_path):
    # a pending run's null integers (pandas NA in Int64 columns) crashed the table: "boolean value of NA is ambiguous"
    import sqlite3

    db = tmp_path / "slab.db"
    assert invoke(runner, "add", write_plan(PLAN), db=f"sqlite:///{db}").exit_code == 0
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE runs SET step = 37, attempts = 1 WHERE run_id = (SELECT min(run_id) FROM runs)")
    result = invoke(runner, "runs", db=f"sqlite:///{db}")
    assert result.exit_code == 0, result.output
    assert "pending" in result.stdout and "37" in result.stdout and "<NA>" not in result.stdout


def test_plan_notes_rounding_and_runs_show_the_tokens_trained_from_the_start(runner, write_plan, tmp_path):
    # runs.tokens had held the plan's 100 while pending and the 256 trained once done
    path = write_plan("name,arch,d_model,n_layers,seq_len,batch_size,tokens\nr{tokens},softmax,32,2,64,4,100|25600\n")
    result = invoke(runner, "plan", path)
    assert result.exit_code == 0 and ":2: 1 run trains up to 2.56x its token budget" in result.stdout
    assert json.loads(invoke(runner, "plan", path, "--json").stdout)["rounded_up"][0]["max_ratio"] == pytest.approx(2.56)
    db = f"sqlite:///{tmp_path}/slab.db"
    assert invoke(runner, "add", path, db=db).exit_code == 0
    runs = json.loads(invoke(runner, "runs", "--json", db=db).stdout)
    assert sorted(r["tokens"] for r in runs) == [256, 25600]


def test_db_given_after_the_command_is_taken_as_before_it(tmp_path):
    from sweep.cli import db_first

    assert db_first(["status", "--db", "x"]) == ["--db", "x", "status"]
    assert db_first(["sql", "select 1", "--db=x"]) == ["--db=x", "sql", "select 1"]
    assert db_first(["--db", "x", "runs"]) == ["--db", "x", "runs"]
    assert db_first(["sql", "--", "--db"]) == ["sql", "--", "--db"]
    missing = tmp_path / "none.db"
    result = subprocess.run([sys.executable, "-m", "sweep.cli", "status", "--db", f"sqlite:///{missing}"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and f"no database at {missing}" in result.stderr


def test_plan_notes_runs_whose_warmup_covers_the_whole_run(runner, write_plan):
    path = write_plan("arch,d_model,n_layers,seq_len,batch_size,tokens,warmup\nsoftmax,64,2,64,4,2560|25600,50\n")
    result = invoke(runner, "plan", path)  # 2,560 tokens are 10 steps of 4 x 64: all of them warm-up
    assert result.exit_code == 0 and ":2: 1 run warms up for all its steps" in result.stdout
    data = json.loads(invoke(runner, "plan", path, "--json").stdout)
    assert data["warmup_only"] == [{"plan": path.stem, "row": 2, "runs": 1}]


def test_plan_notes_hybrid_runs_whose_layers_are_not_whole_periods(runner, write_plan):
    path = write_plan("arch,d_model,n_layers,hybrid,seq_len,batch_size,tokens\nhybrid,64,8|12,8|LLS,64,4,2560\n")
    result = invoke(runner, "plan", path)  # 12 layers of period 8 and 8 layers of LLS are uneven; 8 of 8 and 12 of LLS not
    assert result.exit_code == 0 and ":2: 2 hybrid runs have n_layers that are not whole periods" in result.stdout
    data = json.loads(invoke(runner, "plan", path, "--json").stdout)
    assert data["uneven_hybrid"] == [{"plan": path.stem, "row": 2, "runs": 2}]


def test_plan_notes_expressions_that_read_the_total_params_under_a_large_vocabulary(runner, write_plan):
    # params 25M with a 200k vocabulary: =20*params counts 4.6G tokens, =20*nonembed_params 0.5G
    path = write_plan("arch,params,vocab,seq_len,batch_size,tokens\nsoftmax,25M,200064,64,4,=20*params\n"
                      "softmax,25M,200064,64,4,=20*nonembed_params\nsoftmax,25M,260,64,4,=20*params\n")
    result = invoke(runner, "plan", path)
    assert result.exit_code == 0 and ":2: expressions of 1 run read params, the total count, of which embeddings are up to 89%" in result.stdout
    assert ":3:" not in result.stdout and ":4:" not in result.stdout  # nonembed_params; a byte vocabulary
    data = json.loads(invoke(runner, "plan", path, "--json").stdout)
    assert [(d["row"], d["runs"]) for d in data["total_params_read"]] == [(2, 1)]


def test_plan_columns_lists_every_column_and_derived_name(runner):
    from sweep.plan import COLUMNS, DERIVED

    data = json.loads(invoke(runner, "plan", "--columns", "--json").stdout)
    assert [d["name"] for d in data] == [*COLUMNS, *DERIVED]
    assert {d["name"]: d["default"] for d in data}["seq_len"] == "512"
    table = invoke(runner, "plan", "--columns")
    assert table.exit_code == 0 and "nonembed_params" in table.stdout and "warmup" in table.stdout
    bare = invoke(runner, "plan")
    assert bare.exit_code == 2 and "give one or more plan files (or --columns" in bare.stderr


def test_status_says_which_running_runs_have_no_live_launcher(runner, write_plan, tmp_path):
    """After a launcher is killed its runs stay "running" until a relaunch takes them: status says they have no
    launcher (its process gone from this host, or no heartbeat for a lease) and how to resume them."""
    import os
    import socket
    from datetime import timedelta

    from sqlalchemy import update

    from db.engine import open_db
    from db.schema import Run, utcnow
    from db.writer import claim_run

    db = f"sqlite:///{tmp_path}/slab.db"
    invoke(runner, "add", write_plan(PLAN), db=db)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    engine = open_db(db)
    ids = [r["run_id"] for r in json.loads(invoke(runner, "runs", "--json", db=db).stdout)]
    claim_run(engine, ids[0], f"{host}:{int(dead.stdout)}:a", utcnow())  # its launcher was killed
    claim_run(engine, ids[1], "elsewhere:1:b", utcnow())  # on another host, silent for 10 minutes
    with engine.begin() as conn:
        conn.execute(update(Run).where(Run.run_id == ids[1]).values(heartbeat_at=utcnow() - timedelta(minutes=10)))
    claim_run(engine, ids[2], f"{host}:{os.getpid()}:c", utcnow())  # alive and well
    engine.dispose()
    out = invoke(runner, "status", db=db).output
    assert "│ plan │       1 │       3 │" in out, out  # still counted as running
    assert "2 running runs have no live launcher" in " ".join(out.split()), out
    assert "slab launch PLAN resumes them" in " ".join(out.split()), out


def test_colon_words_and_brackets_in_messages_are_printed_as_they_are(runner, write_plan, tmp_path):
    # rich turned ':x:' into an emoji and '[v2]' into a style: a column ':x:' was reported as '❌', a file p[v2].csv as p.csv
    bad = write_plan("arch,:x:\nsoftmax,1\n")
    result = invoke(runner, "plan", bad)
    assert result.exit_code == 2 and "unknown column ':x:'" in result.stderr, result.stderr
    db = f"sqlite:///{tmp_path}/slab.db"
    invoke(runner, "add", write_plan(PLAN), db=db)
    result = invoke(runner, "runs", "--plan", ":thumbs_up:", db=db)
    assert result.exit_code == 2 and "no plan named ':thumbs_up:'" in result.stderr, result.stderr
    result = invoke(runner, "bench", "plan", write_plan(PLAN, "p[v2].csv"))
    assert result.exit_code == 0 and "p[v2].csv: 4 runs" in result.stdout, result.output


def test_help_shows_bracketed_text_as_written(runner):
    # rich read '[default: params]' and 'ray[client]' in the option help as markup and dropped them
    def words(*args):
        text = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "300"}).output
        return " ".join(text.replace("│", " ").split())

    fit = words("fit")
    for default in ("[default: params]", "[default: loss]", "[default: tokens, where the file has it, else flops / 6N]",
                    "[default: flops, where the file has it, else 6ND]"):
        assert default in fit
    assert "needs the ray[client] extra" in words("launch")


def test_launch_refuses_a_gpu_memory_that_is_not_positive(runner, write_plan, tmp_path):
    db = tmp_path / "slab.db"
    for value in ("0", "-5"):
        result = invoke(runner, "launch", write_plan(PLAN), "--cpu", "--gpu-mem", value, "--ckpt-dir", tmp_path / "ckpt",
                        db=f"sqlite:///{db}")
        assert result.exit_code == 2 and "--gpu-mem" in result.output, result.output
    assert not db.exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("command", ["spread", "dp"])
def test_bench_gpu_counts_below_one_are_refused_before_any_folder_is_made(runner, write_plan, tmp_path, monkeypatch,
                                                                           command):
    result = invoke(runner, "bench", command, write_plan(PLAN), "--cpu", "--gpus", "0", "--csv", tmp_path / "out" / "t.csv")
    assert result.exit_code == 2 and "--gpus" in result.output, result.output
    assert not (tmp_path / "out").exists()
    import sweep.launch

    monkeypatch.setattr(sweep.launch, "host_gpus", lambda: 0)  # no GPU and no --cpu: refused, and no folder left either
    result = invoke(runner, "bench", command, write_plan(PLAN), "--csv", tmp_path / "out" / "t.csv")
    assert result.exit_code == 2 and "no GPU here" in result.stderr, result.output
    assert not (tmp_path / "out").exists()


def test_bench_pack_reports_a_run_that_diverged_without_a_traceback(runner, write_plan, tmp_path, monkeypatch):
    # a run of the warm-up or of the plan ending no better than a uniform guess raised Diverged out of the command
    import sweep.bench
    from models.train import Diverged

    def diverge(*args, **kwargs):
        raise Diverged(2, "the final validation loss 5.573 is no better than a uniform guess's (ln 260 = 5.561)")

    monkeypatch.setattr(sweep.bench, "bench_pack", diverge)
    out_csv = tmp_path / "pack.csv"
    result = invoke(runner, "bench", "pack", write_plan(PLAN), "--steps", "2", "--csv", out_csv)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "error: a run stopped: the final validation loss 5.573" in result.stderr and "nothing was written" in result.stderr
    assert "--steps 2 is too few for the runs to learn: give more" in result.stderr  # the likely cause, named
    assert not out_csv.exists()


def _narrow(monkeypatch, width=80):
    """Print stdout as a terminal of ``width`` columns does."""
    from rich.console import Console

    import sweep.cli

    monkeypatch.setattr(sweep.cli, "out", Console(width=width, emoji=False))


def test_runs_table_fits_an_80_column_terminal_with_every_id_whole(runner, write_plan, tmp_path, monkeypatch):
    # at 80 columns every one of its 14 columns was cut to two or three letters and '…': '| a0… | hg… | 64… |'
    import sqlite3

    db = tmp_path / "slab.db"
    assert invoke(runner, "add", write_plan(PLAN), db=f"sqlite:///{db}").exit_code == 0
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE runs SET status = 'failed', step = 7, attempts = 3, error = ? WHERE run_id = "
                     "(SELECT min(run_id) FROM runs)", ("Traceback (most recent call last):\nRuntimeError: CUDA error: an "
                                                        "illegal memory access was encountered",))
    ids = [r["run_id"] for r in json.loads(invoke(runner, "runs", "--json", db=f"sqlite:///{db}").stdout)]
    _narrow(monkeypatch)
    result = invoke(runner, "runs", db=f"sqlite:///{db}")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in result.stdout, result.stdout
    assert all(i in result.stdout for i in ids) and "lightning" in result.stdout and "failed" in result.stdout
    assert "illegal memory access" in " ".join(" ".join(lines).replace("│", " ").split())
    assert "left out to fit 80 columns" in result.stderr and "--csv" in result.stderr
    _narrow(monkeypatch, 400)
    wide = invoke(runner, "runs", db=f"sqlite:///{db}")
    assert "n_layers" in wide.stdout and "left out" not in wide.stderr


def test_runs_table_at_60_columns_first_leaves_out_an_error_column_with_nothing_in_it(runner, write_plan, tmp_path,
                                                                                   monkeypatch):
    """At 60 columns the empty error column stayed while val_loss and status folded mid-word ('pendi' over 'ng')."""
    db = f"sqlite:///{tmp_path / 'slab.db'}"
    assert invoke(runner, "add", write_plan(PLAN), db=db).exit_code == 0
    _narrow(monkeypatch, 60)
    result = invoke(runner, "runs", db=db)
    assert max(len(line) for line in result.stdout.splitlines()) <= 60, result.stdout
    assert "pending" in result.stdout and "val_loss" in result.stdout and "error" not in result.stdout
    assert result.stderr.split("left out to fit 60 columns: ")[1].startswith("error, n_layers")


def test_sql_table_leaves_out_columns_from_the_right_to_fit_the_terminal(runner, write_plan, tmp_path, monkeypatch):
    """`slab sql "select * from runs"` at 80 columns drew 27 columns one or two letters wide, headers and cells unreadable."""
    db = f"sqlite:///{tmp_path / 'slab.db'}"
    assert invoke(runner, "add", write_plan(PLAN), db=db).exit_code == 0
    _narrow(monkeypatch)
    result = invoke(runner, "sql", "select * from runs", db=db)
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80 and "run_id" in result.stdout
    left = result.stderr.split("left out to fit 80 columns: ")[1].split(" (")[0].split(", ")
    columns = list(json.loads(invoke(runner, "sql", "select * from runs", "--json", db=db).stdout)[0])
    assert left == columns[::-1][: len(left)] and "spec" in left and "--csv" in result.stderr
    assert all(column in result.stdout for column in columns[: len(columns) - len(left)])
    _narrow(monkeypatch, 2000)
    assert "left out" not in invoke(runner, "sql", "select * from runs", db=db).stderr


def test_plan_table_keeps_plan_and_row_whole_at_80_columns(runner, write_plan, monkeypatch):
    path = write_plan("arch,d_model,n_layers,hybrid,seq_len,batch_size,tokens\n"
                      "hybrid,1856,32,LLLLLLLSLLLLLLLSLLLLLLLSLLLLLLLS,64,4,2560\n", "a_long_plan_name.csv")
    _narrow(monkeypatch)
    result = invoke(runner, "plan", path)
    assert result.exit_code == 0, result.output
    assert "a_long_plan_name:2" in result.stdout and "…" not in result.stdout, result.stdout


def test_help_paragraphs_are_not_broken_mid_sentence(runner):
    # a docstring's own line breaks were kept: at 80 columns 'or' ended one line and 'an expression' began the next
    import typer.main

    group = typer.main.get_command(app)
    commands = [[name] for name in group.commands if name != "bench"]
    commands += [["bench", name] for name in group.commands["bench"].commands]
    broken = []
    for args in commands:
        text = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "1000"}).output
        lines = [line.strip() for line in text.split("╭")[0].splitlines()[1:]]  # the description, before the panels
        broken += [f"{' '.join(args)}: {a!r} / {b!r}" for a, b in zip(lines, lines[1:]) if a and b and not b.startswith("Example:")]
    assert not broken, "\n".join(broken)


def test_export_to_dash_is_refused_rather_than_written_to_a_file_named_dash(runner, write_plan, tmp_path, monkeypatch):
    # '--out -' reads as stdout, but it wrote a file named '-' and said so
    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path}/slab.db"
    invoke(runner, "add", write_plan(PLAN), db=db)
    result = invoke(runner, "export", "runs", "--out", "-", db=db)
    assert result.exit_code == 2 and "slab sql" in result.stderr, result.output
    assert not (tmp_path / "-").exists()


def test_a_table_too_wide_for_the_terminal_leaves_out_its_optional_columns_in_order(monkeypatch, capsys):
    # the launch summary's shape: at 80 columns its run ids, names and archs had read '77e8…', 'tsof…', 'soft…'
    import pandas as pd

    from sweep.cli import Format, _emit

    frame = pd.DataFrame([{"run_id": "77e8053ca0ec0cae", "name": "demo-lightning-d64-200k", "arch": "lightning",
                           "status": "failed", "attempts": 3, "step": 20, "final_loss": "5.062", "val_loss": "5.106",
                           "wall_s": "3.684", "error": "RuntimeError: CUDA error: an illegal memory access was encountered"}])
    optional = ("attempts", "final_loss", "wall_s", "step", "name")
    _narrow(monkeypatch)
    _emit(frame, Format.table, title="launch summary", optional=optional, free=("error", 14), whole=("run_id",))
    printed = capsys.readouterr()
    assert max(map(len, printed.out.splitlines())) <= 80 and "…" not in printed.out, printed.out
    assert all(word in printed.out for word in ("77e8053ca0ec0cae", "lightning", "failed", "5.106", "illegal"))
    left = printed.err.split("left out to fit 80 columns: ")[1].split(" (")[0].split(", ")
    assert left == list(optional[:len(left)]) and "status" in printed.out
    _narrow(monkeypatch, 200)
    _emit(frame, Format.table, title="launch summary", optional=optional, free=("error", 14), whole=("run_id",))
    printed = capsys.readouterr()
    assert "demo-lightning-d64-200k" in printed.out and "attempts" in printed.out and not printed.err


def test_launch_counts_runs_lost_to_another_launcher_and_exits_1(runner, write_plan, tmp_path, monkeypatch):
    """A launch whose every run another launcher took over had said '0/1 runs done, 0 failed or diverged', exit 0."""
    import sweep.launch
    from sweep.launch import LaunchResult

    row = {"run_id": "abc", "name": "r", "arch": "softmax", "status": "lost", "attempts": 1, "step": None,
           "final_loss": None, "val_loss": None, "wall_s": None, "error": "lost to another launcher (h:1:x)"}
    monkeypatch.setattr(sweep.launch, "launch", lambda plans, opts, view: LaunchResult(rows=[row]))
    result = invoke(runner, "--db", f"sqlite:///{tmp_path}/slab.db", "launch", "--cpu", write_plan(PLAN))
    assert result.exit_code == 1, result.output
    assert "0/1 runs done, 0 failed or diverged, 1 lost to another launcher" in result.output


def test_a_relaunch_of_a_plan_with_a_diverged_run_exits_1_as_the_launch_that_saw_it(runner, write_plan, tmp_path,
                                                                                 monkeypatch):
    import sweep.launch
    from sweep.launch import LaunchResult

    for diverged, code in ((1, 1), (0, 0)):
        monkeypatch.setattr(sweep.launch, "launch", lambda plans, opts, view: LaunchResult(rows=[], diverged_before=diverged))
        result = invoke(runner, "--db", f"sqlite:///{tmp_path}/slab.db", "launch", "--cpu", write_plan(PLAN))
        assert result.exit_code == code, result.output


def test_launch_stopped_by_ctrl_c_while_ray_starts_says_so(runner, write_plan, tmp_path, monkeypatch):
    """A Ctrl-C while Ray started (seconds) had ended the launch with exit 130 and not a word."""
    import sweep.launch

    def interrupted(plans, opts, view):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep.launch, "launch", interrupted)
    result = invoke(runner, "--db", f"sqlite:///{tmp_path}/slab.db", "launch", "--cpu", write_plan(PLAN))
    assert result.exit_code == 130 and "stopped by Ctrl-C while Ray started" in result.stderr


def _count_rich_layouts(monkeypatch):
    """Count how often rich works out a table's column widths, and how many cells it measures to do so."""
    from rich.table import Table
    from rich.text import Text

    counts = {"layouts": 0, "cells": 0}
    layout, measure = Table._calculate_column_widths, Text.__rich_measure__

    def counted_layout(self, *args, **kwargs):
        counts["layouts"] += 1
        return layout(self, *args, **kwargs)

    def counted_measure(self, *args, **kwargs):
        counts["cells"] += 1
        return measure(self, *args, **kwargs)

    monkeypatch.setattr(Table, "_calculate_column_widths", counted_layout)
    monkeypatch.setattr(Text, "__rich_measure__", counted_measure)
    return counts


def test_a_table_is_laid_out_once_whatever_columns_it_may_leave_out(monkeypatch, capsys):
    """slab runs over 3,780 runs took 15 s in a 120-column terminal: rich measured every cell of the table once for
    each optional column it might leave out, then again to print it."""
    import pandas as pd

    from sweep.cli import Format, _emit

    frame = pd.DataFrame([{"run_id": f"{i:016x}", "arch": "lightning", "hybrid": "LLLS" * (i % 9), "status": "failed",
                           "attempts": 3, "step": i, "final_loss": 5.0 + i / 7, "error": "RuntimeError: CUDA error " * (i % 3),
                           "plan": "minimax01"} for i in range(60)])
    optional = ("attempts", "final_loss", "hybrid", "plan", "step")
    for width, left_out in ((80, True), (120, True), (400, False), (None, False)):
        _narrow(monkeypatch, width or 100_000)
        counts = _count_rich_layouts(monkeypatch)
        _emit(frame, Format.table, title="runs", optional=optional, free=("error", 14), whole=("run_id",))
        printed = capsys.readouterr()
        assert ("left out" in printed.err) == left_out, (width, printed.err)
        assert counts["layouts"] == 1, (width, counts)  # the print's own
        if not left_out:  # the table's natural width fits: rich is given it and measures no cell
            assert counts["cells"] == 0, (width, counts)


@pytest.mark.parametrize("width", [20, 40, 60, 80, 100, 160, 100_000])
def test_a_table_prints_as_rich_lays_it_out_itself(monkeypatch, capsys, width):
    """The widths worked out for a table (to leave out columns, and to spare rich measuring it) are rich's own: wide
    characters, control codes, blank and multi-line cells, a free column and a whole one print as rich prints them."""
    import io

    import pandas as pd
    from rich.console import Console

    import sweep.cli
    from sweep.cli import _print_table, _table, _table_width, _text_widths

    frame = pd.DataFrame({"id": ["a1b2c3d4e5f6a7b8", "0000000000000001", ""], "name": ["日本語の名前", "x", "two words"],
                          "loss": [3.14159265, float("nan"), 2.0], "error": ["", "Traceback\nValueError: bad value given", "\x07bell"],
                          "n": pd.array([1, None, 300], dtype="Int64"), "blank": ["", " ", ""]})
    layout = {"right": ("loss", "n"), "whole": ("id",)}
    texts = frame.map(sweep.cli._cell).astype(object)
    narrowest, natural = _text_widths(texts)
    wide = Console(width=100_000, emoji=False)
    measured = wide.measure(_table(frame, "t", **layout))
    assert (_table_width(narrowest), _table_width(natural)) == (measured.minimum, measured.maximum)

    _narrow(monkeypatch, width)
    _print_table(frame, "t", **layout)
    ours = capsys.readouterr().out
    plain = io.StringIO()
    Console(width=width, emoji=False, file=plain).print(_table(frame, "t", **layout))
    assert ours == plain.getvalue()


def test_export_into_a_folder_that_does_not_exist_is_refused_and_makes_none(runner, write_plan, tmp_path):
    # a mistyped --out folder had been made without a word, and the table written into it
    db = f"sqlite:///{tmp_path}/slab.db"
    assert invoke(runner, "add", write_plan(PLAN), db=db).exit_code == 0
    for out in (tmp_path / "nope" / "runs.csv", tmp_path / "nope" / "deeper" / "runs.parquet"):
        result = invoke(runner, "export", "runs", "--out", out, db=db)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines() == [f"error: cannot write {out}: there is no folder {out.parent} "
                                                      "(make it first)"], result.stderr
        assert not (tmp_path / "nope").exists()
    (tmp_path / "there").mkdir()
    assert invoke(runner, "export", "runs", "--out", tmp_path / "there" / "runs.csv", db=db).exit_code == 0


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_launch_refuses_a_gpu_memory_that_is_not_finite(runner, write_plan, tmp_path, monkeypatch, value):
    """--gpu-mem inf was taken, and --pack auto on a GPU then failed in a traceback after the plan was registered."""
    import sweep.launch

    def init_ray(opts):
        raise AssertionError("Ray started")

    monkeypatch.setattr(sweep.launch, "init_ray", init_ray)
    db = tmp_path / "slab.db"
    result = invoke(runner, "launch", write_plan(PLAN), "--cpu", "--gpu-mem", value, "--ckpt-dir", tmp_path / "ckpt",
                    db=f"sqlite:///{db}")
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.strip() == f"error: --gpu-mem must be a positive number of GiB, got {value}", result.stderr
    assert not db.exists() and not (tmp_path / "ckpt").exists()
