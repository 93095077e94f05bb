"""Plans with several problems, multi-line CSV cells, budgets that train alike, and corpus hashing per load."""

import pytest

import sweep.plan as plan_module
from sweep.plan import MAX_ERRORS, PlanError, cost_plans, load_plan, load_plans

SIZE = "arch,d_model,n_layers,seq_len,batch_size,tokens"


def issues_of(path_or_paths):
    with pytest.raises(PlanError) as info:
        if isinstance(path_or_paths, list):
            load_plans(path_or_paths)
        else:
            load_plan(path_or_paths)
    return info.value


# ---------------------------------------------------------------- every error at once


def test_every_bad_value_of_a_run_is_reported_not_only_the_first(write_plan):
    # each had surfaced only once the one before it was fixed: three reruns for one row
    path = write_plan("arch,d_model,n_layers,tokens,lr,schedule,grad_clip\nsoftmax,64,2,1e5,-1,linear,0\n")
    error = issues_of(path)
    assert [(i.row, i.column) for i in error.issues] == [(2, "lr"), (2, "schedule"), (2, "grad_clip")]
    assert "got -1" in str(error) and "got 'linear'" in str(error) and "got 0" in str(error)


def test_a_cell_that_cannot_be_read_does_not_hide_the_other_errors_of_its_row(write_plan):
    path = write_plan("arch,d_model,n_layers,tokens,lr,warmup\nsoftmax,12a,2,1e5,-1,2.5\n")
    error = issues_of(path)
    assert [(i.row, i.column) for i in error.issues] == [(2, "d_model"), (2, "lr"), (2, "warmup")]
    assert "a size is needed" not in str(error)  # d_model was given, only unreadable


def test_a_cell_that_cannot_be_read_is_not_blamed_on_the_cells_that_read_it(write_plan):
    # tokens reads params, which is unreadable: one error, in params, and none for tokens or a missing size
    path = write_plan("arch,params,tokens,lr\nsoftmax,lots,=20*params,-1\n")
    error = issues_of(path)
    assert [(i.row, i.column) for i in error.issues] == [(2, "params"), (2, "lr")]


def test_errors_past_the_first_twenty_are_counted(write_plan):
    rows = "".join(f"softmax,{i}a,2,1e5\n" for i in range(30))
    error = issues_of(write_plan("arch,d_model,n_layers,tokens\n" + rows))
    assert len(error.issues) == MAX_ERRORS and error.more and error.total == 30
    assert str(error).endswith("\nand 10 more errors")


def test_errors_of_several_plans_are_counted_together(write_plan):
    many = write_plan("arch,d_model,n_layers,tokens\n" + "softmax,1a,2,1e5\n" * 25, "a.csv")
    one = write_plan("arch,d_model,n_layers,tokens\nsoftmax,1a,2,1e5\n", "b.csv")
    error = issues_of([one, many])
    assert len(error.issues) == MAX_ERRORS and error.total == 26
    assert str(error).endswith("\nand 6 more errors")


# ---------------------------------------------------------------- multi-line cells


def test_a_quoted_cell_spanning_lines_is_one_row_refused_at_its_first_line(write_plan):
    # Excel writes a cell with a line break as a quoted cell over two lines: it had been read as two broken rows,
    # and every row after it was numbered as before
    text = (f"name,{SIZE}\n"
            "# a comment\n"
            '"first\n# not a comment\nrun",softmax,32,2,64,4,5k\n'
            "ok,softmax,32,2,64,4,5k\n"
            "bad,softmax,32,2,64,4,lots\n")
    error = issues_of(write_plan(text))
    assert [(i.row, i.column) for i in error.issues] == [(3, "name"), (7, "tokens")]
    assert "line break" in error.issues[0].message


def test_rows_after_a_multi_line_cell_keep_their_line_numbers(write_plan):
    text = f'{SIZE},tags\nsoftmax,32,2,64,4,5k,"a|\nb"\nlightning,32,2,64,4,5k,\n'
    error = issues_of(write_plan(text))
    assert [(i.row, i.column) for i in error.issues] == [(2, "tags")]
    runs = load_plan(write_plan(f"{SIZE}\n\n# c\nsoftmax,32,2,64,4,5k\r\nlightning,32,2,64,4,5k\n", "ok.csv")).runs
    assert [r.row for r in runs] == [4, 5]


def test_an_unclosed_quote_is_refused_at_the_line_it_opens(write_plan):
    # read leniently, the quote had swallowed every later row into one cell
    text = f'name,{SIZE}\nok,softmax,32,2,64,4,5k\n"oops,softmax,32,2,64,4,5k\nx,lightning,32,2,64,4,5k\n'
    error = issues_of(write_plan(text))
    assert [(i.row, i.column) for i in error.issues] == [(3, None)]
    assert "never closed" in error.issues[0].message


# ---------------------------------------------------------------- budgets that train alike


def test_budgets_that_train_the_same_steps_are_one_run_under_the_first_ones_id(write_plan):
    # 10k, 10240 and 10100 tokens are all 40 steps of 4 x 64: they had been three run ids, trained three times
    path = write_plan(f"{SIZE}\nlightning,32,2,64,4,10k\nlightning,32,2,64,4,10240\nlightning,32,2,64,4,10100|20480\n")
    plan = load_plan(path)
    first = plan.runs[0].spec
    assert first.tokens == 10_000  # the first budget keeps the id it had
    assert [r.spec.run_id == first.run_id for r in plan.runs] == [True, True, True, False]
    assert [r.row for r in plan.runs] == [2, 3, 4, 4]
    cost = cost_plans([plan])
    assert cost.runs == 2 and [(row, n) for _, row, n, _ in cost.repeats] == [(3, 1), (4, 1)]


def test_budgets_that_train_alike_in_two_plans_are_one_run(write_plan):
    a = write_plan(f"{SIZE}\nlightning,32,2,64,4,10k\n", "a.csv")
    b = write_plan(f"{SIZE}\nlightning,32,2,64,4,10100\n", "b.csv")
    pa, pb = load_plans([a, b])
    assert pa.runs[0].spec.run_id == pb.runs[0].spec.run_id == load_plan(a).runs[0].spec.run_id


def test_flops_budgets_within_a_step_are_one_run(write_plan):
    path = write_plan("arch,d_model,n_layers,seq_len,batch_size,flops\nsoftmax,32,2,64,4,1e12|1.00001e12|2e12\n")
    runs = load_plan(path).runs
    assert runs[0].spec.tokens != round(1.00001e12 / runs[0].spec.derived()["flops_per_token"])
    assert runs[0].spec.run_id == runs[1].spec.run_id != runs[2].spec.run_id


# ---------------------------------------------------------------- corpus hashing


def test_a_corpus_is_hashed_once_per_load_of_several_plans(tmp_path, monkeypatch):
    calls = []
    real = plan_module.content_digest
    monkeypatch.setattr(plan_module, "content_digest", lambda p: calls.append(p) or real(p))
    (tmp_path / "corpus.txt").write_text("some bytes\n" * 200)  # 2,200 bytes: 110 held out, a sequence of 64 fits
    for name in ("a", "b"):
        (tmp_path / f"{name}.csv").write_text(f"{SIZE},data\nsoftmax,32,2,64,4,5k|10k,corpus.txt\n"
                                             "lightning,32,2,64,4,5k,corpus.txt\n")
    load_plans([tmp_path / "a.csv", tmp_path / "b.csv"])
    assert len(calls) == 1


def test_a_corpus_that_cannot_be_hashed_is_tried_once(tmp_path, monkeypatch):
    calls = []

    def fail(path):
        calls.append(path)
        raise OSError("permission denied")

    monkeypatch.setattr(plan_module, "content_digest", fail)
    (tmp_path / "corpus.txt").write_text("x\n")
    (tmp_path / "p.csv").write_text(f"{SIZE},data\nsoftmax,32,2,64,4,5k|10k|20k,corpus.txt\nlightning,32,2,64,4,5k,corpus.txt\n")
    error = issues_of(tmp_path / "p.csv")
    assert len(calls) == 1 and [(i.row, i.column) for i in error.issues] == [(2, "data"), (3, "data")]


def test_a_space_after_a_closing_quote_still_reads_as_before(write_plan):
    # only an unclosed quote is refused: other quoting slips read as the lenient reader always read them
    runs = load_plan(write_plan(f'name,{SIZE}\n"a" ,softmax,32,2,64,4,"=2*seq_len*batch_size" \n')).runs
    assert [(r.name, r.spec.tokens) for r in runs] == [("a", 512)]


# ---------------------------------------------------------------- names the database can hold


def test_names_longer_than_the_database_holds_are_refused_at_plan_time(write_plan):
    """PostgreSQL refused a run name over 200 characters at `slab add` with a driver error (SQLite kept it): the plan
    names the row and the length instead."""
    from db.schema import Plan, PlanRun

    assert plan_module.MAX_NAME_CHARS == PlanRun.__table__.c.name.type.length == Plan.__table__.c.name.type.length
    long_name = "x" * 150 + "-{d_model}-{arch}-{n_layers}-{tokens}-padding-padding-padding-padding"
    error = issues_of(write_plan(f"name,arch,d_model,n_layers,tokens\n{long_name},softmax,64,2,1e5\nok,softmax,64,2,1e5\n"))
    assert [(i.row, i.column) for i in error.issues] == [(2, "name")]
    assert "characters" in str(error) and "at most 200" in str(error)
    fits = "y" * 190 + "-{d_model}"
    assert len(load_plan(write_plan(f"name,arch,d_model,n_layers,tokens\n{fits},softmax,64,2,1e5\n")).runs) == 1
    error = issues_of(write_plan("arch,d_model,n_layers,tokens\nsoftmax,64,2,1e5\n", "p" * 201 + ".csv"))
    assert "plan's name" in str(error) and "rename the file" in str(error)


def test_a_file_larger_than_any_plan_is_refused_without_reading_it_whole(write_plan, monkeypatch):
    """`slab plan /dev/zero` had read until memory ran out (a MemoryError's traceback under a limit)."""
    monkeypatch.setattr(plan_module, "MAX_PLAN_BYTES", 100)
    assert len(load_plan(write_plan("arch,d_model,n_layers,tokens\nsoftmax,64,2,1e5\n")).runs) == 1
    error = issues_of(write_plan("arch,d_model,n_layers,tokens\n" + "softmax,64,2,1e5\n" * 10))
    assert [(i.row, i.column) for i in error.issues] == [(None, None)] and "a plan is a sheet of rows" in str(error)


def test_a_plan_file_may_not_take_the_name_of_the_runs_in_no_plan(write_plan):
    """`-.csv` registered as plan '-', whose runs status then listed as runs in no plan and `runs --plan -` did not."""
    error = issues_of(write_plan("arch,d_model,n_layers,tokens\nsoftmax,64,2,1e5\n", f"{plan_module.NO_PLAN}.csv"))
    assert "runs in no plan" in str(error) and "rename the file" in str(error)


# ---------------------------------------------------------------- ranges and --max-runs


def test_a_range_is_not_cut_short_where_max_runs_allows_more_than_the_default(write_plan, monkeypatch):
    """A range stopped at DEFAULT_MAX_RUNS + 1 values whatever --max-runs said: `--max-runs 1000000` with seeds
    0..149999+1 planned 100,001 runs without a word. (The default is made small here to keep the test quick.)"""
    monkeypatch.setattr(plan_module, "DEFAULT_MAX_RUNS", 10)
    path = write_plan(f"{SIZE},seed\nsoftmax,32,2,64,4,5k,0..19+1\n")
    assert [r.spec.seed for r in load_plan(path, max_runs=100).runs] == list(range(20))


def test_a_range_longer_than_max_runs_is_refused_in_its_cell(write_plan):
    error = issues_of(write_plan(f"{SIZE},seed\nsoftmax,32,2,64,4,5k,0..1e12+1\n"))
    assert [(i.row, i.column) for i in error.issues] == [(2, "seed")]
    assert "more than 100,000" in str(error) and "--max-runs" in str(error)


# ---------------------------------------------------------------- errors in the column they belong to


def test_a_flops_budget_under_one_token_is_blamed_on_flops_not_tokens(write_plan):
    """flops = 1 had been reported as p.csv:2:tokens (expected at least one token, got 6.7e-07), a column the plan has not."""
    error = issues_of(write_plan("arch,d_model,n_layers,flops\nsoftmax,64,2,1\nsoftmax,64,2,1e12\n"))
    assert [(i.row, i.column) for i in error.issues] == [(2, "flops")], str(error)
    assert "at least one token's FLOPs" in str(error)


def test_a_bin_corpus_without_a_vocab_is_blamed_on_vocab_not_n_heads(write_plan, tmp_path):
    """The missing vocab of a .bin corpus was reported as p.csv:2:n_heads, a column the row had right."""
    (tmp_path / "tokens.bin").write_bytes(b"\0" * 4096)
    error = issues_of(write_plan(f"{SIZE},n_heads,data\nsoftmax,64,2,64,4,5k,1,tokens.bin\n"))
    assert [(i.row, i.column) for i in error.issues] == [(2, "vocab")], str(error)
    assert "give its vocab" in str(error)


# ---------------------------------------------------------------- corpora too short to train on


def test_an_empty_data_file_is_refused_at_plan_time(write_plan, tmp_path):
    """It passed slab plan, and every run then failed at launch ("train split ... holds 0 tokens"), retried."""
    (tmp_path / "e.txt").write_bytes(b"")
    (tmp_path / "e.bin").write_bytes(b"")
    (tmp_path / "odd.bin").write_bytes(b"\0" * 4097)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_bytes(b"")
    error = issues_of(write_plan(f"{SIZE},vocab,data\nsoftmax,32,2,64,4,5k,,e.txt\nsoftmax,32,2,64,4,5k,300,e.bin\n"
                                 "softmax,32,2,64,4,5k,300,odd.bin\nsoftmax,32,2,64,4,5k,,stdlib+empty\n"))
    assert [(i.row, i.column) for i in error.issues] == [(2, "data"), (3, "data"), (4, "data"), (5, "data")], str(error)
    lines = str(error).splitlines()
    assert "e.txt is an empty file" in lines[0] and "e.bin is an empty file" in lines[1], lines
    assert "4097 bytes, not a whole number of uint16 token ids" in lines[2] and "holds only empty files" in lines[3], lines


def test_a_corpus_too_short_for_seq_len_is_refused_at_plan_time(write_plan, tmp_path):
    # the last 5% of a file is held out for validation: 1299 bytes hold 64 of them, one short of a sequence of 64 + 1
    (tmp_path / "short.txt").write_bytes(b"x" * 1299)
    (tmp_path / "fits.txt").write_bytes(b"x" * 1300)
    error = issues_of(write_plan(f"{SIZE},data\nsoftmax,32,2,64,4,5k,short.txt\nsoftmax,32,2,64,4,5k,fits.txt\n"
                                 "softmax,32,2,32,4,5k,short.txt\n"))
    assert [(i.row, i.column) for i in error.issues] == [(2, "data")], str(error)
    assert "its validation split holds 64 tokens, fewer than the 65 a sequence of seq_len 64 needs" in str(error)


def test_niah_filler_too_short_is_refused_at_plan_time(write_plan, tmp_path):
    # NIAH's longest prompt (twice seq_len) fills with the validation split of the data's first text: 2 * 128 - 104 bytes
    (tmp_path / "short.txt").write_bytes(b"x" * 3039)  # 151 of them held out
    (tmp_path / "fits.txt").write_bytes(b"x" * 3040)
    header = "arch,d_model,n_layers,seq_len,batch_size,tokens,evals,data\n"
    error = issues_of(write_plan(header + "softmax,32,2,128,4,5k,niah,short.txt\nsoftmax,32,2,128,4,5k,niah,fits.txt\n"
                                          "softmax,32,2,128,4,5k,,short.txt\n"))
    assert [(i.row, i.column) for i in error.issues] == [(2, "data")], str(error)
    assert "niah" in str(error) and "152" in str(error) and "151" in str(error)


def _launch_check(spec) -> None:
    """What training checks of a run's data before its first step (models.train.pretrain)."""
    from models.data import open_data
    from models.evals import check_evals

    data = open_data(spec.data, spec.vocab_size)
    data.check(spec.seq_len)
    check_evals(spec.evals, data, spec.seq_len, spec.vocab_size)


#: Sizes around where each layout's splits pass a sequence of 128 + 1 tokens and NIAH's 2 * 128 - 104 bytes of filler.
LAYOUT_SIZES = {
    "file": [0, 1, 2579, 2580, 3039, 3040],  # the last 5% held out
    "folder": [0, 2397, 2398, 2857, 2858],  # three files, the last of these bytes, two of 90, a newline between
    "many": [0, 128, 129, 151, 152],  # twenty files: the 20th held out
    "bin": [0, 1, 2579, 2580],  # uint16 ids, the last 5% held out; no niah on token ids
    "pair": [0, 128, 129],  # train.bin of 3000 ids and a val.bin of these
}


@pytest.mark.parametrize("layout", list(LAYOUT_SIZES))
def test_the_plan_refuses_exactly_the_corpora_training_refuses(tmp_path, layout):
    """The plan's sizes, from file sizes alone, mirror models.data's splits (read there as arrays)."""
    import numpy as np

    outcomes = []
    for size in LAYOUT_SIZES[layout]:
        root = tmp_path / f"{layout}{size}"
        corpus = root / "corpus"
        corpus.mkdir(parents=True)
        if layout == "file":
            (corpus / "c.txt").write_bytes(b"y" * size)
        elif layout in ("folder", "many"):
            files = 3 if layout == "folder" else 20
            for i in range(files):
                (corpus / f"{i:02d}.txt").write_bytes(b"y" * (size if i == files - 1 else 90))
        elif layout == "bin":
            np.zeros(size, dtype=np.uint16).tofile(corpus / "c.bin")
        else:
            np.zeros(3000, dtype=np.uint16).tofile(corpus / "train.bin")
            np.zeros(size, dtype=np.uint16).tofile(corpus / "val.bin")
        data = {"file": "corpus/c.txt", "bin": "corpus/c.bin"}.get(layout, "corpus")
        evals = "" if layout in ("bin", "pair") else "niah"
        (root / "p.csv").write_text("arch,d_model,n_layers,seq_len,batch_size,tokens,vocab,evals,data\n"
                                    f"softmax,32,2,128,4,5k,300,{evals},{data}\n")
        try:
            spec = load_plan(root / "p.csv").runs[0].spec
        except PlanError as exc:
            assert [i.column for i in exc.issues] == ["data"], str(exc)
            with pytest.raises(ValueError):
                _launch_check(spec_without_checks(root / "p.csv"))
            outcomes.append(False)
        else:
            _launch_check(spec)
            outcomes.append(True)
    assert outcomes[-1] and not outcomes[-2], outcomes  # each layout's last size is the first that fits


def spec_without_checks(path):
    """The run a plan asks for, without the plan's check of its corpus's size."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plan_module, "_corpus_fit_errors", lambda *args, **kwargs: [])
        return load_plan(path).runs[0].spec


# ---------------------------------------------------------------- seeds


@pytest.mark.parametrize("seed", ["1e20", "18446744073709551616", "2e19"])
def test_a_seed_torch_cannot_take_is_refused_at_plan_time(write_plan, seed):
    """A seed of 2**64 or more passed the plan, and every run failed with "Overflow when unpacking long long"."""
    error = issues_of(write_plan(f"{SIZE},seed\nsoftmax,32,2,64,4,5k,{seed}\n"))
    assert [(i.row, i.column) for i in error.issues] == [(2, "seed")], str(error)
    assert "below 2**64" in str(error)


def test_the_largest_seed_torch_takes_is_planned(write_plan):
    import torch

    seeds = [r.spec.seed for r in load_plan(write_plan(f"{SIZE},seed\nsoftmax,32,2,64,4,5k,9223372036854775808|1e19\n")).runs]
    assert seeds == [2**63, 10**19]
    for seed in seeds:
        torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- name cells


def test_a_name_is_one_label_even_with_a_bar(write_plan):
    """A name cell of run|a was read as a list: the row's run twice, labelled "run" and "a"."""
    runs = load_plan(write_plan(f"name,{SIZE}\nrun|a,softmax,32,2,64,4,5k\n{{arch}}|{{d_model}},softmax,32,2,64,4,5k|10k\n")).runs
    assert [r.name for r in runs] == ["run|a", "softmax|32", "softmax|32"]


@pytest.mark.parametrize("template, field", [("{arch.upper}", "arch.upper"), ("r-{arch[0]}", "arch[0]"),
                                             ("{lr:{arch.upper}}", "arch.upper"), ("{}", "")])
def test_a_name_template_takes_bare_fields_only(write_plan, template, field):
    """{arch.upper} formatted to '<built-in method upper of str object at 0x...>', and {arch[0]} to 's'."""
    error = issues_of(write_plan(f"name,{SIZE}\n{template},softmax,32,2,64,4,5k\n"))
    assert [(i.row, i.column) for i in error.issues] == [(2, "name")], str(error)
    assert f"{{{field}}}" in str(error) and "{arch}" in str(error), str(error)
