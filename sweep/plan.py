"""Spreadsheet plans: parse a CSV/XLSX plan, validate every cell, and expand its rows into RunSpecs.

A plan is a header row of known columns (``COLUMNS``) and one row per block of runs. A cell holds

- a value: ``64``, ``3e-4``, ``10M`` (suffixes k, M, B, T), ``lightning``;
- a list: ``64|128|256`` (the row is repeated for each item; a ``name`` cell is one label, ``|`` included);
- a geometric range ``64..1024*2`` (64, 128, ..., 1024) or an arithmetic range ``1..5+1``;
- an expression ``=20*params`` over other columns of the same run and the derived names ``params``
  (the model's total parameter count), ``nonembed_params``, ``flops_per_token``, ``tokens`` and ``flops``;
  arithmetic, ``min``, ``max`` and ``round`` only, parsed with ``ast`` and never ``eval``-ed.

A row expands to the product of its lists and ranges; expressions are evaluated per expanded run in
dependency order. Every row has a cell for each column: an empty cell (``a,,b``) takes the column's default, and a
row with fewer cells than the header is an error. Blank lines and lines starting with ``#`` (quoted or not) are ignored;
so is a column with no name in the header whose cells are all empty (a spreadsheet's spacer); no cell holds a line
break. Every error names ``file:row:column`` (row = the line number the row starts on), and all of a load's
errors are reported together. A run whose budget falls within the same whole steps as an earlier run's trains exactly
as that one, and takes its budget and run id (a registered run's too: ``sweep.registry.adopt_registered_budgets``).
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import difflib
import functools
import hashlib
import io
import itertools
import math
import operator
import re
import string
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

from models.config import (
    ARCHS,
    BYTE_VOCAB_SIZE,
    DATA_SOURCES,
    MQAR_VOCAB_SIZE,
    ModelConfig,
    count_params,
    flops_per_token,
    hybrid_pattern,
    hybrid_period,
    shape_for_params,
)
from models.sources import (
    STDLIB_SURE_BYTES,
    content_digest,
    is_token_source,
    parse_data,
    split_sizes,
    stdlib_split_sizes,
    token_max_id,
)
from sweep.spec import RunSpec

DEFAULT_MAX_RUNS = 100_000
MAX_ERRORS = 20
SCHEDULES = ("cosine", "wsd", "constant")
EVALS = ("niah", "mqar")
DERIVED = ("params", "nonembed_params", "flops_per_token", "tokens", "flops")
#: Shortest seq_len for niah evals (seq_len tokens hold the needle, the question and the key's digits) and for
#: passkey data (a document of seq_len + 1 tokens holds them and the key's '.'), as computed by
#: models.data.passkey_prompt. Mirrored, not imported: models.data imports torch, which planning must not
#: load; tests/sweep/test_plan.py checks them against models.data and models.evals.
NIAH_MIN_SEQ_LEN = 104
PASSKEY_MIN_SEQ_LEN = 104
#: MQAR's key-value pairs per sequence are seq_len // MQAR_PAIRS_DIVISOR, and keys and values split the
#: vocabulary in halves; mirrored from models.data as the two above.
MQAR_PAIRS_DIVISOR = 16
#: Seeds are below this: torch.manual_seed takes an unsigned 64-bit integer (numpy's generators take any size).
MAX_SEED = 2**64
#: The most layers a run may have: counting its parameters walks its layers (models.config.count_params), about 0.1 s
#: for this many, where 1B hung slab plan. Ten times the deepest Transformer trained (DeepNet's 1,000).
MAX_LAYERS = 10_000
#: Spreadsheet formats to save as .csv or .xlsx first (read as CSV they would fail as "not UTF-8 text").
_OTHER_SHEETS = (".ods", ".xls", ".xlsb", ".numbers")
_FORMULA = "spreadsheet formula; enter plan expressions as text (prefix with ')"
#: What a spreadsheet writes in a cell whose formula failed (a CSV saved from one holds them as text).
_SHEET_ERRORS = frozenset({"#NAME?", "#VALUE!", "#REF!", "#DIV/0!", "#N/A", "#NUM!", "#NULL!", "#SPILL!", "#CALC!"})


@dataclass(frozen=True)
class Column:
    """One plan column: its kind of value, default (None = required or derived) and meaning."""

    kind: str  # int | float | str | list-str (a set such as evals, not a product)
    default: Any
    doc: str


#: Every column a plan may have, with its default: the one place defaults live.
COLUMNS: dict[str, Column] = {
    "name": Column("str", None, "one label for the row's runs (a | in it is part of it, not a list); may use bare {fields} "
                                "of the spec or derived names, with a format such as {lr:.0e}, e.g. {arch}-{params}"),
    "arch": Column("str", None, "softmax | lightning | hybrid | hgrn2 | mamba2 (required)"),
    "d_model": Column("int", None, "model width (or give params)"),
    "n_layers": Column("int", None, f"number of blocks, at most {MAX_LAYERS:,} (or give params)"),
    "n_heads": Column("int", None, "attention heads; default d_model // 64"),
    "params": Column("float", None, "target non-embedding size, resolved by models.config.shape_for_params (a hybrid's "
                                    "layers in whole periods); in an expression, params is the total count"),
    "hybrid": Column("str", 8, "softmax every k-th layer (8 = one per seven lightning) or a pattern like LLLS"),
    "vocab": Column("int", None, f"vocabulary; default {BYTE_VOCAB_SIZE} for byte data, {MQAR_VOCAB_SIZE} for mqar"),
    "seq_len": Column("int", 512, "training context length"),
    "batch_size": Column("int", 32, "sequences per optimizer step"),
    "tokens": Column("float", None, "training tokens (give tokens or flops, not both)"),
    "flops": Column("float", None, "training FLOPs budget; tokens = flops / flops_per_token"),
    "lr": Column("float", 1e-3, "peak learning rate"),
    "warmup": Column("float", 0.05, "warmup: steps if >= 1, else a fraction of the run's steps"),
    "schedule": Column("str", "cosine", "cosine | wsd | constant"),
    "min_lr_ratio": Column("float", 0.1, "final learning rate as a fraction of lr"),
    "weight_decay": Column("float", 0.1, "AdamW weight decay"),
    "grad_clip": Column("float", 1.0, "gradient-norm clipping threshold"),
    "seed": Column("int", 0, "random seed (init and data order)"),
    "data": Column("str", "stdlib", "stdlib | passkey | mqar | a .txt/.bin path; mixtures like stdlib+passkey@0.1 (weights in (0, 1))"),
    "evals": Column("list-str", "", "evaluations at every validation (eval_every) and at the end: niah (seq_len >= 104) | mqar, or empty"),
    "eval_every": Column("int", 0, "steps between validation evals (0 = at the end only)"),
    "gpus": Column("float", 1.0, "fraction of one GPU per run (0.25 packs four), or a whole number for data-parallel"),
    "tags": Column("list-str", "", "free labels, e.g. ablation|v2"),
}

#: What each derived name means in an expression (``=20*params``) or a name template.
DERIVED_DOCS = {
    "params": "the model's total parameter count, embeddings included (not the params column's target)",
    "nonembed_params": "the parameter count without embeddings",
    "flops_per_token": "training FLOPs per token as models.config counts them (every matmul, head and attention)",
    "tokens": "the run's training tokens (given, or flops / flops_per_token)",
    "flops": "the run's training FLOPs (given, or tokens x flops_per_token)",
}
assert set(DERIVED_DOCS) == set(DERIVED)


def column_reference() -> list[dict[str, str]]:
    """Every plan column with its default and meaning, then the derived names expressions may use (slab plan --columns)."""
    rows = [{"name": name, "kind": col.kind, "default": "" if col.default is None else str(col.default), "meaning": col.doc}
            for name, col in COLUMNS.items()]
    return rows + [{"name": name, "kind": "derived", "default": "", "meaning": doc} for name, doc in DERIVED_DOCS.items()]


_NUM_SUFFIX = {"k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
_SUFFIX_DIGITS = {suffix: round(math.log10(scale)) for suffix, scale in _NUM_SUFFIX.items()}
_INT_RE = re.compile(r"^[+-]?\d+$")
_NUM_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?([kKMBGT])?$")
# A '+' right after an exponent's e belongs to the number (1e+1..1e+2*2); any other '+' is the step.
_RANGE_RE = re.compile(r"^(?P<a>[^.](?:[^*+]|(?<=[eE])\+)*?)\.\.(?P<b>(?:[^*+]|(?<=[eE])\+)+)(?P<op>[*+])(?P<s>.+)$")


@dataclass(frozen=True)
class PlanIssue:
    """One problem in a plan, located by file, row (line number) and column."""

    path: str
    row: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = self.path
        if self.row is not None:
            where += f":{self.row}"
        if self.column:
            where += f":{self.column}"
        return f"{where}: {self.message}"


class PlanError(ValueError):
    """A plan has errors: ``issues`` lists the first ``MAX_ERRORS``, ``total`` counts every one, and ``more`` says
    whether some are not listed."""

    def __init__(self, issues: list[PlanIssue], total: int = 0):
        self.issues = issues[:MAX_ERRORS]
        self.total = max(total, len(issues))
        self.more = self.total > len(self.issues)
        lines = [str(i) for i in self.issues]
        if self.more:
            left = self.total - len(self.issues)
            lines.append(f"and {left} more error{'s' if left != 1 else ''}")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class PlannedRun:
    """A run as one plan row asked for it: the spec plus the plan's label for it."""

    spec: RunSpec
    row: int
    name: str | None
    tags: str
    #: An expression of the row read ``params``, the total count (embeddings included), not the column's target.
    total_params_read: bool = False
    #: The row's hybrid period (``models.config.hybrid_period`` of its cell); 1 for other archs.
    hybrid_period: int = 1
    #: The row's params target (the size its shape was chosen for), where it gave one.
    params_target: float | None = None


@dataclass
class Plan:
    """A parsed, validated and expanded plan file."""

    path: Path
    name: str
    sha256: str
    runs: list[PlannedRun] = field(default_factory=list)

    def unique_specs(self) -> dict[str, RunSpec]:
        """The plan's distinct runs by run id (two rows may ask for the same run)."""
        return {r.spec.run_id: r.spec for r in self.runs}


# ---------------------------------------------------------------- reading


def read_rows(path: Path) -> list[tuple[int, list[str]]]:
    """The file's non-comment, non-blank rows as (line number, cells); raises PlanError if unreadable."""
    return _read_plan_file(path)[1]


def _read_plan_file(path: Path) -> tuple[bytes, list[tuple[int, list[str]]]]:
    """The file's bytes, read once, and its rows as read_rows gives them."""
    where = str(path)
    if path.suffix.lower() in _OTHER_SHEETS:
        message = "only .csv and .xlsx plans are read: save this sheet as .csv or .xlsx"
        raise PlanError([PlanIssue(where, None, None, message)])
    try:
        # Read once, and digested from these bytes: a second read gets nothing from a pipe (slab add <(...)), and may
        # get another version of a file being saved.
        raw = _read_capped(path, MAX_PLAN_BYTES + 1)
    except OSError as exc:
        raise PlanError([PlanIssue(where, None, None, f"cannot read the file: {exc.strerror or exc}")]) from None
    if len(raw) > MAX_PLAN_BYTES:  # /dev/zero, or a data file given for a plan, had been read until memory ran out
        message = f"over {MAX_PLAN_BYTES >> 20} MiB: a plan is a sheet of rows (ranges and lists expand them), not data"
        raise PlanError([PlanIssue(where, None, None, message)])
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        return raw, _read_xlsx(where, raw)
    head = raw[:64]
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(head) >= 4 and not (any(head[0::2]) and any(head[1::2]))):
        # Excel's "Unicode Text": without its BOM, UTF-8 decoding would pass and every name read 'a\x00r\x00c...'
        message = "UTF-16 text (as Excel's \"Unicode Text\" saves): save the plan as \"CSV UTF-8\" instead"
        raise PlanError([PlanIssue(where, None, None, message)])
    if b"\x00" in raw:
        line = raw[: raw.index(b"\x00")].count(b"\n") + 1
        raise PlanError([PlanIssue(where, line, None, "a binary file (it holds NUL bytes), not CSV text")])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PlanError(
            [PlanIssue(where, line, None, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})")]
        ) from None
    return raw, _read_csv(where, text)


def _read_capped(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of the file, read in pieces (one read of ``limit`` would allocate all of it at once)."""
    parts, size = [], 0
    with path.open("rb") as f:
        while size < limit and (part := f.read(min(1 << 20, limit - size))):
            parts.append(part)
            size += len(part)
    return b"".join(parts)


class _Lines:
    """A file's lines for csv.reader, which takes as many as one row needs (a quoted cell may span lines);
    ``pos`` is the index of the next line, and may be set back to read a row again."""

    def __init__(self, lines: list[str]):
        self.lines, self.pos = lines, 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self.pos == len(self.lines):
            raise StopIteration
        self.pos += 1
        return self.lines[self.pos - 1]


def _read_csv(where: str, text: str) -> list[tuple[int, list[str]]]:
    # Lines end at \n, \r\n or \r, as an editor counts them (str.splitlines also breaks at \f, \x1c, \u2028...).
    src = _Lines(io.StringIO(text, newline="").readlines())
    strict = csv.reader(src, skipinitialspace=True, strict=True)
    lenient = csv.reader(src, skipinitialspace=True)
    rows, issues = [], []
    while True:
        # Blank and comment lines between rows; a line inside a quoted cell is the cell's, whatever it starts with.
        while src.pos < len(src.lines) and (not src.lines[src.pos].strip() or src.lines[src.pos].lstrip().startswith("#")):
            src.pos += 1
        if src.pos == len(src.lines):
            break
        lineno = src.pos + 1  # a row is known by the line it starts on
        try:
            cells = next(strict)
        except csv.Error as exc:
            # Read leniently, an unclosed quote takes every later line into one cell: refused, naming where it opens.
            if src.pos == len(src.lines) and "end of data" in str(exc):
                issues.append(PlanIssue(where, lineno, None, 'a quote (") opened in this row is never closed, so '
                                        "every line after it would be one cell: close it, or write a quote inside a "
                                        'quoted cell as ""'))
                break
            src.pos = lineno - 1  # other slips ('"a" ,b') read as they always have
            try:
                cells = next(lenient)
            except csv.Error as exc:
                message = f"cannot read this row as CSV: {exc}"
                if "field larger than field limit" in str(exc):  # csv's words for it: say which limit, in characters
                    limit = csv.field_size_limit()
                    message = f"a cell of this row is longer than {limit:,} characters, the most a CSV cell may hold"
                issues.append(PlanIssue(where, lineno, None, message))
                continue
        cells = [c.strip() for c in cells]
        if not any(cells):  # a spreadsheet saves a blank row as bare commas: a blank line, not a row to expand
            continue
        if cells[0].startswith("#"):  # a comment a spreadsheet quoted ('"# a, b",,'), as an .xlsx row is one
            continue
        rows.append((lineno, cells))
    if issues:
        raise PlanError(issues)
    return rows


def _read_xlsx(where: str, raw: bytes) -> list[tuple[int, list[str]]]:
    try:
        import openpyxl
    except ImportError:
        raise PlanError(
            [PlanIssue(where, None, None, "reading .xlsx plans needs openpyxl: pip install 'scalinglab[xlsx]'")]
        ) from None
    from openpyxl.utils import get_column_letter

    try:
        # Not data_only: a formula must be seen as one, since its cached value is None or '#NAME?'.
        sheet = openpyxl.load_workbook(io.BytesIO(raw), read_only=True).worksheets[0]
    except Exception as exc:
        raise PlanError([PlanIssue(where, None, None, f"cannot read the workbook: {_clip(str(exc))}")]) from None
    try:
        # read_only parses each sheet's XML as its rows are read: a broken one fails here, not in load_workbook
        sheet_rows = [tuple(row) for row in sheet.iter_rows()]
    except Exception as exc:
        raise PlanError([PlanIssue(where, None, None, f"cannot read the workbook: {_clip(str(exc))}")]) from None
    rows, issues = [], []
    for lineno, row in enumerate(sheet_rows, start=1):
        cells = ["" if c.value is None else _xlsx_text(c.value) for c in row]
        while cells and not cells[-1]:
            cells.pop()
        formulas = [i for i, c in enumerate(row) if c.data_type in ("f", "e")]  # 'e': an error value, '#NAME?'
        if not cells or (cells[0].startswith("#") and 0 not in formulas):
            continue
        header = rows[0][1] if rows else []
        for i in formulas:
            column = (header[i] if i < len(header) else "") or get_column_letter(i + 1)
            issues.append(PlanIssue(where, lineno, column, _FORMULA))
        # A sheet cannot tell a missing cell from an empty one, and trailing empties were dropped above: a short
        # row here is one with empty cells, so it takes the defaults rather than failing as a short CSV row does.
        if rows and len(cells) < len(header):
            cells += [""] * (len(header) - len(cells))
        rows.append((lineno, cells))
    if issues:
        raise PlanError(issues)
    return rows


def _xlsx_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


# ---------------------------------------------------------------- cells


class CellError(ValueError):
    """A single cell is malformed; the caller adds file, row and column."""


@dataclass(frozen=True)
class Expr:
    """A parsed ``=expression`` cell and the names it reads."""

    text: str
    tree: ast.Expression
    names: frozenset[str]


_BINOPS: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def _round(x: float, ndigits: float = 0) -> float:
    """round(), taking ndigits as a float with a whole value: every expression value is a float."""
    if ndigits != int(ndigits):
        raise CellError(f"round() needs a whole number of digits, got {_show(ndigits)}")
    return round(x, int(ndigits))


_FUNCS: dict[str, Callable[..., float]] = {"min": min, "max": max, "round": _round}
#: (fewest, most) arguments of each function.
_ARITY = {"min": (2, None), "max": (2, None), "round": (1, 2)}
#: More nodes than any plan expression needs; it also bounds the evaluator's recursion.
_MAX_NODES = 200


def parse_expr(text: str) -> Expr:
    """Parse an ``=expression`` cell, allowing only arithmetic, names, numbers, min, max and round."""
    body = text[1:].strip()
    if not body:
        raise CellError("empty expression after '='")
    try:
        tree = ast.parse(body, mode="eval")
    except SyntaxError as exc:
        raise CellError(f"expression syntax error in {_clip(text)!r}: {exc.msg}") from None
    except (MemoryError, RecursionError):  # how the parser refuses very deep nesting, e.g. 10,000 minus signs
        raise CellError(f"expression {text[:40]!r}... is too deeply nested") from None
    nodes = list(ast.walk(tree))
    if len(nodes) > _MAX_NODES:
        raise CellError(f"expression {text[:40]!r}... is too long")
    names = set()
    for node in nodes:
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCS or node.keywords:
                raise CellError(f"in {_clip(text)!r}: only min(), max() and round() may be called")
            fewest, most = _ARITY[node.func.id]
            if len(node.args) < fewest:
                need = "at least two arguments" if most is None else "an argument"
                raise CellError(f"in {_clip(text)!r}: {node.func.id}() needs {need}")
            if most is not None and len(node.args) > most:
                raise CellError(f"in {_clip(text)!r}: {node.func.id}() takes at most {most} arguments")
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float)) or isinstance(node.value, bool):
                raise CellError(f"in {_clip(text)!r}: only numbers are allowed as constants, got {node.value!r}")
            try:
                finite = math.isfinite(float(node.value))
            except OverflowError:  # an integer literal beyond the float range
                finite = False
            if not finite:
                raise CellError(f"in {_clip(text)!r}: number too large")
        elif not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Load, ast.USub, ast.UAdd, *_BINOPS)):
            raise CellError(f"in {_clip(text)!r}: {type(node).__name__} is not allowed in an expression")
    names -= set(_FUNCS)
    return Expr(text, tree, frozenset(names))


def eval_expr(expr: Expr, lookup: Callable[[str], float]) -> float:
    """Evaluate a parsed expression, reading names through ``lookup``; numbers are floats."""

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            return lookup(node.id)
        if isinstance(node, ast.UnaryOp):
            value = ev(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp):
            left, right = ev(node.left), ev(node.right)
            try:
                value = _BINOPS[type(node.op)](left, right)
            except ZeroDivisionError:
                raise CellError(f"division by zero in {_clip(expr.text)!r}") from None
            except OverflowError:
                raise CellError(f"number too large in {_clip(expr.text)!r}") from None
            if isinstance(value, complex):  # a negative number to a fractional power
                raise CellError(f"{_clip(expr.text)!r} is not a real number")
            # Float arithmetic overflows to inf silently; stop here, before round() fails on it.
            if not math.isfinite(value):
                raise CellError(f"number too large in {_clip(expr.text)!r}")
            return float(value)
        if isinstance(node, ast.Call):
            args = [ev(a) for a in node.args]
            try:
                return float(_FUNCS[node.func.id](*args))
            except OverflowError:  # round(1.7e308, -308)
                raise CellError(f"number too large in {_clip(expr.text)!r}") from None
        raise CellError(f"cannot evaluate {_clip(expr.text)!r}")  # unreachable after parse_expr's whitelist

    value = ev(expr.tree)
    if not math.isfinite(value):
        raise CellError(f"{_clip(expr.text)!r} is not finite ({value})")
    return value


def parse_number(text: str, expected: str = "a number") -> float:
    """A number cell, allowing suffixes k, M, B (or G) and T: ``10M`` -> 1e7."""
    if not _NUM_RE.match(text):
        hint = ""
        if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?[a-zA-Z]", text.strip()):  # 135m, 10b: a suffix not known
            hint = f" (a number may end in {', '.join(s for s in _NUM_SUFFIX if s != 'G')} or G: 10M is 1e7)"
        raise CellError(f"expected {expected}, got {_quoted(text)}{hint}")
    scale = _NUM_SUFFIX.get(text[-1], 1.0)
    value = float(text[:-1] if scale != 1.0 else text) * scale
    if not math.isfinite(value):
        raise CellError(f"number too large: {_quoted(text)}")
    return value


def si(x: float) -> str:
    """A number to three significant figures with an SI prefix (12k, 4.56M, 3.2e18 as 3.2E), as tables show counts."""
    x = float(f"{x:.3g}")  # rounded first, so 9.9999e17 reads 1E, not 1e+03P
    for unit, scale in (("Z", 1e21), ("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def parse_range(text: str, limit: int | None = None) -> list[float]:
    """``a..b*r`` (geometric) or ``a..b+s`` (arithmetic), both ends included; more than ``limit`` values (default
    DEFAULT_MAX_RUNS) is an error."""
    m = _RANGE_RE.match(text)
    if not m or "..." in text:
        raise CellError(f"malformed range {_clip(text)!r}: expected start..end*ratio or start..end+step")
    try:
        a, b, s = (parse_number(m.group(k).strip()) for k in ("a", "b", "s"))
    except CellError as exc:
        raise CellError(f"malformed range {_clip(text)!r}: {exc}") from None
    if a > b:
        raise CellError(f"empty range {_clip(text)!r}: the start {_show(a)} is greater than the end {_show(b)}")
    geometric = m.group("op") == "*"
    if geometric and (s <= 1 or a <= 0):
        raise CellError(f"malformed range {_clip(text)!r}: a geometric range needs start > 0 and ratio > 1")
    if not geometric and s <= 0:
        raise CellError(f"malformed range {_clip(text)!r}: the step must be positive")
    limit = DEFAULT_MAX_RUNS if limit is None else limit
    too_many = CellError(f"the range {_clip(text)!r} has more than {limit:,} values, so the plan expands to more "
                         f"than {limit:,} runs (raise --max-runs)")  # refused, not cut short to fewer runs than it asks
    if not geometric:
        # Counted in steps: a step below the ends' float resolution (1e20..1e20+1) never passes a tolerance on the end.
        steps = (b - a) / s + 1e-9
        if not steps < limit:
            raise too_many
        return [a + i * s for i in range(math.floor(steps) + 1)]
    out, x, eps = [], a, 1e-9 * max(abs(a), abs(b))  # relative: a range of 1e-10s ends at its end too
    while x <= b + eps:
        if len(out) == limit:
            raise too_many
        out.append(x)
        x = x * s
    return out


def parse_cell(column: str, text: str, max_items: int | None = None) -> list[Any] | Expr:
    """A cell as the list of values it stands for (one item for a plain value), or an Expr; a range of more than
    ``max_items`` values (default DEFAULT_MAX_RUNS) is an error."""
    col = COLUMNS[column]
    if text in _SHEET_ERRORS:
        raise CellError(f"{text} is a spreadsheet's error value: a spreadsheet computed this cell (a plan expression such "
                        "as =20*params, say) as its own formula; write the expression again as text (prefix with ')")
    if text.startswith("="):
        if col.kind not in ("int", "float"):
            raise CellError(f"expressions are only allowed in numeric columns, not in {column}")
        return parse_expr(text)
    if col.kind == "list-str":
        return ["|".join(sorted({p.strip() for p in text.split("|") if p.strip()}))]
    if column == "name":  # one label: as a list, its names would only label the row's same runs again
        return [text]
    items = [p.strip() for p in text.split("|")]
    if any(not p for p in items):
        raise CellError(f"empty item in list {_clip(text)!r}")
    if col.kind == "str":
        return items
    expected = "a number"
    if col.kind == "int":  # seed and eval_every take 0 (their defaults)
        expected = "a non-negative integer" if col.default == 0 else "a positive integer"
    values: list[Any] = []
    for item in items:
        if ".." in item:
            values.extend(parse_range(item, max_items))
        elif col.kind == "int" and _INT_RE.match(item) and len(item) <= 40:
            values.append(int(item))  # exactly: as a float, seed 2**53 + 1 would be 2**53, and 2**64 - 1 be 2**64
        elif col.kind == "int":
            values.append(_whole_number(item, expected))
        else:
            values.append(parse_number(item, expected))
    return values


def _whole_number(text: str, expected: str) -> float | int:
    """A number cell of a whole-number column: exactly the integer it writes (9007199254740993.0, 1.5k), else its
    float, which the column's check refuses."""
    value = parse_number(text, expected)
    shift = _SUFFIX_DIGITS.get(text[-1], 0)
    # Decimal, not Fraction: a digit count or an exponent in the millions costs it nothing (Fraction builds 10**exp)
    sign, digits, exponent = Decimal(text[:-1] if shift else text).as_tuple()
    exact = Decimal((sign, digits, exponent + shift))  # the suffix as digits: Decimal's arithmetic would round
    if exact == exact.to_integral_value():
        return int(exact)
    if value == int(value):  # a fraction whose float is whole (1e-400 is 0.0): refused, not read as that whole
        raise CellError(f"expected {expected}, got {_quoted(text)}")
    return value


# ---------------------------------------------------------------- resolution


#: Columns whose values are whole numbers (warmup and gpus where 1 or more).
_WHOLE_COLUMNS = frozenset([name for name, col in COLUMNS.items() if col.kind == "int"] + ["warmup", "gpus"])
#: How a cycle's message names the resolver's own steps.
_INTERNAL_NAMES = {"_config": "the model's shape", "_params": "params (the total count)"}


class _Resolver:
    """Resolves one expanded run's columns and derived names, memoised, with cycle detection."""

    def __init__(self, cells: dict[str, Any], base_dir: Path, configs: dict[tuple, Any] | None = None):
        self.cells = cells
        self.base_dir = base_dir
        #: the load's model shapes by their arguments (_Load.configs), each built and checked once
        self.configs: dict[tuple, Any] = {} if configs is None else configs
        self.values: dict[str, Any] = {}
        self.visiting: list[str] = []
        self.column_of: dict[str, str] = {}
        self.total_params_read = False

    def get(self, name: str) -> Any:
        if name in self.values:
            return self.values[name]
        if name in self.visiting:
            loop = self.visiting[self.visiting.index(name) :] + [name]
            cycle = " -> ".join(_INTERNAL_NAMES.get(n, n) for n in loop)
            # Blamed on a cell of the cycle that holds an expression, not on an empty one whose default it reached.
            held = next((n for n in loop if isinstance(self.cells.get(n), Expr)), None)
            if held is not None:
                raise _ColumnError(held, f"expressions form a cycle: {cycle}")
            raise CellError(f"expressions form a cycle: {cycle}")
        self.visiting.append(name)
        try:
            value = self._compute(name)
        except _ColumnError:
            raise
        except CellError as exc:
            if name in COLUMNS:  # locate the problem in the cell that holds it
                raise _ColumnError(name, str(exc)) from None
            raise
        finally:
            self.visiting.pop()
        self.values[name] = value
        return value

    def numeric(self, name: str) -> float:
        if name not in COLUMNS and name not in DERIVED:
            known = ", ".join(sorted(set(COLUMNS) | set(DERIVED)))
            raise CellError(f"unknown name {_clip(name)!r} in expression (known: {known})")
        self.total_params_read |= name == "params"
        value = self.get("_params" if name == "params" else name)
        if isinstance(value, str) or value is None:
            raise CellError(f"{name!r} is not a number here (it is {_clip(value)!r})")
        return float(value)

    def _cell(self, column: str) -> Any:
        raw = self.cells.get(column)
        if raw is _UNREADABLE:  # reported where it was read: what needs it fails in its name, to be left out
            raise _ColumnError(column, "the cell could not be read")
        if isinstance(raw, Expr):
            value = eval_expr(raw, self.numeric)
            # Columns of whole numbers take a float's rounding error off one as that number (=0.07*100 is 7.000000000000001);
            # a warmup about 1 is left alone: below 1 it is a fraction of the run, not a step.
            least = 1.5 if column == "warmup" else 0.5
            if column in _WHOLE_COLUMNS and abs(value) >= least and abs(value - round(value)) <= 1e-9 * abs(value):
                value = float(round(value))
            return value
        return raw

    def _compute(self, name: str) -> Any:
        if name == "_config":
            return self._config()
        if name in ("_params", "nonembed_params"):
            counts = count_params(self.get("_config"))
            return counts.total if name == "_params" else counts.nonembed
        if name == "flops_per_token":
            return flops_per_token(self.get("_config"), int(self.get("seq_len")))
        if name == "tokens" and self.cells.get("tokens") is None:
            if self.cells.get("flops") is None:
                raise CellError("give tokens or flops (neither is set)")  # as budget() says it: reported once
            return self.get("flops") / self.get("flops_per_token")
        if name == "flops" and self.cells.get("flops") is None:
            return self.get("tokens") * self.get("flops_per_token")
        # Columns whose empty cell stands for a value worked out from others (a shape from params, heads from d_model,
        # the vocabulary from data): an expression reads the value the run has, not the missing cell's None.
        if name in ("d_model", "n_layers", "n_heads") and self.cells.get(name) is None:
            return getattr(self.get("_config"), name)
        if name == "vocab" and self.cells.get("vocab") is None:
            return self.vocab()
        value = self._cell(name)
        if value is None:
            value = COLUMNS[name].default
        return value

    def _config(self) -> ModelConfig:
        arch = self.get("arch")
        if arch not in ARCHS:
            raise _ColumnError("arch", f"expected one of {', '.join(ARCHS)}, got {arch!r}")
        shape = {k: self.cells.get(k) for k in ("d_model", "n_layers", "n_heads")}
        if self.cells.get("params") is not None:
            if shape["d_model"] is not None or shape["n_layers"] is not None:
                raise _ColumnError("params", "give params or d_model/n_layers, not both")
            # A hybrid's layers come in whole periods, so a ladder of sizes keeps one softmax share.
            period = self._hybrid_period() if arch == "hybrid" else 1
            target = _positive(self.get("params"), "params", integer=False)
            d_model, n_layers, n_heads = shape_for_params(target, period)
            if n_layers > MAX_LAYERS:
                if period > MAX_LAYERS:
                    raise _ColumnError("hybrid", f"a period of {_count(period)} layers; a model has at most "
                                                 f"{MAX_LAYERS:,} layers")
                raise _ColumnError("params", f"params {target:.3g} gives a model of {_count(n_layers)} layers "
                                             f"(models.config.shape_for_params); a model has at most {MAX_LAYERS:,}")
            # known before n_heads is read, so that an n_heads cell such as =d_model/128 may read them
            self.values.update(d_model=d_model, n_layers=n_layers)
            if shape["n_heads"] is not None:
                n_heads = _positive_int(self.get("n_heads"), "n_heads")
        else:
            missing = [k for k in ("d_model", "n_layers") if shape[k] is None]
            if missing:
                raise _ColumnError(missing[0], "a size is needed: give d_model and n_layers, or params")
            d_model = _positive_int(self.get("d_model"), "d_model")
            n_layers = _positive_int(self.get("n_layers"), "n_layers")
            if n_layers > MAX_LAYERS:
                raise _ColumnError("n_layers", f"expected at most {MAX_LAYERS:,} layers, got {_count(n_layers)}")
            if shape["n_heads"] is None:
                n_heads = max(1, d_model // 64)
                if d_model % n_heads:
                    raise _ColumnError(
                        "d_model",
                        f"d_model {d_model} is not divisible by n_heads {n_heads}, its default (d_model // 64): "
                        "give n_heads, or a d_model that is a multiple of 64",
                    )
            else:
                n_heads = _positive_int(self.get("n_heads"), "n_heads")
        if d_model % n_heads:
            raise _ColumnError("n_heads", f"d_model {d_model} is not divisible by n_heads {n_heads}")
        hybrid = ""
        if arch == "hybrid":
            cell = str(self.get("hybrid")).strip()
            if cell.isdigit() and not cell.isdecimal():  # '²' passes isdigit, not int(): hybrid_pattern's ValueError
                raise _ColumnError("hybrid", f"expected a period (a whole number) or a pattern of L and S, "
                                             f"got {_clip(cell)!r}")
            try:
                hybrid = hybrid_pattern(self.get("hybrid"), n_layers)
            except ValueError as exc:
                raise _ColumnError("hybrid", str(exc)) from None
        elif self.cells.get("hybrid") is not None:
            raise _ColumnError("hybrid", f"a hybrid pattern only applies to arch hybrid, not {arch}")
        vocab = self.vocab()  # outside the try: its errors are vocab's, not the shape's
        key = (arch, d_model, n_layers, n_heads, vocab, hybrid)
        if key in self.configs:  # a big plan repeats a few shapes: one frozen config each, which count_params' cache
            return self.configs[key]  # then finds by identity
        try:
            config = self.configs[key] = ModelConfig(arch, d_model, n_layers, n_heads, vocab, hybrid)
            return config
        except ValueError as exc:  # a shape the checks above let through, e.g. an odd head width for softmax
            # in the cell the row gives: with no n_heads cell its default came from d_model (or params)
            given = next((c for c in ("n_heads", "d_model", "params") if self.cells.get(c) is not None), "n_heads")
            raise _ColumnError(given, str(exc)) from None

    def _hybrid_period(self) -> int:
        text = str(self.get("hybrid") or "").strip().upper()
        # As hybrid_pattern reads the cell: a period in any decimal digits (８ is 8), else a pattern of L and S.
        if not text or (not text.isdecimal() and set(text) - {"L", "S"}):
            return 1  # not a pattern: hybrid_pattern names the problem below
        return max(1, hybrid_period(text))

    def vocab(self) -> int:
        data = self.get("data")
        if self.cells.get("vocab") is not None:
            return _positive_int(self.get("vocab"), "vocab")
        parts = _part_names(data)
        if "mqar" in parts:
            return MQAR_VOCAB_SIZE
        if any(p.endswith(".bin") for p in parts):
            raise _ColumnError("vocab", f"data {_clip(data)!r} is a .bin of token ids: give its vocab")
        return BYTE_VOCAB_SIZE


class _ColumnError(CellError):
    """A cell error that belongs to a named column (not the one being resolved)."""

    def __init__(self, column: str, message: str):
        super().__init__(message)
        self.column = column


class _RunErrors(CellError):
    """Every problem of one expanded run, so that a user fixes them in one go, not one per attempt."""

    def __init__(self, errors: list[CellError]):
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


#: A row's cell that could not be parsed (its error is reported already): the row still expands, so that its other
#: cells are checked, and whatever reads this one fails in its column and is not reported again.
_UNREADABLE = object()


def _positive(value: Any, column: str, integer: bool = True) -> float:
    # value != int(value), not float(value) != int(value): as a float, 10**30 is not the integer 10**30
    if not isinstance(value, (int, float)) or not value > 0 or (integer and value != int(value)):
        kind = "a positive integer" if integer else "a positive number"
        raise _ColumnError(column, f"expected {kind}, got {_show(value)}")
    return value


def _positive_int(value: Any, column: str) -> int:
    return int(_positive(value, column))


#: The most characters of a cell that a message quotes: past it, one line would hold a 100,000-character cell whole.
_QUOTE_CHARS = 80


def _clip(text: Any) -> Any:
    """A cell's text as a message quotes it: a long one cut to its start and end around '...'; other values as is."""
    if not isinstance(text, str) or len(text) <= _QUOTE_CHARS:
        return text
    return f"{text[:50]}...{text[-25:]}"


def _quoted(text: str) -> str:
    """A cell's text in double quotes, as typed; escaped where it holds characters a terminal does not show."""
    # '6\u200b4' (a zero-width space) had read 'got "64"' on the screen
    return f'"{_clip(text)}"' if text.isprintable() else ascii(_clip(text))


def _count(n: float) -> str:
    """A whole count as a message writes it: exact with thousands separators, or to three figures from 1e15."""
    return f"{int(n):,}" if abs(n) < 1e15 else f"{n:.3g}"


def _show(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, str) else str(value)


def _data_path(source: str, base_dir: Path) -> Path:
    """A data cell's file part as a path: relative ones are relative to the plan's folder."""
    try:
        path = Path(source).expanduser()
    except RuntimeError:  # how pathlib says that ~name is no user's home
        raise CellError(f"data path {_clip(source)!r}: no home folder for {_clip(source.split('/')[0])!r}") from None
    return path if path.is_absolute() else base_dir / path


def resolve_data(data: str, base_dir: Path) -> str:
    """A data value as a plan stores it: its file parts absolute, taking relative ones from ``base_dir``."""
    parts = []
    for part in data.split("+"):
        source, _, weight = part.partition("@")
        source, weight = source.strip(), weight.strip()
        if source not in DATA_SOURCES:
            try:
                source = str(_data_path(source, base_dir).resolve())
            except CellError:  # a ~name of no user: kept as written, which names no stored run's data
                pass
        parts.append(source + (f"@{_weight_text(weight)}" if weight else ""))
    return "+".join(parts)


def _weight_text(weight: str) -> str:
    """A mixture weight as a spec stores it: one spelling per value (0.10, .1 and 1e-1 are 0.1), as other numbers."""
    try:
        return f"{float(weight):.12g}"
    except ValueError:
        return weight


def _data_value(data: str, base_dir: Path, digests: dict[str, str | CellError] | None = None) -> tuple[str, str]:
    """Check a data cell and make its paths absolute (relative paths are relative to the plan file); also the
    content digests of its files, "+"-joined (``digests`` caches them, or why one failed, by path across a load)."""
    digests = {} if digests is None else digests
    out, digest, names = [], [], []
    for part in data.split("+"):
        source, _, weight = part.partition("@")
        source, weight = source.strip(), weight.strip()
        if weight:
            try:
                w = float(weight)
            except ValueError:
                raise CellError(f"mixture weight in {_clip(part)!r} must be a number") from None
            if not 0 < w < 1:
                raise CellError(f"mixture weight in {_clip(part)!r} must be between 0 and 1")
        if source in names:
            raise CellError(f"{_clip(source)!r} appears twice in the mixture {_clip(data)!r}: give it once, with its "
                            "weight")
        names.append(source)
        if source not in DATA_SOURCES:
            path = _data_path(source, base_dir)
            try:
                is_dir, exists = path.is_dir(), path.exists()
            except OSError as exc:  # not ENOENT, which is_dir and exists answer False: a name too long, say
                raise CellError(f"data path {_clip(str(path))}: {exc.strerror or exc}") from None
            if path.suffix not in (".txt", ".bin") and not is_dir:
                raise CellError(f"unknown data {_clip(source)!r}: expected {', '.join(DATA_SOURCES)}, or a .txt/.bin "
                                "path")
            if not exists:
                raise CellError(f"data path {_clip(str(path))} does not exist")
            source = str(path.resolve())
            if source not in digests:
                try:
                    digests[source] = content_digest(source)
                except (OSError, ValueError) as exc:
                    # kept, so a corpus that fails late is not read again for each of the plan's runs on it
                    digests[source] = CellError(f"data {source}: cannot read it: {exc}")
            known = digests[source]
            if isinstance(known, CellError):
                raise CellError(str(known))
            digest.append(known)
        out.append(source + (f"@{_weight_text(weight)}" if weight else ""))
    try:  # the weights as training reads them: refused here, not in every run at launch
        parse_data(data)
    except ValueError as exc:
        raise CellError(str(exc)) from None
    return "+".join(out), "+".join(digest)


def _build_spec(r: _Resolver, base_dir: Path, digests: dict[str, str | CellError] | None = None,
                splits: dict[str, tuple[int, int, str] | CellError] | None = None,
                max_ids: dict[str, int | None] | None = None) -> RunSpec:
    """The run a resolver's cells describe; raises _RunErrors naming every bad value of it (a check that needs a
    value that failed is skipped, not reported as a second problem)."""
    errors: list[CellError] = []

    def attempt(check: Callable[..., Any], *args: Any) -> Any:
        try:
            return check(*args)
        except CellError as exc:
            errors.append(exc)
            return None

    def num(col: str, check: Callable[[float], bool], expected: str) -> float:
        value = r.get(col)
        if not isinstance(value, (int, float)) or not check(value):
            raise _ColumnError(col, f"expected {expected}, got {_show(value)}")
        return value

    def whole(col: str, check: Callable[[float], bool], expected: str) -> int:
        return int(num(col, lambda v: check(v) and v == int(v), expected))

    def text(col: str, choices: tuple[str, ...] | None = None) -> str:
        value = str(r.get(col))
        if choices and value not in choices:
            raise _ColumnError(col, f"expected one of {', '.join(choices)}, got {_clip(value)!r}")
        return value

    def data_value() -> tuple[str, str]:
        try:
            return _data_value(text("data"), base_dir, digests)
        except CellError as exc:
            raise _ColumnError("data", str(exc)) from None

    def budget() -> int:
        if r.cells.get("tokens") is not None and r.cells.get("flops") is not None:
            raise _ColumnError("flops", "give tokens or flops, not both")
        if r.cells.get("tokens") is None and r.cells.get("flops") is None:
            raise _ColumnError("tokens", "give tokens or flops (neither is set)")
        given = "tokens" if r.cells.get("tokens") is not None else "flops"
        num(given, lambda v: v > 0, "a positive number")
        tokens = r.get("tokens")
        if given == "flops" and tokens < 1:  # blamed on the cell the plan has, with what it would have to be
            least = r.get("flops_per_token")
            raise _ColumnError("flops", f"expected at least one token's FLOPs ({least:,} for this model), got "
                                        f"{_show(r.get('flops'))}")
        return int(round(num("tokens", lambda v: v >= 1, "at least one token")))

    def evals_of() -> tuple[str, ...]:
        evals = tuple(e for e in text("evals").split("|") if e)
        bad = [e for e in evals if e not in EVALS]
        if bad:
            raise _ColumnError("evals", f"expected evals among {', '.join(EVALS)}, got {_clip(bad[0])!r}")
        return evals

    data, data_digest = attempt(data_value) or (None, "")
    if data is not None:
        r.values["data"] = data
    cfg = attempt(r.get, "_config")
    seq_len = attempt(whole, "seq_len", lambda v: v > 0, "a positive integer")
    batch = attempt(whole, "batch_size", lambda v: v > 0, "a positive integer")
    tokens = attempt(budget)
    lr = attempt(num, "lr", lambda v: v > 0, "a positive number")
    # 2.5 would be cut to 2 steps without a word: steps are whole, fractions below 1
    warm = attempt(num, "warmup", lambda v: v >= 0 and (v < 1 or v == int(v)),
                   "a fraction of the run's steps below 1, or a whole number of steps")
    schedule = attempt(text, "schedule", SCHEDULES)
    min_lr_ratio = attempt(num, "min_lr_ratio", lambda v: 0 <= v <= 1, "a number in [0, 1]")
    weight_decay = attempt(num, "weight_decay", lambda v: v >= 0, "a number >= 0")
    grad_clip = attempt(num, "grad_clip", lambda v: v > 0, "a positive number")
    seed = attempt(whole, "seed", lambda v: 0 <= v < MAX_SEED, "a non-negative integer below 2**64 (torch's seeds)")
    evals = attempt(evals_of)
    eval_every = attempt(whole, "eval_every", lambda v: v >= 0, "a non-negative integer")
    gpus = attempt(num, "gpus", lambda v: v > 0 and (v <= 1 or v == int(v)), "a fraction in (0, 1] or a whole number")
    # Caught here, not when every run of the plan fails at launch.
    if data is not None and cfg is not None and seq_len is not None and evals is not None:
        errors += _data_fit_errors(data, cfg, seq_len, evals, r.cells.get("seq_len") is not None)
    if data is not None and seq_len is not None and evals is not None:
        errors += _corpus_fit_errors(data, seq_len, evals, splits)
    if data is not None and cfg is not None:
        errors += _token_fit_errors(data, cfg.vocab_size, max_ids)
    # Each data-parallel worker trains an equal slice of every batch; caught here, not after every attempt at launch.
    if gpus is not None and batch is not None and gpus > 1 and batch % int(gpus):
        # in the row's batch_size cell; where it has none, in gpus: the plan may not have a batch_size column
        given = r.cells.get("batch_size") is not None
        errors.append(_ColumnError("batch_size" if given else "gpus",
                                   f"batch_size {batch}{'' if given else ' (its default)'} is not divisible by the "
                                   f"{_count(gpus)} data-parallel workers of gpus {_count(gpus)}"))
    if errors:
        raise _RunErrors(errors)
    steps = max(1, math.ceil(tokens / (batch * seq_len)))
    return RunSpec(
        arch=cfg.arch,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        hybrid=cfg.hybrid,
        vocab_size=cfg.vocab_size,
        seq_len=seq_len,
        batch_size=batch,
        tokens=tokens,
        lr=lr,
        warmup=warmup_steps(warm, steps),
        schedule=schedule,
        min_lr_ratio=min_lr_ratio,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        seed=seed,
        data=data,
        evals=evals,
        eval_every=eval_every,
        gpus=gpus,
        data_digest=data_digest,
    )


def _data_fit_errors(data: str, cfg: ModelConfig, seq_len: int, evals: tuple[str, ...],
                     seq_len_given: bool = True) -> list[_ColumnError]:
    """Data and evals that the vocabulary or seq_len cannot hold, which would fail every run at launch; an MQAR vocab
    too small for seq_len is blamed on vocab where the row takes seq_len's default."""
    errors = []
    parts = _part_names(data)
    byte_parts = [p for p in parts if p in ("stdlib", "passkey") or (p not in DATA_SOURCES and not is_token_source(p))]
    if byte_parts and cfg.vocab_size < BYTE_VOCAB_SIZE:
        errors.append(_ColumnError("vocab", f"byte-level data {byte_parts[0]!r} needs vocab >= {BYTE_VOCAB_SIZE}, "
                                            f"got {cfg.vocab_size}"))
    if "passkey" in parts and seq_len < PASSKEY_MIN_SEQ_LEN:
        errors.append(_ColumnError("seq_len", f"passkey data needs seq_len >= {PASSKEY_MIN_SEQ_LEN}, got {seq_len}"))
    if "niah" in evals and seq_len < NIAH_MIN_SEQ_LEN:
        errors.append(_ColumnError("seq_len", f"niah evals need seq_len >= {NIAH_MIN_SEQ_LEN}, got {seq_len}"))
    # MQAR's ids too: below 256 the byte prompts would not even fit the embedding (an IndexError after the last step)
    token_parts = [p for p in parts if p == "mqar" or (p not in DATA_SOURCES and is_token_source(p))]
    if "niah" in evals and token_parts and not byte_parts:
        # NIAH's prompts are byte text: a model of token ids reads them as other tokens and scores 0 whatever its arch
        errors.append(_ColumnError("evals", f"niah evals need byte-level text, and data {_clip(data)!r} holds token ids "
                                            "only (add a byte-level part such as passkey, or drop niah)"))
    pairs = max(1, seq_len // MQAR_PAIRS_DIVISOR)
    if "mqar" in evals or "mqar" in parts:
        if 4 * pairs > seq_len:  # the pairs, then a query slot for each
            errors.append(_ColumnError("seq_len", f"mqar needs seq_len >= {4 * pairs}, got {seq_len}"))
        elif pairs > cfg.vocab_size // 2 - 1:
            errors.append(_ColumnError(
                "seq_len" if seq_len_given else "vocab",
                f"mqar at seq_len {seq_len} has {pairs} key-value pairs, which need a vocab of at least "
                f"{2 * pairs + 2}, got {cfg.vocab_size}: give a larger vocab or a seq_len below "
                f"{MQAR_PAIRS_DIVISOR * (cfg.vocab_size // 2)}"))
    return errors


def _corpus_fit_errors(data: str, seq_len: int, evals: tuple[str, ...],
                       splits: dict[str, tuple[int, int, str] | CellError] | None = None) -> list[_ColumnError]:
    """File corpora too short for the run, from their files' sizes: training draws a window of seq_len + 1 tokens from
    each split before its first step (models.data.Data.check), and NIAH its longest prompt's filler from the first
    text's validation split (models.evals.check_evals). ``splits`` caches each file's sizes across a load."""
    splits = {} if splits is None else splits
    parts = _part_names(data)
    errors, short = [], set()
    for path in (p for p in parts if p not in DATA_SOURCES):
        if path not in splits:
            try:
                splits[path] = split_sizes(path)
            except OSError as exc:  # gone or unreadable since it was hashed
                splits[path] = CellError(f"data {path}: cannot read it: {exc}")
            except ValueError as exc:  # an empty file, a token file of an odd size
                splits[path] = CellError(str(exc))
        sizes = splits[path]
        if isinstance(sizes, CellError):
            errors.append(_ColumnError("data", str(sizes)))
            short.add(path)
            continue
        train, val, held_out = sizes
        for split, tokens in (("train", train), ("validation", val)):
            if tokens < seq_len + 1:
                errors.append(_ColumnError("data", f"data {path}: its {split} split holds {tokens} tokens, fewer than the "
                                                   f"{seq_len + 1} a sequence of seq_len {seq_len} needs ({held_out}): "
                                                   "give a longer corpus or a shorter seq_len"))
                short.add(path)
                break
    # NIAH's filler (and passkey documents') is the mixture's first byte text, else stdlib (models.data.Data.text_filler)
    filler = next((p for p in parts if p == "stdlib" or (p not in DATA_SOURCES and not is_token_source(p))), "stdlib")
    if "niah" in evals and filler != "stdlib" and filler not in short:
        need, have = 2 * seq_len - NIAH_MIN_SEQ_LEN, splits[filler][1]
        if have < need:
            errors.append(_ColumnError("data", f"data {filler}: niah evals fill their longest prompt ({2 * seq_len} tokens, "
                                               f"twice seq_len) with {need} bytes of its validation split, which holds "
                                               f"{have}: give a longer corpus, a shorter seq_len, or drop niah"))
    return errors + _stdlib_fit_errors(parts, filler, seq_len, evals)


def _stdlib_fit_errors(parts: list[str], filler: str, seq_len: int, evals: tuple[str, ...]) -> list[_ColumnError]:
    """What a row needs of the stdlib corpus (this Python's standard library: a few hundred kB of validation text) that
    it lacks: a training window of each split, passkey documents' filler, NIAH's longest prompt."""
    needs = {}
    if "stdlib" in parts:
        needs["seq_len"] = (seq_len + 1, f"a sequence of seq_len {seq_len}")
    elif "passkey" in parts and filler == "stdlib":
        needs["seq_len"] = (seq_len - PASSKEY_MIN_SEQ_LEN, f"the filler of a passkey document of seq_len {seq_len}")
    if "niah" in evals and filler == "stdlib":
        needs["evals"] = (2 * seq_len - NIAH_MIN_SEQ_LEN, f"the filler of niah's longest prompt ({2 * seq_len} tokens, "
                                                          "twice seq_len)")
    # Scanning the standard library takes a second or more: only for a row that needs more than any one holds.
    needs = {column: need for column, need in needs.items() if need[0] > STDLIB_SURE_BYTES}
    if not needs:
        return []
    train, val, held = stdlib_split_sizes()
    errors = []
    for column, (need, what) in needs.items():
        splits = (("train", train), ("validation", val)) if column == "seq_len" else (("validation", val),)
        short = next(((split, have) for split, have in splits if have < need), None)
        if short:
            errors.append(_ColumnError(column, f"data stdlib (this Python's standard library): its {short[0]} split "
                                               f"holds {short[1]} tokens, fewer than the {need} that {what} needs "
                                               f"({held}): give a shorter seq_len, or a longer corpus as data"
                                               + (", or drop niah" if column == "evals" else "")))
    return errors


def _part_names(data: str) -> list[str]:
    """The sources a data cell mixes (``stdlib+passkey@0.1`` -> stdlib, passkey), weights dropped."""
    return [q.partition("@")[0] for q in data.split("+")]


def _token_fit_errors(data: str, vocab_size: int, max_ids: dict[str, int | None] | None = None) -> list[_ColumnError]:
    """Token files holding an id the vocabulary lacks, which models.data refuses before every run's first step.
    ``max_ids`` caches each file's largest id (None where it cannot be read: _corpus_fit_errors names why)."""
    max_ids = {} if max_ids is None else max_ids
    errors = []
    for path in _part_names(data):
        if path in DATA_SOURCES or not is_token_source(path):
            continue
        if path not in max_ids:
            try:
                max_ids[path] = token_max_id(path)
            except (OSError, ValueError):
                max_ids[path] = None
        top = max_ids[path]
        if top is not None and top >= vocab_size:
            errors.append(_ColumnError("vocab", f"data {path} holds token id {top}, which vocab {vocab_size} lacks: "
                                                f"give a vocab of at least {top + 1}"))
    return errors


#: Counts (tokens, parameters) the database stores as 64-bit integers must stay below this.
MAX_STORED_INT = 2**63
#: The most steps a run may take: step numbers (runs.step and ckpt_step, metrics.step, evals.step) are 32-bit
#: integers on PostgreSQL, whose launch had failed at the first write past this.
MAX_STORED_STEP = 2**31 - 1
#: The largest plan file read: a row per run of --max-runs' default 100,000 takes a few MB.
MAX_PLAN_BYTES = 64 << 20
#: Plan and run names the database stores (its String(200) name columns) may have at most this many characters.
MAX_NAME_CHARS = 200
#: The plan name that selects runs belonging to no plan (a plan re-added without them), in filters and counts; no
#: plan file may take it.
NO_PLAN = "-"


# ---------------------------------------------------------------- the plan


@dataclass
class _Load:
    """What one load of plans works out once for all of them."""

    #: Content digests of data files by resolved path (or why one could not be read): a corpus is read once.
    digests: dict[str, str | CellError] = field(default_factory=dict)
    #: Token counts of data files' splits by resolved path (``models.sources.split_sizes``), or why they cannot be
    #: trained on.
    splits: dict[str, tuple[int, int, str] | CellError] = field(default_factory=dict)
    #: The largest token id of token files by resolved path (``models.sources.token_max_id``), None if unreadable.
    max_ids: dict[str, int | None] = field(default_factory=dict)
    #: The run id of each spec as trained (its budget rounded up to whole steps) -> the budget of the first run to
    #: train it: a later budget within the same steps takes that one, so identical training is one run id.
    trained: dict[str, int] = field(default_factory=dict)
    #: The model configs built so far, by their arguments (_Resolver._config).
    configs: dict[tuple, Any] = field(default_factory=dict)
    #: Every issue found: PlanError lists the first MAX_ERRORS and counts the rest.
    issues: list[PlanIssue] = field(default_factory=list)


def load_plan(path: str | Path, *, max_runs: int = DEFAULT_MAX_RUNS) -> Plan:
    """Read, validate and expand a plan file; raises PlanError listing its problems (the first 20, and how many)."""
    return load_plans([path], max_runs=max_runs)[0]


def load_plans(paths: list[str | Path], *, max_runs: int = DEFAULT_MAX_RUNS) -> list[Plan]:
    """Load several plans, reporting the errors of all of them together; a run two plans give is one run."""
    load, plans, unlisted = _Load(), [], 0
    for p in paths:
        before = len(load.issues)
        try:
            plan = _load_plan(Path(p), max_runs, load)
        except PlanError as exc:  # a file that cannot be read, or a bad header: that file's rows are not checked
            load.issues.extend(exc.issues)
            unlisted += exc.total - len(exc.issues)
            continue
        if len(load.issues) == before:
            plans.append(plan)
    if load.issues:
        raise PlanError(load.issues, total=len(load.issues) + unlisted)
    return plans


def _load_plan(path: Path, max_runs: int, load: _Load) -> Plan:
    """One plan of a load, its rows' errors added to ``load.issues``; an unreadable file or header raises PlanError."""
    where = str(path)
    raw, rows = _read_plan_file(path)
    if not rows:
        raise PlanError([PlanIssue(where, None, None, "the plan is empty: expected a header row of columns")])
    header_line, header = rows[0]
    issues: list[PlanIssue] = []
    seen: set[str] = set()
    for name in header:
        if not name:  # a spreadsheet's spacer, or a stray cell's column: ignored where it holds nothing (below)
            continue
        if name not in COLUMNS:
            message = f"unknown column {_clip(name)!r}{_column_hint(name)}"
            # a name holding tabs (a tab-separated header) is located as written in the message, not with raw tabs
            located = _clip(name) if name.isprintable() else ascii(_clip(name))
            issues.append(PlanIssue(where, header_line, located, message))
        elif name in seen:
            issues.append(PlanIssue(where, header_line, name, "duplicate column"))
        seen.add(name)
    if "arch" not in seen:
        issues.append(PlanIssue(where, header_line, None, "the header has no 'arch' column"))
    if issues:
        raise PlanError(issues)
    if len(rows) == 1:
        raise PlanError([PlanIssue(where, header_line, None, "the plan has a header but no rows")])

    if len(path.stem) > MAX_NAME_CHARS:  # the plan is known by its file name
        raise PlanError([PlanIssue(where, None, None, f"the plan's name (its file name without .csv) is "
                                                      f"{len(path.stem)} characters; plan names have at most "
                                                      f"{MAX_NAME_CHARS}: rename the file")])
    if path.stem == NO_PLAN:  # status and runs list the runs that belong to no plan under this name
        raise PlanError([PlanIssue(where, None, None, f"a plan is named by its file name without .csv, and "
                                                      f"{NO_PLAN!r} stands for the runs in no plan: rename the file")])
    plan = Plan(path=path, name=path.stem, sha256=hashlib.sha256(raw).hexdigest())
    order = {name: i for i, name in enumerate(header) if name}
    named = [i for i, name in enumerate(header) if name]
    width = named[-1] + 1  # columns with no name after the last named one (Excel's trailing ,,) need no cell
    total = 0
    for lineno, cells in rows[1:]:
        if len(cells) > len(header):
            message = f"{len(cells)} cells but the header has {len(header)} columns"
            if any(c.startswith("=") for c in cells):  # an unquoted =min(a, b) splits at its comma
                message += '; quote expressions that contain commas: "=min(a, b)"'
            load.issues.append(PlanIssue(where, lineno, None, message))
            continue
        if len(cells) < width:
            # Not filled with defaults: a cell left out by mistake would silently change the runs.
            missing = [name for name in header[len(cells):width] if name]
            listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            have = f"{len(cells)} cell" + ("s" if len(cells) != 1 else "")
            message = (f"{have} but the header has {width} columns (none for {listed}); "
                       "write an empty cell, as in a,,b, to take a column's default")
            load.issues.append(PlanIssue(where, lineno, None, message))
            continue
        row_issues: list[PlanIssue] = []
        for i, text in enumerate(cells):
            if text and not header[i]:
                row_issues.append(PlanIssue(where, lineno, None, f"a value, {_clip(text)!r}, in column {i + 1} "
                                            f"({_column_letter(i)}), which has no name in the header: name the column, "
                                            "or clear the cell"))
        parsed: dict[str, Any] = {}
        for column, text in ((header[i], cells[i]) for i in named):
            if not text:
                continue
            if "\n" in text or "\r" in text:
                # Excel writes a cell with a line break as a quoted cell over several lines: no plan value holds one.
                message = f"a line break inside the cell, got {_clip(text)!r}: write the value on one line"
                row_issues.append(PlanIssue(where, lineno, column, message))
                continue
            try:
                parsed[column] = parse_cell(column, text, max_runs)
            except CellError as exc:
                row_issues.append(PlanIssue(where, lineno, column, str(exc)))
        # Checked here, not only when the row expands, so that it is reported beside the row's other cell errors.
        if "arch" not in parsed and not any(i.column == "arch" for i in row_issues):
            row_issues.append(PlanIssue(where, lineno, "arch", f"arch is required (one of {', '.join(ARCHS)})"))
        elif isinstance(parsed.get("arch"), list) and (bad := [a for a in parsed["arch"] if a not in ARCHS]):
            message = f"expected one of {', '.join(ARCHS)}, got {_clip(bad[0])!r}"
            row_issues.append(PlanIssue(where, lineno, "arch", message))
            del parsed["arch"]
        # The row expands without its unreadable cells, so that the errors of its other cells come out now too.
        unreadable = {i.column for i in row_issues}
        lists = {c: v for c, v in parsed.items() if not isinstance(v, Expr)}
        count = math.prod(len(v) for v in lists.values())
        if count == 0:
            empty = next(c for c, v in lists.items() if not v)
            row_issues.append(PlanIssue(where, lineno, empty, "this row expands to zero runs"))
        total += count
        if total > max_runs:
            load.issues += row_issues
            load.issues.append(
                PlanIssue(where, lineno, None, f"the plan expands to more than {max_runs:,} runs (raise --max-runs)")
            )
            break
        if count:
            row_issues += _expand_row(plan, where, lineno, parsed, lists, unreadable, load)
        # A row's problems read left to right, as its cells stand in the file.
        load.issues += sorted(row_issues, key=lambda i: order.get(i.column, len(order)))
    return plan


def _column_letter(index: int) -> str:
    """A spreadsheet's name for the column at a 0-based index: A, ..., Z, AA, ..."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return letters


def _column_hint(name: str) -> str:
    sep = next((s for s in (";", "\t") if s in name), None)
    if sep:
        return f"; columns are separated by commas, not {sep!r}"
    close = difflib.get_close_matches(name.strip().lower(), COLUMNS, n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; known columns: {', '.join(COLUMNS)}"


def _expand_row(
    plan: Plan, where: str, lineno: int, parsed: dict, lists: dict, unreadable: set[str | None], load: _Load
) -> list[PlanIssue]:
    """Add a row's runs to ``plan``; returns the row's problems, one per distinct message (not one per run)."""
    exprs = {c: v for c, v in parsed.items() if isinstance(v, Expr)}
    names = list(lists)
    issues: list[PlanIssue] = []
    seen_messages: set[tuple[str | None, str]] = set()
    tags = parsed.get("tags", [""])[0]  # one label for the row's runs, as its name template is
    for combo in itertools.product(*(lists[c] for c in names)):
        cells = dict(zip(names, combo))
        cells.update(exprs)
        cells.update(dict.fromkeys(unreadable - {None}, _UNREADABLE))
        for col in ("name", "tags"):
            cells.pop(col, None)
        resolver = _Resolver(cells, plan.path.parent, load.configs)
        try:
            spec = _build_spec(resolver, plan.path.parent, load.digests, load.splits, load.max_ids)
            _check_storable(spec, resolver.cells)
            label = _label(parsed.get("name"), spec, tags)
        except CellError as exc:
            for error in getattr(exc, "errors", [exc]):
                column = getattr(error, "column", None)
                key = (column, str(error))
                if column not in unreadable and key not in seen_messages:
                    seen_messages.add(key)
                    issues.append(PlanIssue(where, lineno, column, str(error)))
            continue
        if unreadable:
            continue  # a name or tags cell that could not be read: the row's runs are not the ones it asks for
        # Budgets within one step train alike (whole steps): the first budget's spec, and so its id, stands for all.
        first = load.trained.setdefault(spec.trained_id, spec.tokens)
        if first != spec.tokens:
            spec = dataclasses.replace(spec, tokens=first)
        period = resolver._hybrid_period() if spec.arch == "hybrid" else 1
        target = resolver.get("params") if resolver.cells.get("params") is not None else None
        plan.runs.append(PlannedRun(spec=spec, row=lineno, name=label, tags=tags, total_params_read=resolver.total_params_read,
                                    hybrid_period=period, params_target=target))
    return issues


def warmup_steps(warmup: float, steps: int) -> int:
    """A plan's warmup cell as steps of a run of ``steps``: whole steps from 1 up, else a fraction of the run
    rounded (one step of warmup trains at about the peak rate, as none does), cut to the run."""
    return min(int(warmup) if warmup >= 1 else int(round(warmup * steps)), steps)


def _check_storable(spec: RunSpec, cells: dict[str, Any]) -> None:
    """Refuse a run whose token or parameter count (a 64-bit integer) or step count (32-bit) the database cannot hold,
    at plan time; the error is in a cell of the row (``cells``), not in a column the plan may not have."""
    derived = spec.derived()
    for what, value in (("tokens", spec.trained_tokens), ("params", derived["params"])):
        if value < MAX_STORED_INT:
            continue
        if what == "tokens" and spec.batch_size * spec.seq_len >= MAX_STORED_INT:  # one step alone is too many
            column = "batch_size" if spec.batch_size >= spec.seq_len else "seq_len"
        elif what == "tokens":
            column = "tokens" if cells.get("flops") is None else "flops"
        elif cells.get("params") is not None:
            column = "params"
        else:  # the vocabulary where embeddings are most of the count, else the width
            column = "vocab" if derived["params"] > 2 * derived["nonembed_params"] else "d_model"
        verb = "trains" if what == "tokens" else "has"
        raise _ColumnError(column, f"the run {verb} {value:.3g} {what}; the database holds counts below "
                                   f"{MAX_STORED_INT:.3g}")
    if spec.steps > MAX_STORED_STEP:
        # Blamed on the budget's cell, the one a row always has; the message names the cells that set a step's size.
        budget = "tokens" if cells.get("flops") is None else "flops"
        size = " x ".join(f"{name} {getattr(spec, name):,}{'' if cells.get(name) is not None else ' (its default)'}"
                          for name in ("batch_size", "seq_len"))
        raise _ColumnError(budget, f"the run takes {_count(spec.steps)} steps of {size} tokens; the database holds "
                                   f"step numbers up to {MAX_STORED_STEP:,}: give fewer {budget}, or a larger "
                                   "batch_size or seq_len")


def _label(name_cell: list[str] | None, spec: RunSpec, tags: str) -> str | None:
    """The run's name: the row's name template filled with the run's fields (warmup in steps, flops those of the
    whole steps it trains), or None where the row has no name."""
    if not name_cell:
        return None
    template = name_cell[0]
    # the plan's column names too, where the spec calls a field otherwise; evals as a cell lists them, not a list's repr
    fields = {**spec.to_dict(), **spec.derived(), "vocab": spec.vocab_size, "tags": tags, "evals": "|".join(spec.evals)}
    try:
        odd = _odd_field(template)
    except ValueError as exc:  # unbalanced braces
        raise _ColumnError("name", f"bad name template {_clip(template)!r}: {exc}") from None
    if odd is not None:
        raise _ColumnError("name", f"bad name template {_clip(template)!r}: {{{odd}}} is not a bare field; write fields "
                                   "such as {arch} or {d_model}, with a format if need be ({lr:.0e}), without "
                                   "attributes, indexes or positional {}")
    try:
        if _formats_alike(template):  # str.format_map, in C, where no format takes a field: a third of a load had gone here
            name = template.format_map({k: _whole(v) if type(v) is float else v for k, v in fields.items()})
        else:
            name = _NameFormatter().vformat(template, (), fields)
    except KeyError as exc:
        known = ", ".join(sorted(fields))
        raise _ColumnError("name", f"bad name template {_clip(template)!r}: no field {exc} (known: {known})") from None
    except (AttributeError, IndexError, TypeError, ValueError) as exc:
        raise _ColumnError("name", f"bad name template {_clip(template)!r}: {exc}") from None
    # PostgreSQL refuses a longer one at `slab add` (SQLite would keep it): said here, with the row.
    if len(name) > MAX_NAME_CHARS:
        raise _ColumnError("name", f"the run's name is {len(name)} characters ({name[:40]!r}...); names have at most "
                                   f"{MAX_NAME_CHARS}")
    return name


#: A format spec's width and precision ([[fill]align][sign][z][#][0][width][grouping][.precision][type]).
_SPEC_RE = re.compile(r"^(?:.?[<>=^])?[-+ ]?z?#?0?(?P<width>\d*)[,_]?(?:\.(?P<precision>\d+))?[a-zA-Z%]?$", re.S)
#: The most digits a name's format may ask for: 'g' drops trailing zeros, so {lr:.300g} may still be a short name.
_MAX_NAME_PRECISION = 1000


def _check_name_format(format_spec: str) -> None:
    """Refuse a name format whose width or precision would build a string of gigabytes (ValueError)."""
    spec = _SPEC_RE.match(format_spec)  # one it does not match is left to format(), which names the problem
    if spec:
        width, precision = spec["width"], spec["precision"] or ""
        if len(width) > 4 or int(width or 0) > MAX_NAME_CHARS:
            raise ValueError(f"the format {_clip(format_spec)!r} pads to {_clip(width)} characters; names have at "
                             f"most {MAX_NAME_CHARS}")
        if len(precision) > 4 or int(precision or 0) > _MAX_NAME_PRECISION:
            raise ValueError(f"the format {_clip(format_spec)!r} asks for {_clip(precision)} digits; names have at "
                             f"most {MAX_NAME_CHARS} characters")


def _whole(value: Any) -> Any:
    """A count held as a float (flops) as an int, so that it reads as its digits, not with a trailing .0."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


@functools.lru_cache(maxsize=1024)
def _odd_field(template: str) -> str | None:
    """The first field of a name template that is not a bare name, or None; ValueError on unbalanced braces."""
    # str.format would read {arch.upper} as a bound method's repr and {arch[0]} as a letter: only bare fields
    return next((f for f in _template_fields(template) if not f.isidentifier()), None)


@functools.lru_cache(maxsize=1024)
def _formats_alike(template: str) -> bool:
    """True when no format of the template takes a field ({lr:>{tokens}}), so each is checked here, once per template,
    and str.format_map may fill it; ValueError on a format too large."""
    specs = [spec for _, field, spec, _ in string.Formatter().parse(template) if field is not None and spec]
    if any("{" in spec for spec in specs):
        return False
    for spec in specs:
        _check_name_format(spec)
    return True


class _NameFormatter(string.Formatter):
    """str.format for name templates, refusing a width or precision that would build a string of gigabytes."""

    def format_field(self, value: Any, format_spec: str) -> Any:
        _check_name_format(format_spec)
        return super().format_field(_whole(value), format_spec)


def _template_fields(template: str) -> list[str]:
    """The fields a name template formats, those nested in its format specs too; ValueError on unbalanced braces."""
    fields = []
    for _, field, spec, _ in string.Formatter().parse(template):
        if field is not None:
            fields.append(field)
            fields += _template_fields(spec) if spec else []
    return fields


# ---------------------------------------------------------------- costing


@dataclass(frozen=True)
class Block:
    """Runs of one plan row that share an architecture and shape: one line of ``slab plan``."""

    plan: str
    row: int
    arch: str
    shape: str  # d_model x n_layers / heads (+ hybrid pattern)
    params: int
    nonembed_params: int
    tokens_min: int
    tokens_max: int
    flops: float
    runs: int


@dataclass(frozen=True)
class Costing:
    """What a set of plans will cost: its blocks, distinct runs, total FLOPs and estimated GPU-hours."""

    blocks: list[Block]
    runs: int
    flops: float
    gpu_hours: float
    mfu: float
    gpu_tflops: float
    #: Rows some of whose runs an earlier row (or plan) already gives, as (plan, row, repeated, of its runs):
    #: a run is trained once, so those runs are priced once, under the first row.
    repeats: list[tuple[str, int, int, int]] = field(default_factory=list)
    #: Rows with runs whose warmup covers the whole run, as (plan, row, such runs): their learning rate only rises,
    #: never decays (the plan cuts a warmup to the run's steps).
    warmup_only: list[tuple[str, int, int]] = field(default_factory=list)
    #: Rows with hybrid runs whose layers are not whole periods of their pattern, as (plan, row, such runs): their
    #: softmax share differs from the pattern's, and lightning layers follow the last softmax one.
    uneven_hybrid: list[tuple[str, int, int]] = field(default_factory=list)
    #: Rows whose expressions read ``params`` (the total) where embeddings are over EMBEDDING_NOTE_SHARE of it, as
    #: (plan, row, such runs, the largest embedding share): ``=20*params`` then counts the vocabulary's weights.
    total_params_read: list[tuple[str, int, int, float]] = field(default_factory=list)
    #: Rows with runs that train over ROUNDING_NOTE_SHARE more tokens than their budget (whole steps of batch_size x
    #: seq_len), as (plan, row, such runs, the largest ratio of trained tokens to budget).
    rounded_up: list[tuple[str, int, int, float]] = field(default_factory=list)


#: ``slab plan`` notes rows whose runs train more than this share over their token budget.
ROUNDING_NOTE_SHARE = 0.05

#: ``slab plan`` notes expressions that read ``params`` where embeddings are more than this share of it.
EMBEDDING_NOTE_SHARE = 0.1


def cost_plans(plans: list[Plan], *, mfu: float = 0.3, gpu_tflops: float = 989.0) -> Costing:
    """Group the plans' distinct runs into blocks and price them: GPU-hours = FLOPs / (mfu * peak)."""
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {mfu}")
    if not 0 < gpu_tflops < math.inf:  # NaN and inf too: inf priced every plan at 0 GPU-hours
        raise ValueError(f"--gpu-tflops must be a positive number of TFLOP/s, got {gpu_tflops}")
    groups: dict[tuple, list[RunSpec]] = {}
    seen: set[str] = set()
    per_row: dict[tuple[str, int], list[int]] = {}  # (plan, row) -> [repeated, runs]
    warm: dict[tuple[str, int], int] = {}
    uneven: dict[tuple[str, int], int] = {}
    embedded: dict[tuple[str, int], list] = {}
    rounded: dict[tuple[str, int], list] = {}
    total = 0.0
    for plan in plans:
        for run in plan.runs:
            tally = per_row.setdefault((plan.name, run.row), [0, 0])
            tally[1] += 1
            if run.spec.run_id in seen:
                tally[0] += 1
                continue
            seen.add(run.spec.run_id)
            s = run.spec
            if s.schedule != "constant" and s.warmup >= s.steps:
                warm[(plan.name, run.row)] = warm.get((plan.name, run.row), 0) + 1
            if s.hybrid and s.n_layers % run.hybrid_period:
                uneven[(plan.name, run.row)] = uneven.get((plan.name, run.row), 0) + 1
            if (ratio := s.trained_tokens / s.tokens) > 1 + ROUNDING_NOTE_SHARE:
                tally = rounded.setdefault((plan.name, run.row), [0, 1.0])
                tally[0], tally[1] = tally[0] + 1, max(tally[1], ratio)
            if run.total_params_read:
                d = s.derived()
                share = 1 - d["nonembed_params"] / d["params"]
                if share > EMBEDDING_NOTE_SHARE:
                    tally = embedded.setdefault((plan.name, run.row), [0, 0.0])
                    tally[0], tally[1] = tally[0] + 1, max(tally[1], share)
            shape = f"{s.d_model}x{s.n_layers}/{s.n_heads}" + (f" {s.hybrid}" if s.hybrid else "")
            groups.setdefault((plan.name, run.row, s.arch, shape), []).append(s)
    blocks = []
    for (plan_name, row, arch, shape), specs in groups.items():
        counts = count_params(specs[0].model_config())
        flops = sum(s.derived()["flops"] for s in specs)
        total += flops
        tokens = [s.trained_tokens for s in specs]
        blocks.append(Block(plan_name, row, arch, shape, counts.total, counts.nonembed, min(tokens), max(tokens), flops, len(specs)))
    hours = total / (mfu * gpu_tflops * 1e12) / 3600
    repeats = [(plan_name, row, n, of) for (plan_name, row), (n, of) in per_row.items() if n]
    return Costing(blocks=blocks, runs=len(seen), flops=total, gpu_hours=hours, mfu=mfu, gpu_tflops=gpu_tflops,
                   repeats=repeats, warmup_only=[(p, r, n) for (p, r), n in warm.items()],
                   uneven_hybrid=[(p, r, n) for (p, r), n in uneven.items()],
                   total_params_read=[(p, r, n, share) for (p, r), (n, share) in embedded.items()],
                   rounded_up=[(p, r, n, ratio) for (p, r), (n, ratio) in rounded.items()])
