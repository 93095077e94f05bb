"""Plan parsing and expansion: every cell form, counts, run ids, and every validation error."""

import re

import numpy as np
import pytest

import sweep.plan as plan_module
from sweep.plan import (
    MAX_ERRORS,
    NIAH_MIN_SEQ_LEN,
    PASSKEY_MIN_SEQ_LEN,
    PlanError,
    cost_plans,
    load_plan,
    load_plans,
    parse_range,
)
from sweep.spec import RunSpec

HEADER = "name,arch,d_model,n_layers,n_heads,seq_len,batch_size,tokens,lr\n"


def spec_of(**overrides):
    base = dict(
        arch="softmax", d_model=64, n_layers=2, n_heads=4, hybrid="", vocab_size=260, seq_len=128,
        batch_size=8, tokens=100000, lr=1e-3, warmup=10, schedule="cosine", min_lr_ratio=0.1,
        weight_decay=0.1, grad_clip=1.0, seed=0, data="stdlib", evals=("niah",), eval_every=0, gpus=0.25,
    )
    base.update(overrides)
    return RunSpec(**base)


def test_golden_run_id():
    # Changing the canonical form or the hash changes every stored run: this must never drift silently.
    assert spec_of().run_id == "188bbef4a5161be6"


def test_trained_id_is_the_id_of_the_spec_at_its_whole_steps_budget():
    import dataclasses

    odd = spec_of(tokens=100000 - 7)  # 8 x 128 = 1,024 tokens a step: 98 steps either way
    assert odd.trained_id == dataclasses.replace(odd, tokens=odd.trained_tokens).run_id != odd.run_id
    assert spec_of(tokens=1024 * 98).trained_id == spec_of(tokens=1024 * 98).run_id == odd.trained_id


def test_run_id_ignores_placement_and_normalises_numbers():
    assert spec_of(gpus=2).run_id == spec_of().run_id
    assert spec_of(lr=0.1 + 0.2).run_id == spec_of(lr=0.3).run_id
    assert spec_of(d_model=64.0).run_id == spec_of().run_id
    assert spec_of(seed=1).run_id != spec_of().run_id
    assert RunSpec.from_json(spec_of().canonical_json()) == spec_of()


@pytest.mark.parametrize(
    "cell, expected",
    [
        ("64..1024*2", [64, 128, 256, 512, 1024]),
        ("1..5+1", [1, 2, 3, 4, 5]),
        ("1e-4..1e-2*10", [1e-4, 1e-3, 1e-2]),
        ("2..3+2", [2]),
        ("1e+1..1e+2*2", [10, 20, 40, 80]),
        ("1e+1..3e+1+1e+1", [10, 20, 30]),
    ],
)
def test_ranges(cell, expected):
    assert parse_range(cell) == pytest.approx(expected)


def test_every_cell_form_expands(write_plan):
    path = write_plan(
        HEADER
        + "r-{d_model}-{lr},softmax|lightning,64..256*2,2,4,128,8,=20*params,1e-3|3e-3\n"
        + 'x,hgrn2,1..3+1,2,1,128,8,10k,"=0.5*min(1e-3, max(2e-3, 3e-3))"\n'
    )
    plan = load_plan(path)
    assert len(plan.runs) == 2 * 3 * 2 + 3
    first = plan.runs[0]
    assert first.name == "r-64-0.001"
    assert first.spec.tokens == round(20 * first.spec.derived()["params"])
    assert {r.spec.d_model for r in plan.runs[:12]} == {64, 128, 256}
    assert plan.runs[-1].spec.lr == pytest.approx(5e-4)
    assert plan.runs[-1].spec.tokens == 10_000


def test_defaults_and_derived_tokens_from_flops(write_plan):
    path = write_plan("arch,params,flops,hybrid\nhybrid,20M,1e17,LLLS\n# comment\n\nsoftmax,20M,1e17,\n")
    runs = load_plan(path).runs
    assert len(runs) == 2
    hyb, soft = runs[0].spec, runs[1].spec
    assert hyb.hybrid.startswith("LLLS") and set(hyb.hybrid) == {"L", "S"}
    assert soft.seq_len == 512 and soft.batch_size == 32 and soft.schedule == "cosine"
    fpt = soft.derived()["flops_per_token"]
    assert soft.tokens == round(1e17 / fpt)
    assert soft.warmup == round(0.05 * soft.steps)


@pytest.mark.parametrize("warmup, steps, expected", [(0.05, 9, 0), (0.05, 100, 5), (0, 9, 0), (0.3, 10, 3), (3, 2, 2)])
def test_warmup_cell_resolves_to_steps(write_plan, warmup, steps, expected):
    # a fraction is rounded (a warmup of one step would train step 1 at the peak rate, as none does), whole steps
    # are cut to the run
    path = write_plan(f"arch,d_model,n_layers,seq_len,batch_size,tokens,warmup\nsoftmax,64,2,64,4,{256 * steps},{warmup}\n")
    spec = load_plan(path).runs[0].spec
    assert spec.steps == steps and spec.warmup == expected
    assert plan_module.warmup_steps(warmup, steps) == expected


def test_plan_prices_the_whole_steps_a_run_trains_and_notes_large_rounding(write_plan):
    # slab plan had priced 100 tokens where the run trains a whole step of 4 x 64 = 256
    path = write_plan("arch,d_model,n_layers,seq_len,batch_size,tokens\nsoftmax,32,2,64,4,100|5000|25600\n")
    runs = [r.spec for r in load_plan(path).runs]
    assert [s.trained_tokens for s in runs] == [256, 5120, 25600]
    cost = cost_plans([load_plan(path)])
    assert cost.flops == pytest.approx(sum(s.derived()["flops_per_token"] * s.trained_tokens for s in runs))
    assert (cost.blocks[0].tokens_min, cost.blocks[0].tokens_max) == (256, 25600)
    [(plan_name, row, n, ratio)] = cost.rounded_up  # 5000 -> 5120 is 2.4% over: not noted
    assert (row, n) == (2, 1) and ratio == pytest.approx(2.56)


def test_same_run_from_two_rows_and_two_plans_is_one(write_plan):
    a = write_plan(HEADER + "a,softmax,64,2,4,128,8,1e5,1e-3\nb,softmax,64,2,4,128,8,100000,0.001\n", "a.csv")
    b = write_plan(HEADER + "c,softmax,64,2,4,128,8,100k,1e-3\n", "b.csv")
    pa, pb = load_plan(a), load_plan(b)
    assert len(pa.unique_specs()) == 1
    assert set(pa.unique_specs()) == set(pb.unique_specs())
    assert cost_plans([pa, pb]).runs == 1


ERRORS = [
    ("name,arch,wat\nx,softmax,1\n", ":1:wat: unknown column 'wat'"),
    ("arch,arch\nsoftmax,softmax\n", ":1:arch: duplicate column"),
    (HEADER + "x,rwkv,64,2,4,128,8,1e5,1e-3\n", ":2:arch: expected one of softmax"),
    (HEADER + "x,softmax,12a,2,4,128,8,1e5,1e-3\n", ':2:d_model: expected a positive integer, got "12a"'),
    (HEADER + "x,softmax,-64,2,4,128,8,1e5,1e-3\n", ":2:d_model: expected a positive integer, got -64"),
    (HEADER + "x,softmax,64,0,4,128,8,1e5,1e-3\n", ":2:n_layers: expected a positive integer, got 0"),
    (HEADER + "x,softmax,64,2,3,128,8,1e5,1e-3\n", ":2:n_heads: d_model 64 is not divisible by n_heads 3"),
    ("arch,d_model,n_layers,tokens,flops\nsoftmax,64,2,1e5,1e12\n", ":2:flops: give tokens or flops, not both"),
    ("arch,d_model,n_layers\nsoftmax,64,2\n", ":2:tokens: give tokens or flops (neither is set)"),
    (HEADER + "x,softmax,64..,2,4,128,8,1e5,1e-3\n", ":2:d_model: malformed range '64..'"),
    (HEADER + "x,softmax,64..128*1,2,4,128,8,1e5,1e-3\n", ":2:d_model: malformed range"),
    (HEADER + "x,softmax,64,2,4,128,8,=(20*,1e-3\n", ":2:tokens: expression syntax error"),
    (HEADER + "x,softmax,64,2,4,128,8,=20*parms,1e-3\n", ":2:tokens: unknown name 'parms'"),
    (HEADER + "x,softmax,64,2,4,=batch_size,=seq_len,1e5,1e-3\n", "expressions form a cycle"),
    (HEADER + "x,softmax,64,2,4,128,8,1e5,=1/(seq_len-128)\n", ":2:lr: division by zero"),
    (HEADER + "x,softmax,64,2,4,128,8,=__import__('os'),1e-3\n", ":2:tokens: in \"=__import__('os')\": only min()"),
    (HEADER + "x,softmax,256..64*2,2,4,128,8,1e5,1e-3\n", ":2:d_model: empty range '256..64*2': the start 256 is"),
    (HEADER + "x,softmax,64...128*2,2,4,128,8,1e5,1e-3\n", ":2:d_model: malformed range '64...128*2'"),
    (HEADER + "x,softmax,1e400,2,4,128,8,1e5,1e-3\n", ':2:d_model: number too large: "1e400"'),
    (HEADER + "x,softmax,64,2,4,128,8,=min(1e9, 20*params),1e-3\n", ":2: 10 cells but the header has 9 columns; quote"),
    ("arch,d_model,n_layers,tokens,lr\nsoftmax,128,2,1M\n",
     ":2: 4 cells but the header has 5 columns (none for lr); write an empty cell, as in a,,b, to take a column's default"),
    ("arch,d_model,n_layers,tokens\nsoftmax,128\n", ":2: 2 cells but the header has 4 columns (none for n_layers, tokens)"),
    (HEADER + "x\n", ":2: 1 cell but the header has 9 columns (none for arch, d_model, n_layers and 5 more)"),
    ("arch,d_model,n_layers,tokens\nsoftmax,1e3,2,1e5\n", ":2:d_model: d_model 1000 is not divisible by n_heads 15, its default"),
    ("name;arch;d_model\nx;softmax;64\n", "columns are separated by commas, not ';'"),
    ("Arch,d_model,n_layers,tokens\nsoftmax,64,2,1e5\n", ":1:Arch: unknown column 'Arch'; did you mean 'arch'?"),
    (HEADER.replace("name", "nmae") + "x,softmax,64,2,4,128,8,1e5,1e-3\n", "did you mean 'name'?"),
    (HEADER + "{arch}-{parms},softmax,64,2,4,128,8,1e5,1e-3\n", ":2:name: bad name template '{arch}-{parms}': no field 'parms' (known:"),
    (HEADER + "{d_model[0]},softmax,64,2,4,128,8,1e5,1e-3\n", ":2:name: bad name template"),
    ("arch,d_model,n_layers,tokens,data,seq_len\nsoftmax,64,2,1e5,stdlib+passkey@0.1,103\n",
     ":2:seq_len: passkey data needs seq_len >= 104, got 103"),
    ("arch,d_model,n_layers,tokens,data,seq_len\nsoftmax,64,2,1e5,passkey,64\n", ":2:seq_len: passkey data needs seq_len >= 104"),
    ("arch,d_model,n_layers,tokens,evals,seq_len\nsoftmax,64,2,1e5,mqar|niah,103\n", ":2:seq_len: niah evals need seq_len >= 104, got 103"),
    ("arch,d_model,n_layers,tokens,hybrid\nhybrid,64,4,1e5,8\n", ":2:hybrid: hybrid '8' gives no softmax layer"),
    ("arch,d_model,n_layers,tokens,data\nsoftmax,64,2,1e5,nope.bin\n", ":2:data: data path"),
    ("arch,d_model,n_layers,tokens,evals\nsoftmax,64,2,1e5,niah|bogus\n", ":2:evals: expected evals among"),
    ("arch,d_model,n_layers,tokens,gpus\nsoftmax,64,2,1e5,1.5\n", ":2:gpus: expected a fraction"),
    # Data-parallel workers split each batch: refused here, not after every attempt at launch failed.
    ("arch,d_model,n_layers,tokens,batch_size,gpus\nsoftmax,64,2,1e5,6,4\n",
     ":2:batch_size: batch_size 6 is not divisible by the 4 data-parallel workers of gpus 4"),
    ("arch,d_model,n_layers,tokens,schedule\nsoftmax,64,2,1e5,linear\n", ":2:schedule: expected one of cosine"),
    ("arch,d_model,n_layers,tokens,warmup\nsoftmax,64,2,1e5,2.5\n", ":2:warmup: expected a fraction of the run's steps below 1, or a whole number of steps, got 2.5"),
    # A suffix the numbers do not take (135m for 135M) is said to be one, with those they take.
    ("arch,params,tokens\nsoftmax,135m,1e5\n", ':2:params: expected a number, got "135m" (a number may end in k, K, M, B, T or G'),
    ("", ": the plan is empty"),
    ("# only a comment\n\n", ": the plan is empty"),
    (HEADER, ":1: the plan has a header but no rows"),
]


@pytest.mark.parametrize("text, message", ERRORS)
def test_validation_errors(write_plan, text, message):
    path = write_plan(text)
    with pytest.raises(PlanError) as info:
        load_plan(path)
    assert message in str(info.value)
    assert str(info.value).startswith(str(path))


def test_short_rows_are_errors_not_defaults(write_plan):
    text = "arch,d_model,n_layers,tokens,lr\nsoftmax,128,2,1M\n# softmax,128\n\nsoftmax,128,2,1M,\nsoftmax,128\n"
    path = write_plan(text)
    with pytest.raises(PlanError) as info:
        load_plan(path)
    # Both short rows are reported, with no cell check (no "a size is needed") for either.
    assert [(i.row, i.column) for i in info.value.issues] == [(2, None), (6, None)]
    assert "a size is needed" not in str(info.value)
    # The row whose missing cell is written empty takes the default lr.
    runs = load_plan(write_plan(text.replace("softmax,128,2,1M\n", "", 1).replace("softmax,128\n", ""))).runs
    assert len(runs) == 1 and runs[0].spec.lr == 1e-3


def test_short_rows_count_toward_the_error_limit(write_plan):
    with pytest.raises(PlanError) as info:
        load_plan(write_plan(HEADER + "x,softmax,64\n" * 30))
    assert len(info.value.issues) == MAX_ERRORS and info.value.more


def test_all_errors_reported_at_once_up_to_twenty(write_plan):
    bad_rows = "".join(f"x,softmax,{i}a,2,4,128,8,1e5,1e-3\n" for i in range(30))
    with pytest.raises(PlanError) as info:
        load_plan(write_plan(HEADER + bad_rows))
    assert len(info.value.issues) == MAX_ERRORS == 20
    assert [i.row for i in info.value.issues] == list(range(2, 22))
    assert info.value.more and info.value.total == 30 and str(info.value).endswith("\nand 10 more errors")


def test_exactly_twenty_errors_are_not_said_to_hide_more(write_plan):
    bad_rows = "".join(f"x,softmax,{i}a,2,4,128,8,1e5,1e-3\n" for i in range(20))
    with pytest.raises(PlanError) as info:
        load_plan(write_plan(HEADER + bad_rows))
    assert len(info.value.issues) == 20 and not info.value.more
    assert info.value.total == 20 and "more error" not in str(info.value)


def test_more_errors_carry_over_across_plans(write_plan):
    many = write_plan(HEADER + "".join(f"x,softmax,{i}a,2,4,128,8,1e5,1e-3\n" for i in range(25)), "a.csv")
    one = write_plan(HEADER + "x,softmax,1a,2,4,128,8,1e5,1e-3\n", "b.csv")
    with pytest.raises(PlanError) as info:
        load_plans([one, many])
    assert len(info.value.issues) == 20 and info.value.more


def test_size_limit(write_plan):
    path = write_plan(HEADER + "x,softmax,64,2,4,1..200+1,8,1e5,1e-3\n")
    assert len(load_plan(path, max_runs=200).runs) == 200
    with pytest.raises(PlanError, match="more than 199 runs"):
        load_plan(path, max_runs=199)


def test_unreadable_and_non_utf8(tmp_path):
    with pytest.raises(PlanError, match="cannot read the file"):
        load_plan(tmp_path / "missing.csv")
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("arch,name\nsoftmax,caf\xe9\n".encode("latin-1"))
    with pytest.raises(PlanError, match=r"latin1.csv:2: not UTF-8 text \(byte 0xe9"):
        load_plan(bad)


def write_xlsx(tmp_path, rows, edit=None):
    """A one-sheet workbook of ``rows`` at tmp_path/p.xlsx, after ``edit(sheet)`` (skips without openpyxl)."""
    openpyxl = pytest.importorskip("openpyxl")
    wb = openpyxl.Workbook()
    for row in rows:
        wb.active.append(row)
    if edit:
        edit(wb.active)
    path = tmp_path / "p.xlsx"
    wb.save(path)
    return path


def test_xlsx_plan(tmp_path):
    path = write_xlsx(tmp_path, [["# an xlsx plan"], ["arch", "d_model", "n_layers", "tokens", "lr"],
                                 ["softmax|lightning", 64, 2, 100000, 0.001]])
    runs = load_plan(path).runs
    assert [r.spec.arch for r in runs] == ["softmax", "lightning"]
    assert runs[0].row == 3


def test_shipped_plans_expand_within_their_stated_sizes():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "plans"
    sizes = {p.stem: len(load_plan(p).unique_specs()) for p in sorted(root.glob("*.csv"))}
    assert {"demo", "smoke-h100", "minimax01", "minimax01-paper", "hybrid-ratio", "isoflop"} <= set(sizes)
    assert 3500 <= sizes["minimax01"] <= 3900
    archs = {r.spec.arch for r in load_plan(root / "demo.csv").runs}
    assert archs == {"softmax", "lightning", "hybrid", "hgrn2", "mamba2"}


def test_round_takes_negative_digits(write_plan):
    runs = load_plan(write_plan(HEADER + 'x,softmax,64,2,4,128,8,"=round(20*params, -3)",1e-3\n')).runs
    params = runs[0].spec.derived()["params"]
    assert runs[0].spec.tokens == round(20 * params, -3) and runs[0].spec.tokens % 1000 == 0


EXPRESSION_ERRORS = [
    ("=min(params)", "in '=min(params)': min() needs at least two arguments"),
    ("=max(1e6)", "max() needs at least two arguments"),
    ('"=round(1e6, 1, 2)"', "round() takes at most 2 arguments"),
    ('"=round(1e6, 0.5)"', "round() needs a whole number of digits, got 0.5"),
    ("=(-8)**0.5*1e6", "'=(-8)**0.5*1e6' is not a real number"),
    ("=" + "9" * 400, "number too large"),
    ("=round(1e308*10)", "number too large"),
    ('"=round(1.7e308, -308)"', "number too large"),
    ("=round(1e400)", "number too large"),
    ("=" + "-" * 20000 + "1", "is too deeply nested"),
    ("=" + "+".join(["1"] * 1500), "is too long"),
]


@pytest.mark.parametrize("cell, message", EXPRESSION_ERRORS)
def test_expression_errors_are_cell_errors(write_plan, cell, message):
    path = write_plan(HEADER + f"x,softmax,64,2,4,128,8,{cell},1e-3\n")
    with pytest.raises(PlanError) as info:
        load_plan(path)
    assert str(info.value).startswith(f"{path}:2:tokens: ")
    assert message in str(info.value)


def test_passkey_minimum_seq_len_matches_models_data():
    # plan.py mirrors these (models.data imports torch); a run at the minimum works, one token less fails.
    np = pytest.importorskip("numpy")
    data = pytest.importorskip("models.data")
    evals = pytest.importorskip("models.evals")
    text = np.frombuffer(b"filler text " * 200, dtype=np.uint8)
    source = data.PasskeySource(data.Corpus("filler", text, text, "0" * 64, True))
    rng = np.random.default_rng(0)
    x, _ = source.sample(rng, PASSKEY_MIN_SEQ_LEN, "train")
    assert len(x) == PASSKEY_MIN_SEQ_LEN
    with pytest.raises(ValueError, match="a passkey prompt needs at least"):
        source.sample(rng, PASSKEY_MIN_SEQ_LEN - 1, "train")
    prompts, _ = evals.niah_prompts(text, NIAH_MIN_SEQ_LEN, 0.5, 2, 0)
    assert prompts.shape == (2, NIAH_MIN_SEQ_LEN - data.PASSKEY_DIGITS)  # the key's digits fill the rest
    assert plan_module.MQAR_PAIRS_DIVISOR == data.MQAR_PAIRS_DIVISOR
    with pytest.raises(ValueError, match="a passkey prompt needs at least"):
        evals.niah_prompts(text, NIAH_MIN_SEQ_LEN - 1, 0.5, 2, 0)


def test_passkey_plan_at_the_minimum_seq_len(write_plan):
    text = f"arch,d_model,n_layers,tokens,data,evals,seq_len\nsoftmax,64,2,1e5,stdlib+passkey@0.1,niah,{PASSKEY_MIN_SEQ_LEN}\n"
    assert load_plan(write_plan(text)).runs[0].spec.seq_len == PASSKEY_MIN_SEQ_LEN


def test_name_template_may_use_derived_names(write_plan):
    runs = load_plan(write_plan(HEADER + "{arch}-{params}-{tokens},softmax,64,2,4,128,8,=20*params,1e-3\n")).runs
    spec = runs[0].spec
    assert runs[0].name == f"softmax-{spec.derived()['params']}-{spec.tokens}"


def test_a_run_on_a_corpus_is_known_by_its_contents_not_its_path(tmp_path):
    # the id had hashed the corpus's absolute path: a moved checkout retrained every run, an edited corpus none
    text = "arch,d_model,n_layers,seq_len,batch_size,tokens,data\nsoftmax,32,2,64,4,5k,corpus.txt\nsoftmax,32,2,64,4,5k,stdlib\n"
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "plan.csv").write_text(text)
        (tmp_path / folder / "corpus.txt").write_text("the same bytes\n" * 100)
    a, b = (load_plan(tmp_path / f / "plan.csv").runs for f in ("a", "b"))
    assert a[0].spec.data != b[0].spec.data and a[0].spec.run_id == b[0].spec.run_id
    assert len(a[0].spec.data_digest) == 64 and a[1].spec.data_digest == "" and "data_digest" not in a[1].spec.to_dict()
    (tmp_path / "b" / "corpus.txt").write_text("other bytes\n" * 200)  # long enough to train on (seq_len 64)
    edited = load_plan(tmp_path / "b" / "plan.csv").runs
    assert edited[0].spec.run_id != a[0].spec.run_id and edited[1].spec.run_id == a[1].spec.run_id
    spec = edited[0].spec  # the field travels through the database's JSON
    assert RunSpec.from_json(spec.canonical_json()) == spec


@pytest.mark.parametrize("row, message", [
    ("softmax,64,4,5120,stdlib,100", ":2:vocab: byte-level data 'stdlib' needs vocab >= 260, got 100"),
    ("softmax,128,4,5120,passkey,100", ":2:vocab: byte-level data 'passkey' needs vocab >= 260, got 100"),
    ("softmax,128,4,5120,stdlib+stdlib@0.5,", ":2:data: 'stdlib' appears twice in the mixture"),
    ("softmax,128,4,5120,stdlib@0.5+passkey@0.6+mqar,", ":2:data: the weights in 'stdlib@0.5+passkey@0.6+mqar' add up to 1.1"),
])
def test_data_that_would_fail_at_training_is_refused_at_plan_time(write_plan, row, message):
    # these had passed slab plan and slab add, and failed every run (three attempts each) at launch
    with pytest.raises(PlanError, match=re.escape(message)):
        load_plan(write_plan("arch,d_model,n_layers,seq_len,batch_size,tokens,data,vocab\n" + row.replace(",", ",32,2,", 1) + "\n"))


def test_a_mixture_weighted_in_every_part_is_taken(write_plan):
    runs = load_plan(write_plan("arch,d_model,n_layers,seq_len,tokens,data\nsoftmax,32,2,128,5120,stdlib@0.5+passkey@0.6\n")).runs
    assert runs[0].spec.data == "stdlib@0.5+passkey@0.6"  # scaled to add up to 1 when trained


def test_name_template_may_use_the_plan_column_vocab(write_plan):
    # the column is vocab, the spec's field vocab_size: {vocab} had been refused as no field
    runs = load_plan(write_plan("name,arch,d_model,n_layers,vocab,tokens\nv{vocab},softmax,32,2,300,16k\n")).runs
    assert runs[0].name == "v300"


def test_name_template_reads_evals_tags_and_whole_counts_as_written(write_plan):
    """{evals} had read as a list's repr (x-['mqar', 'niah']), {flops} with a float's .0 and {tags} as no field."""
    text = "name,arch,d_model,n_layers,seq_len,tokens,evals,tags\nx-{evals}-{flops}-{tags}-{lr},softmax,64,2,128,1M,niah|mqar,small\n"
    run = load_plan(write_plan(text)).runs[0]
    assert run.name == f"x-mqar|niah-{int(run.spec.derived()['flops'])}-small-{run.spec.lr}"


def test_counts_the_database_cannot_hold_are_refused_at_plan_time(write_plan):
    # slab plan had priced 1e19 tokens and slab add then crashed on SQLite's 64-bit integer
    path = write_plan("arch,d_model,n_layers,seq_len,batch_size,tokens\nsoftmax,32,2,64,4,1e19\nsoftmax,32,2,64,4,=2**1000\n"
                      "softmax,32,2,64,16777216,1e18\n")
    with pytest.raises(PlanError) as info:
        load_plan(path)
    messages = [str(i) for i in info.value.issues]
    assert len(messages) == 2 and all(":tokens: the run trains" in m and "holds counts below 9.22e+18" in m for m in messages)
    assert [m.split(":")[1] for m in messages] == ["2", "3"]


@pytest.mark.parametrize("suffix", [".ods", ".xls"])
def test_other_spreadsheet_formats_are_named(tmp_path, suffix):
    path = tmp_path / f"plan{suffix}"
    path.write_bytes(b"PK\x03\x04\xff\xfe\x00")
    with pytest.raises(PlanError, match=rf"plan\{suffix}: only \.csv and \.xlsx plans are read"):
        load_plan(path)


def test_xlsx_trailing_empty_cells_take_defaults(tmp_path):
    # A sheet drops trailing empty cells, so a row short of the header there is not the CSV error.
    path = write_xlsx(tmp_path, [["arch", "d_model", "n_layers", "tokens", "lr", "seed"],
                                 ["softmax", 64, 2, 100000], ["softmax", 64, 2, 100000, None, 1]])
    runs = load_plan(path).runs
    assert [(r.spec.lr, r.spec.seed) for r in runs] == [(1e-3, 0), (1e-3, 1)]


def test_xlsx_formulas_are_reported(tmp_path):
    def row4(ws):
        ws.cell(row=4, column=1, value="softmax")
        ws.cell(row=4, column=2, value="=64*2")

    path = write_xlsx(tmp_path, [["arch", "d_model", "n_layers", "tokens"],
                                 ["softmax", 64, 2, "=20*params"],  # a formula: openpyxl stores no cached value
                                 ["softmax", 64, 2, "#NAME?"]], row4)  # what Excel caches for =20*params
    with pytest.raises(PlanError) as info:
        load_plan(path)
    formula = "spreadsheet formula; enter plan expressions as text (prefix with ')"
    assert [str(i) for i in info.value.issues] == [
        f"{path}:2:tokens: {formula}", f"{path}:3:tokens: {formula}", f"{path}:4:d_model: {formula}"
    ]


def test_xlsx_expression_entered_as_text(tmp_path):
    def as_text(ws):
        ws.cell(row=2, column=4, value="=20*params").data_type = "s"  # what a leading ' makes of it in a spreadsheet

    path = write_xlsx(tmp_path, [["arch", "d_model", "n_layers", "tokens"], ["softmax", 64, 2]], as_text)
    spec = load_plan(path).runs[0].spec
    assert spec.tokens == round(20 * spec.derived()["params"])


def test_mqar_that_the_vocabulary_cannot_hold_is_refused_at_plan_time(write_plan):
    # at seq_len 2080 MQAR has 130 pairs: bytes (260) hold 129, so the final eval would have failed after training
    ok = "arch,d_model,n_layers,tokens,data,evals,seq_len\nsoftmax,64,2,1e5,stdlib,mqar,2064\n"
    assert load_plan(write_plan(ok)).runs[0].spec.evals == ("mqar",)
    with pytest.raises(PlanError, match=r"seq_len.*mqar at seq_len 2080 has 130 key-value pairs, which need a vocab of at "
                                        r"least 262, got 260: give a larger vocab or a seq_len below 2080"):
        load_plan(write_plan(ok.replace("2064", "2080")))
    with pytest.raises(PlanError, match="mqar needs seq_len >= 4, got 3"):
        load_plan(write_plan(ok.replace("2064", "3")))
    wide = "arch,d_model,n_layers,tokens,data,evals,seq_len,vocab\nsoftmax,64,2,1e5,stdlib,mqar,2080,512\n"
    assert load_plan(write_plan(wide)).runs[0].spec.vocab_size == 512


def test_si_rounds_before_it_picks_the_prefix():
    from sweep.plan import si

    assert [si(v) for v in (999.6, 9.9999e17, 1.234e6, 12_000, 3.2e18, 0.5)] == ["1k", "1E", "1.23M", "12k", "3.2E", "0.5"]


def test_niah_on_token_ids_alone_is_refused_at_plan_time(write_plan, tmp_path):
    # NIAH's prompts are bytes: on a .bin corpus alone every arch scores 0 (the models refuse it at launch too)
    import numpy as np

    np.arange(4000, dtype=np.uint16).tofile(tmp_path / "tokens.bin")  # 200 ids held out: a sequence of 128 fits
    header = "arch,d_model,n_layers,seq_len,tokens,vocab,evals,data\n"
    with pytest.raises(PlanError, match=r":2:evals: niah evals need byte-level text, and data '.*tokens\.bin' holds token"):
        load_plan(write_plan(header + "softmax,32,2,128,5120,4096,niah,tokens.bin\n"))
    # with byte text beside it (the passkey filler) NIAH has prompts a model can read; mqar needs no bytes
    runs = load_plan(write_plan(header + "softmax,32,2,128,5120,4096,niah,tokens.bin+passkey@0.1\n"
                                "softmax,32,2,128,5120,4096,mqar,tokens.bin\n", "ok.csv")).runs
    assert len(runs) == 2


def test_excel_blank_rows_of_empty_cells_are_skipped(write_plan):
    # Excel saves a blank row of a sheet as a line of bare commas: that is a blank line, not a row without an arch.
    path = write_plan(HEADER + ",,,,,,,,\r\nx,softmax,64,2,4,128,8,10k,1e-3\r\n , , ,,,,,,\r\n")
    assert [r.row for r in load_plan(path).runs] == [3]


def test_an_arch_typo_is_reported_with_the_other_errors_of_its_row(write_plan):
    with pytest.raises(PlanError) as exc:
        load_plan(write_plan(HEADER + "x,softmx,64,2,4,128,8,lots,1e-3\ny,,64,2,4,128,8,10k,1e-3\n"))
    text = str(exc.value)
    assert ":2:arch: expected one of" in text and "'softmx'" in text and ":2:tokens:" in text
    assert ":3:arch: arch is required" in text


def test_shipped_plans_name_each_run_apart():
    # A name template that leaves out a varied field (a seed) labels two runs alike in `slab runs` and reports.
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[2] / "plans").glob("*.csv")):
        named = {r.spec.run_id: r.name for r in load_plan(path).runs if r.name}
        assert len(set(named.values())) == len(named), path.name


def test_a_malformed_seed_is_not_said_to_need_a_positive_integer(write_plan):
    # seed 0 is the default: "expected a positive integer" would send the user away from it
    with pytest.raises(PlanError, match=r':2:seed: expected a non-negative integer, got "x"'):
        load_plan(write_plan("arch,d_model,n_layers,tokens,seed\nsoftmax,64,2,10k,x\n"))


def test_a_spec_holds_its_numbers_in_their_normal_types():
    spec = spec_of(d_model=np.int64(64), seed=True, n_layers=2.0, evals=["niah"], lr=np.float32(0.5), gpus=1)
    assert [type(getattr(spec, f)) for f in ("d_model", "seed", "n_layers", "lr", "gpus")] == [int, int, int, float, float]
    assert (spec.seed, spec.evals, spec.lr) == (1, ("niah",), 0.5)
    assert spec == spec_of(seed=1, lr=0.5, gpus=1.0) and spec.run_id == spec_of(seed=1, lr=0.5).run_id
    assert spec.canonical_json(identity=True) == spec_of(seed=1, lr=0.5).canonical_json(identity=True)
    assert '"gpus"' not in spec.canonical_json(identity=True) and '"gpus":1.0' in spec.canonical_json()
    with pytest.raises(ValueError, match="non-finite"):
        spec_of(lr=float("nan"))
