"""Usage errors (an unknown command or option, a missing argument, an out-of-range or malformed value) print as slab's
own errors do: one ``error:`` line on stderr, ending in the command's help, exit 2, nothing on stdout. They had printed
click's boxed panel under a usage line, over several lines."""

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import sweep.cli
from sweep.cli import app

#: Characters of rich's boxes and panels (the error panel drew them).
BOX = set("╭╮╰╯│─┌┐└┘├┤┬┴┼━┃")

#: (arguments, the start of the error line, the help it names at its end)
CASES = [
    pytest.param(["lanch"], "error: No such command 'lanch'. Did you mean 'launch'", "slab --help", id="unknown-command"),
    pytest.param(["bench", "trian"], "error: No such command 'trian'. Did you mean 'train'?", "slab bench --help",
                 id="unknown-subcommand"),
    pytest.param(["launch", "plans/x.csv", "--max-attempt", "2"], "error: No such option: --max-attempt",
                 "slab launch --help", id="misspelt-option"),
    pytest.param(["--bogus", "status"], "error: No such option: --bogus", "slab --help", id="unknown-root-option"),
    pytest.param(["launch"], "error: Missing argument 'files'.", "slab launch --help", id="missing-argument"),
    pytest.param(["plan", "plans/x.csv", "--max-runs", "0"], "error: Invalid value for '--max-runs':",
                 "slab plan --help", id="below-min"),
    pytest.param(["status", "--interval", "0"], "error: Invalid value for '--interval':", "slab status --help",
                 id="float-below-min"),
    pytest.param(["plan", "plans/x.csv", "--max-runs", "many"],
                 "error: Invalid value for '--max-runs':", "slab plan --help", id="bad-int"),
    pytest.param(["bench", "dp", "--gpus", "two"], "error: Invalid value for '--gpus':",
                 "slab bench dp --help", id="bad-int-in-subgroup"),
    pytest.param(["export", "runs", "--format", "xml"], "error: Invalid value for '--format':", "slab export --help",
                 id="bad-choice"),
]


def slab(*args: str) -> subprocess.CompletedProcess:
    """Run ``python -m sweep.cli`` (what the console script runs: sweep.cli.main) in a fresh process."""
    return subprocess.run([sys.executable, "-m", "sweep.cli", *args], capture_output=True, text=True, timeout=120)


def assert_one_error_line(code: int, stdout: str, stderr: str, start: str, help_: str) -> None:
    assert code == 2, stderr
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(start), lines[0]
    assert lines[0].endswith(f" (see '{help_}')"), lines[0]
    assert not BOX & set(stderr), stderr
    assert "Usage:" not in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("args,start,help_", CASES)
def test_usage_error_is_one_error_line_naming_the_help(args, start, help_):
    proc = slab(*args)
    assert_one_error_line(proc.returncode, proc.stdout, proc.stderr, start, help_)


@pytest.mark.parametrize("args,start,help_", CASES[:6])
def test_usage_error_is_one_line_under_clirunner_too(args, start, help_):
    """Typer's CliRunner runs the same group's main: the same line, and the help named as `slab`, not `root`."""
    result = CliRunner().invoke(app, args)
    assert_one_error_line(result.exit_code, result.stdout, result.stderr, start, help_)


def test_usage_error_through_the_console_script():
    script = Path(sys.executable).with_name("slab")
    if not script.is_file():
        pytest.skip("the slab console script is not installed beside this Python")
    proc = subprocess.run([str(script), "launch", "plans/x.csv", "--max-attempt", "2"], capture_output=True, text=True,
                          timeout=120)
    assert_one_error_line(proc.returncode, proc.stdout, proc.stderr, "error: No such option: --max-attempt",
                          "slab launch --help")


def test_db_after_the_command_still_moves_before_it_and_errors_name_the_command():
    proc = slab("status", "--db", "sqlite:///x.db", "--lmit", "3")
    assert_one_error_line(proc.returncode, proc.stdout, proc.stderr, "error: No such option: --lmit",
                          "slab status --help")


def test_help_is_unchanged():
    """--help still prints its rich panels on stdout with exit 0; `slab` and `slab bench` alone print help, exit 2."""
    proc = slab("launch", "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert "--max-attempts" in proc.stdout and "Example:" in proc.stdout and BOX & set(proc.stdout)
    for args in ([], ["bench"]):
        proc = slab(*args)
        assert proc.returncode == 2 and "Usage:" in proc.stdout and "error:" not in proc.stderr, args


def test_slab_s_own_errors_keep_their_line_without_a_hint():
    result = CliRunner().invoke(app, ["--db", "", "status"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: --db is empty: expected a database URL such as sqlite:///slab.db (leave --db out for that default, or "
        "set SLAB_DB)"]


@pytest.mark.parametrize("args, line", [
    (["report", "--out", ""], "error: --out is empty: give it a value"),
    (["runs", "--plan="], "error: --plan is empty: give it a value, or leave it out for its default"),
    (["fit", "--arch", "", "--method", "frontier"], "error: --arch is empty: give it a value, or leave it out for its default"),
    (["bench", "train", "--params", "3M", "--out", ""], "error: --out is empty: give it a value, or leave it out for its default"),
])
def test_an_option_given_an_empty_value_is_refused(tmp_path, monkeypatch, args, line):
    """`--out "$VAR"` with VAR unset: report wrote into the working directory, `--plan ""` listed every plan's runs and
    `fit --arch ""` fitted five archs as one, stored with an empty arch; each exited 0."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["--db", f"sqlite:///{tmp_path / 'none.db'}", *args])
    assert (result.exit_code, result.stdout, result.stderr.splitlines()) == (2, "", [line])
    assert list(tmp_path.iterdir()) == []


def test_an_empty_positional_argument_or_flag_is_not_an_empty_option(tmp_path):
    """Only an option's value is checked: --csv takes none, so the empty string after it is sql's statement."""
    url = f"sqlite:///{tmp_path / 'slab.db'}"
    sweep.cli.open_db(url, create=True).dispose()
    result = CliRunner().invoke(app, ["--db", url, "sql", "--csv", ""])
    assert result.exit_code == 2 and "needs a statement" in result.stderr


@pytest.mark.parametrize("args", [["export", "runs", "--out", "{long}.csv"], ["report", "--out", "{long}"],
                                  ["fit", "--csv", "{long}.csv"]])
def test_a_path_the_file_system_refuses_is_one_line_not_a_traceback(tmp_path, monkeypatch, args):
    """A file name over the file system's 255 bytes ended these commands in an OSError's traceback, exit 1."""
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'slab.db'}"
    sweep.cli.open_db(url, create=True).dispose()
    long = "a" * 300
    result = CliRunner().invoke(app, ["--db", url, *(a.format(long=long) for a in args)])
    assert result.exit_code == 2 and result.stdout == "", result.output
    assert result.stderr.splitlines() == [f"error: {long}{args[-1][6:]}: File name too long"]


def test_a_ctrl_c_before_a_command_handles_its_own_says_so_and_exits_130(tmp_path, monkeypatch):
    """A launch stopped in its first seconds (reading its plans, before Ray) exited 130 with nothing printed."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep.cli, "_plans", interrupted)
    result = CliRunner().invoke(app, ["--db", f"sqlite:///{tmp_path / 'slab.db'}", "launch", "--cpu", "p.csv"])
    assert (result.exit_code, result.stdout, result.stderr) == (130, "", "stopped by Ctrl-C\n")
    assert not (tmp_path / "slab.db").exists()


def _status_raising(monkeypatch, exc: BaseException) -> None:
    def raising(*args, **kwargs):
        raise exc

    monkeypatch.setattr(sweep.cli, "open_db", raising)


def test_other_click_errors_are_one_line_with_their_own_exit_code(monkeypatch, tmp_path):
    _status_raising(monkeypatch, sweep.cli.ClickException("the file is locked"))
    result = CliRunner().invoke(app, ["--db", f"sqlite:///{tmp_path}/x.db", "status"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.splitlines() == ["error: the file is locked"]


def test_ctrl_c_and_abort_exit_as_before(monkeypatch, tmp_path):
    """A Ctrl-C is typer's exit 130; an Abort (EOF at a prompt) prints 'Aborted!' with exit 1."""
    import typer

    db = f"sqlite:///{tmp_path}/x.db"
    _status_raising(monkeypatch, KeyboardInterrupt())
    assert CliRunner().invoke(app, ["--db", db, "status"]).exit_code == 130
    _status_raising(monkeypatch, typer.Abort())
    result = CliRunner().invoke(app, ["--db", db, "status"])
    assert result.exit_code == 1 and "Aborted" in result.stderr and "error:" not in result.stderr
    _status_raising(monkeypatch, typer.Exit(3))
    assert CliRunner().invoke(app, ["--db", db, "status"]).exit_code == 3
    _status_raising(monkeypatch, SystemExit(4))
    assert CliRunner().invoke(app, ["--db", db, "status"]).exit_code == 4


def test_usage_errors_are_raised_to_a_caller_that_asks_for_them():
    """With standalone_mode=False (a program calling the command), click's exception reaches the caller as before."""
    import typer.main

    with pytest.raises(sweep.cli.UsageError, match="No such command 'lanch'"):
        typer.main.get_command(app).main(["lanch"], prog_name="slab", standalone_mode=False)
