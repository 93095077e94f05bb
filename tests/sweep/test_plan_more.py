"""Plan reading and expansion: cases an audit found (Excel exports, derived names in expressions, run ids)."""

import pytest

from sweep.plan import PlanError, load_plan, parse_range, resolve_data

HEAD = "arch,d_model,n_layers,tokens"


def errors_of(path):
    with pytest.raises(PlanError) as info:
        load_plan(path)
    return [str(i) for i in info.value.issues]


@pytest.mark.parametrize("weight", ["0.10", ".1", "1e-1", " 0.1", "0.1 ", "1E-01"])
def test_a_mixture_weight_is_one_run_however_it_is_spelled(write_plan, weight):
    # 'passkey@0.10' had hashed its text: a run id apart from 'passkey@0.1', which trains the same mixture
    one = load_plan(write_plan(HEAD + ",data\nsoftmax,64,2,1e5,stdlib+passkey@0.1\n", "a.csv")).runs[0].spec
    other = load_plan(write_plan(HEAD + f",data\nsoftmax,64,2,1e5,stdlib+passkey@{weight}\n", "b.csv")).runs[0].spec
    assert other.data == one.data == "stdlib+passkey@0.1"
    assert other.run_id == one.run_id
    # slab launch --where data= compares through resolve_data: the spelling the plan took matches the stored one
    assert resolve_data(f"stdlib+passkey@{weight}", write_plan("").parent) == one.data


@pytest.mark.parametrize("zero", ["-0", "-0.0", "=-0.0"])
def test_a_negative_zero_is_the_run_zero_is(write_plan, zero):
    # weight_decay -0 trains as 0 but had hashed as -0.0: a second run id for the same training
    one = load_plan(write_plan(HEAD + ",weight_decay\nsoftmax,64,2,1e5,0\n", "a.csv")).runs[0].spec
    other = load_plan(write_plan(HEAD + f",weight_decay\nsoftmax,64,2,1e5,{zero}\n", "b.csv")).runs[0].spec
    assert other.run_id == one.run_id and str(other.weight_decay) == "0.0"


def test_a_mixture_weight_keeps_its_value(write_plan):
    spec = load_plan(write_plan(HEAD + ",data\nsoftmax,64,2,1e5,stdlib@0.25+passkey@0.05\n")).runs[0].spec
    assert spec.data == "stdlib@0.25+passkey@0.05"
    spec = load_plan(write_plan(HEAD + ",data\nsoftmax,64,2,1e5,stdlib+passkey@0.3\n", "c.csv")).runs[0].spec
    assert spec.data == "stdlib+passkey@0.3"


def test_expressions_read_a_shape_the_params_column_chose(write_plan):
    # ="d_model" where params gives the shape had failed: 'd_model' is not a number here (it is None)
    path = write_plan("arch,params,tokens,lr,batch_size\nsoftmax,5M,1e5,=0.256/d_model,=4*n_layers+n_heads\n")
    [run] = load_plan(path).runs
    s = run.spec
    assert s.d_model > 0 and s.lr == pytest.approx(0.256 / s.d_model)
    assert s.batch_size == 4 * s.n_layers + s.n_heads


def test_expressions_read_the_default_heads_and_vocab(write_plan):
    # n_heads (d_model // 64) and vocab (from data) had defaults that expressions could not read
    path = write_plan("arch,d_model,n_layers,tokens,lr,seed,data\n"
                      "softmax,128,2,1e5,=1e-3*n_heads,=vocab,stdlib\nsoftmax,128,2,1e5,=1e-3*n_heads,=vocab,mqar\n")
    runs = load_plan(path).runs
    assert [(r.spec.n_heads, r.spec.lr, r.spec.seed) for r in runs] == [(2, 2e-3, 260), (2, 2e-3, 8192)]


def test_a_shape_expression_that_reads_its_own_default_is_a_cycle_not_a_crash(write_plan):
    path = write_plan("arch,d_model,n_layers,tokens\nsoftmax,=64*n_heads,2,1e5\n")
    [message] = errors_of(path)
    assert message.startswith(f"{path}:2:d_model: expressions form a cycle")


def test_a_quoted_comment_line_is_a_comment(write_plan):
    # Excel quotes a comment cell holding a comma: the line starts with '"#' and had been read as the header
    path = write_plan('"# a plan, with a comma in its comment",,,\r\n' + HEAD + "\r\n"
                      '"# softmax, 64",,,\r\nsoftmax,64,2,1e5\r\n')
    assert [r.row for r in load_plan(path).runs] == [4]


def test_spreadsheet_columns_with_no_name_and_no_values_are_ignored(write_plan):
    # Excel saves a stray (since cleared) cell right of the table as empty columns on every line: had been refused
    # as "empty column name in the header"
    path = write_plan("\ufeff" + HEAD + ",,\r\nsoftmax,64,2,1e5,,\r\nlightning,64,2,1e5\r\n")
    assert [(r.row, r.spec.arch) for r in load_plan(path).runs] == [(2, "softmax"), (3, "lightning")]
    lead = write_plan("," + HEAD + "\n,softmax,64,2,1e5\n", "lead.csv")  # a table that starts in column B
    assert [r.spec.d_model for r in load_plan(lead).runs] == [64]


def test_a_value_under_a_column_with_no_name_is_refused_where_it_is(write_plan):
    path = write_plan(HEAD + ",,\nsoftmax,64,2,1e5,,3e-4\nsoftmax,64,2,1e5,,\n")
    assert errors_of(path) == [f"{path}:2: a value, '3e-4', in column 6 (F), which has no name in the header: "
                               "name the column, or clear the cell"]


def test_short_rows_still_refused_beside_unnamed_columns(write_plan):
    path = write_plan(HEAD + ",\nsoftmax,64,2\n")
    [message] = errors_of(path)
    assert message.startswith(f"{path}:2: 3 cells but the header has 4 columns (none for tokens)")


@pytest.mark.parametrize("value", ["#NAME?", "#VALUE!", "#DIV/0!", "#REF!"])
def test_a_spreadsheet_error_value_is_named_as_one(write_plan, value):
    # a CSV opened and saved again in a spreadsheet holds '#NAME?' where it computed =20*params as its own formula
    path = write_plan(HEAD + f"\nsoftmax,64,2,{value}\n")
    [message] = errors_of(path)
    assert message.startswith(f"{path}:2:tokens: {value} is a spreadsheet's error value")
    assert "as text" in message


def test_a_range_of_small_numbers_stops_at_its_end():
    # the end's tolerance had been 1e-9 whatever the scale: 1e-9 was taken into a range that ends at 1e-10
    assert parse_range("1e-12..1e-10*10") == pytest.approx([1e-12, 1e-11, 1e-10], rel=1e-9)
    assert parse_range("1e-10..3e-10+1e-10") == pytest.approx([1e-10, 2e-10, 3e-10], rel=1e-9)
    assert parse_range("0.1..0.3+0.1") == pytest.approx([0.1, 0.2, 0.3])  # 0.30000000000000004 stays in
    assert parse_range("0..0+1") == [0]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le"])
def test_utf16_text_is_named_as_such(tmp_path, encoding):
    # Excel's "Unicode Text" is UTF-16: without a BOM every name read as 'a\x00r\x00c\x00h\x00'
    path = tmp_path / "plan.csv"
    path.write_bytes((HEAD + "\nsoftmax,64,2,1e5\n").encode(encoding))
    [message] = errors_of(path)
    assert message.startswith(f"{path}: UTF-16 text") and "UTF-8" in message


def test_a_binary_file_is_not_called_utf16(tmp_path):
    # a NUL byte anywhere in the first 4 KiB had been taken as UTF-16 text
    path = tmp_path / "plan.csv"
    path.write_bytes((HEAD + "\nsoftmax,64,2,1e5\n").encode() + b"PK\x03\x04\x00\x00")
    [message] = errors_of(path)
    assert message == f"{path}:3: a binary file (it holds NUL bytes), not CSV text"


def test_an_n_heads_expression_reads_the_width_params_chose(write_plan):
    # head width 32 on a ladder of params targets: had failed as 'd_model' is not a number here (it is None)
    [run] = load_plan(write_plan("arch,params,n_heads,tokens\nsoftmax,5M,=d_model/32,1e5\n")).runs
    assert run.spec.n_heads == run.spec.d_model // 32 and run.spec.d_model % 32 == 0


def test_an_expression_that_needs_a_missing_budget_is_reported_once(write_plan):
    path = write_plan("arch,d_model,n_layers,lr\nsoftmax,64,2,=tokens*1e-9\n")
    assert errors_of(path) == [f"{path}:2:tokens: give tokens or flops (neither is set)"]


def test_a_large_seed_is_taken_as_written(write_plan):
    # integer cells had been read as floats: 2**53 + 1 trained seed 2**53 (one run id for two seeds), and 2**64 - 1,
    # the largest seed torch takes, rounded to 2**64 and was refused
    seeds = [2**53, 2**53 + 1, 12345678901234567891, 2**64 - 1]
    path = write_plan(HEAD + ",seed\nsoftmax,64,2,1e5," + "|".join(map(str, seeds)) + "\n")
    runs = load_plan(path).runs
    assert [r.spec.seed for r in runs] == seeds
    assert len({r.spec.run_id for r in runs}) == 4
    assert load_plan(write_plan(HEAD + ",seed\nsoftmax,64,2,1e5,7|7.0|7e0\n", "b.csv")).runs[0].spec.seed == 7


def test_an_integer_cell_of_many_digits_is_still_too_large_not_a_crash(write_plan):
    # int() refuses strings of over 4,300 digits: such a cell is a number too large, as before
    [message] = errors_of(write_plan(HEAD + ",seed\nsoftmax,64,2,1e5," + "9" * 5000 + "\n"))
    assert message.startswith(f"{write_plan('').parent}/plan.csv:2:seed: number too large")


@pytest.mark.parametrize("column, cell, value", [("n_layers", "=0.07*100", 7), ("warmup", "=0.57*100", 57),
                                                 ("batch_size", "=0.1*3*10", 3)])
def test_an_expression_a_rounding_error_off_a_whole_number_gives_that_number(write_plan, column, cell, value):
    # 0.07*100 is 7.000000000000001 in floats: had been refused as "expected a positive integer, got 7.000000000000001"
    cells = {"arch": "softmax", "d_model": "64", "n_layers": "2", "seq_len": "64", "batch_size": "4", "tokens": "1e5",
             "warmup": "10", column: cell}
    spec = load_plan(write_plan(",".join(cells) + "\n" + ",".join(cells.values()) + "\n")).runs[0].spec
    assert getattr(spec, column) == value


def test_an_expression_that_is_not_whole_is_still_refused_in_an_integer_column(write_plan):
    [message] = errors_of(write_plan(HEAD + "\nsoftmax,64,=2.001,1e5\n"))
    assert message.endswith(":2:n_layers: expected a positive integer, got 2.001")


@pytest.mark.parametrize("peak", [float("inf"), float("nan"), 0.0])
def test_pricing_refuses_a_peak_that_is_not_a_positive_number(write_plan, peak):
    from sweep.plan import cost_plans

    plan = load_plan(write_plan(HEAD + "\nsoftmax,64,2,1e5\n"))
    with pytest.raises(ValueError, match="--gpu-tflops must be a positive number of TFLOP/s"):
        cost_plans([plan], gpu_tflops=peak)
