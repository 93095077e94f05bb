"""`make bench` cannot run in CI (its GPU lines need a GPU): parse each of its `slab` lines with the CLI instead, so a
misspelt flag or a removed option in the Makefile fails here rather than on someone's GPU machine."""

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import typer.main

from sweep.cli import app

ROOT = Path(__file__).resolve().parents[2]


def _bench_lines() -> list[list[str]]:
    """The recipe's `slab` commands as argument lists, for a host with a GPU and with four (every branch)."""
    out = subprocess.run(["make", "-s", "-n", "-o", "setup", "-o", ".venv/.stamp", "bench", "BIN=/bin", "HAS_GPU=1",
                          "GPUS=4"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [shlex.split(line)[1:] for line in out.splitlines() if line.startswith("/bin/slab ")]


def _parse(args: list[str]):
    """Resolve the subcommands and parse their options, as `slab` would, without running anything (the click API,
    which Typer 0.29 carries as its own copy: duck-typed here, not imported)."""
    command = typer.main.get_command(app)
    ctx = command.make_context("slab", list(args))
    while hasattr(command, "resolve_command"):  # a group
        # A group keeps its subcommand's name and arguments unparsed (click 8.2+ names the first list privately).
        pending = [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]
        name, command, rest = command.resolve_command(ctx, pending)
        ctx = command.make_context(name, rest, parent=ctx)
    return ctx


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_every_make_bench_line_parses():
    lines = _bench_lines()
    # CPU lines, the one-GPU lines and the several-GPU lines: the recipe as written has 12.
    assert len(lines) >= 12, lines
    for args in lines:
        ctx = _parse(args)
        assert ctx.command.name == args[1], args


def test_a_misspelt_flag_fails_to_parse():
    with pytest.raises(Exception, match="No such option"):
        _parse(["bench", "train", "--arch", "softmax", "--seq-lenn", "2048"])


def _recipe(*targets: str, **variables: str) -> list[str]:
    """The `slab` lines `make -n` would run for these targets."""
    args = ["make", "-s", "-n", "-o", "setup", "-o", ".venv/.stamp", *targets, "BIN=/bin",
            *(f"{k}={v}" for k, v in variables.items())]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.startswith("/bin/slab ")]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_bench_is_its_parts_in_order():
    parts = ["bench-cpu", "bench-kernels", "bench-train", "bench-length", "bench-pack", "bench-multi"]
    whole = _recipe("bench", HAS_GPU="1", GPUS="4")
    assert whole == [line for part in parts for line in _recipe(part, HAS_GPU="1", GPUS="4")]
    # one GPU: no several-GPU part; no GPU: only the CPU part
    assert _recipe("bench", HAS_GPU="1", GPUS="1") == whole[:-2]
    assert _recipe("bench", HAS_GPU="", GPUS="0") == _recipe("bench-cpu")


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("target,variables", [("bench-pack", {"HAS_GPU": "", "GPUS": "0"}),
                                              ("bench-multi", {"HAS_GPU": "1", "GPUS": "1"})])
def test_a_gpu_part_without_its_gpus_says_so(target, variables):
    done = subprocess.run(["make", "-o", "setup", "-o", ".venv/.stamp", target, "BIN=/bin",
                           *(f"{k}={v}" for k, v in variables.items())], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0
    assert f"make {target}: needs" in done.stderr
