"""Rows of many runs: the values, shapes and errors each run gets (work a load may share between runs must give what
working out each run alone gives)."""

from pathlib import Path

import pytest

from sweep.plan import PlanError, load_plan, load_plans

SIZE = "arch,d_model,n_layers,seq_len,batch_size,tokens"
KNOWN = ("arch, batch_size, d_model, data, eval_every, evals, flops, flops_per_token, gpus, grad_clip, hybrid, lr, "
         "min_lr_ratio, n_heads, n_layers, nonembed_params, params, schedule, seed, seq_len, tags, tokens, vocab, "
         "vocab_size, warmup, weight_decay")


def issues_of(*paths):
    with pytest.raises(PlanError) as info:
        load_plans(list(paths))
    return info.value.issues


def test_a_bad_value_all_runs_of_a_row_share_is_one_error_per_row(write_plan):
    path = write_plan(f"{SIZE},lr,schedule\nsoftmax,32,2,64,4,5k|10k|20k,-1,\nsoftmax,32,2,64,4,5k,1e-3,\n"
                      "lightning,32,2,64,4,5k|10k,-1,linear\n")
    assert [(i.row, i.column, i.message) for i in issues_of(path)] == [
        (2, "lr", "expected a positive number, got -1"),
        (4, "lr", "expected a positive number, got -1"),
        (4, "schedule", "expected one of cosine, wsd, constant, got 'linear'"),
    ]


def test_a_row_s_shared_and_listed_values_reach_each_of_its_runs(write_plan):
    runs = load_plan(write_plan(f"{SIZE},lr,seed,warmup\nsoftmax,32,2,64,4,5k,3e-4|1e-3,0|7,\n"
                                "lightning,32,2,64,4,5k,2e-3,1,0.5\n")).runs
    assert [(r.spec.arch, r.spec.lr, r.spec.seed, r.spec.warmup) for r in runs] == [
        ("softmax", 3e-4, 0, 1), ("softmax", 3e-4, 7, 1), ("softmax", 1e-3, 0, 1), ("softmax", 1e-3, 7, 1),
        ("lightning", 2e-3, 1, 10),  # a warmup of 0.05 (the default) and of 0.5 of 20 steps
    ]


def test_an_expression_reads_a_column_the_row_leaves_empty_as_its_default(write_plan):
    runs = load_plan(write_plan(f"{SIZE},lr\nsoftmax,32,2,64,4,=seq_len*batch_size*10,=grad_clip/1000\n")).runs
    assert (runs[0].spec.tokens, runs[0].spec.lr) == (2560, 1e-3)
    [issue] = issues_of(write_plan(f"{SIZE},lr\nsoftmax,32,2,64,4,5k,=tags\n", "b.csv"))
    assert (issue.column, issue.message) == ("lr", "'tags' is not a number here (it is '')")


def test_a_relative_data_cell_is_read_in_each_plan_s_own_folder_within_one_load(tmp_path):
    # one load checks a data cell once: 'corpus.txt' of a/ and of b/ are two files, and only a/ has one
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "plan.csv").write_text(f"{SIZE},data\nsoftmax,32,2,64,4,5k|10k,corpus.txt\n")
    (tmp_path / "a" / "corpus.txt").write_text("the same bytes\n" * 100)
    a, b = tmp_path / "a" / "plan.csv", tmp_path / "b" / "plan.csv"
    for order in ([a, b], [b, a]):
        [issue] = issues_of(*order)
        assert (Path(issue.path), issue.row, issue.column) == (b, 2, "data")
        # a long path is shown clipped in its middle (as under pytest-xdist's folders)
        assert issue.message.startswith("data path /") and issue.message.endswith("/b/corpus.txt does not exist")
    assert len(load_plans([a])[0].runs) == 2


def test_runs_of_one_size_keep_the_shape_each_row_asks_for(write_plan):
    # a load builds each model shape once: rows of one width and depth differ in vocab, arch, pattern or heads
    path = write_plan("arch,d_model,n_layers,n_heads,hybrid,vocab,seq_len,tokens\nsoftmax,64,2,,,300,64,5k|10k\n"
                      "softmax,64,2,,,,64,5k\nsoftmax,64,2,2,,,64,5k\nhybrid,64,2,,LS,,64,5k\nhybrid,64,2,,SL,,64,5k\n"
                      "lightning,64,2,,,,64,5k\n")
    shapes = [(c.arch, c.n_heads, c.vocab_size, c.hybrid) for c in (r.spec.model_config() for r in load_plan(path).runs)]
    assert shapes == [("softmax", 1, 300, ""), ("softmax", 1, 300, ""), ("softmax", 1, 260, ""), ("softmax", 2, 260, ""),
                      ("hybrid", 1, 260, "LS"), ("hybrid", 1, 260, "SL"), ("lightning", 1, 260, "")]


def test_a_name_template_s_first_problem_is_the_one_reported(write_plan):
    # names are filled from the fields the template names alone: a field no run has is still found where it stands
    cases = {
        "{arch:d}-{nope}": "Unknown format code 'd' for object of type 'str'",
        "{nope}-{arch:d}": f"no field 'nope' (known: {KNOWN})",
        "{data_digest}": f"no field 'data_digest' (known: {KNOWN})",
    }
    for i, (template, message) in enumerate(cases.items()):
        [issue] = issues_of(write_plan(f"name,{SIZE}\n{template},softmax,32,2,64,4,5k\n", f"p{i}.csv"))
        assert (issue.column, issue.message) == ("name", f"bad name template {template!r}: {message}")
