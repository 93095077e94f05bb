"""Bad plan files a fuzzing of the shipped plans found: each is one located error (or the right runs), never a
traceback, a hang, a silently changed value or a message of thousands of characters."""

import hashlib
import os
import tracemalloc
from pathlib import Path

import pytest

from sweep.plan import PlanError, load_plan, parse_range

SIZE = "arch,d_model,n_layers,seq_len,batch_size,tokens"


def issues_of(path):
    with pytest.raises(PlanError) as info:
        load_plan(path)
    return info.value.issues


# ---------------------------------------------------------------- data paths the file system refuses


@pytest.mark.parametrize("data", ["a" * 5000 + ".txt", "x" * 300 + ".bin", "d" * 300])
def test_a_data_path_too_long_for_the_file_system_is_an_error_in_its_cell(write_plan, data):
    # Path.is_dir() raised OSError ENAMETOOLONG: a traceback
    [issue] = issues_of(write_plan(f"{SIZE},data,vocab\nsoftmax,32,2,64,4,5k,{data},300\n"))
    assert (issue.row, issue.column) == (2, "data"), str(issue)
    assert "too long" in issue.message and len(str(issue)) < 300, str(issue)


def test_a_data_path_in_the_home_of_an_unknown_user_is_an_error_in_its_cell(write_plan):
    # Path.expanduser() raised RuntimeError("Could not determine home directory."): a traceback
    [issue] = issues_of(write_plan(f"{SIZE},data\nsoftmax,32,2,64,4,5k,~no-such-user-zz/corpus.txt\n"))
    assert (issue.row, issue.column) == (2, "data"), str(issue)
    assert "~no-such-user-zz" in issue.message, str(issue)


# ---------------------------------------------------------------- sizes that cannot be counted


@pytest.mark.parametrize("layers", [str(10**18), "20000", "=2**40"])
def test_a_model_of_too_many_layers_is_refused_in_its_cell(write_plan, layers):
    # 10**18 layers: MemoryError building the layer list (1B hung counting them); 20,000 was counted for seconds
    [issue] = issues_of(write_plan(f"{SIZE}\nsoftmax,32,{layers},64,4,5k\n"))
    assert (issue.row, issue.column) == (2, "n_layers"), str(issue)
    assert "at most 10,000" in issue.message, str(issue)


@pytest.mark.parametrize("params", ["1e300", "1e30"])
def test_a_params_target_too_large_to_count_is_refused_in_its_cell(write_plan, params):
    # shape_for_params gave ~1e98 (or ~3e8) layers: OverflowError building the layer list, or a hang
    [issue] = issues_of(write_plan(f"arch,params,tokens\nsoftmax,{params},1e5\n"))
    assert (issue.row, issue.column) == (2, "params"), str(issue)
    assert "params" in issue.message and len(str(issue)) < 300, str(issue)


@pytest.mark.parametrize("column", ["d_model", "vocab"])
def test_a_whole_number_beyond_float_precision_is_not_called_a_non_integer(write_plan, column):
    # 10**30 was refused as "expected a positive integer, got 1000000000000000000000000000000"
    head = "arch,d_model,n_layers,vocab,seq_len,batch_size,tokens"
    cells = {"d_model": f"{10**30},2,300", "vocab": f"64,2,{10**30}"}[column]
    [issue] = issues_of(write_plan(f"{head}\nsoftmax,{cells},64,4,5k\n"))
    assert (issue.row, issue.column) == (2, column), str(issue)  # not params, a column the plan does not have
    assert "expected a positive integer" not in issue.message, str(issue)
    assert "the database holds counts below" in issue.message, str(issue)


def test_gpus_too_large_for_the_batch_is_named_readably(write_plan):
    # 'the 1000000000000000019884624838656 data-parallel workers of gpus 1000000000000000019884624838656'
    [issue] = issues_of(write_plan(f"{SIZE},gpus\nsoftmax,32,2,64,4,5k,1e30\n"))
    assert (issue.row, issue.column) == (2, "batch_size"), str(issue)
    assert "1e+30" in issue.message and "19884624838656" not in issue.message, str(issue)


def test_gpus_that_do_not_divide_the_default_batch_are_blamed_on_gpus(write_plan):
    # blamed on batch_size, a column the plan does not have (its default, 32, was the batch)
    [issue] = issues_of(write_plan("arch,d_model,n_layers,tokens,gpus\nsoftmax,32,2,5k,3\n"))
    assert (issue.row, issue.column) == (2, "gpus"), str(issue)
    assert "batch_size 32 (its default)" in issue.message, str(issue)


# ---------------------------------------------------------------- values read exactly


@pytest.mark.parametrize("cell, seed", [("9007199254740993.0", 9007199254740993), ("1.8446744073709551615e19", 2**64 - 1),
                                        ("1.5k", 1500), ("1e19", 10**19), ("12345678901234567.89e2", 1234567890123456789)])
def test_a_whole_number_written_with_a_point_or_an_exponent_is_read_exactly(write_plan, cell, seed):
    # read through a float, 9007199254740993.0 had planned seed 9007199254740992: another run, without a word
    [run] = load_plan(write_plan(f"{SIZE},seed\nsoftmax,32,2,64,4,5k,{cell}\n")).runs
    assert run.spec.seed == seed


def test_a_fraction_in_a_whole_number_column_is_still_refused(write_plan):
    [issue] = issues_of(write_plan(f"{SIZE},seed\nsoftmax,32,2,64,4,5k,2.5\n"))
    assert (issue.row, issue.column) == (2, "seed") and "got 2.5" in issue.message, str(issue)


def test_an_arithmetic_range_whose_step_is_below_its_ends_float_resolution_has_its_values():
    # the end's tolerance, 1e-9 of the ends (1e11 here), had taken 100,000 values: "more than 100,000 values"
    assert parse_range("1e20..1e20+1") == [1e20]
    assert parse_range("1e15..1.000000002e15+1e6") == [1e15, 1e15 + 1e6, 1e15 + 2e6]  # had a fourth, 1e15 + 3e6
    assert parse_range("0..3+1") == [0, 1, 2, 3]


def test_a_hybrid_period_in_other_digits_gives_the_shape_of_its_ascii_digits(write_plan):
    # '８' (fullwidth) was period 8 to the layer pattern but 1 to the shape: 7 layers, "no softmax layer in 7 layers"
    ascii_spec = load_plan(write_plan("arch,params,hybrid,tokens\nhybrid,20M,8,1e5\n", "a.csv")).runs[0].spec
    other = load_plan(write_plan("arch,params,hybrid,tokens\nhybrid,20M,\uff18,1e5\n", "b.csv")).runs[0].spec
    assert other.run_id == ascii_spec.run_id


# ---------------------------------------------------------------- the file as read


def test_a_plan_read_from_a_pipe_records_the_digest_of_what_it_read(tmp_path):
    # the digest read the file a second time: a pipe (slab add <(...)) gave the digest of no bytes at all
    if not Path("/dev/fd").is_dir():
        pytest.skip("no /dev/fd")
    text = f"{SIZE}\nsoftmax,32,2,64,4,5k\n".encode()
    read, write = os.pipe()
    try:
        os.write(write, text)
        os.close(write)
        plan = load_plan(f"/dev/fd/{read}")
    finally:
        os.close(read)
    assert len(plan.runs) == 1
    assert plan.sha256 == hashlib.sha256(text).hexdigest()


# ---------------------------------------------------------------- messages stay one readable line


@pytest.mark.parametrize("cell", ["7" * 100_000, "=" + "(" * 300 + "1" + ")" * 300, "1" * 5000 + "x", "=" + "1+" * 3000 + "1",
                                  "1.." + "2" * 5000])
def test_an_error_about_a_very_long_cell_quotes_only_its_start(write_plan, cell):
    # the message had quoted the whole cell: a 100,000-character line
    [issue] = issues_of(write_plan(f"{SIZE}\nsoftmax,{cell},2,64,4,5k\n"))
    assert (issue.row, issue.column) == (2, "d_model"), str(issue)
    assert len(str(issue)) < 400 and "..." in issue.message, str(issue)[:500]


# the width from a field: tokens, not seq_len, whose 99,999,999 no corpus here fills (refused in seq_len first)
@pytest.mark.parametrize("template, tokens", [("{lr:>99999999}", "5k"), ("{lr:.99999999f}", "5k"),
                                              ("{lr:>{tokens}}", "99999999")])
def test_a_name_format_of_a_huge_width_is_refused_before_it_is_built(write_plan, template, tokens):
    # {lr:>9999999999} built a 10 GB name (a MemoryError, or seconds and gigabytes a run) before its length was checked
    path = write_plan(f"name,{SIZE}\n{template},softmax,32,2,64,4,{tokens}\n")
    tracemalloc.start()
    try:
        [issue] = issues_of(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (issue.row, issue.column) == (2, "name"), str(issue)
    assert "names have at most 200" in issue.message and peak < 20e6, (str(issue), peak)


@pytest.mark.parametrize("cell, shown", [("6\u200b4", "\\u200b"), ("\ufeff64", "\\ufeff"), ("64\u2060", "\\u2060")])
def test_a_number_with_an_invisible_character_shows_it(write_plan, cell, shown):
    # 'expected a positive integer, got "6​4"' read on a terminal as got "64": the zero-width space did not show
    [issue] = issues_of(write_plan(f"{SIZE}\nsoftmax,{cell},2,64,4,5k\n"))
    assert (issue.row, issue.column) == (2, "d_model") and shown in issue.message, str(issue)


@pytest.mark.parametrize("cell", ["1e-400", "0." + "0" * 1000 + "1", "1e-999999999"])
def test_a_fraction_too_small_for_a_float_is_not_read_as_zero(write_plan, cell):
    # seed 1e-400 was the float 0.0, a whole number: the plan ran seed 0 without a word
    [issue] = issues_of(write_plan(f"{SIZE},seed\nsoftmax,32,2,64,4,5k,{cell}\n"))
    assert (issue.row, issue.column) == (2, "seed") and "expected" in issue.message, str(issue)


def test_a_zero_with_a_huge_exponent_is_zero(write_plan):
    [run] = load_plan(write_plan(f"{SIZE},seed\nsoftmax,32,2,64,4,5k,0e999999999\n")).runs
    assert run.spec.seed == 0


@pytest.mark.parametrize("head, row, column, message", [
    # had blamed tokens, which the plan does not have
    ("arch,d_model,n_layers,flops", "softmax,32,2,1e300", "flops", "the database holds counts below"),
    ("arch,d_model,n_layers,seq_len,batch_size,tokens", f"softmax,32,2,64,{10**19},5k", "batch_size",
     "the database holds counts below"),
    # a seq_len that large no corpus fills either: the stdlib data's check, in the same cell, speaks first
    ("arch,d_model,n_layers,seq_len,batch_size,tokens", f"softmax,32,2,{10**19},4,5k", "seq_len", "data stdlib"),
])
def test_a_count_the_database_cannot_hold_is_blamed_on_the_cell_that_makes_it(write_plan, head, row, column, message):
    [issue] = issues_of(write_plan(f"{head}\n{row}\n"))
    assert (issue.row, issue.column) == (2, column), str(issue)
    assert message in issue.message, str(issue)


def test_a_hybrid_period_longer_than_any_model_is_refused_in_its_cell(write_plan):
    # shape_for_params rounded the layers to whole periods of 99,999,999,999: a hang counting them
    [issue] = issues_of(write_plan("arch,params,hybrid,tokens\nhybrid,20M,99999999999,1e5\n"))
    assert (issue.row, issue.column) == (2, "hybrid") and "at most 10,000" in issue.message, str(issue)


def test_a_hybrid_period_in_superscript_digits_is_named(write_plan):
    # '²' passes str.isdigit but not int(): "invalid literal for int() with base 10: '²'"
    [issue] = issues_of(write_plan("arch,d_model,n_layers,hybrid,tokens\nhybrid,64,8,\u00b2,1e5\n"))
    assert (issue.row, issue.column) == (2, "hybrid"), str(issue)
    assert "int()" not in issue.message and "pattern of L and S" in issue.message, str(issue)


def test_a_cell_longer_than_csv_takes_is_named_in_words(write_plan):
    [issue] = issues_of(write_plan(f"{SIZE}\nsoftmax,{'7' * 200_000},2,64,4,5k\n"))
    assert issue.row == 2 and "longer than 131,072 characters" in issue.message, str(issue)


def test_a_workbook_whose_sheet_is_broken_is_one_error(tmp_path):
    # openpyxl's read-only sheet parses its XML as rows are read: a ParseError traceback, not at load_workbook
    openpyxl = pytest.importorskip("openpyxl")
    import zipfile

    book = openpyxl.Workbook()
    book.active.append(["arch", "d_model", "n_layers", "tokens"])
    book.active.append(["softmax", 64, 2, 100000])
    whole, broken = tmp_path / "whole.xlsx", tmp_path / "broken.xlsx"
    book.save(whole)
    with zipfile.ZipFile(whole) as zin, zipfile.ZipFile(broken, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            zout.writestr(item, data[: len(data) // 2] if item.filename.endswith("sheet1.xml") else data)
    [issue] = issues_of(broken)
    assert issue.path == str(broken) and issue.message.startswith("cannot read the workbook"), str(issue)


@pytest.mark.parametrize("head, row, column", [
    ("arch,d_model,n_layers,tokens", "softmax,65,2,1e5", "d_model"),  # an odd head width of the default heads
    ("arch,d_model,n_layers,tokens,data,vocab", "softmax,64,2,1e5,mqar,40", "vocab"),  # seq_len is its default, 512
    ("arch,d_model,n_layers,n_heads,tokens", "softmax,65,2,1,1e5", "n_heads"),
    ("arch,d_model,n_layers,seq_len,tokens,data,vocab", "softmax,64,2,512,1e5,mqar,40", "seq_len"),
])
def test_a_shape_or_data_error_is_in_a_cell_the_row_gives(write_plan, head, row, column):
    # had been n_heads and seq_len, columns these plans do not have
    [issue] = issues_of(write_plan(f"{head}\n{row}\n"))
    assert (issue.row, issue.column) == (2, column), str(issue)



def test_a_tab_separated_header_is_located_without_raw_tabs(write_plan):
    # the location was 'plan.csv:1:arch<TAB>d_model...': a terminal spreads the tabs out as spaces
    issues = issues_of(write_plan("arch\td_model\tn_layers\ttokens\nsoftmax\t64\t2\t1e5\n"))
    assert "\t" not in issues[0].column and "\\t" in issues[0].column, issues[0]
    assert "not '\\t'" in issues[0].message, issues[0]
