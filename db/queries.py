"""Read-side queries: runs, metrics, evals and status counts as pandas frames; read-only SQL; exports."""

from __future__ import annotations

import datetime
import decimal
import difflib
import json
import os
import re
import sqlite3
import stat
import uuid
from dataclasses import fields
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from sqlalchemy import JSON, BigInteger, Engine, Float, Integer, String, case, cast, func, select, tuple_
from sqlalchemy.exc import SQLAlchemyError

from db.engine import FILE_STATES, explain, read_only, reading
from db.schema import TABLES, Eval, Metric, Plan, PlanRun, Run, UTCDateTime
from sweep.plan import NO_PLAN
from sweep.spec import RunSpec

#: Export file suffixes and the format each names (JSON is known only to refuse it).
EXPORT_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".json": "json"}
EXPORT_FORMATS = ("csv", "parquet")

#: The first words of the statements ``slab sql`` runs (SQLite has no SHOW and TABLE).
READ_STATEMENTS = ("select", "with", "values", "explain", "show", "table")

#: The most rows ``slab sql`` returns: a frame of a million rows takes about a GB, and a query with no end (a recursive
#: WITH without a limit) had grown until the system killed the command.
MAX_SQL_ROWS = 1_000_000
#: Rows fetched from the driver at a time while counting them against the cap.
SQL_FETCH_ROWS = 10_000

#: Parameters a statement of the run-id queries may bind besides its ids (launch's status filter binds two).
ID_MARGIN = 10


def sqlite_default_variables(version: tuple[int, ...]) -> int:
    """The parameters a statement may bind in a SQLite of ``version`` built with the default limit: 999 before 3.32,
    32,766 since (a build may set its own: Debian's takes 250,000)."""
    return 999 if version < (3, 32, 0) else 32_766


def id_batch_for(version: tuple[int, ...]) -> int:
    """Run ids a query binds at a time, for the SQLite ``version`` linked: 10,000, fewer where that SQLite takes fewer
    parameters. PostgreSQL's psycopg sends at most 65,535 and a study of several plans holds more finished runs."""
    return min(10_000, sqlite_default_variables(version) - ID_MARGIN)


#: Run ids per query of ``metrics_frame``, ``evals_frame`` and the launcher's look-ups, under the limit of the SQLite
#: this Python links (``_id_batch`` also asks each connection, where Python can).
ID_BATCH = id_batch_for(sqlite3.sqlite_version_info)

#: Rows fetched at a time by the frame readers: rows as Python objects take about six times their frame's memory, so
#: a large table (metrics) is turned into frames a chunk at a time rather than held whole as rows.
FETCH_ROWS = 50_000

#: Unique keys an export reads a table in (the primary key where none is named). Metrics and evals by run and step, not
#: by id: a worker writes a run's steps in order, so a curve is cut only at its end, while on PostgreSQL ids of
#: concurrent launchers commit out of order and a chunk read between them would leave a hole in a curve.
EXPORT_KEYS = {"metrics": ("run_id", "step"), "evals": ("run_id", "step", "name")}

#: Spec fields the runs table holds as they are (registration copies them), so ``runs_frame`` has no column of them
#: from the spec. Another spec field whose name a runs column takes comes as spec_<name>: spec_tokens is the plan's
#: budget, which runs.tokens rounds up to whole steps.
SPEC_FIELDS_IN_RUNS = frozenset({"arch"})


class QueryError(ValueError):
    """A query cannot run: a write through ``slab sql``, a bad statement, an unknown table."""


def _run_filter(stmt, plan: str | None, arch: str | None, status: str | None):
    if plan == NO_PLAN:
        # An anti-join, not NOT EXISTS: SQLite ran that as a correlated scan of plan_runs per run (plan_runs has no
        # index led by run_id), quadratic in the runs; the outer join gets a hash join or an automatic index.
        stmt = stmt.outerjoin(PlanRun, PlanRun.run_id == Run.run_id).where(PlanRun.run_id.is_(None))
    elif plan:
        stmt = stmt.join(PlanRun, PlanRun.run_id == Run.run_id).join(Plan, Plan.id == PlanRun.plan_id)
        stmt = stmt.where(Plan.name == plan)
    if arch:
        stmt = stmt.where(Run.arch == arch)
    if status:
        stmt = stmt.where(Run.status == status)
    return stmt


def runs_frame(engine: Engine, *, plan: str | None = None, arch: str | None = None, status: str | None = None) -> pd.DataFrame:
    """One row per run (filtered), with spec fields as columns and the plans it belongs to."""
    stmt = _run_filter(select(Run), plan, arch, status).order_by(Run.arch, Run.flops, Run.run_id)
    with reading(engine) as conn:
        rows = conn.execute(stmt).mappings().all()
        links = conn.execute(select(PlanRun.run_id, Plan.name).join(Plan, Plan.id == PlanRun.plan_id)).all()
    plans: dict[str, list[str]] = {}
    for run_id, name in links:
        plans.setdefault(run_id, []).append(name)
    run_columns = [c.name for c in Run.__table__.columns if c.name != "spec"]
    spec_columns = _spec_columns([r["spec"] or {} for r in rows], {*run_columns, "plan"})
    records = []
    for r in rows:
        rec = {k: v for k, v in r.items() if k != "spec"}
        spec = r["spec"] or {}
        rec.update({column: _spec_cell(spec.get(key)) for key, column in spec_columns.items()})
        rec["plan"] = ",".join(sorted(plans.get(r["run_id"], [])))
        records.append(rec)
    columns = run_columns + list(spec_columns.values()) + ["plan"]
    frame = pd.DataFrame.from_records(records, columns=columns)
    for column in Run.__table__.columns:
        if isinstance(column.type, UTCDateTime):  # in UTC with its zone, as export writes them, on either database
            frame[column.name] = pd.to_datetime(frame[column.name], utc=True)
    return _typed(frame, Run)


def _spec_columns(specs: list[dict], taken: set[str]) -> dict[str, str]:
    """Spec key -> runs_frame column: RunSpec's fields in their order, then keys only stored specs have (a spec
    written by another version or a script), each as spec_<key> where ``taken`` holds its name."""
    keys = [f.name for f in fields(RunSpec)]
    keys += sorted({k for spec in specs for k in spec} - set(keys))
    return {k: f"spec_{k}" if k in taken else k for k in keys if k not in SPEC_FIELDS_IN_RUNS}


def _spec_cell(value):
    """A spec value as one cell: a list (evals) as a plan writes it (niah|mqar), so CSV does not get a Python repr."""
    return "|".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def _typed(frame: pd.DataFrame, model) -> pd.DataFrame:
    """Numeric columns of ``model``'s table in their own dtypes: an all-NULL column (results of pending runs, an
    empty frame) otherwise comes back as object holding None; nullable integers as Int64, so NULLs keep them whole."""
    for column in model.__table__.columns:
        name = column.name
        if name not in frame.columns:
            continue
        if isinstance(column.type, Float):
            frame[name] = frame[name].astype("float64")
        elif isinstance(column.type, Integer):  # BigInteger too
            frame[name] = _integers(frame[name], "Int64" if column.nullable else "int64")
    return frame


def _integers(series: pd.Series, dtype: str) -> pd.Series:
    """``series`` in the integer ``dtype``, or in float64 where a value is not whole: SQLite keeps a REAL in an INTEGER
    column (a database written by a script), which a cast would cut (int64) or refuse (Int64)."""
    if series.dtype == object:
        try:
            series = series.astype("Int64")  # exact for whole numbers and None, where float64 would round past 2**53
        except (TypeError, ValueError):
            return pd.to_numeric(series).astype("float64")
    elif series.dtype.kind == "f" and (series.notna() & (series % 1 != 0)).any():  # inf % 1 is NaN: not whole
        return series.astype("float64")
    return series.astype(dtype)


def _read_chunks(conn, stmt, model=None) -> Iterator[pd.DataFrame]:
    """``stmt``'s rows as frames of up to FETCH_ROWS rows (one empty frame when it has none), numeric columns typed
    as ``model``'s table types them."""
    # stream_results: a server-side cursor on PostgreSQL, whose driver otherwise receives the whole result first.
    for chunk in pd.read_sql(stmt.execution_options(stream_results=True), conn, chunksize=FETCH_ROWS):
        yield chunk if model is None else _typed(chunk, model)


def _read_frame(conn, stmt, model) -> pd.DataFrame:
    """``stmt``'s rows as one frame, read a chunk at a time (see FETCH_ROWS)."""
    chunks = list(_read_chunks(conn, stmt, model))
    return chunks[0] if len(chunks) == 1 else _typed(pd.concat(chunks, ignore_index=True), model)


def _frame_of_runs(engine: Engine, stmt, model, run_ids: list[str] | None, order: list[str]) -> pd.DataFrame:
    """``stmt``'s rows, for the runs ``run_ids`` only (None: all), asking for up to ID_BATCH run ids per query."""
    with reading(engine) as conn:
        if run_ids is None:
            return _read_frame(conn, stmt, model)
        ids = list(dict.fromkeys(run_ids))
        size = _id_batch(conn)
        batches = [ids[i : i + size] for i in range(0, len(ids), size)] or [[]]  # none: the empty frame
        parts = [_read_frame(conn, stmt.where(model.run_id.in_(batch)), model) for batch in batches]
    if len(parts) == 1:
        return parts[0]
    frame = _typed(pd.concat(parts, ignore_index=True), model)
    return frame.sort_values(order, kind="stable", ignore_index=True)  # each batch came ordered, not the whole


def _id_batch(conn) -> int:
    """Run ids to bind in one statement on ``conn``: ID_BATCH, or fewer where its SQLite takes fewer parameters."""
    if conn.dialect.name != "sqlite":
        return ID_BATCH
    raw = conn.connection.driver_connection
    if not hasattr(raw, "getlimit"):  # Python 3.10: ID_BATCH follows the linked SQLite's default
        return ID_BATCH
    return max(1, min(ID_BATCH, raw.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) - ID_MARGIN))


def metrics_frame(engine: Engine, run_ids: list[str] | None = None) -> pd.DataFrame:
    """Training curves: run_id, step, tokens, flops, loss, lr, tokens_per_s, mfu (ordered by run and step)."""
    cols = [Metric.run_id, Metric.step, Metric.tokens, Metric.flops, Metric.loss, Metric.lr, Metric.tokens_per_s, Metric.mfu]
    stmt = select(*cols).order_by(Metric.run_id, Metric.step)
    return _frame_of_runs(engine, stmt, Metric, run_ids, ["run_id", "step"])


def evals_frame(engine: Engine, run_ids: list[str] | None = None) -> pd.DataFrame:
    """Eval results: run_id, step, name, value."""
    stmt = select(Eval.run_id, Eval.step, Eval.name, Eval.value).order_by(Eval.run_id, Eval.step, Eval.name)
    return _frame_of_runs(engine, stmt, Eval, run_ids, ["run_id", "step", "name"])


def status_counts(engine: Engine, plan: str | None = None) -> pd.DataFrame:
    """Runs per plan and status: columns plan, status, runs (runs in no plan are under NO_PLAN)."""
    stmt = (
        select(func.coalesce(Plan.name, NO_PLAN).label("plan"), Run.status, func.count().label("runs"))
        .select_from(Run)
        .outerjoin(PlanRun, PlanRun.run_id == Run.run_id)
        .outerjoin(Plan, Plan.id == PlanRun.plan_id)
        .group_by(Plan.name, Run.status)
        .order_by(Plan.name, Run.status)
    )
    if plan == NO_PLAN:
        stmt = stmt.where(Plan.name.is_(None))
    elif plan:
        stmt = stmt.where(Plan.name == plan)
    with reading(engine) as conn:
        return pd.DataFrame(conn.execute(stmt).all(), columns=["plan", "status", "runs"])


def runs_training(engine: Engine, tokens: set[int], *columns) -> list[tuple]:
    """The ``columns`` (Run.run_id, ...) of the registered runs that train one of these token counts (whole steps')."""
    wanted, rows = sorted(tokens), []
    with reading(engine) as conn:
        batch = _id_batch(conn)
        for i in range(0, len(wanted), batch):
            rows += [tuple(row) for row in conn.execute(select(*columns).where(Run.tokens.in_(wanted[i : i + batch])))]
    return rows


def plan_names(engine: Engine) -> list[str]:
    """Names of the registered plans."""
    with reading(engine) as conn:
        return list(conn.scalars(select(Plan.name).order_by(Plan.name)))


def run_sql(engine: Engine, query: str, max_rows: int | None = MAX_SQL_ROWS) -> pd.DataFrame:
    """Run one read statement (see READ_STATEMENTS) on a read-only connection and return its rows; anything else,
    a second statement, or more than ``max_rows`` rows (None: any number) raises QueryError.

    This guards against slips, not against a hostile user: a SELECT may still call functions with side effects
    (PostgreSQL's pg_read_file, lo_export, dblink_exec for a superuser). Give untrusted users a read-only role.
    """
    word = sole_statement_word(query, engine.dialect.name)
    if not word:
        raise QueryError("slab sql needs a statement, e.g. \"select * from runs limit 5\"")
    allowed = READ_STATEMENTS if engine.dialect.name != "sqlite" else READ_STATEMENTS[:4]
    if word not in allowed:
        # The read-only transaction stops writes to tables, not COPY ... TO PROGRAM (a shell command on a
        # PostgreSQL server), DO blocks, SET, or SQLite's VACUUM INTO and writing pragmas: refuse them by name.
        hint = ("; for a pragma, select from its function, e.g. select * from pragma_table_info('runs')"
                if word == "pragma" else "")
        shown = word.upper() if _IDENT.fullmatch(word) else repr(word[:20])
        names = [s.upper() for s in allowed]
        close = [] if word in READ_STATEMENTS else difflib.get_close_matches(word, allowed, n=1, cutoff=0.7)
        if close:  # 'selec' is a slip, not a write
            raise QueryError(f"{shown} is not a statement slab sql knows; did you mean {close[0].upper()}?")
        raise QueryError(f"slab sql is read-only: it runs only {', '.join(names[:-1])} or {names[-1]} statements, "
                         f"not {shown}{hint}")
    with read_only(engine) as conn:
        if conn.dialect.name == "postgresql":
            # sole_statement_word reads strings as standard ones, where a backslash is a character.
            conn.exec_driver_sql("SET LOCAL standard_conforming_strings = on")
        rows, columns = _execute(conn, query, max_rows)
    if rows is None:
        raise QueryError("slab sql is read-only: the statement returned no rows")
    frame = pd.DataFrame(rows, columns=_distinct_names(columns))
    for name in frame.columns[frame.dtypes == object]:
        frame[name] = frame[name].map(_printable)
    for j in np.flatnonzero((frame.dtypes == float).to_numpy()):
        # A column of whole numbers beside reals or NULLs turns float64, which holds integers exactly only to 2**53:
        # seed 9007199254740993 had read ...992. Such a column keeps the values as the database gave them.
        if any(type(r[j]) is int and abs(r[j]) > 2**53 for r in rows):
            frame.isetitem(j, pd.Series([r[j] for r in rows], dtype=object))
    return frame


def _distinct_names(columns: list[str]) -> list[str]:
    """The columns' names, a repeated one numbered from its second (run_id, run_id_2): JSON records need distinct keys,
    and PostgreSQL names every unnamed min(...) "min"."""
    taken, out = set(columns), []
    for name in columns:
        if name in out:
            n = 2
            while f"{name}_{n}" in taken:
                n += 1
            name = f"{name}_{n}"
            taken.add(name)
        out.append(name)
    return out


#: Values a frame prints as they are in a table, CSV and JSON; others (a blob, a uuid, an address) as text.
_PRINTABLE = (str, int, float, bool, type(None), decimal.Decimal, datetime.date, datetime.time, datetime.timedelta,
              list, dict)


def _printable(value):
    """``value``, or its text where pandas' JSON writer cannot hold it: a blob in PostgreSQL's hex form (\\x00ff)."""
    if isinstance(value, _PRINTABLE):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()
    return str(value)


_SPACE = " \t\n\r\f\v"
_IDENT = re.compile(r"[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*")
#: A number ends before the letters or $ after it (PostgreSQL 14 reads 1e'x' as 1 then e'x', 1$a$ as 1 then $a$).
_NUMBER = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_DOLLAR_QUOTE = re.compile(r"\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*)?\$")
_PARAM = re.compile(r"\$[0-9]+")
_PG_LINE_END, _SQLITE_LINE_END = re.compile(r"[\r\n]"), re.compile(r"\n")  # where a -- comment ends
#: What may lie between the parts of a string continued on a new line (PostgreSQL: 'a'<newline>'b' is 'ab').
_CONTINUATION = re.compile(r"(?:[ \t\n\r\f\v]+|--[^\r\n]*+)*+'")  # possessive: no backtracking on long comments


def sole_statement_word(query: str, dialect: str) -> str:
    """The first word, lowercased, of the one statement in ``query`` (its first token when that is no word, "" when
    it holds none); QueryError when a second statement follows the first ``;``.

    A PostgreSQL server runs every statement of a string sent whole (psycopg2 does), so this reads the string as
    the server's lexer does (standard strings, E'' strings, dollar quotes, nested comments), or SQLite's; other
    databases are read as PostgreSQL.
    """
    pg = dialect != "sqlite"
    i, n = 0, len(query)
    first: str | None = None  # the first word; "" once the first token turns out to be no word
    ended = False
    while i < n:
        c = query[i]
        if c in _SPACE:
            i += 1
            continue
        if query.startswith("--", i):
            end = (_PG_LINE_END if pg else _SQLITE_LINE_END).search(query, i)
            i = n if end is None else end.end()
            continue
        if query.startswith("/*", i):
            i = _comment_end(query, i, nested=pg)
            continue
        if ended:
            raise QueryError("slab sql runs one statement at a time, but the query goes on after its ';'")
        if c == ";":
            ended = True
            i += 1
            continue
        if first is None and c == "(":
            i += 1
            continue
        word, start = "", i
        if c == "'":
            i = _quote_end(query, i, "'", backslash=False)
        elif c == '"' or (not pg and c == "`"):
            i = _quote_end(query, i, c, backslash=False)
        elif not pg and c == "[":
            end = query.find("]", i + 1)
            i = n if end < 0 else end + 1
        elif pg and c == "$" and (m := _DOLLAR_QUOTE.match(query, i) or _PARAM.match(query, i)):
            if m.group().endswith("$"):
                end = query.find(m.group(), m.end())
                i = n if end < 0 else end + len(m.group())
            else:
                i = m.end()
        elif m := _NUMBER.match(query, i):
            i = m.end()
        elif m := _IDENT.match(query, i):
            # Only ASCII letters fold to a keyword: "K" (the Kelvin sign) lowers to "k".
            word, i = (m.group().lower() if m.group().isascii() else m.group()), m.end()
            if pg and word == "e" and query.startswith("'", i):  # E'...': a backslash escapes the next character
                i = _quote_end(query, i, "'", backslash=True)
                # A string continued on a new line stays an E'' string.
                while (m := _CONTINUATION.match(query, i)) and ("\n" in m.group() or "\r" in m.group()):
                    i = _quote_end(query, m.end() - 1, "'", backslash=True)
                word = ""
        else:
            i += 1
        if first is None:
            first = word or query[start:i]
    return first or ""


def _quote_end(query: str, i: int, quote: str, *, backslash: bool) -> int:
    """The index after the quoted string or name opening at ``i`` (its end when unterminated); a doubled quote is
    part of it, and with ``backslash`` so is the character after a backslash."""
    j, n = i + 1, len(query)
    while j < n:
        if backslash and query[j] == "\\":
            j += 2
        elif query[j] == quote:
            if not query.startswith(quote, j + 1):
                return j + 1
            j += 2
        else:
            j += 1
    return n


def _comment_end(query: str, i: int, *, nested: bool) -> int:
    """The index after the /* */ comment opening at ``i`` (its end when unterminated); PostgreSQL's nest."""
    depth, j, n = 0, i, len(query)
    while j < n:
        if query.startswith("/*", j) and (nested or depth == 0):
            depth += 1
            j += 2
        elif query.startswith("*/", j):
            depth -= 1
            j += 2
            if depth == 0:
                return j
        else:
            j += 1
    return n


def _execute(conn, query: str, max_rows: int | None = None) -> tuple[list | None, list[str]]:
    """Run ``query`` on the driver's own cursor, as read by sole_statement_word and with no parameters (SQLAlchemy's
    text() would take :name in a string literal for one); its rows (None when it returns none) and column names.
    QueryError when it returns more than ``max_rows`` rows."""
    raw = conn.connection.driver_connection
    cur = raw.cursor()
    try:
        if conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg":
            # psycopg sends a query without parameters by the simple protocol, where the server runs every statement
            # of the string. Pipeline mode sends it by the extended protocol, which takes one statement and refuses a
            # string of several: a second guard beside sole_statement_word.
            with raw.pipeline():
                cur.execute(query)
        else:
            cur.execute(query)
        if cur.description is None:
            return None, []
        return _fetch(cur, max_rows), [c[0] for c in cur.description]
    except conn.dialect.loaded_dbapi.Error as exc:
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if any(state in message for state in FILE_STATES):  # the file's, not the statement's: say what to do
            raise QueryError(explain(exc, conn.engine.url)) from None
        if "multiple commands" in message:
            raise QueryError(f"slab sql runs one statement at a time: {message}") from None
        folded = message.replace("-", "").replace(" ", "").lower()
        if "readonly" in folded or "notauthorized" in folded:
            raise QueryError(f"slab sql is read-only: {message}") from None
        raise QueryError(message) from None
    finally:
        cur.close()


def _fetch(cur, max_rows: int | None) -> list:
    """The cursor's rows, fetched a batch at a time; QueryError once there are more than ``max_rows``."""
    # SQLite steps the query as rows are fetched, so the cap also ends a query that would never finish.
    if max_rows is None:
        return cur.fetchall()
    rows: list = []
    while batch := cur.fetchmany(SQL_FETCH_ROWS):
        rows += batch
        if len(rows) > max_rows:
            raise QueryError(f"the query returns more than {max_rows:,} rows, more than slab sql holds at once: narrow "
                             "it (a WHERE, a LIMIT, an aggregate), or write a whole table to a file with slab export "
                             "TABLE --out FILE, which reads it a chunk at a time")
    return rows


def export_format(out: Path, fmt: str | None = None) -> str:
    """The format to export ``out`` in: ``fmt``, else the one its suffix names (CSV for other suffixes);
    raises QueryError when they disagree or the format is unknown."""
    named = EXPORT_SUFFIXES.get(out.suffix.lower())
    if fmt is None:
        fmt = named or "csv"
    elif named is not None and named != fmt:
        raise QueryError(f"format {fmt} contradicts the file name {out} ({named}); "
                         f"name it *.{fmt}, or leave the format out to write {named}")
    if fmt not in EXPORT_FORMATS:
        raise QueryError(f"cannot export to {fmt} ({out}); expected one of {', '.join(EXPORT_FORMATS)}")
    return fmt


def _check_out(out: Path) -> None:
    """Raise QueryError when ``out`` cannot be a file: it is a folder, or a folder it needs is a file."""
    if out.is_dir():
        raise QueryError(f"cannot write {out}: it is a folder; name a file in it, e.g. {out / 'table.csv'}")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise QueryError(f"cannot write {out}: {parent} is not a folder")


def _schema_dtype(column) -> str | None:
    """The pandas dtype of a table column, so a column with no values yet still has its type in the file."""
    if isinstance(column.type, Integer):  # BigInteger too; nullable, so NULLs do not turn it into floats
        return "Int64"
    if isinstance(column.type, Float):
        return "float64"
    if isinstance(column.type, UTCDateTime):
        return "datetime64[us, UTC]"
    if isinstance(column.type, (String, JSON)):  # Text too; JSON is written as text
        return "string"
    return None


def export_table(engine: Engine, table: str, fmt: str | None, out: Path) -> int:
    """Write a whole table to CSV or Parquet (atomically) in an existing folder, in ``fmt`` or the one ``out``'s
    suffix names; returns the number of rows."""
    if table not in TABLES:
        raise QueryError(f"unknown table {table!r}; expected one of {', '.join(sorted(TABLES))}")
    fmt = export_format(out, fmt)
    _check_out(out)
    if not out.parent.is_dir():  # a mistyped folder had been made silently, and the file put in it
        raise QueryError(f"cannot write {out}: there is no folder {out.parent} (make it first)")
    if fmt == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise QueryError("parquet export needs pyarrow: pip install 'scalinglab[parquet]'") from None
    # Through a symbolic link, the file it names is written and the link kept (it had been replaced by a plain file).
    target = out.resolve() if out.is_symlink() else out
    if target.exists() and not target.is_file():
        # A device or a pipe (/dev/null, a FIFO) is written into: put in place, a file had replaced /dev/null itself.
        return _write_table(engine, table, fmt, target, out)
    if target.exists() and not os.access(target, os.W_OK):
        raise QueryError(f"cannot write {out}: the file is read-only (its mode is {stat.filemode(target.stat().st_mode)})")
    # A name of this export's own: two exports to one file at once had shared one temporary file, each truncating and
    # writing it under the other, and put the mix in place.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        rows = _write_table(engine, table, fmt, tmp, out)
        if target.exists():  # the file replaced keeps who may read it (a private export stays private)
            os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
        tmp.replace(target)
    except OSError as exc:
        raise QueryError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the write failed too (a read-only folder): its error is the one to report
            pass
    return rows


def _write_table(engine: Engine, table: str, fmt: str, path: Path, out: Path) -> int:
    """Write ``table`` to ``path`` in ``fmt``, reading and writing a chunk at a time; returns the number of rows. An
    error of the file or of the database is a QueryError naming ``out``."""
    try:
        # A chunk at a time, so that a table of millions of metric rows never lies in memory whole.
        floats = _fractional_columns(engine, TABLES[table])
        chunks = (_export_columns(c, TABLES[table], floats) for c in _export_chunks(engine, TABLES[table]))
        return _write_csv(chunks, path) if fmt == "csv" else _write_parquet(chunks, path)
    except OSError as exc:
        raise QueryError(f"cannot write {out}: {exc.strerror or exc}") from None
    except SQLAlchemyError as exc:  # a damaged or locked file, a lost server: nothing is put in place
        raise QueryError(f"cannot export {table}: reading it failed: {explain(exc, engine.url)}") from None


def _export_chunks(engine: Engine, table) -> Iterator[pd.DataFrame]:
    """``table``'s rows in EXPORT_KEYS order as frames of up to FETCH_ROWS rows (one empty frame when it has none),
    each read in a transaction of its own."""
    # One transaction held while the file was written stopped SQLite's checkpoints (the WAL of a database a launch
    # writes to grew for the whole export) and held a PostgreSQL snapshot as long. Each chunk is read in a short
    # transaction instead, from where the last one ended in key order. So every row that exists throughout the export
    # is written exactly once, as it was when its chunk was read; a row added or deleted meanwhile may be in the file
    # or not. A run training during the export (or finishing) has its curve cut at some step, as a snapshot would,
    # though not at one moment for all runs: runs later in the file may be cut later. Tables are exported one per
    # command, so a runs file and a metrics file never shared a snapshot either.
    key = [table.c[name] for name in EXPORT_KEYS.get(table.name, ())] or list(table.primary_key.columns)
    stmt = select(table).order_by(*key).limit(FETCH_ROWS)
    after = None
    while True:
        page = stmt
        if after is not None:
            page = stmt.where(key[0] > after[0] if len(key) == 1 else tuple_(*key) > tuple_(*after))
        with reading(engine) as conn:
            chunk = pd.read_sql(page, conn)
        if after is None or len(chunk):
            # As Python values (a numpy integer is no parameter psycopg takes), before the caller retypes the chunk.
            after = [chunk[c.name].iloc[-1:].tolist()[0] for c in key] if len(chunk) else None
            yield chunk
        if len(chunk) < FETCH_ROWS:
            return


def _write_csv(chunks: Iterator[pd.DataFrame], path: Path) -> int:
    """Write the chunks as one CSV file (the header from the first); returns the number of rows."""
    rows = 0
    with open(path, "w", encoding="utf-8", newline="") as fh:
        for i, chunk in enumerate(chunks):
            chunk.to_csv(fh, index=False, header=i == 0)
            rows += len(chunk)
    return rows


def _write_parquet(chunks: Iterator[pd.DataFrame], path: Path) -> int:
    """Write the chunks as one Parquet file (a row group or more each, the schema from the first); returns the number
    of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, writer = 0, None
    try:
        for chunk in chunks:
            part = pa.Table.from_pandas(chunk, preserve_index=False, schema=None if writer is None else writer.schema)
            if writer is None:
                writer = pq.ParquetWriter(path, part.schema)
            writer.write_table(part)
            rows += len(chunk)
    finally:
        if writer is not None:
            writer.close()
    return rows


def _fractional_columns(engine: Engine, table) -> set[str]:
    """The integer columns of ``table`` that hold a value that is not whole; only SQLite's can (a REAL stays REAL in an
    INTEGER column), so other databases are not scanned."""
    ints = [c for c in table.columns if isinstance(c.type, Integer)]
    if engine.dialect.name != "sqlite" or not ints:
        return set()
    # Found before the first chunk is written, so that every chunk of the file types the column alike (Parquet
    # takes its schema from the first).
    stmt = select(*(func.max(case((c != cast(c, BigInteger), 1), else_=0)).label(c.name) for c in ints))
    with reading(engine) as conn:
        found = conn.execute(stmt).mappings().one()
    return {name for name, flag in found.items() if flag}


def _export_columns(frame: pd.DataFrame, table, floats: set[str] = frozenset()) -> pd.DataFrame:
    """A chunk of ``table`` as export writes it: JSON as text, times in UTC, every column in its schema dtype (so that
    a chunk whose values are all NULL types its columns as the others do), the integer columns ``floats`` as floats."""
    for column in table.columns:
        col, dtype = column.name, _schema_dtype(column)
        if isinstance(column.type, JSON):  # specs, fit results: as text so every format can hold them
            frame[col] = frame[col].map(lambda v: None if v is None else json.dumps(v, sort_keys=True))
        if dtype and dtype.startswith("datetime"):
            # Stored UTC; SQLite gives them back without the zone, PostgreSQL in the session's zone.
            frame[col] = pd.to_datetime(frame[col], utc=True).astype(dtype)
        elif dtype:
            # A value that is not whole is written as it is, not cut to an integer: the file is the database's copy.
            dtype = "float64" if col in floats else dtype
            try:
                frame[col] = frame[col].astype(dtype)
            except (TypeError, ValueError):  # a value written after the scan, or text in a number column
                bad = next((v for v in frame[col] if not _castable(v, dtype)), None)
                raise QueryError(f"cannot export {table.name}: its column {col} holds {bad!r}, which is not a number "
                                 f"of its type ({dtype}); slab sql reads it as it is stored") from None
    return frame


def _castable(value, dtype: str) -> bool:
    """Whether pandas casts ``value`` alone to ``dtype``."""
    try:
        pd.Series([value], dtype=object).astype(dtype)
    except (TypeError, ValueError):
        return False
    return True
