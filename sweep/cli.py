"""The ``slab`` command: thin Typer commands over the library (plan, add, runs, status, sql, export, ...).

Exit codes: 0 success, 1 some runs failed, diverged or were lost (or a Ctrl-C left some unfinished), 2 bad input (plan, options, database, query), 130 a Ctrl-C while a launch's Ray started or stopped.
``slab --help`` and ``slab plan`` import neither torch nor ray: heavy imports live inside the commands.
"""

from __future__ import annotations

import errno
import json
import math
import shlex
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

try:  # a typer that carries its own click (typer._click, as 0.29 does) raises that one's errors, not click's
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # an older typer, over click
    from click.exceptions import ClickException, UsageError

from sqlalchemy.exc import DBAPIError

from db.engine import DatabaseError, explain, open_db, resolve_url
from sweep.plan import DEFAULT_MAX_RUNS, NO_PLAN, Plan, PlanError, cost_plans, load_plans, si

#: Whether a usage error is printed here as one line (a standalone run of the command, as `slab` and CliRunner run it)
#: or raised to the caller (``main(..., standalone_mode=False)``), as click does.
_ONE_LINE_ERRORS: ContextVar[bool] = ContextVar("one_line_errors", default=False)


def _help_of(ctx) -> str:
    """``slab bench dp --help``: the help of the command a usage error is about, named as slab whatever the program's
    name (``python -m sweep.cli``; CliRunner's ``root``)."""
    names = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(["slab", *reversed(names), "--help"])


@contextmanager
def _one_line_errors(ctx=None):
    """Print a click error as slab prints its own, ``error: message`` on one line of stderr, and exit with its code
    (2 for a usage error, which names the command's help at the end of the line)."""
    try:
        yield
    except (DatabaseError, DBAPIError, ClickException) as exc:
        # NoArgsIsHelpError (`slab` alone, `slab bench` alone) has printed the help already, and keeps its exit 2
        if not _ONE_LINE_ERRORS.get() or type(exc).__name__ == "NoArgsIsHelpError":
            raise
        if isinstance(exc, DatabaseError):  # raised past a command's own handlers (a damaged page found by a read)
            fail(str(exc))
        if isinstance(exc, DBAPIError):  # a database that opened and then failed: a damaged page, a lost server, a lock
            fail(f"the database failed: {explain(exc, resolve_url(((ctx and ctx.obj) or {}).get('db')))}")
        message = exc.format_message()
        if isinstance(exc, UsageError):
            message += f" (see '{_help_of(exc.ctx)}')"
        fail(message, code=exc.exit_code)
    except KeyboardInterrupt:
        # A Ctrl-C before a command's own handler (a launch's first seconds: imports, plans) had exited 130 in silence.
        if not _ONE_LINE_ERRORS.get():
            raise
        err.print("stopped by Ctrl-C", highlight=False, markup=False)
        raise typer.Exit(130) from None
    except OSError as exc:
        # A path no check of the command foresaw (a name too long for the file system, a folder it may not enter) had
        # ended in a traceback; a closed pipe is click's to end quietly.
        if not _ONE_LINE_ERRORS.get() or exc.errno == errno.EPIPE:
            raise
        fail(f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else f"{type(exc).__name__}: {exc}")


def _empty_option(command, args: list[str]) -> tuple[str, bool] | None:
    """The first option of the command line given an empty value (``--out ""``, ``--plan=``, as `--out "$VAR"` with
    VAR unset gives) and whether it is required, or None. Commands had read one as not given (``--plan ""`` listed
    every plan's runs, ``fit --arch ""`` fitted all archs as one) or as the working directory (``report --out ""``)."""
    i = 0
    while i < len(args) and args[i] != "--":
        name, eq, value = args[i].partition("=")
        # read by their attributes: typer's click may be its own copy (typer._click) or click itself
        option = next((p for p in command.params if p.param_type_name == "option" and name in p.opts), None)
        if option is not None and not option.is_flag and not option.count:
            if (value if eq else args[i + 1] if i + 1 < len(args) else None) == "":
                return name, option.required
            i += 1 if eq else 2
            continue
        if (sub := getattr(command, "commands", {}).get(args[i])) is not None:
            command = sub
        i += 1
    return None


class SlabGroup(TyperGroup):
    """slab's root command: click's usage errors (unknown command or option, missing argument, bad value) print as
    slab's own errors, one ``error:`` line naming the command's help, exit 2. They are caught as they leave parsing
    (make_context) and the subcommands (invoke), before typer would draw its boxed panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode: bool = True, **extra):
        """click's entry point, with one-line errors on where it handles them itself (standalone mode)."""
        token = _ONE_LINE_ERRORS.set(standalone_mode)
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=standalone_mode, **extra)
        finally:
            _ONE_LINE_ERRORS.reset(token)

    def make_context(self, info_name, args, parent=None, **extra):
        """Parse the arguments as click does; a usage error, or an option given an empty value, fails in one line."""
        with _one_line_errors():
            if _ONE_LINE_ERRORS.get() and (empty := _empty_option(self, list(args))) and empty[0] != "--db":  # its own below
                name, required = empty
                fail(f"{name} is empty: give it a value" + ("" if required else ", or leave it out for its default"))
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        """Run the subcommand as click does; its usage errors fail in one line."""
        with _one_line_errors(ctx):
            return super().invoke(ctx)


app = typer.Typer(
    cls=SlabGroup,
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks that print measured numbers (some need a GPU). Their default plans are relative "
                        "to the repository's root: run them from there. Tables and figures go to bench-out/ in the working "
                        "directory unless --out or --csv names a place (train writes them only with --out; analysis "
                        "and plan only print; make bench writes docs/bench/).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

# Piped output (CI logs, files) is never cut to a width: a table keeps its natural width and every digit (at rich's
# 80-column default, or any fixed width, slab compare's 18 columns printed as 'basel…' and '17000…'). Tables do not
# expand to the console's width, so this one does not pad them. No emoji: rich read ':x:' in a message (a column, a plan
# name) as an emoji code and printed '❌'.
PIPED_WIDTH = 100_000
out = Console(width=None if sys.stdout.isatty() else PIPED_WIDTH, emoji=False)
err = Console(stderr=True, width=None if sys.stderr.isatty() else PIPED_WIDTH, emoji=False)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` in red to stderr, on one line, and exit (2 = bad input)."""
    # A library's message may span lines (pandas' ends in a newline: a lone ')' had followed on a second line)
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


#: The most seconds --interval and --lease-timeout take: time.sleep and timedelta overflow on inf or 1e20 (a traceback).
MAX_SECONDS = 1e9


def _check_seconds(value: float, option: str, least: float) -> None:
    """Fail (exit 2) on a number of seconds typer's min lets through that cannot be waited (inf, 1e20)."""
    if not least <= value <= MAX_SECONDS:
        fail(f"{option} must be a number of seconds from {least:g} to {MAX_SECONDS:g}, got {value:g}")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            out.print(f"scalinglab {version('scalinglab')}")
        except PackageNotFoundError:
            out.print("scalinglab (not installed)")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    db: Optional[str] = typer.Option(
        None, "--db", envvar="SLAB_DB", help="Database URL: SQLite or PostgreSQL (default sqlite:///slab.db; e.g. postgresql+psycopg://USER:PW@HOST/DB)."
    ),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """scalinglab: plan, launch and analyse scaling-law sweeps of sequence-model architectures.

    Example: slab plan plans/demo.csv && slab add plans/demo.csv && slab status
    """
    if db == "":  # `--db "$VAR"` with VAR unset had read (and `add` created) ./slab.db; an empty SLAB_DB arrives as None
        fail("--db is empty: expected a database URL such as sqlite:///slab.db (leave --db out for that default, or set "
             "SLAB_DB)")
    ctx.obj = {"db": resolve_url(db), "db_named": bool(db)}  # typer fills db from SLAB_DB too


#: The database `make demo` writes (its DEMO_DB), which a plain `slab status` after it does not read.
DEMO_DB = Path("demo-out/slab.db")


def _engine(ctx: typer.Context, create: bool = False):
    from db.engine import DEFAULT_URL

    try:
        return open_db(ctx.obj["db"], create=create)
    except DatabaseError as exc:
        message = str(exc)
        if not ctx.obj.get("db_named") and ctx.obj["db"] == DEFAULT_URL and message.startswith("no database at"):
            # the default, sqlite:///slab.db in the working folder: say how to read another (make demo's, say)
            message += ", or name one with --db URL (or SLAB_DB)"
            if DEMO_DB.is_file():
                message += f"; make demo's is --db sqlite:///{DEMO_DB.as_posix()}"
        fail(message)


def _check_filters(engine, plan: str | None, arch: str | None = None, no_plan_ok: bool = False) -> None:
    """Exit 2 on a --plan the database does not hold or an --arch that does not exist, rather than show nothing.

    With no_plan_ok, --plan - (NO_PLAN) selects the runs that belong to no plan."""
    from db.queries import plan_names

    if plan and not (no_plan_ok and plan == NO_PLAN):
        known = plan_names(engine)
        if plan not in known:
            hint = f" ('{NO_PLAN}', runs in no plan, is taken by slab runs and slab status)" if plan == NO_PLAN else ""
            if (stem := Path(plan).stem) != plan and stem in known:  # its file's path, as slab add was given it
                hint = f" (a plan is named by its file's stem: --plan {stem})"
            fail(f"no plan named {plan!r} in the database; known: {', '.join(known) or 'none'}{hint}")
    _check_arch(arch)


def _check_arch(arch: str | None, option: str = "") -> None:
    """Exit 2 on an architecture that does not exist (Softmax, linear), rather than say it has no runs."""
    from models.config import ARCHS

    if arch and arch not in ARCHS:
        fail(f"{option + ': ' if option else ''}unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")


def _plans(files: list[Path], max_runs: int):
    """Load and check plans (exit 2 on any error, all of them printed); two files may not share a plan name."""
    try:
        plans = load_plans(files, max_runs=max_runs)
    except PlanError as exc:
        for issue in exc.issues:
            err.print(f"[bold red]error:[/] {escape(str(issue))}", highlight=False, soft_wrap=True)
        if exc.more:
            left = exc.total - len(exc.issues)
            err.print(f"and {_n(left, 'more error')} ({exc.total} in all); nothing was written", highlight=False)
        elif len(exc.issues) > 1:
            err.print(f"{len(exc.issues)} errors; nothing was written", highlight=False)
        raise typer.Exit(2)
    first: dict[str, tuple[Path, Plan]] = {}  # plan name -> (its file, resolved; the plan)
    for p in plans:
        # A plan is named by its file's stem: a second file of that name would take over the first one's runs.
        path = Path(p.path).resolve()
        seen, plan_seen = first.setdefault(p.name, (path, p))
        if seen != path:
            fail(f"{plan_seen.path} and {p.path} would both be plan {p.name!r} (a plan is named by its file name): "
                 "rename one")
    return [p for _, p in first.values()]  # a file named twice is one plan


def _refuse_missing_parent(folder: Path, what: str) -> None:
    """Fail (exit 2) where ``folder`` and the folder it would go in are both missing: a misspelt parent had become a
    new tree (slab export, and add and launch for a SQLite file, refuse a missing folder so)."""
    if not folder.exists() and not folder.parent.exists():
        fail(f"{what} {folder}: there is no folder {folder.parent} to write it in: make that first "
             f"(mkdir -p {shlex.quote(str(folder.parent))}), or check the path")


def _ensure_dir(folder: Path, what: str) -> None:
    """Make ``folder``, not its parents, now, or fail (exit 2) before minutes of benchmarking, not after."""
    _refuse_missing_parent(folder, what)
    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        fail(f"{what}: cannot create the folder {folder}: {exc.strerror or exc}")


def _count_option(text: str | None, option: str) -> float | None:
    """A count option such as 1.5B or 300M (None when not given); a bad one fails with exit 2."""
    from sweep.plan import CellError, parse_number

    if text is None:
        return None
    try:
        value = parse_number(text, "a count like 300M or 1.5B")
    except CellError as exc:
        fail(f"{option}: {exc}")
    if value <= 0:
        fail(f"{option}: expected a positive count, got {text!r}")
    return value


def _require_gpu(command: str) -> None:
    """Fail (exit 2) when there is no CUDA GPU for a GPU benchmark, before anything is written."""
    import torch

    if not torch.cuda.is_available():
        fail(f"slab bench {command} times GPU kernels and this machine has no CUDA GPU")


class Format(str, Enum):
    """How `runs` and `sql` print rows."""

    table = "table"
    csv = "csv"
    json = "json"


def _cell(value) -> str:
    """A table cell: blank for missing, floats to 6 significant digits (CSV and JSON keep them whole)."""
    import pandas as pd  # already loaded: the frame is pandas'

    # pandas' NA (a pending run's integers, kept whole as Int64) has no truth value, so it is named, not compared
    if value is None or value is pd.NA or value != value:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _table(frame, title: str | None, right: tuple[str, ...] = (), whole: tuple[str, ...] = (),
           widths: list[int] | None = None) -> Table:
    """A rich table of a frame, every cell as text; ``right`` columns aligned right, ``whole`` ones never wrapped
    (``widths``: each column's fixed width, where they are known to be those rich would choose)."""
    table = Table(title=escape(title) if title else None, show_lines=False)  # a file name such as p[v2].csv as it is
    for i, col in enumerate(frame.columns):
        # fold, not '…': squeezed by a narrow terminal, a run id or a number wraps whole onto a second line
        table.add_column(Text(str(col)), overflow="fold", justify="right" if col in right else "left", no_wrap=col in whole,
                         width=None if widths is None else widths[i])
    for row in frame.itertuples(index=False):  # Text: data such as '[b]x' is shown as it is, not as markup
        table.add_row(*(Text(_cell(v)) for v in row))
    return table


#: What `_table`'s rich table adds to its cells' text: a space either side of each cell (padding (0, 1)), and per
#: row a border at both edges and one between columns (the default box).
CELL_PAD = 2


def _table_width(widths: list[int]) -> int:
    """The width of a `_table` whose columns' cells are ``widths`` wide (their text, without padding)."""
    return sum(widths) + CELL_PAD * len(widths) + len(widths) + 1


def _text_widths(texts, free: tuple[str, int] | None = None) -> tuple[list[int], list[int]]:
    """Per column of a frame of cell texts, with its header: the longest word and the longest line, in terminal
    cells, which rich measures as a column's narrowest (no word cut) and natural widths; the ``free`` column's
    narrowest is its header's longest word or, where it holds any text, free[1]."""
    from rich.cells import cell_len
    from rich.control import strip_control_codes

    def measure(text: str) -> tuple[int, int]:
        text = strip_control_codes(text)  # as rich's Text keeps it
        lines = text.splitlines()
        longest = max(map(cell_len, lines)) if lines else 0
        words = text.split()
        return (max(map(cell_len, words)) if words else longest), longest

    narrowest, natural = [], []
    for i, col in enumerate(texts.columns):
        # a column of thousands of rows holds few distinct texts (an arch, a status), each measured once
        distinct = texts.iloc[:, i].unique()
        cells = [measure(t) for t in distinct]
        head = measure(str(col))
        if free is not None and col == free[0]:
            narrowest.append(max(head[0], free[1] if any(t != "" for t in distinct) else 0))
        else:
            narrowest.append(max(lo for lo, _ in [head, *cells]))
        natural.append(max(hi for _, hi in [head, *cells]))
    return narrowest, natural


def _print_table(frame, title: str | None = None, optional: tuple[str, ...] = (), free: tuple[str, int] | None = None,
                 hint: str = "a wider terminal shows them", **layout) -> None:
    """Print ``_table(frame, title, **layout)``; a terminal too narrow for its words loses the ``optional`` columns,
    in that order, until they fit (``free``: a text column and the width it keeps), which stderr then names."""
    import pandas as pd

    # At 80 columns rich had cut each of slab runs' 14 columns to two letters and '…'. The widths are worked out once
    # here, as rich measures them: letting rich measure the whole table for every column it might leave out, then
    # again to print it, took 15 s for 3,780 runs in a 120-column terminal.
    texts = pd.DataFrame([[_cell(v) for v in row] for row in frame.itertuples(index=False)], columns=frame.columns,
                         dtype=object)
    narrowest, natural = _text_widths(texts, free)
    keep = list(range(len(texts.columns)))
    left_out = []
    for col in optional:
        if _table_width([narrowest[i] for i in keep]) <= out.width:
            break
        keep.remove(list(texts.columns).index(col))
        left_out.append(col)
    widths = [natural[i] for i in keep]
    # Where the table's natural width fits, it is the width rich gives each column: fixed here, rich need not
    # measure every cell again. A narrower terminal's squeeze is left to rich.
    table = _table(texts.iloc[:, keep], title, widths=widths if _table_width(widths) <= out.width else None, **layout)
    out.print(table)
    if left_out:
        err.print(f"note: left out to fit {out.width} columns: {', '.join(left_out)} ({hint})", highlight=False,
                  markup=False)


def _emit(frame, fmt: Format, title: str | None = None, **fit) -> None:
    """Print a frame as CSV, JSON records or a rich table (``fit``: how `_print_table` narrows it for a terminal)."""
    if fmt is Format.csv:
        sys.stdout.write(frame.to_csv(index=False))
    elif fmt is Format.json:
        sys.stdout.write(_json_records(frame) + "\n")
    else:
        _print_table(frame, title, **fit)


def _json_records(frame) -> str:
    """A frame as JSON records, as pandas writes them (ISO dates, null for NaN and infinities), but every float whole:
    pandas' to_json keeps 10 significant digits (an lr of 0.000123456789012345 had read 0.0001234568), CSV all."""
    records = json.loads(frame.to_json(orient="records", date_format="iso", date_unit="us"))
    keys = list(records[0]) if records else []
    for j, key in enumerate(keys):
        column = frame.iloc[:, j]
        if column.dtype.kind not in "fO":  # only float and mixed columns hold floats
            continue
        for record, value in zip(records, column.tolist()):
            if isinstance(value, float) and math.isfinite(value):
                record[key] = value
    return json.dumps(records, separators=(",", ":"), allow_nan=False)


def _n(count: int, noun: str) -> str:
    """``1 run``, ``2 runs``: a count with its noun."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _fmt(csv_: bool, json_: bool) -> Format:
    if csv_ and json_:
        fail("give --csv or --json, not both")
    return Format.csv if csv_ else Format.json if json_ else Format.table


@app.command()
def plan(
    files: Optional[list[Path]] = typer.Argument(None, help="Plan files (CSV, or XLSX with openpyxl).", show_default=False),
    mfu: float = typer.Option(0.3, help="Model FLOPs utilisation assumed for the GPU-hours estimate."),
    gpu_tflops: float = typer.Option(989.0, help="Peak dense bf16 TFLOP/s of one GPU (H100 SXM: 989)."),
    max_runs: int = typer.Option(DEFAULT_MAX_RUNS, min=1, help="Refuse plans that expand to more runs than this."),
    as_json: bool = typer.Option(False, "--json", help="Print runs and totals as JSON."),
    columns: bool = typer.Option(False, "--columns", help="List every plan column, its default and meaning, and the derived names expressions may use; no files needed."),
) -> None:
    """Dry run: expand plans into runs and price them (FLOPs, GPU-hours = FLOPs / (MFU x peak)). Writes nothing.

    A plan is a CSV with one row per block of runs; a cell holds a value, a list (64|128), a range (64..1024*2) or an expression (=20*nonembed_params). Columns: slab plan --columns.

    Example: slab plan plans/minimax01.csv --mfu 0.4
    """
    from sweep.plan import column_reference

    if columns:
        if files:  # it had printed the list and never read them: a misspelt or broken plan passed unseen
            fail("--columns lists the columns every plan may have and reads no plan: give it without plan files")
        ref = column_reference()
        if as_json:
            sys.stdout.write(json.dumps(ref) + "\n")
        else:
            import pandas as pd

            _emit(pd.DataFrame(ref), Format.table, title="plan columns (and derived names)")
        return
    if not files:
        fail("give one or more plan files (or --columns for the columns a plan may have)")
    plans = _plans(files, max_runs)
    try:
        cost = cost_plans(plans, mfu=mfu, gpu_tflops=gpu_tflops)
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        runs = []
        seen = set()
        for p in plans:
            for r in p.runs:
                if r.spec.run_id not in seen:
                    seen.add(r.spec.run_id)
                    runs.append({"run_id": r.spec.run_id, "plan": p.name, "row": r.row, "name": r.name, **r.spec.derived(), "spec": r.spec.to_dict()})
        totals = {"runs": cost.runs, "flops": cost.flops, "gpu_hours": cost.gpu_hours, "mfu": mfu, "gpu_tflops": gpu_tflops}
        repeats = [{"plan": p, "row": r, "repeated": n, "runs": of} for p, r, n, of in cost.repeats]
        warmup_only = [{"plan": p, "row": r, "runs": n} for p, r, n in cost.warmup_only]
        uneven = [{"plan": p, "row": r, "runs": n} for p, r, n in cost.uneven_hybrid]
        total_read = [{"plan": p, "row": r, "runs": n, "embedding_share": share} for p, r, n, share in cost.total_params_read]
        rounded = [{"plan": p, "row": r, "runs": n, "max_ratio": ratio} for p, r, n, ratio in cost.rounded_up]
        sys.stdout.write(json.dumps({"totals": totals, "blocks": [asdict(b) for b in cost.blocks], "runs": runs,
                                     "repeats": repeats, "warmup_only": warmup_only, "uneven_hybrid": uneven,
                                     "total_params_read": total_read, "rounded_up": rounded}) + "\n")
        return
    import pandas as pd

    blocks = pd.DataFrame(
        [(f"{b.plan}:{b.row}", b.arch, b.shape, si(b.params), si(b.nonembed_params),
          si(b.tokens_min) if b.tokens_min == b.tokens_max else f"{si(b.tokens_min)}-{si(b.tokens_max)}", si(b.flops), str(b.runs))
         for b in cost.blocks], columns=["plan:row", "arch", "shape", "params", "non-emb", "tokens", "FLOPs", "runs"])
    # plan:row, which the notes below name, is never wrapped (at 80 columns it had read 'minimax0…'); a long hybrid pattern
    # in shape wraps instead
    _print_table(blocks, ", ".join(str(f) for f in files), optional=("non-emb", "params"), free=("shape", 10),
                 right=("params", "non-emb", "tokens", "FLOPs", "runs"), whole=("plan:row", "arch"),
                 hint="slab plan --json gives every figure")
    for plan_name, row, n, of in cost.repeats:
        # Such a row is missing from the table, or shows fewer runs than it expands to.
        which = (f"its {_n(of, 'run')} {'is' if of == 1 else 'are all'}" if n == of
                 else f"{n} of its {of} runs {'is' if n == 1 else 'are'}")
        out.print(f"note: {plan_name}:{row}: {which} given before (each run is trained once)", highlight=False, markup=False)
    for plan_name, row, n in cost.warmup_only:
        out.print(f"note: {plan_name}:{row}: {_n(n, 'run')} warm{'s' if n == 1 else ''} up for all {'its' if n == 1 else 'their'} steps, so the "
                  "learning rate never decays (give a smaller warmup or more tokens)", highlight=False, markup=False)
    for plan_name, row, n in cost.uneven_hybrid:
        out.print(f"note: {plan_name}:{row}: {_n(n, 'hybrid run')} {'has' if n == 1 else 'have'} n_layers that are not whole periods of "
                  "the hybrid pattern, so the softmax share differs from the pattern's and lightning layers follow the last "
                  "softmax one (give n_layers a multiple of the period, or params)", highlight=False, markup=False)
    for plan_name, row, n, ratio in cost.rounded_up:
        out.print(f"note: {plan_name}:{row}: {_n(n, 'run')} train{'s' if n == 1 else ''} up to {ratio:.3g}x {'its' if n == 1 else 'their'} "
                  "token budget, since a run takes whole steps of batch_size x seq_len tokens (the tokens column shows what "
                  "is trained; give more tokens or a smaller batch)", highlight=False, markup=False)
    for plan_name, row, n, share in cost.total_params_read:
        out.print(f"note: {plan_name}:{row}: expressions of {_n(n, 'run')} read params, the total count, of which "
                  f"embeddings are up to {share:.0%}; the params column is a non-embedding target (write nonembed_params "
                  "for the count without embeddings)", highlight=False, markup=False)
    out.print(
        f"[bold]{cost.runs:,}[/] {'run' if cost.runs == 1 else 'runs'}, [bold]{cost.flops:.3e}[/] FLOPs, about [bold]{cost.gpu_hours:,.3g}[/] GPU-hours "
        f"at {mfu:.0%} MFU of {gpu_tflops:g} TFLOP/s"
    )


@app.command()
def add(
    ctx: typer.Context,
    files: list[Path] = typer.Argument(..., help="Plan files to register.", show_default=False),
    max_runs: int = typer.Option(DEFAULT_MAX_RUNS, min=1, help="Refuse plans that expand to more runs than this."),
) -> None:
    """Register plans and their runs as pending (idempotent: known runs are left as they are).

    Example: slab --db sqlite:///study.db add plans/demo.csv plans/hybrid-ratio.csv
    """
    from sweep.registry import add_plans, moved_warning

    plans = _plans(files, max_runs)  # validate everything before touching the database
    engine = _engine(ctx, create=True)
    try:
        added = add_plans(engine, plans)
    except DatabaseError as exc:
        fail(str(exc))
    for r in added:
        why = f"registered before from {r.moved_from}" if r.moved_from else "the file changed"
        gone = f"; {_n(r.dropped, 'run')} of its last registration no longer in it ({why})" if r.dropped else ""
        out.print(f"{escape(r.plan)}: [bold]{r.new}[/] new {'run' if r.new == 1 else 'runs'}, {r.known} already known"
                  f"{escape(gone)}")
        if warning := moved_warning(r):
            err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)


@app.command()
def runs(
    ctx: typer.Context,
    plan: Optional[str] = typer.Option(None, help="Only runs of this plan (its name: the file stem); '-' for runs in no plan."),
    arch: Optional[str] = typer.Option(None, help="Only this architecture."),
    status: Optional[str] = typer.Option(None, help="Only runs in this status: pending, running, done, failed, diverged."),
    csv_: bool = typer.Option(False, "--csv", help="Print CSV."),
    json_: bool = typer.Option(False, "--json", help="Print JSON records."),
) -> None:
    """List runs with their state and results.

    Example: slab runs --status failed   (the error column says why)
    """
    from db.queries import runs_frame
    from db.schema import RUN_STATUSES

    if status and status not in RUN_STATUSES:
        fail(f"unknown status {status!r}; expected one of {', '.join(RUN_STATUSES)}")
    fmt = _fmt(csv_, json_)
    engine = _engine(ctx)
    _check_filters(engine, plan, arch, no_plan_ok=True)
    frame = _whole_numbers(runs_frame(engine, plan=plan, arch=arch, status=status))
    if fmt is Format.table:
        cols = ["run_id", "arch", "d_model", "n_layers", "hybrid", "params", "tokens", "status", "attempts", "step", "final_loss", "val_loss", "error", "plan"]
        frame = frame[cols].copy()
        frame["error"] = frame["error"].map(_last_line)
        for c in ("final_loss", "val_loss"):
            frame[c] = frame[c].map(lambda v: f"{v:.4f}" if v == v and v is not None else "")
        for c in ("params", "tokens"):  # 1.33G, as slab plan shows them (CSV and JSON keep every digit)
            frame[c] = frame[c].map(lambda v: si(float(v)) if _cell(v) else "")
    title = _n(len(frame), "run")
    optional = ("n_layers", "d_model", "attempts", "final_loss", "hybrid", "plan", "step", "tokens", "params")
    if fmt is Format.table:
        frame = _table_rows(frame, "runs")
        # At 60 columns an error column with nothing in it had stayed while val_loss folded ('1.840' over '3').
        optional = ("error", *optional) if (frame["error"] == "").all() else (*optional, "error")
    _emit(frame, fmt, title=title, free=("error", 14), whole=("run_id",),
          hint="slab runs --csv or --json prints every column", optional=optional)


def _last_line(error):
    """A run's error as a table shows it: its last line, the exception, up to 80 characters ('…' where it goes on)."""
    if not isinstance(error, str) or not error.strip():
        return ""
    line = error.strip().splitlines()[-1]
    return line if len(line) <= 80 else line[:79] + "…"


def _whole_numbers(frame):
    """Integer columns of the runs table and spec as pandas' nullable Int64, so a null among them does not print
    the others as floats (step 3.0) in CSV and JSON."""
    from sqlalchemy import Integer

    from db.schema import Run
    from sweep.spec import RunSpec

    ints = {c.name for c in Run.__table__.columns if isinstance(c.type, Integer)}
    ints |= {name for name, f in RunSpec.__dataclass_fields__.items() if f.type == "int"}
    ints |= {f"spec_{name}" for name in ints}  # a spec field whose name a runs column takes (spec_tokens)
    for col in ints & set(frame.columns):
        try:
            frame[col] = frame[col].astype("Int64")
        except (TypeError, ValueError):  # a stored value that is not whole: leave the column as it is
            pass
    return frame


@app.command()
def status(
    ctx: typer.Context,
    plan: Optional[str] = typer.Option(None, help="Only this plan; '-' for runs in no plan."),
    watch: bool = typer.Option(False, "--watch", help="Refresh every --interval seconds until all runs are finished (Ctrl-C to stop)."),
    interval: float = typer.Option(2.0, min=0.1, help="Seconds between refreshes with --watch."),
) -> None:
    """Counts of runs per plan and status.

    Example: slab status --watch   (follow a launch from another terminal)
    """
    from sweep.progress import status_table, watch_status

    _check_seconds(interval, "--interval", 0.1)
    engine = _engine(ctx)
    _check_filters(engine, plan, no_plan_ok=True)
    if watch:
        watch_status(engine, out, plan=plan, interval=interval)
    else:
        out.print(status_table(engine, plan=plan, width=out.width))


@app.command()
def sql(
    ctx: typer.Context,
    query: str = typer.Argument(..., help="One SELECT, WITH, VALUES or EXPLAIN statement (SHOW and TABLE on PostgreSQL).", show_default=False),
    csv_: bool = typer.Option(False, "--csv", help="Print CSV."),
    json_: bool = typer.Option(False, "--json", help="Print JSON records."),
) -> None:
    """Run one read-only SQL query; a write, a second statement or a COPY is refused (exit 2).

    This guards against slips, not a hostile user (a SELECT can still call a server's functions): give people you do not trust a read-only database role.

    The runs table holds a run's spec (d_model, n_layers, seq_len, lr, data, ...) as JSON in its spec column, where slab runs spreads it into columns: on SQLite read it with json_extract(spec, '$.d_model').

    Example: slab sql "select arch, min(val_loss) from runs where status='done' group by arch"
    Example: slab sql "select json_extract(spec, '$.d_model') as d_model, val_loss from runs"
    """
    from db.queries import QueryError, run_sql

    fmt = _fmt(csv_, json_)
    try:
        frame = run_sql(_engine(ctx), query)
    except QueryError as exc:
        fail(str(exc))
    if fmt is not Format.table:
        _emit(frame, fmt)
        return
    # Columns a terminal cannot hold go from the right (the first stays): `select * from runs` had drawn 27 columns of
    # one or two letters, headers and cells folded beyond reading. Names repeated in the query are not narrowed.
    named = list(frame.columns)
    optional = tuple(reversed(named[1:])) if len(set(named)) == len(named) else ()
    _print_table(_table_rows(frame, "rows"), optional=optional, hint="--csv or --json prints every column, or select fewer")


#: The most rows, and cells, a table draws: rich draws a few thousand cells a second (`slab sql` of 600,000 rows had
#: taken over two minutes and 4 GB; `slab runs` of 12,000 runs 72 s); --csv and --json print all.
TABLE_ROWS, TABLE_CELLS = 1_000, 10_000


def _table_rows(frame, noun: str):
    """The first rows of a frame that a table draws quickly, saying on stderr how many are left out and how to get all."""
    rows = min(TABLE_ROWS, max(100, TABLE_CELLS // max(1, len(frame.columns))))
    if len(frame) <= rows:
        return frame
    err.print(f"note: showing the first {rows:,} of {len(frame):,} {noun}; --csv or --json prints them all",
              highlight=False, markup=False)
    return frame.head(rows)


class ExportFormat(str, Enum):
    """File formats of `slab export`."""

    csv = "csv"
    parquet = "parquet"


@app.command()
def export(
    ctx: typer.Context,
    table: str = typer.Argument(..., help="plans, runs, plan_runs, metrics, evals, fits or meta (the schema version).", show_default=False),
    format: Optional[ExportFormat] = typer.Option(None, "--format", help="csv or parquet (needs pyarrow); default: from the --out suffix (.parquet or .pq: parquet; .json is refused; any other: csv).", show_default=False),
    out_path: Path = typer.Option(..., "--out", help="File to write, in a folder that exists.", show_default=False),
) -> None:
    """Export a whole table to CSV or Parquet.

    Example: slab export metrics --format parquet --out metrics.parquet
    """
    from db.queries import QueryError, export_table

    if str(out_path) == "-":  # it had written a file named '-'
        fail(f"--out -: slab export writes a file; for the table on stdout: slab sql \"select * from {table}\" --csv")
    try:
        n = export_table(_engine(ctx), table, format.value if format else None, out_path)
    except QueryError as exc:
        fail(str(exc))
    out.print(f"wrote {_n(n, 'row')} of {table} to {out_path}", markup=False)


@app.command()
def launch(
    ctx: typer.Context,
    files: list[Path] = typer.Argument(..., help="Plan files to register and train.", show_default=False),
    address: Optional[str] = typer.Option(
        None, help="Ray cluster to join: 'auto' (RAY_ADDRESS, or a Ray already running on this host: the cluster `ray start` "
        "made, or another process's own local Ray, such as another slab launch's), the head's "
        "HOST:PORT (its GCS, port 6379 by default), or ray://HOST:PORT (Ray Client: needs the ray\\[client] extra). "
        "Default: start a local Ray in this process."
    ),
    ckpt_dir: Path = typer.Option(
        Path(".slab/ckpt"), help="Checkpoints go to CKPT_DIR/<run_id>/ (a relative path is relative to the working folder: "
        "relaunch from the same one to resume). On a cluster this must be a path every node shares."
    ),
    max_attempts: int = typer.Option(3, min=1, help="Attempts per run in this launch before it stays failed."),
    cpu: bool = typer.Option(False, "--cpu", help="Train on CPU (no GPU asked for)."),
    where: Optional[str] = typer.Option(None, help='Only runs that match, e.g. arch=lightning,tokens=12k (the plan\'s column names and its number forms, or the derived params, flops, flops_per_token).'),
    limit: Optional[int] = typer.Option(
        None, help="Train at most this many of the selected runs (1 or more); runs another live launcher holds go last."
    ),
    cpus_per_run: int = typer.Option(1, min=1, help="CPU cores each run takes (its torch threads)."),
    lease_timeout: float = typer.Option(
        120.0, min=5.0, help="Seconds without a heartbeat after which this launcher's runs count as abandoned: another "
        "launch takes them and slab status says so (both follow the lease each run's launcher recorded). It heartbeats "
        "every 10 s, or every quarter of a lease under 40 s."),
    ckpt_every: int = typer.Option(1000, min=1, help="Checkpoint every this many steps (and every 10 minutes)."),
    max_runs: int = typer.Option(DEFAULT_MAX_RUNS, min=1, help="Refuse plans that expand to more runs than this."),
    pack: str = typer.Option(
        "auto", help="Train same-shape runs (differing only in seed, lr, warmup, schedule, decay, clipping) as one "
        "stacked model per task: 'auto' packs on GPUs by size and memory, a number N packs up to N (CPU too), 'off'.",
    ),
    gpu_mem: float = typer.Option(80.0, help="GiB of memory per GPU, for --pack auto."),
    num_gpus: Optional[int] = typer.Option(None, min=1, help="GPUs the local Ray may use, the first ones CUDA lists (1 or more; default: all). Not with --cpu or --address."),
    fsdp_min_params: Optional[str] = typer.Option(
        None, help="Data-parallel runs of at least this many parameters (e.g. 1B) shard with FSDP instead of DDP. "
        "Default: those whose training state (16 bytes a parameter) would fill half a GPU's memory.",
    ),
    restart: bool = typer.Option(
        False, "--restart", help="Train from step 0 the runs whose recorded checkpoints are not under --ckpt-dir (without "
        "it the launch refuses them; relaunch with the --ckpt-dir they were trained with to resume them).",
    ),
) -> None:
    """Register plans and train every run that is not done, one Ray task per run or per pack.

    Runs share GPUs by their plan's gpus column (0.25 = four per GPU); small same-shape runs also train together as one stacked model (--pack), so a GPU takes one large step instead of many small ones.

    Runs start largest first. On a host of several GPUs each goes to an idle GPU, else to the least loaded one with room; a whole number above 1 in gpus trains a run data-parallel (DDP, or FSDP when large).

    A second launch of the same plan trains nothing twice; after a crash, a relaunch resumes runs from their checkpoints. Ctrl-C once (or a SIGTERM, as a scheduler sends) stops starting runs and lets running ones checkpoint; twice cancels at once. Exit 0 when every run is done, 1 when any failed, diverged (in this launch or an earlier one) or was lost to another launcher or a Ctrl-C left some unfinished, 2 on bad input, 130 on a Ctrl-C while Ray starts or stops.

    Example: slab launch plans/demo.csv --cpu
    """
    from sweep.launch import LaunchError, LaunchOptions, launch as run_launch, parse_where
    from sweep.progress import LaunchView

    from sweep.pack import parse_pack

    try:
        pack_size = parse_pack(pack)
    except ValueError as exc:
        fail(str(exc))
    if not 0 < gpu_mem < math.inf:  # typer's min cannot exclude 0, nor inf: packs were sized against them (NaN failed)
        fail(f"--gpu-mem must be a positive number of GiB, got {gpu_mem:g}")
    _check_seconds(lease_timeout, "--lease-timeout", 5.0)
    fsdp_from = _count_option(fsdp_min_params, "--fsdp-min-params")
    plans = _plans(files, max_runs)
    try:
        opts = LaunchOptions(
            db_url=ctx.obj["db"], address=address, ckpt_dir=ckpt_dir, max_attempts=max_attempts, cpu=cpu,
            where=parse_where(where), limit=limit, cpus_per_run=cpus_per_run, lease_timeout_s=lease_timeout,
            ckpt_every_steps=ckpt_every, pack=pack_size, gpu_mem_gib=gpu_mem, num_gpus=num_gpus,
            fsdp_min_params=fsdp_from, restart=restart,
        )
        result = run_launch(plans, opts, LaunchView(out))
    except (LaunchError, DatabaseError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:  # outside the driver's loop, which handles its own: Ray starting or stopping
        err.print("stopped by Ctrl-C while Ray started or stopped: runs not started stay pending, and a relaunch "
                  "trains them", highlight=False, markup=False)
        raise typer.Exit(130) from None
    if not result.rows:  # nothing was trained, and the launch said why ("nothing to train: all 6 selected runs are done")
        if result.diverged_before:  # as the launch that saw them diverge: `slab launch P && slab report` stops here too
            raise typer.Exit(1)
        return
    import pandas as pd

    frame = pd.DataFrame(result.rows)[["run_id", "name", "arch", "status", "attempts", "step", "final_loss", "val_loss", "wall_s", "error"]]
    frame["error"] = frame["error"].map(_last_line)
    for c in ("final_loss", "val_loss", "wall_s"):
        frame[c] = frame[c].map(lambda v: f"{v:.4g}" if v is not None and v == v else "")
    _emit(frame, Format.table, title="launch summary", free=("error", 14), whole=("run_id",),
          hint="slab runs --csv prints every column", optional=("attempts", "final_loss", "wall_s", "step", "name"))
    done = sum(r["status"] == "done" for r in result.rows)
    bad = sum(r["status"] in ("failed", "diverged") for r in result.rows)
    lost = sum(r["status"] == "lost" for r in result.rows)
    out.print(f"{done}/{len(result.rows)} runs done, {bad} failed or diverged"
              + (f", {lost} lost to another launcher" if lost else "") + (" (stopped early)" if result.interrupted else ""))
    if bad or lost or (result.interrupted and done < len(result.rows)):
        raise typer.Exit(1)


class Method(str, Enum):
    """The scaling-law fits of `slab fit --method`."""

    frontier = "frontier"
    power = "power"
    one = "1"
    two = "2"
    three = "3"


#: --edges of compare and report (fit's says how it applies to one law).
EDGES_HELP = ("Frontier laws from training curves: drop the bins whose best run is the smallest size there, keep them (the "
              "runs' envelope), or auto: drop unless some arch's frontier is then not identified.")


def _check_edges(edges: str | None) -> None:
    """Fail (exit 2) on an --edges value other than auto, drop or keep (None: the command's default)."""
    if edges is not None and edges not in ("auto", "drop", "keep"):
        fail(f"--edges must be auto, drop or keep, got {edges!r}")


def _warn_few_runs(runs, bootstrap: int) -> None:
    """Warn on stderr for each arch whose bootstrap would resample fewer than MIN_BOOTSTRAP_RUNS runs: its
    intervals are unknown (compare and report show none)."""
    from analysis.compare import MIN_BOOTSTRAP_RUNS

    if not bootstrap:
        return
    for arch_name, n in runs["arch"].value_counts().sort_index().items():
        if n < MIN_BOOTSTRAP_RUNS:
            err.print(f"[yellow]warning:[/] the intervals resample runs, and {escape(str(arch_name))} has "
                      f"{_n(n, 'run')}: there is little to resample (at least {MIN_BOOTSTRAP_RUNS} are needed), so its "
                      "intervals are unknown", highlight=False)


def _writable_dir(folder: Path, what: str) -> None:
    """Fail (exit 2) before any work when ``folder`` could not be made (in a folder that exists) or written in; makes
    nothing itself."""
    import os

    _refuse_missing_parent(folder, what)
    existing = folder if folder.exists() else folder.parent
    if not existing.is_dir():
        fail(f"{what} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"{what} {folder}: cannot write in {existing}")


def _progress_bar(description: str):
    """A rich progress bar and the ``progress(done, total)`` callback the fits call."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(description), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(),
                   console=err, transient=True, disable=not err.is_terminal)
    task = bar.add_task(description, total=None)

    def progress(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return bar, progress


def _analysis_inputs(ctx: typer.Context, plan: str | None, arch: str | None):
    from db.queries import evals_frame, metrics_frame, runs_frame

    engine = _engine(ctx)
    _check_filters(engine, plan, arch)
    runs = runs_frame(engine, plan=plan, arch=arch, status="done")
    if runs.empty:
        fail("no finished runs to analyse" + (f" in plan {plan}" if plan else "") + (f" for arch {arch}" if arch else "") + "; launch some with `slab launch PLAN`")
    ids = runs["run_id"].tolist()
    return engine, runs, metrics_frame(engine, ids), evals_frame(engine, ids)


@app.command()
def fit(
    ctx: typer.Context,
    plan: Optional[str] = typer.Option(None, help="Only runs of this plan."),
    arch: Optional[str] = typer.Option(None, help="Only this architecture; needed where the runs hold several (one law over several would mix them; slab compare fits each)."),
    method: Method = typer.Option(Method.frontier, help="frontier: L = E + A C^-alpha; power: L = A C^-alpha; 1, 2, 3: Chinchilla approaches."),
    bootstrap: int = typer.Option(200, min=0, help="Bootstrap resamples of runs for the intervals (as compare and report)."),
    seed: int = typer.Option(0, min=0, help="Seed of the bootstrap."),
    csv_file: Optional[Path] = typer.Option(None, "--csv", help="Fit an external CSV of params, tokens, loss[, flops] instead of the database."),
    params_col: Optional[str] = typer.Option(None, help="With --csv: the parameter-count column \\[default: params]."),
    tokens_col: Optional[str] = typer.Option(None, help="With --csv: the token column \\[default: tokens, where the file has it, else flops / 6N]."),
    loss_col: Optional[str] = typer.Option(None, help="With --csv: the loss column \\[default: loss]."),
    flops_col: Optional[str] = typer.Option(None, help="With --csv: the FLOPs column \\[default: flops, where the file has it, else 6ND]."),
    n_params: str = typer.Option("nonembed_params", help="From the database: fit on nonembed_params or params (total)."),
    edges: Optional[str] = typer.Option(None, help="frontier/power from training curves: drop the compute bins whose best run is the smallest size there (the compute-optimal frontier), keep them (the runs' envelope, an upper bound), or auto (as compare and report): drop, unless the frontier is then not identified. \\[default: auto]"),
    as_json: bool = typer.Option(False, "--json", help="Print the fit as JSON."),
) -> None:
    """Fit a scaling law with bootstrap intervals; from the database the fit is stored in the fits table.

    Intervals resting on fewer than 5 runs are unknown (as in slab report): printed as unknown, null in --json. On a database this may not write (a read-only file) the fit is printed all the same and a warning says it was not stored: exit 0, and --json has no fit_id.

    Example: slab fit --plan isoflop --arch softmax --method 2 --bootstrap 500
    Example: slab fit --csv chinchilla.csv --params-col "Model Size" --flops-col "Training FLOP" --method 3
    """
    from analysis.compare import arch_seed, fit_on_runs, unknown_on_few_runs
    from analysis.fits import FitError, fit_approach1, fit_approach2, fit_approach3, fit_loss_compute, load_csv

    if edges is not None and method not in (Method.frontier, Method.power):
        fail(f"--edges applies to --method frontier and power (loss against compute); approach {method.value} "
             "chooses its points by its own rule")
    _check_edges(edges)
    metrics = None
    if csv_file is not None:
        ignored = [o for o, v in (("--plan", plan), ("--arch", arch), ("--n-params", n_params != "nonembed_params")) if v]
        if ignored:
            fail(f"{', '.join(ignored)} select{'s' if len(ignored) == 1 else ''} runs of the database; with --csv the "
                 "whole file is fitted (filter it first, and name its parameter column with --params-col)")
        try:
            runs = load_csv(csv_file, params_col=params_col or "params", tokens_col=tokens_col, loss_col=loss_col or "loss",
                            flops_col=flops_col)
        except FitError as exc:
            fail(str(exc))
        for note in runs.attrs.get("notes", []):
            err.print(f"[yellow]warning:[/] {escape(str(csv_file))}: {escape(note)}", highlight=False)
        pcol, engine = "params", None
    else:
        named = [o for o, v in (("--params-col", params_col), ("--tokens-col", tokens_col), ("--loss-col", loss_col),
                                ("--flops-col", flops_col)) if v is not None]
        if named:
            fail(f"{', '.join(named)} name{'s' if len(named) == 1 else ''} columns of a --csv file; runs of the database "
                 "have theirs (choose the size with --n-params)")
        if n_params not in ("nonembed_params", "params"):
            fail(f"--n-params must be nonembed_params or params, got {n_params!r}")
        engine, runs, metrics, _ = _analysis_inputs(ctx, plan, arch)
        archs = sorted(runs["arch"].astype(str).unique())
        if arch is None and len(archs) > 1:
            fail(f"these runs are of {len(archs)} architectures ({', '.join(archs)}); one law over them all would mix "
                 f"them: pass --arch {archs[0]} (or another), or compare them with `slab compare`")
        pcol = n_params
        seed = arch_seed(seed, archs[0])  # as compare and report seed this arch's fits
    bar, progress = _progress_bar(f"fitting ({method.value})")
    try:
        with bar:
            if method in (Method.frontier, Method.power):
                form = "saturating" if method is Method.frontier else "power"

                def job(nb: int):
                    return fit_loss_compute(runs, metrics=metrics, form=form, params_col=pcol, edges=edges or "auto",
                                            n_bootstrap=nb, seed=seed, progress=progress)
            elif method is Method.one:
                if metrics is None or metrics.empty:
                    fail("approach 1 needs training curves: " + ("fit runs from the database, not --csv" if csv_file is not None
                         else "these runs recorded none; --method frontier, power, 2 or 3 fit their final points"))

                def job(nb: int):
                    return fit_approach1(runs, metrics, params_col=pcol, n_bootstrap=nb, seed=seed, progress=progress)
            else:
                approach = fit_approach2 if method is Method.two else fit_approach3

                def job(nb: int):
                    return approach(runs, params_col=pcol, n_bootstrap=nb, seed=seed, progress=progress)
            # no bootstrap where the runs are too few to resample: its intervals would be discarded
            result = fit_on_runs(job, bootstrap, len(runs))
            if "unidentified" in result.details:  # the frontier fit's fallback
                err.print(f"[yellow]note:[/] {escape(result.details['unidentified'])}; fitted the runs' envelope "
                          "instead, an upper bound of the frontier (--edges drop refuses)", highlight=False)
    except FitError as exc:
        fail(str(exc))
    result = unknown_on_few_runs(result, len(runs))  # as the report gives them (and stored so)
    data = result.to_dict()
    unsaved = None
    if engine is not None:
        from db.writer import save_fit

        try:
            data["fit_id"] = save_fit(engine, method=result.method, source="db", n_points=result.n_points, result=data, plan=plan, arch=arch)
        except DatabaseError as exc:  # a read-only database: the fit is still the answer asked for
            unsaved = str(exc)
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        out.print(_fit_table(result))
    # what a nan, an inf, an estimate at its bound or an 'unknown' in the table means
    for why in ("not_finite", "at_bound", "intervals_unknown"):
        if why in result.details:
            err.print(f"[yellow]warning:[/] {escape(result.details[why])}", highlight=False)
    if unsaved:
        err.print(f"[yellow]warning:[/] the fit was not stored in the fits table: {escape(unsaved)}", highlight=False)


def _fit_table(result) -> Table:
    """A fit's estimates and 95% intervals as `slab fit` prints them: 'unknown' where they are, '-' with no bootstrap."""
    failed = result.details.get("bootstrap_failed", 0)
    unusable = result.details.get("bootstrap_unusable", 0)
    odd = f", {unusable} with an exponent <= 0 or a constant overflowing" if unusable else ""
    ran = result.details.get("bootstrap_stopped_after")  # stopped once most of them had failed
    boots = (f"{result.n_bootstrap} bootstraps" + (f", stopped after {ran}" if ran else "")
             + (f" ({failed} failed{odd})" if failed else ""))
    if result.details.get("bootstrap_skipped"):  # none ran (fit_on_runs): a count would claim replicates never run
        boots = "bootstrap skipped: too few runs to resample"
    table = Table(title=f"{result.formula}  ({result.n_points} points, {boots}, converged: {result.converged})")
    for col in ("quantity", "estimate", "95% low", "95% high"):
        table.add_column(col, justify="left" if col == "quantity" else "right")
    unknown = "intervals_unknown" in result.details
    for name, value in result.estimates.items():
        lo, hi = result.interval(name)
        table.add_row(name, f"{value:.4g}", *("unknown" if unknown else f"{x:.4g}" if x == x else "-" for x in (lo, hi)))
    return table


@app.command()
def compare(
    ctx: typer.Context,
    plan: Optional[str] = typer.Option(None, help="Only runs of this plan."),
    baseline: str = typer.Option("softmax", help="The architecture the others are measured against."),
    edges: str = typer.Option("auto", help=EDGES_HELP),
    bootstrap: int = typer.Option(200, min=0, help="Bootstrap resamples for the intervals (as fit and report)."),
    seed: int = typer.Option(0, min=0, help="Seed of the bootstrap."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
) -> None:
    """Compare architectures: per-arch frontier laws, the loss gap and compute multiplier vs a baseline, NIAH.

    The gap is each arch's frontier loss minus the baseline's at a compute C (training loss along the curves); the compute multiplier is the compute it needs to reach the baseline's loss at C, divided by C (above 1: it needs more). NIAH: the largest model of each arch, hybrids by ratio, runs of that size averaged. Where no loss law can be compared (one size, as in an ablation), the retrieval tables and the final loss of each variant are still shown (not with --json), and the command exits 2.

    Example: slab compare --plan smoke-h100 --baseline softmax
    """
    from analysis.compare import (beyond_context_names, compare_archs, gap_summary, loss_table, mqar_table, niah_grid,
                                  niah_table)
    from analysis.fits import FitError

    _check_edges(edges)
    _check_arch(baseline, "--baseline")
    _, runs, metrics, evals = _analysis_inputs(ctx, plan, None)
    if baseline not in set(runs["arch"]):
        fail(f"baseline {baseline!r} has no finished runs; archs present: {', '.join(sorted(set(runs['arch'])))}")
    if set(runs["arch"]) == {baseline}:
        fail(f"only the baseline {baseline!r} has finished runs: nothing to compare it with")
    _warn_few_runs(runs, bootstrap)
    bar, progress = _progress_bar("fitting per arch")
    result, failure = None, None
    try:
        with bar:
            result = compare_archs(runs, baseline=baseline, metrics=metrics, n_bootstrap=bootstrap, seed=seed, progress=progress,
                                   edges=edges)
    except FitError as exc:
        failure = str(exc)
    if as_json:
        if result is None:
            fail(failure)
        sys.stdout.write(json.dumps(result.to_dict()) + "\n")
        return
    if result is not None:
        _emit(gap_summary(result), Format.table,
              title=f"loss gap and compute multiplier vs {baseline} (all columns: --json)")
        if any(f.details.get("edges") == "keep" for f in result.fits.values()):
            err.print("note: these laws follow the runs' envelope, an upper bound of the compute-optimal frontier: at "
                      "most budgets the best run is the smallest size there", highlight=False)
        for arch_name, message in result.errors.items():
            err.print(f"[yellow]warning:[/] {escape(f'{arch_name}: {message}')}")
        # an estimate at its bound (E at 0, a flat alpha), as slab fit warns and the report's findings say
        for arch_name, f in sorted(result.fits.items()):
            note = f.details.get("at_bound")
            if note:
                err.print(f"[yellow]warning:[/] {escape(f'{arch_name}: {note}')}", highlight=False)
    else:  # an ablation at one size, say: what can be shown without a law still is
        losses = loss_table(runs)
        _emit(losses.assign(params=losses["params"].map(si), tokens=losses["tokens"].map(si)).round(4), Format.table,
              title="final loss by variant and size (validation loss; training loss where none)")
    niah = niah_table(runs, evals)
    if not niah.empty:
        sizes = ", ".join(f"{v} {si(p)}" for v, p in niah.groupby("variant")["params"].max().items())
        grid = niah_grid(niah).rename(columns=beyond_context_names(niah))  # as the report heads them
        _emit(grid.round({c: 1 for c in grid.columns if c.startswith("len ")}), Format.table,
              title=f"needle in a haystack, accuracy (%) by depth and length (largest model of each: {sizes})")
    mqar = mqar_table(runs, evals)
    if not mqar.empty:
        t = mqar[["arch", "ratio_label", "params", "name", "accuracy", "best", "n_runs"]]
        _emit(t.assign(params=t["params"].map(si)).round(3), Format.table, title="MQAR (accuracy by hybrid ratio)")
    if failure is not None:
        fail(f"no loss comparison: {failure}")


@app.command()
def report(
    ctx: typer.Context,
    out_dir: Path = typer.Option(..., "--out", help="Folder for index.html, report.md, fits.json and figures/ (PNG and SVG); made if missing, in a folder that exists. "
                                 "These replace an earlier report's; a figures/ holding other files is refused.", show_default=False),
    plan: Optional[str] = typer.Option(None, help="Only runs of this plan."),
    title: Optional[str] = typer.Option(None, help="Report title (default: 'scalinglab report: ' and the plan name, or 'all runs')."),
    throughput: Optional[Path] = typer.Option(None, help="CSV of arch, seq_len, tokens_per_s (slab bench train --seq-len ... --out FILE) for the throughput figure. "
                                              "Where present, params, d_model, n_layers, n_heads and vocab (model size) and compile, fused and device "
                                              "columns keep sizes and settings apart; only repeats of one configuration are averaged."),
    bootstrap: int = typer.Option(200, min=0, help="Bootstrap resamples per fit (as fit and compare)."),
    baseline: Optional[str] = typer.Option(None, help="Architecture the others are compared with (default: softmax when it has runs, else the first arch).", show_default=False),
    seed: int = typer.Option(0, min=0, help="Seed of the bootstraps."),
    edges: str = typer.Option("auto", help=EDGES_HELP),
) -> None:
    """Write a scaling-curve report: index.html (self-contained), report.md, fits.json and PNG/SVG figures.

    Example: slab report --plan demo --out demo-out/report
    """
    import pandas as pd

    from analysis.compare import load_throughput
    from analysis.fits import FitError
    from analysis.report import write_report

    _check_edges(edges)
    _check_arch(baseline, "--baseline")
    _writable_dir(out_dir, "--out")  # the report's own folder is made, not its parents
    tput = None
    if throughput is not None:  # read before the runs, so that a wrong path or value fails at once
        try:
            tput = load_throughput(throughput)
        except FitError as exc:
            fail(str(exc))
    _, runs, metrics, evals = _analysis_inputs(ctx, plan, None)
    archs = sorted(set(runs["arch"]))
    if baseline is not None and baseline not in archs:
        fail(f"--baseline {baseline!r} has no finished runs; archs present: {', '.join(archs)}")
    bar, progress = _progress_bar("fitting and drawing")
    try:
        with bar:
            files = write_report(runs, metrics, evals, out_dir, throughput=tput, title=title or f"scalinglab report: {plan or 'all runs'}",
                                 bootstrap=bootstrap, seed=seed, progress=progress, baseline=baseline or "softmax",
                                 edges=edges)
    except FitError as exc:
        fail(str(exc))
    except OSError as exc:  # e.g. a read-only folder, which _writable_dir cannot tell when running as root
        fail(f"--out {out_dir}: cannot write the report: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
    for line in files.findings:
        out.print(f"- {line}", highlight=False, markup=False)
    out.print("against the seed study (MiniMax-01):", highlight=False, markup=False)
    for line in files.seed_study:
        out.print(f"- {line}", highlight=False, markup=False)
    for line in files.skipped:
        out.print(f"[dim]not shown: {escape(line)}[/]", highlight=False)
    if files.comparison is None:  # with one, a finding above names the archs with too few runs
        _warn_few_runs(runs, bootstrap)
    out.print(f"wrote {files.index_html}, {files.report_md} and {files.fits_json} ({len(files.figures)} figures) in "
              f"{files.seconds:.1f} s", markup=False)


@bench_app.command("kernels")
def bench_kernels_cmd(
    out_dir: Path = typer.Option(Path("bench-out"), "--out", help="Folder for linear_attention.csv/.md/.png."),
    quick: bool = typer.Option(False, "--quick", help="Fewer shapes and repetitions."),
    peers: bool = typer.Option(True, help="Include flash-linear-attention when importable (its autotuning takes minutes)."),
) -> None:
    """GPU: check every linear-attention backend against naive on the device, then time ours vs SDPA vs fla.

    Each cell is timed twice: as eager calls (what a caller waits, the host's launch time included) and replayed as a CUDA graph (GPU time alone); the report gives both tables and the ratios the kernels are judged by. Takes about 5 minutes on an H200 without fla; with fla on a fresh machine add its autotuning (17.5 minutes on an H100 when its checks ran in fp32 too).

    Example: slab bench kernels --out docs/bench
    """
    import logging

    _require_gpu("kernels")
    _ensure_dir(out_dir, "--out")
    from kernels.linear_attention.bench import report, run_bench

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # one line per check and timing
    out.print(report(run_bench(out_dir, quick=quick, peers=peers)), highlight=False, markup=False)


@bench_app.command("fused")
def bench_fused_cmd(
    out_csv: Path = typer.Option(Path("bench-out/fused.csv"), "--csv", help="Write the table here."),
) -> None:
    """GPU: check, then time the fused norms, SwiGLU gate and head + loss against PyTorch and torch.compile.

    The ops: RMSNorm, gated RMSNorm, the SwiGLU gate and the head + cross-entropy, at the 135M model's shapes: 16k tokens, d 768, SwiGLU hidden 2048, vocab 32k, bf16. Each op's output and gradients are first checked on the GPU against the fp32 reference; a failing op is listed as FAIL with no timings, and the command then exits 1.

    Example: slab bench fused --csv docs/bench/fused.csv
    """
    _require_gpu("fused")
    _ensure_dir(out_csv.parent, "--csv")
    from kernels.fused.bench import bench_fused

    frame = bench_fused()
    frame.to_csv(out_csv, index=False)
    _emit(frame.round(4), Format.table, title="fused kernels (median ms, peak extra MiB)")
    failed = sorted(set(frame.loc[frame["check"] == "FAIL", "op"]))
    if failed:
        out.print(f"[red]failed the on-GPU check against the fp32 reference: {', '.join(failed)}[/red]")
        raise typer.Exit(1)


@bench_app.command("analysis")
def bench_analysis_cmd() -> None:
    """Time approach 3 with 1,000 bootstraps on 200 runs, and a report over 3,700 runs (synthetic data).

    Example: slab bench analysis
    """
    from analysis.bench import bench_analysis

    r = bench_analysis()
    out.print(f"approach 3, 1,000 bootstraps, 200 runs: {r['approach3_bootstrap_s']:.2f} s (target < 10 s); "
              f"report over 3,700 runs: {r['report_s']:.2f} s (target < 30 s)")


@bench_app.command("train")
def bench_train_cmd(
    arch: list[str] = typer.Option(["softmax"], help="Architecture(s) to time."),
    params: str = typer.Option("135M", help="Named size (135M: d 768, 12 layers, vocab 32k; 350M) or a non-embedding target like 30M."),
    seq_len: list[int] = typer.Option([2048], min=1, help="Context length(s); several give a throughput-vs-length table."),
    tokens_per_step: int = typer.Option(32768, min=1, help="Tokens per optimizer step (batch = this / seq_len)."),
    steps: int = typer.Option(30, help="Optimizer steps, 2 or more (the first is warm-up; the median of the second half is reported)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    compile_mode: Optional[str] = typer.Option(None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs) or max-autotune-no-cudagraphs; implies --compile."),
    fused: bool = typer.Option(False, "--fused", help="All the fused Triton kernels (RMSNorms, SwiGLU gate, head + loss; kernels.fused) even with --compile, where compiled training by default fuses the head + loss and, with quack on a Hopper GPU, the MLP and lightning's q, k, v SiLU in their GEMMs' epilogues."),
    kernels: Optional[str] = typer.Option(None, help="Which LM kernels run (default: training's choice, gemm compiled, auto eager): loss (the head + loss fused), gemm (also the SwiGLU MLP and lightning's q, k, v SiLU in their GEMMs' epilogues, on quack where installed on a Hopper GPU), auto (--fused), triton, torch (none fused).", show_default=False),
    microbatch: Optional[int] = typer.Option(None, min=1, help="Sequences per forward pass (default: from a memory estimate)."),
    out_csv: Optional[Path] = typer.Option(None, "--out", help="Also write the table as CSV and its figure as PNG beside it (e.g. docs/bench/train.csv, train.png)."),
    profile: Optional[Path] = typer.Option(None, help="Folder for a torch.profiler table per (arch, T): the ops that took the most time over three steps."),
) -> None:
    """Single-run training speed on the GPU (the CPU when there is none): tokens/s and MFU.

    MFU is given against the H100's 989 TFLOP/s bf16 datasheet peak and its measured 785 TFLOP/s. On a GPU the mean SM clock and power draw over the timed steps are given too (from nvidia-smi): at its power cap a GPU lowers its clock, and the same code's MFU then differs between hosts.

    Example: slab bench train --arch softmax --arch lightning --params 135M --seq-len 2048 --compile
    """
    import pandas as pd
    import torch

    from models.bench import bench_kernels, bench_spec, bench_train

    modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    if compile_mode is not None and compile_mode not in modes:
        fail(f"--compile-mode {compile_mode!r}: expected one of {', '.join(modes)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:  # every spec before any training, so that a bad --arch or --kernels fails at once (and before a folder is made)
        kernels = bench_kernels(fused, kernels)
        specs = [(a, t, bench_spec(a, params, t, max(1, tokens_per_step // t), steps)) for a in arch for t in seq_len]
    except ValueError as exc:
        fail(str(exc))
    if out_csv:
        # Checked before training: a folder had failed at the end (IsADirectoryError), and a .png name had the figure
        # written over the table.
        if out_csv.is_dir() or out_csv.suffix.lower() != ".csv":
            fail(f"--out {out_csv}: expected a .csv file name (its figure goes beside it as .png)")
        _ensure_dir(out_csv.parent, "--out")
    if profile:
        _ensure_dir(profile, "--profile")
    rows = []
    for a, t, spec in specs:
        prof = profile / f"train_{a}_{t}.txt" if profile else None
        rows.append(bench_train(spec, compile=compile_mode or compile, microbatch=microbatch, device=device, profile=prof,
                                kernels=kernels))
        r = rows[-1]
        mfu = f", MFU {r['mfu_989']:.1%} of 989, {r['mfu_785']:.1%} of 785" if r["mfu_989"] is not None else " (CPU: no MFU)"
        gpu = f", SM clock {r['sm_clock_mhz']:.0f} MHz at {r['power_w']:.0f} W" if r["sm_clock_mhz"] is not None else ""
        shape = f"d {spec.d_model} x {spec.n_layers} layers, vocab {spec.vocab_size}"  # what --params resolved to
        attention = f", softmax attention on {r['attention'].upper()}" if r["attention"] else ""
        epilogues = ", MLP in quack's GEMM epilogues" if r["epilogues"] else ""
        epilogues += " and the loss on its scaled-exp pipeline" if r["epilogue_loss"] else ""
        out.print(f"{a} T={t} ({shape}): {r['tokens_per_s']:,.0f} tokens/s{mfu}{gpu}{attention}{epilogues}")
    frame = pd.DataFrame(rows)
    if out_csv:
        from analysis.bench_figures import bench_figure

        frame.to_csv(out_csv, index=False)
        out.print(f"wrote {out_csv} and {bench_figure(out_csv)}", markup=False)
    _emit(frame[["arch", "seq_len", "params", "microbatch", "compile", "kernels", "attention", "tokens_per_s", "mfu_989",
                 "mfu_785", "sm_clock_mhz", "power_w"]].round(4), Format.table, title="training throughput",
          optional=("power_w", "sm_clock_mhz", "mfu_785", "attention", "kernels", "compile", "microbatch"),
          hint=f"{out_csv} holds every column" if out_csv else "--out FILE writes every column")


@bench_app.command("plan")
def bench_plan(
    plan_file: Path = typer.Argument(Path("plans/minimax01.csv"), help="Plan to expand and register."),
) -> None:
    """Time expanding a big plan and registering it into a fresh SQLite file.

    Example: slab bench plan plans/minimax01.csv
    """
    from sweep.bench import bench_plan as run

    _plans([plan_file], DEFAULT_MAX_RUNS)  # a bad file fails here with file:row:column, before any timing
    result = run(plan_file)
    out.print(
        f"{plan_file}: {_n(result['runs'], 'run')}; expand {result['expand_s']:.3f} s (target < 1 s); "
        f"register into fresh SQLite {result['register_s']:.3f} s (target < 2 s)", markup=False
    )


@bench_app.command("pack")
def bench_pack(
    plan_file: Path = typer.Argument(Path("plans/pack-grid.csv"), help="Plan whose runs to train both ways."),
    steps: Optional[int] = typer.Option(None, min=1, help="Cut every run to this many optimizer steps (default: the plan's own)."),
    pack: str = typer.Option("auto", help="Packing as for slab launch: auto, off or a number of runs."),
    out_csv: Path = typer.Option(Path("bench-out/pack.csv"), "--csv", help="Append the result here, and redraw the table's figure beside it (pack.png)."),
) -> None:
    """Train a plan's runs one at a time, then packed as stacked models, in this process (GPU if present).

    Prints both wall times, the speedup, aggregate tokens/s and MFU, and how far the two modes' final losses differ. Evals are left out of both.

    Example: slab bench pack plans/pack-grid.csv --steps 50
    """
    import time

    import pandas as pd

    from analysis.bench_figures import bench_figure
    from sweep.bench import append_csv
    from sweep.bench import bench_pack as run
    from models.train import TrainingError
    from sweep.pack import parse_pack

    try:
        pack_size = parse_pack(pack)
    except ValueError as exc:
        fail(str(exc))
    t0 = time.perf_counter()
    [plan] = _plans([plan_file], DEFAULT_MAX_RUNS)
    _check_csv(out_csv, "pack")
    try:
        result = run(plan, steps=steps, pack=pack_size, progress=_stamp(t0))
    except TrainingError as exc:  # a diverged or out-of-memory run: both modes must train every run to compare them
        # Cut to a few steps, a run ends no better than a uniform guess, which training counts as diverged.
        hint = f"; --steps {steps} is too few for the runs to learn: give more" if steps and "uniform guess" in str(exc) else ""
        fail(f"a run stopped: {exc}{hint}; nothing was written to {out_csv}", code=1)
    append_csv({"plan": str(plan_file), **result}, out_csv)
    out.print(f"appended to {out_csv}; figure {bench_figure(out_csv)}", markup=False)
    shown = pd.DataFrame({"measure": list(result), "value": [f"{v:.4g}" if isinstance(v, float) else str(v) for v in result.values()]})
    _emit(shown, Format.table, title="packed vs one at a time")


def _bench_view():
    """The launch view of a benchmark: runs' start and end lines on stderr (stdout keeps the tables)."""
    from sweep.progress import LaunchView

    return LaunchView(Console(stderr=True, emoji=False), live=False)


def _stamp(t0: float):
    """A ``progress(message)`` callback writing each message to stderr after the seconds since ``t0``."""
    import time

    return lambda msg: sys.stderr.write(f"[{time.perf_counter() - t0:7.1f} s] {msg}\n")


def _check_csv(out_csv: Path, kind: str) -> None:
    """Fail (exit 2) before any training when --csv names a file that is not a `slab bench {kind}` table."""
    from analysis.bench_figures import BenchTableError, read_table, table_kind

    _writable_dir(out_csv.parent, "--csv")  # made when the table is written: a refusal after this leaves no folder
    if not out_csv.exists():
        return
    try:  # results are added to this table at the end: a file that is not one (a plan, say) fails now
        found = table_kind(read_table(out_csv))
    except BenchTableError as exc:
        fail(f"--csv {exc}")
    if found != kind:
        what = f"a `slab bench {found}` table" if found else "not a benchmark table"
        fail(f"--csv {out_csv}: {what}; `slab bench {kind}` writes its own (give a new file)")


@bench_app.command("spread")
def bench_spread_cmd(
    plan_file: Path = typer.Argument(Path("plans/smoke-h100.csv"), help="Plan to launch whole, once per GPU count."),
    gpus: Optional[list[int]] = typer.Option(None, min=1, help="GPU counts to launch on, in this order (default: all the host's, then 1)."),
    cpu: bool = typer.Option(False, "--cpu", help="Count CPUs instead of GPUs and train on CPU (a check of the command, not a GPU figure)."),
    out_csv: Path = typer.Option(Path("bench-out/multi_gpu_spread.csv"), "--csv", help="Append the launches here, and redraw its figure beside it."),
) -> None:
    """Launch one plan on all of a host's GPUs and on one, each into a fresh database; compare the wall times.

    The one GPU is CUDA's first. Each launch is `slab launch` itself: fractional runs packed on every GPU, largest runs first, pending runs started as soon as a GPU share frees.

    Example: slab bench spread plans/smoke-h100.csv --gpus 2 --gpus 1
    """
    import time

    import pandas as pd

    from analysis.bench_figures import bench_figure
    from sweep.bench import append_csv, bench_spread
    from sweep.launch import host_gpus
    from sweep.launch import LaunchError

    t0 = time.perf_counter()
    [plan] = _plans([plan_file], DEFAULT_MAX_RUNS)
    _check_csv(out_csv, "spread")
    # No GPU and no --cpu: [1], which bench_spread refuses with "no GPU here (pass --cpu ...)".
    counts = gpus or ([2, 1] if cpu else sorted({max(host_gpus(), 1), 1}, reverse=True))
    try:
        rows = bench_spread(plan, counts, view=_bench_view(), cpu=cpu, progress=_stamp(t0))
    except (ValueError, LaunchError) as exc:
        fail(str(exc))
    append_csv(rows, out_csv)  # one write: an interrupt cannot leave a launch's row without its 1-GPU baseline
    out.print(f"appended to {out_csv}; figure {bench_figure(out_csv)}", markup=False)
    _emit(pd.DataFrame(rows).round(3), Format.table, title="one launch per GPU count")
    if any(r["done"] < r["runs"] for r in rows):
        fail("some runs did not finish (see the lines above)", code=1)


@bench_app.command("dp")
def bench_dp_cmd(
    plan_file: Path = typer.Argument(Path("plans/dp-350m.csv"), help="Plan whose runs to train at each GPU count."),
    gpus: list[int] = typer.Option([1, 2], min=1, help="GPU counts per run: 1 trains on one GPU, more data-parallel through Ray Train."),
    steps: Optional[int] = typer.Option(None, min=2, help="Cut every run to this many optimizer steps (default: the plan's own)."),
    cpu: bool = typer.Option(False, "--cpu", help="CPU workers (gloo) instead of GPUs (NCCL): a check of the command, not a speed figure."),
    out_csv: Path = typer.Option(Path("bench-out/multi_gpu_dp.csv"), "--csv", help="Write every step's loss and tokens/s here (replacing a dp table there), and its figure beside it."),
) -> None:
    """Data-parallel scaling: train each run of a plan on 1, 2, ... GPUs through `slab launch`.

    The same global batch is split across the workers. Prints the median tokens/s of the second half of the steps, the speed-up over one GPU and the final losses; the figure overlays the loss curves.

    Example: slab bench dp plans/dp-350m.csv --gpus 1 --gpus 2 --steps 60
    """
    import time

    from analysis.bench_figures import bench_figure, data_parallel_summary
    from sweep.bench import bench_data_parallel
    from sweep.launch import LaunchError

    t0 = time.perf_counter()
    [plan] = _plans([plan_file], DEFAULT_MAX_RUNS)
    _check_csv(out_csv, "dp")
    try:
        curves, outcomes = bench_data_parallel(plan, gpus, steps=steps, view=_bench_view(), cpu=cpu, progress=_stamp(t0))
    except (ValueError, LaunchError) as exc:
        fail(str(exc))
    failed = [o for o in outcomes if o["status"] != "done"]
    for o in failed:
        last = (o["error"] or "").strip().splitlines()
        err.print(f"{o['run']} on {o['gpus']} {'CPU worker' if cpu else 'GPU'}(s): {o['status']}: {last[-1] if last else ''}",
                  highlight=False, markup=False)
    if curves.empty:
        fail("no run trained a step; nothing written", code=1)
    tmp = out_csv.with_name(f".{out_csv.name}.tmp")
    _ensure_dir(out_csv.parent, "--csv")
    curves.to_csv(tmp, index=False)
    tmp.replace(out_csv)
    out.print(f"wrote {out_csv}; figure {bench_figure(out_csv)}", markup=False)
    _emit(data_parallel_summary(curves).round(4), Format.table, title="data-parallel scaling")
    if failed:
        fail(f"{len(failed)} of {len(outcomes)} trainings did not finish (see the lines above)", code=1)


@bench_app.command("plot")
def bench_plot(
    tables: list[Path] = typer.Argument(..., help="CSV tables written by `slab bench train --out`, `slab bench pack --csv`, `slab bench spread --csv` or `slab bench dp --csv`."),
) -> None:
    """Redraw the PNG figure beside each benchmark table (train.csv -> train.png), e.g. after editing one.

    Example: slab bench plot docs/bench/pack.csv docs/bench/train_135m_compile.csv
    """
    from analysis.bench_figures import BenchTableError, bench_figure

    for table in tables:
        try:
            out.print(f"{table} -> {bench_figure(table)}", markup=False)
        except BenchTableError as exc:
            fail(str(exc))


def db_first(argv: list[str]) -> list[str]:
    """The arguments with a ``--db URL`` given after the command moved before it, where the option lives
    (``slab status --db x.db`` would otherwise be "No such option")."""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if i and (arg == "--db" and i + 1 < len(argv) or arg.startswith("--db=")):
            n = 2 if arg == "--db" else 1
            return argv[i:i + n] + argv[:i] + argv[i + n:]
    return argv


def main() -> None:
    """Console-script entry point."""
    app(args=db_first(sys.argv[1:]))


if __name__ == "__main__":
    main()
