"""Engines from a URL: ``--db`` or ``SLAB_DB``, default a SQLite file; schema creation and version check."""

from __future__ import annotations

import functools
import os
import re
import shlex
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import quote, unquote, urlencode

from sqlalchemy import Connection, Engine, create_engine, event, inspect, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError
from sqlalchemy.exc import DatabaseError as SADatabaseError
from sqlalchemy.orm import Session
from sqlalchemy.util import asbool

from db.schema import SCHEMA_VERSION, TABLES, Base, Meta

DEFAULT_URL = "sqlite:///slab.db"
ENV_VAR = "SLAB_DB"
#: How long a SQLite connection waits for another writer's lock before failing (milliseconds). A launcher's writes
#: hold it for milliseconds and the launcher retries a lock error for a lease, so this bounds only how long a command
#: waits on a file that another program keeps locked: it then fails within 30 s, not seeming to hang.
SQLITE_BUSY_MS = 20_000
#: Seconds a PostgreSQL connection may take to be made (libpq's connect_timeout) where the URL sets none: a server
#: that accepts the connection but never answers (stopped, or behind a dead proxy) had held a command forever.
PG_CONNECT_TIMEOUT_S = 10
#: The SQLite URL forms, for errors about a URL SQLAlchemy rejects.
SQLITE_FORMS = "a SQLite file is sqlite:///relative/path.db or sqlite:////absolute/path.db"
#: The databases scalinglab writes (db.writer's inserts are theirs), as SQLAlchemy names them, and their URLs.
SUPPORTED_BACKENDS = ("sqlite", "postgresql")
SUPPORTED_KINDS = f"sqlite:///FILE ({SQLITE_FORMS}) or postgresql+psycopg://USER:PASSWORD@HOST/DB"
#: Said when SQLite fails because this process may not write the file or its folder.
NOT_WRITABLE = "the database (or its folder) is not writable here"
#: Said when SQLite refuses a write because the URL asked for a read-only file (its option filled in).
READ_ONLY_URL = "its URL opens it read-only ({option}); name it without {option} to write it"
#: SQLite URI modes that open only a file that exists (rwc, the default, creates it).
EXISTING_ONLY_MODES = ("ro", "rw")


class DatabaseError(RuntimeError):
    """The database cannot be used: bad URL, missing file, or a schema newer than this scalinglab."""


class _ForeignDatabase(DatabaseError):
    """The database holds a table of scalinglab's name that scalinglab did not make (open_db names the URL)."""


def resolve_url(url: str | None = None) -> str:
    """The database URL to use: the given one, else ``$SLAB_DB``, else ``sqlite:///slab.db``."""
    return url or os.environ.get(ENV_VAR) or DEFAULT_URL


def shown_url(url: str) -> str:
    """The URL with its password masked, for error messages and logs."""
    if (masked := _mask_raw_at_password(url)) is not None:
        return masked
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _mask_raw_at_password(url: str) -> str | None:
    """``url`` with its password masked up to the last @ of its host and database part, where an unescaped @ follows
    the password's own (a password holding a raw @, which SQLAlchemy cuts there, taking the rest for the host); None
    for any other URL."""
    scheme, sep, rest = url.partition("://")
    user, colon, after = rest.partition(":")
    if not sep or not colon or "/" in user:  # no user:password@ part (the username takes no : or /)
        return None
    _, at, tail = after.partition("@")
    where, q, query = tail.partition("?")
    if not at or "@" not in where:
        return None
    return f"{scheme}://{user}:***@{where[where.rindex('@') + 1:]}{q}{query}"


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL, a path or a ``file:`` URI (with ``uri=true``); None for other databases and
    in-memory SQLite."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # make_engine says what is wrong with it
        return None
    return _sqlite_file(parsed)


def _asbool(value) -> bool:
    """A URL's boolean option as SQLAlchemy reads it; False for one it cannot read (make_engine then says so)."""
    try:
        return asbool(value)
    except ValueError:
        return False


def _is_uri(parsed: URL) -> bool:
    """Whether a SQLite URL names its database as a SQLite URI (``uri=true``), as SQLAlchemy's pysqlite reads it."""
    return _asbool(parsed.query.get("uri", False))


def _uri_mode(parsed: URL) -> str | None:
    """The ``mode`` a SQLite URI URL opens its file in (ro, rw, rwc, memory); None for a plain path."""
    return parsed.query.get("mode") if _is_uri(parsed) else None


def _file_uri(parsed: URL) -> bool:
    """Whether a SQLite URL's database is a ``file:`` URI, whose query options (mode, vfs, immutable) SQLite reads."""
    return _is_uri(parsed) and (parsed.database or "").startswith("file:")


def _database_name(parsed: URL) -> str | None:
    """What a SQLite URL's database part names: a path, ``:memory:`` or "" as written, a ``file:`` URI's path decoded;
    None for a URI of another host's file."""
    database = parsed.database or ""
    if not _file_uri(parsed):
        return database
    # file:path, file:/path, file:///path and file://localhost/path (https://www.sqlite.org/uri.html); another
    # authority is left to SQLite, which refuses it in one line.
    database = database[len("file:"):].partition("#")[0]
    if database.startswith("//"):
        authority, _, rest = database[2:].partition("/")
        if authority not in ("", "localhost"):
            return None
        database = "/" + rest
    return unquote(database)


def _sqlite_file(parsed: URL) -> Path | None:
    """The file a SQLite URL names (see sqlite_path), ``~`` expanded as for a plain path."""
    if parsed.get_backend_name() != "sqlite" or (_file_uri(parsed) and _uri_mode(parsed) == "memory"):
        return None
    database = _database_name(parsed)
    if not database or database == ":memory:":
        return None
    return Path(database).expanduser()


def _names_no_file(parsed: URL) -> bool:
    """Whether a SQLite URL opens a database with no file (``:memory:``, an empty name, a ``file::memory:`` URI,
    ``mode=memory`` or ``vfs=memdb``), which SQLite drops when its connection closes."""
    if _file_uri(parsed) and (_uri_mode(parsed) == "memory" or parsed.query.get("vfs") == "memdb"):
        return True
    return _database_name(parsed) in ("", ":memory:")  # file: alone is a temporary database


def _writable(path: Path) -> bool:
    """Whether this process may write the SQLite file and its folder (WAL keeps -wal and -shm files beside it)."""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def _url_read_only_option(parsed: URL) -> str | None:
    """The option of a SQLite URI URL that opens its file read-only (mode=ro, immutable=1); None where none does."""
    if _uri_mode(parsed) == "ro":
        return "mode=ro"
    if _is_uri(parsed) and _asbool(parsed.query.get("immutable", False)):
        return "immutable=1"
    return None


def _why_read_only(parsed: URL) -> str:
    """Why SQLite refused a write to the file of a SQLite URL: the URL's mode=ro, or the file's permissions."""
    path = _sqlite_file(parsed)
    option = _url_read_only_option(parsed)
    # make_engine adds its options only for a file this process cannot write: on one it can, they are the user's.
    if option and path is not None and _writable(path):
        return READ_ONLY_URL.format(option=option)
    return NOT_WRITABLE


def _unwritable_file_uri_options(path: Path) -> dict[str, str] | None:
    """SQLite URI options to read an existing file this process cannot write; None when it can write it."""
    if not path.exists() or _writable(path):
        return None
    if any(Path(f"{path}{suffix}").exists() for suffix in ("-wal", "-shm")):
        return {"mode": "ro"}  # a writer has it open (or left its WAL): read through its -shm
    if Path(f"{path}-journal").exists():
        # A writer stopped mid-transaction left its rollback journal: immutable would ignore it and read the half-written
        # pages as they are. Read-only, SQLite itself sees whether the journal is hot and refuses rather than read them.
        return {"mode": "ro"}
    # A read-only connection to a WAL database makes a -shm file, which it cannot in a read-only folder and
    # which, made by this process with the file's mode, would lock its owner out of writing. With no -wal,
    # every commit is in the file and no writer is attached, so it is read as immutable (no locks, no -shm).
    return {"mode": "ro", "immutable": "1"}


def _configure_sqlite(dbapi_conn, record, read_only: bool) -> None:
    """Connect hook of a SQLite file: busy timeout and foreign keys (WAL is set by open_db, see _use_wal)."""
    # Foreign keys are off by default. pysqlite's own deferred BEGIN is turned off: see _sqlite_begin.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
    if read_only:
        record.info["slab_read_only_file"] = True
    else:
        cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _use_wal(engine: Engine) -> None:
    """Put the SQLite file of ``engine`` in WAL mode (persistent: once for the file), unless it is read-only here."""
    # WAL lets readers (slab status --watch) run while the launcher writes. Set only once the file is known to be a
    # scalinglab database: switching is a write, which a read of another program's database (refused) must not make,
    # as a file opened read-only keeps its journal mode.
    raw = engine.raw_connection()
    try:
        if not raw.info.get("slab_read_only_file"):
            cur = raw.driver_connection.cursor()
            try:
                _set_wal(cur)
            finally:
                cur.close()
    finally:
        raw.close()


def _set_wal(cur) -> None:
    # Switching a new file to WAL takes an exclusive lock without calling the busy handler, so when two
    # launchers create the same database at once one of them gets "database is locked" at once; retry it
    # until the other's switch lands (WAL is then persistent and the pragma a no-op).
    deadline = time.monotonic() + SQLITE_BUSY_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _sqlite_begin(conn) -> None:
    # BEGIN IMMEDIATE takes the write lock up front (waiting up to the busy timeout), so a transaction that
    # reads and then writes (registering a plan) cannot fail on a lock upgrade when two launchers race.
    # A file opened read-only cannot take the write lock at all.
    # A connection that only reads (see `reading`) begins deferred too: in WAL it reads the last commit without
    # waiting for the writer, and never holds up the writer.
    read_only = (conn.info.get("slab_read_only") or conn.info.get("slab_read_only_file")
                 or conn.info.get("slab_reading"))
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _first_line(exc: Exception) -> str:
    """The first line of an exception's message (SQLAlchemy's go on with URL forms and links)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def make_engine(url: str | None = None) -> Engine:
    """A SQLAlchemy engine for the URL; SQLite in WAL mode with a busy timeout and foreign keys, or read-only
    when this process cannot write the file or its URL says mode=ro (``sqlite:///file:PATH?mode=ro&uri=true``)."""
    url = resolve_url(url)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        hint = ""
        if "://" not in url:  # a file path where a URL was expected, the commonest slip
            hint = f"; for a SQLite file write sqlite:///{url} ({SQLITE_FORMS})"  # an absolute path gets its 4th slash
        raise DatabaseError(f"bad database URL {shown_url(url)!r}: {exc}{hint}") from None
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, parsed)
    _refuse_unsupported(url, parsed)
    if _mask_raw_at_password(url) is not None:
        # SQLAlchemy ends the password at its first @ and takes the rest for the host: the driver's error would name
        # that host, showing the rest of the password.
        raise DatabaseError(f"bad database URL {shown_url(url)!r}: an @ in its password (or database name) must be "
                            "written %40, as the URL has an @ after the password's")
    connect_args = {}
    if (parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in ("psycopg", "psycopg2")
            and "connect_timeout" not in parsed.query):
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
    try:
        return create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    except NoSuchModuleError:  # a driver SQLAlchemy has no dialect for (postgresql+nosuch://)
        raise DatabaseError(f"unknown database driver {parsed.get_driver_name()!r} in {shown_url(url)!r}: expected "
                            f"{SUPPORTED_KINDS}") from None
    except ModuleNotFoundError as exc:  # "No module named 'MySQLdb'" did not say that it is the URL's driver
        raise DatabaseError(f"cannot use database URL {shown_url(url)!r}: its driver, the Python module {exc.name!r}, is "
                            f"not installed; install it, or name another URL (sqlite:///FILE, or "
                            "postgresql+psycopg://USER:PASSWORD@HOST/DB)") from None
    except Exception as exc:  # bad options: say it plainly
        raise DatabaseError(f"cannot use database URL {shown_url(url)!r}: {_first_line(exc)}") from None


#: Options SQLAlchemy's pysqlite reads from any SQLite URL (others reach SQLite only in a URI URL, uri=true).
PYSQLITE_OPTIONS = ("uri", "timeout", "isolation_level", "detect_types", "check_same_thread", "cached_statements")


def _refuse_unsupported(url: str, parsed: URL) -> None:
    """Raise DatabaseError for a URL of a database other than SQLite or PostgreSQL, before any driver is loaded."""
    # The writer's inserts and upserts are SQLite's and PostgreSQL's own (ON CONFLICT): another database had taken
    # `slab add` and then failed the launch.
    backend = parsed.get_backend_name()
    if backend in SUPPORTED_BACKENDS:
        return
    try:
        parsed.get_dialect()  # SQLAlchemy's dialect only: its driver is imported by create_engine
    except NoSuchModuleError:  # a scheme SQLAlchemy has no dialect for ("Can't load plugin" says little)
        raise DatabaseError(f"unknown database kind {backend!r} in {shown_url(url)!r}: expected "
                            f"{SUPPORTED_KINDS}") from None
    except Exception:  # a third-party dialect that fails to load: not one scalinglab writes either way
        pass
    raise DatabaseError(f"unsupported database kind {backend!r} in {shown_url(url)!r}: scalinglab stores its results "
                        f"in SQLite or PostgreSQL only: expected {SUPPORTED_KINDS}")


def _refuse_ignored_options(url: str, parsed: URL) -> None:
    """Raise DatabaseError for options of a plain-path SQLite URL that SQLAlchemy would drop with only a warning:
    ``sqlite:///slab.db?mode=ro`` opened the file read-write."""
    ignored = [key for key in parsed.query if key not in PYSQLITE_OPTIONS]
    if _is_uri(parsed) or not ignored:
        return
    names = ", ".join(map(repr, ignored))
    options = {key: value for key, value in parsed.query.items() if key != "uri"}
    uri = f"sqlite:///file:{quote(parsed.database or '')}?{urlencode(options, doseq=True)}&uri=true"
    raise DatabaseError(f"bad database URL {url!r}: a plain SQLite path takes no option {names} (only "
                        f"{', '.join(PYSQLITE_OPTIONS[1:])}); SQLite's own options, such as mode=ro, are read from its URI "
                        f"form: {uri}")


def _sqlite_engine(url: str, parsed) -> Engine:
    """The engine of a SQLite URL (see make_engine); a URL SQLAlchemy rejects raises DatabaseError."""
    hint = f"({SQLITE_FORMS})"
    if parsed.host or parsed.username or parsed.password or parsed.port:
        # sqlite://slab.db (two slashes) reads slab.db as a host; SQLAlchemy's message does not say so.
        what = f"{parsed.host!r} is read as a host name" if parsed.host else "it has a user or port"
        raise DatabaseError(f"bad database URL {shown_url(url)!r}: SQLite has no server, but {what} {hint}")
    if _names_no_file(parsed):
        # Every command opens its own connections and a launch records results from other processes: a database in
        # memory would take the runs, say so, and keep nothing. Shown as given: it holds no password (refused above),
        # and shown_url would escape :memory:.
        raise DatabaseError(f"database URL {url!r} names no file: SQLite keeps nothing of a database in "
                            f"memory once the command ends; name a file ({SQLITE_FORMS})")
    _refuse_ignored_options(url, parsed)
    path = _sqlite_file(parsed)
    mode = _uri_mode(parsed)
    # SQLite refuses the WAL switch and BEGIN IMMEDIATE on a file opened so: begin as a reader instead.
    read_only = _url_read_only_option(parsed) is not None
    if path is not None:
        # A mode the user set is kept (rw on a file this process cannot write fails, as asked); with none, or with
        # ro, a file it cannot write is read as _unwritable_file_uri_options says (immutable when no writer has it
        # open).
        extra = _unwritable_file_uri_options(path) if mode in (None, "ro") else None
        read_only = read_only or bool(extra)
        if extra or _is_uri(parsed):
            # Rebuilt from the file, as sqlite_path and open_db see it (~ expanded, relative to the cwd, escaped once).
            query = {**parsed.query, **(extra or {}), "uri": "true"}
            parsed = parsed.set(database=f"file:{quote(str(path.absolute()))}", query=query)
        else:
            parsed = parsed.set(database=str(path))  # with ~ expanded, as sqlite_path and open_db see it
    try:
        engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_MS / 1000})
    except Exception as exc:
        raise DatabaseError(f"bad database URL {shown_url(url)!r}: {_first_line(exc)} {hint}") from None
    event.listen(engine, "connect", functools.partial(_configure_sqlite, read_only=read_only))
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _driver_message(exc: Exception) -> str:
    """The database driver's own message of an error, on one line: without SQLAlchemy's wrapping, statement and link."""
    orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = str(orig).split("\n(Background on this error")[0].split("\n[SQL: ")[0]
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(orig).__name__


#: SQLite's words for a state of the file (not of a statement): locked by another process, not a database, damaged.
FILE_STATES = ("database is locked", "database table is locked", "file is not a database",
               "database disk image is malformed")


def explain(exc: Exception, url: URL | str) -> str:
    """One line saying why the database of ``url`` failed with ``exc`` (a driver error), and what to do where it is
    a state of the file the user can act on: locked, damaged, not a database, a journal it cannot roll back."""
    parsed = make_url(url) if isinstance(url, str) else url
    detail = _driver_message(exc)
    path = _sqlite_file(parsed)
    if path is None:
        if "timeout expired" in detail:  # libpq's words for a connect_timeout passed
            if "connect_timeout" in parsed.query:
                return f"{detail} (the server did not answer within the URL's connect_timeout)"
            return (f"{detail} (the server did not answer within {PG_CONNECT_TIMEOUT_S:g} s; add ?connect_timeout=SECONDS "
                    "to the URL to wait longer)")
        return detail
    code = getattr(getattr(exc, "orig", None) or exc, "sqlite_errorname", "")
    if any(state in detail for state in FILE_STATES[:2]):
        return (f"{path} is locked: another process has held a lock on it for over {SQLITE_BUSY_MS / 1000:g} s (a "
                "program with the file open in a transaction, or a copy in progress); try again once it has finished")
    if FILE_STATES[2] in detail:
        return f"{path} is not a SQLite database (another kind of file, or encrypted): check the path"
    if FILE_STATES[3] in detail:
        return (f"{path} is damaged ({detail}), as an interrupted copy or a full disk leaves a file: restore it from a "
                f"backup, or save what it holds with `sqlite3 {path} .recover`")
    if code == "SQLITE_READONLY_ROLLBACK":
        return (f"a writer stopped in the middle of a transaction and left {path.name}-journal, which SQLite must roll "
                f"back before {path} can be read, and {_why_read_only(parsed)}; open it once where it is writable (any "
                "slab command does)")
    if Path(f"{path}-wal").exists() and not Path(f"{path}-shm").exists() and not _writable(path):
        return (f"{path.name}-wal holds commits not yet in {path}, and reading them needs a {path.name}-shm file, which "
                f"cannot be made here: {NOT_WRITABLE}; open it once where it is writable (any slab command does)")
    return _not_writable_hint(parsed, detail)


@contextmanager
def write_errors(engine: Engine, doing: str) -> Iterator[None]:
    """Raise a driver error of the database's state (locked, damaged, unreachable) inside as one DatabaseError line,
    ``cannot DOING: why``; errors of the statements themselves (a constraint) propagate as they are."""
    try:
        yield
    except SADatabaseError as exc:
        if type(exc) not in (SADatabaseError, OperationalError):  # IntegrityError and kin: a statement's fault
            raise
        raise DatabaseError(f"cannot {doing}: {explain(exc, engine.url)}") from None


def _not_writable_hint(parsed: URL, detail: str) -> str:
    """``detail``, naming the cause when SQLite failed because it may not write the file or its folder (or the URL
    opens it read-only)."""
    path = _sqlite_file(parsed)
    if path is None:
        return detail
    if "readonly database" in detail:
        return f"{detail} ({_why_read_only(parsed)})"
    if "unable to open database file" in detail and not _writable(path if path.exists() else path.parent):
        return f"{detail} ({NOT_WRITABLE})"
    return detail


def open_db(url: str | None = None, *, create: bool = True) -> Engine:
    """Open (and with ``create`` initialise) the database; refuse a missing one or a newer schema."""
    url = resolve_url(url)
    path = sqlite_path(url)
    if path is not None and path.is_dir():  # SQLite would say only "unable to open database file"
        raise DatabaseError(f"{path} is a folder, not a database file: name a file in it, e.g. sqlite:///{path / 'slab.db'}")
    if path is not None and not path.exists():
        if (mode := _uri_mode(make_url(url))) in EXISTING_ONLY_MODES:  # SQLite says "unable to open database file"
            raise DatabaseError(f"no database at {path}: the URL's mode={mode} opens only a file that exists; "
                                "check the path")
        if not create:
            raise DatabaseError(f"no database at {path}; register a plan first with `slab add PLAN`")
        if path.parent.exists() and not path.parent.is_dir():  # 'mkdir -p' of a file would fail: say what it is
            raise DatabaseError(f"{path.parent} is a file, not a folder, so it cannot hold the database {path.name}: "
                                "check the path")
        if not path.parent.is_dir():
            # Made silently, a misspelt folder would hold a new, empty database: the study would be trained again there.
            raise DatabaseError(f"no folder {path.parent} for the database {path.name}: make it first "
                                f"(mkdir -p {shlex.quote(str(path.parent))}), or check the path")
    if path is not None and not create and path.is_file() and path.stat().st_size == 0:
        # An empty file has no tables either; connecting would turn it into a WAL database on the way to saying so.
        raise DatabaseError(f"the database {path} is an empty file, with no scalinglab tables; register a plan first "
                            "with `slab add PLAN`")
    engine = make_engine(url)
    try:
        # Checked first without the write lock, so that opening a database a launcher is writing does not wait on it.
        with reading(engine) as conn:
            ready = _schema_ready(conn, create)
            # A file read-only here (mode=ro, immutable, permissions) cannot be upgraded: its missing columns are read
            # as empty instead, where that is all it lacks.
            ready = ready or (conn.info.get("slab_read_only_file") and _view_missing_columns(engine, conn))
        if not ready:
            with engine.begin() as conn:
                _check_or_create(conn, create)
        if engine.dialect.name == "sqlite":
            _use_wal(engine)
    except _ForeignDatabase as exc:
        engine.dispose()
        raise DatabaseError(f"the database {shown_url(url)!r} is not scalinglab's: {exc}; name another with --db "
                            "or SLAB_DB") from None
    except DatabaseError:
        engine.dispose()
        raise
    except Exception as exc:
        engine.dispose()
        raise DatabaseError(f"cannot open database {shown_url(url)!r}: {explain(exc, engine.url)}") from None
    return engine


#: PostgreSQL advisory-lock keys: one process at a time checks or creates the schema, or registers plans.
PG_SCHEMA_LOCK = 0x5CA1AB1E
PG_REGISTER_LOCK = 0x5CA1AB1F


def serialize(conn: Connection | Session, key: int) -> None:
    """Make the current transaction the only one holding ``key`` until it ends (PostgreSQL; SQLite's
    BEGIN IMMEDIATE already lets one writer in at a time)."""
    bind = conn.get_bind() if isinstance(conn, Session) else conn
    if bind.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def _schema_version(conn: Connection, create: bool) -> int | None:
    """The database's schema version (0 when unrecorded), None where it has no tables; refuse a newer one, and a
    database without tables unless ``create``."""
    if not inspect(conn).has_table(Meta.__tablename__):
        _refuse_foreign(conn)
        if not create:
            raise DatabaseError("the database has no scalinglab tables; register a plan first with `slab add PLAN`")
        return None
    have = {c["name"] for c in inspect(conn).get_columns(Meta.__tablename__)}
    if not {"key", "value"} <= have:
        raise _ForeignDatabase(f"its meta table has columns {', '.join(sorted(have))}, not key and value")
    row = conn.execute(select(Meta.value).where(Meta.key == "schema_version")).scalar_one_or_none()
    try:
        version = int(row) if row is not None else 0
    except (TypeError, ValueError):
        raise _ForeignDatabase(f"its meta table gives schema_version {row!r}, not a whole number") from None
    if version > SCHEMA_VERSION:
        raise DatabaseError(
            f"database schema version {version} is newer than this scalinglab's ({SCHEMA_VERSION}); upgrade scalinglab"
        )
    return version


def _refuse_foreign(conn: Connection) -> None:
    """Raise _ForeignDatabase for a database without scalinglab's meta table that holds a table of scalinglab's name,
    or (a SQLite file) any table or view: another program's, which creating the schema would write into."""
    # scalinglab makes meta with its other tables, in one transaction: one of them without it is another program's.
    # A PostgreSQL database is often shared with other programs' tables; a SQLite file is one program's.
    insp = inspect(conn)
    names = sorted({*insp.get_table_names(), *insp.get_view_names()})
    ours = [name for name in names if name in TABLES]
    if ours:
        raise _ForeignDatabase(f"it has a table named {ours[0]} but no meta table, which scalinglab makes with its "
                               "tables")
    if names and conn.dialect.name == "sqlite":
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise _ForeignDatabase(f"it holds another program's tables ({shown}) and none of scalinglab's")


def _missing_columns(conn: Connection) -> list:
    """Columns of the schema that the database's existing tables lack (tables it lacks are created whole)."""
    insp = inspect(conn)
    missing = []
    for table in Base.metadata.sorted_tables:
        if insp.has_table(table.name):
            have = {c["name"] for c in insp.get_columns(table.name)}
            missing += [c for c in table.columns if c.name not in have]
    return missing


def _schema_ready(conn: Connection, create: bool) -> bool:
    """Whether the database holds this version's tables and columns, so that opening it writes nothing."""
    return _schema_version(conn, create) == SCHEMA_VERSION and not _missing_columns(conn)


def _view_missing_columns(engine: Engine, conn: Connection) -> bool:
    """On a SQLite file read-only here whose tables all exist, give every connection of ``engine`` a TEMP VIEW of each
    table lacking nullable columns of the schema, with the table's columns and NULL for those (a temporary view
    takes precedence over the table of its name); False, doing nothing, where a table or a NOT NULL column is missing."""
    insp = inspect(conn)
    if not all(insp.has_table(table.name) for table in Base.metadata.sorted_tables):
        return False
    missing = _missing_columns(conn)
    if any(not column.nullable for column in missing):
        return False
    q = conn.dialect.identifier_preparer
    views: dict = {}
    for column in missing:
        views.setdefault(column.table, []).append(f"NULL AS {q.format_column(column)}")
    statements = [f"CREATE TEMP VIEW {q.format_table(table)} AS SELECT *, {', '.join(nulls)} "
                  f"FROM main.{q.format_table(table)}" for table, nulls in views.items()]
    if statements:
        def add_views(dbapi_conn, record) -> None:
            """Connect hook: this connection's views of the tables with missing columns."""
            cur = dbapi_conn.cursor()
            for statement in statements:
                cur.execute(statement)
            cur.close()

        event.listen(engine, "connect", add_views)
        conn.invalidate()  # this pooled connection predates the views: it is not reused
    return True


def _check_or_create(conn: Connection, create: bool) -> None:
    # Concurrent CREATE TABLEs of one name collide in PostgreSQL's catalog (two launchers on a new
    # database): the second waits here and then finds the tables made.
    serialize(conn, PG_SCHEMA_LOCK)
    _schema_version(conn, create)
    Base.metadata.create_all(conn)
    # Columns added to a table without a version bump (runs.resumed_from_step came after the first release, whose
    # databases say schema 1): added here, empty, as a later release would have made them.
    for column in _missing_columns(conn):
        if not column.nullable:
            raise DatabaseError(f"the database's {column.table.name} table lacks column {column.name}, which this "
                                "scalinglab needs and cannot add; re-register the plans into a new database")
        q = conn.dialect.identifier_preparer
        conn.exec_driver_sql(f"ALTER TABLE {q.format_table(column.table)} ADD COLUMN {q.format_column(column)} "
                             f"{column.type.compile(dialect=conn.dialect)}")
    if conn.execute(select(Meta).where(Meta.key == "schema_version")).first() is None:
        conn.execute(Meta.__table__.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))


@contextmanager
def session(engine: Engine) -> Iterator[Session]:
    """A session in one transaction: committed on success, rolled back on error; a write to a database this
    process may not write raises DatabaseError."""
    try:
        with Session(engine) as s, s.begin():
            yield s
    except OperationalError as exc:
        if "readonly database" not in str(exc.orig):
            raise
        raise DatabaseError(f"cannot write the database: {_why_read_only(engine.url)} ({exc.orig})") from None


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection for reads: on SQLite its transactions begin deferred (plain BEGIN), so that they neither wait
    for nor block the writer."""
    with engine.connect() as conn:
        conn.info["slab_reading"] = True  # read by _sqlite_begin; the info outlives this checkout, hence the pop
        try:
            yield conn
        finally:
            conn.rollback()
            conn.info.pop("slab_reading", None)


@contextmanager
def read_only(engine: Engine) -> Iterator[Connection]:
    """A connection on which the database itself refuses writes (SQLite query_only, PostgreSQL READ ONLY)."""
    with engine.connect() as conn:
        backend = engine.dialect.name
        if backend == "sqlite":
            conn.info["slab_read_only"] = True  # a plain BEGIN: query_only refuses BEGIN IMMEDIATE
            conn.exec_driver_sql("PRAGMA query_only=ON")
            # query_only does not stop ATTACH, which creates the file it names.
            raw = conn.connection.driver_connection
            raw.set_authorizer(_refuse_attach)
        elif backend == "postgresql":
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
        try:
            yield conn
        finally:
            conn.rollback()
            if backend == "sqlite":
                try:
                    raw.set_authorizer(None)
                except TypeError:  # Python 3.10 takes no None: an authorizer that allows everything
                    raw.set_authorizer(lambda *_: sqlite3.SQLITE_OK)
                conn.exec_driver_sql("PRAGMA query_only=OFF")
                conn.rollback()
                conn.info.pop("slab_read_only", None)


def _refuse_attach(action: int, *_) -> int:
    """SQLite authorizer for read-only connections: refuse ATTACH and DETACH, allow the rest."""
    return sqlite3.SQLITE_DENY if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH) else sqlite3.SQLITE_OK
