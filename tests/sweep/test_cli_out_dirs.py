"""--out of slab report and slab export: the folder or file named may be new, the folder it goes in must exist (as
for a SQLite file of add and launch), so that a misspelt parent path is refused in one line rather than made."""
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sweep.cli import app

SMOKE_DB = Path(__file__).parents[2] / "docs" / "smoke" / "smoke.db"


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "smoke.db"
    shutil.copy(SMOKE_DB, path)
    return f"sqlite:///{path}"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_refused_missing_parent(result, option, folder):
    """The command exited 2 with one line saying ``folder``'s parent is missing, and made neither."""
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: {option} {folder}: there is no folder {folder.parent} to write it in: make that first "
        f"(mkdir -p {folder.parent}), or check the path"]
    assert not folder.parent.exists()


def test_report_into_a_missing_parent_folder_is_refused_and_makes_nothing(db, tmp_path):
    # it had made tmp/reprots/smoke and the report in it: a misspelt parent became a new tree. A missing --out in a
    # folder that exists is made (make demo's demo-out/report; test_cli_analysis writes reports to tmp_path / "r").
    out = tmp_path / "reprots" / "smoke"
    result = invoke("--db", db, "report", "--plan", "smoke-h100", "--bootstrap", "0", "--out", out)
    assert_refused_missing_parent(result, "--out", out)


def test_export_into_a_missing_folder_is_refused_as_the_report_is(db, tmp_path):
    out = tmp_path / "exprots" / "runs.csv"
    result = invoke("--db", db, "export", "runs", "--out", out)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert f"there is no folder {out.parent}" in result.stderr and not out.parent.exists()


def test_bench_into_a_missing_parent_folder_is_refused_before_it_runs(tmp_path):
    # bench's output folders were made with every missing parent (mkdir -p), unlike report's and export's
    out = tmp_path / "bnech" / "train" / "t.csv"
    result = invoke("bench", "train", "--arch", "softmax", "--params", "1M", "--seq-len", "32", "--steps", "2",
                    "--out", out)
    assert_refused_missing_parent(result, "--out", out.parent)


@pytest.mark.parametrize("kind", ["pack", "spread", "dp"])
def test_a_bench_table_in_a_missing_parent_folder_is_refused_before_training(tmp_path, monkeypatch, kind):
    # their check let any depth of missing folders through: pack and spread then made the tree, and dp (whose folder
    # is made as the table is written) trained for minutes before refusing
    monkeypatch.chdir(tmp_path)
    plan = Path(__file__).parents[2] / "plans" / "pack-grid.csv"
    out = tmp_path / "bnech" / "dp" / "t.csv"
    result = invoke("bench", kind, plan, "--cpu" if kind != "pack" else "--steps", *([] if kind != "pack" else ["2"]),
                    "--csv", out)
    assert_refused_missing_parent(result, "--csv", out.parent)
