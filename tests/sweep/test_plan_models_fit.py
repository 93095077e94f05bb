"""Plan rows that every run of would fail at launch, inside training, are refused at plan time, naming row and column."""

import os
import time

import numpy as np
import pytest

from sweep.plan import PlanError, load_plan

SIZE = "arch,d_model,n_layers,seq_len,batch_size,tokens"


def _settled(path):
    """Date a file back past the digest cache's settle time, so that its digest is cached."""
    old = time.time() - 60
    os.utime(path, (old, old))
    return path


def test_a_token_corpus_holding_an_id_the_vocab_lacks_is_refused_in_vocab(write_plan, tmp_path):
    # each run had failed at launch, in models.data, before its first step
    np.arange(5000, dtype=np.uint16).tofile(tmp_path / "tokens.bin")
    with pytest.raises(PlanError) as info:
        load_plan(write_plan(f"{SIZE},vocab,data\nlightning,32,2,32,2,1k,300|5000,tokens.bin\n"))
    [issue] = info.value.issues
    assert (issue.row, issue.column) == (2, "vocab")
    assert "token id 4999" in issue.message and "vocab 300" in issue.message and "5000" in issue.message


def test_a_vocab_that_holds_every_id_of_a_token_corpus_is_accepted(write_plan, tmp_path):
    np.arange(5000, dtype=np.uint16).tofile(tmp_path / "tokens.bin")
    plan = load_plan(write_plan(f"{SIZE},vocab,data\nlightning,32,2,32,2,1k,5000,tokens.bin+stdlib@0.5\n"))
    assert [r.spec.vocab_size for r in plan.runs] == [5000]


def test_a_token_folder_is_checked_in_its_validation_file_too(write_plan, tmp_path):
    (tmp_path / "corpus").mkdir()
    np.zeros(4000, dtype=np.uint16).tofile(tmp_path / "corpus" / "train.bin")
    np.full(200, 700, dtype=np.uint16).tofile(tmp_path / "corpus" / "val.bin")
    with pytest.raises(PlanError, match="token id 700"):
        load_plan(write_plan(f"{SIZE},vocab,data\nlightning,32,2,32,2,1k,512,corpus\n"))


def test_the_plan_scan_of_a_token_corpus_is_the_one_training_reads(tmp_path):
    """The largest id the plan finds is cached under the key models.data reads, with the very sha256 it computes."""
    from models import data as D
    from models.sources import token_max_id

    ids = (np.arange(30000) % 1234).astype(np.uint16)
    ids.tofile(tmp_path / "t.bin")
    _settled(tmp_path / "t.bin")
    assert token_max_id(tmp_path / "t.bin") == 1233
    scans = []
    real = D._sha256_and_max
    D._sha256_and_max = lambda *a: scans.append(1) or real(*a)
    try:
        corpus = D.bin_corpus(tmp_path / "t.bin")
    finally:
        D._sha256_and_max = real
    assert not scans  # read from the entry the plan wrote
    assert (corpus.max_id, corpus.sha256) == (1233, real(corpus.train, corpus.val)[0])


@pytest.fixture
def small_stdlib(monkeypatch):
    """The standard library's splits as a small Python's would be: 2,000,000 training and 90,000 validation bytes."""
    import sweep.plan as P

    monkeypatch.setattr(P, "stdlib_split_sizes", lambda: (2_000_000, 90_000, "every 20th file is held out for validation"))


@pytest.mark.parametrize("row,column,need", [
    ("lightning,32,2,100k,1,1M,stdlib,", "seq_len", "100001"),  # training windows: seq_len + 1 of each split
    ("lightning,32,2,100k,1,1M,passkey,", "seq_len", "99896"),  # passkey documents fill seq_len - 104 from stdlib
    ("lightning,32,2,50k,1,1M,passkey,niah", "evals", "99896"),  # NIAH's 2 x seq_len prompt
])
def test_a_seq_len_the_stdlib_corpus_cannot_fill_is_refused(write_plan, small_stdlib, row, column, need):
    # every run had failed at launch ("the val split of stdlib holds ... tokens"), naming no row or column
    with pytest.raises(PlanError) as info:
        load_plan(write_plan(f"{SIZE},data,evals\n{row}\n"))
    [issue] = info.value.issues
    assert (issue.row, issue.column) == (2, column)
    assert "stdlib" in issue.message and "holds 90000" in issue.message and need in issue.message


def test_a_seq_len_the_stdlib_corpus_fills_is_accepted(write_plan, small_stdlib):
    plan = load_plan(write_plan(f"{SIZE},data,evals\nlightning,32,2,89999,1,1M,stdlib|passkey,\n"
                                "lightning,32,2,45k,1,1M,stdlib,niah\n"))
    assert len(plan.runs) == 3


def test_a_row_that_any_standard_library_fills_does_not_scan_it(write_plan, monkeypatch):
    import sweep.plan as P

    monkeypatch.setattr(P, "stdlib_split_sizes", lambda: pytest.fail("scanned the standard library"))
    load_plan(write_plan(f"{SIZE},data,evals\nlightning,32,2,4096,1,1M,stdlib|passkey,niah\n"))


def test_stdlib_split_sizes_are_the_corpus_training_reads():
    from models.data import stdlib_corpus
    from models.sources import stdlib_split_sizes

    corpus = stdlib_corpus()
    assert stdlib_split_sizes()[:2] == (len(corpus.train), len(corpus.val))


def test_a_seq_len_past_any_standard_library_is_refused_in_seq_len(write_plan):
    # the stdlib corpus holds at most STDLIB_CAP_BYTES, a twentieth of it for validation: under 4M bytes in any Python
    with pytest.raises(PlanError) as info:
        load_plan(write_plan(f"{SIZE},data\nlightning,32,2,4M,1,4M,stdlib\n"))
    [issue] = info.value.issues
    assert (issue.row, issue.column) == (2, "seq_len") and "validation split" in issue.message


@pytest.mark.parametrize("vocab", [64, 8192])
def test_niah_on_mqar_alone_is_refused_at_plan_time(write_plan, vocab):
    # below 256 the byte prompts' ids pass the embedding: the run trained every step, then its eval failed with
    # "IndexError: index out of range"; above it, every arch scored 0 on prompts its MQAR ids do not spell
    with pytest.raises(PlanError) as info:
        load_plan(write_plan(f"{SIZE},vocab,data,evals\nlightning,32,2,128,2,1k,{vocab},mqar,niah\n"))
    [issue] = info.value.issues
    assert (issue.row, issue.column) == (2, "evals") and "byte-level text" in issue.message
    load_plan(write_plan(f"{SIZE},vocab,data,evals\nlightning,32,2,128,2,1k,{max(vocab, 260)},mqar+passkey@0.5,niah\n",
                         "ok.csv"))
