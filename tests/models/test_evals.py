"""Evals: the scoring pipeline gives 1 to an oracle and 0 to a model that knows nothing."""

import numpy as np
import pytest
import torch
from torch import nn

from models.config import ModelConfig
from models.data import PASSKEY_QUESTION, open_data
from models.evals import NIAH_DEPTHS, check_evals, mqar_accuracy, needle_in_haystack, run_evals, validation_loss
from models.lm import LM

CPU = torch.device("cpu")
QUESTION_TAIL = PASSKEY_QUESTION.encode()


class Oracle(nn.Module):
    """Puts all mass on the right next token: passkey digits after the question, MQAR values at queries."""

    def __init__(self, vocab, task, wrong=False):
        super().__init__()
        self.config = ModelConfig("softmax", 8, 1, 1, vocab)
        self.task, self.wrong = task, wrong

    def forward(self, idx, targets=None, last_only=False):
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        for b, row in enumerate(idx.tolist()):
            if self.task == "niah":
                text = bytes(row)
                answer = text.rindex(QUESTION_TAIL) + len(QUESTION_TAIL)
                key = text[text.index(b"pass key is ") + len(b"pass key is ") :][:5]
                nxt = key[len(text) - answer] if len(text) - answer < 5 else ord(".")
                logits[b, -1, (nxt + self.wrong) % 256] = 1.0
            else:
                pairs, i = {}, 0
                while row[2 * i + 1] != 0:
                    pairs[row[2 * i]] = row[2 * i + 1]
                    i += 1
                for p in range(2 * i, len(row)):
                    if row[p] in pairs:
                        logits[b, p, pairs[row[p]] - self.wrong] = 1.0
        return logits, None


def test_niah_scores_an_oracle_one_and_a_wrong_model_zero():
    data = open_data("stdlib", 260)
    right = needle_in_haystack(Oracle(260, "niah"), data, 128, device=CPU, samples=3)
    names = {f"niah/len={n}/depth={d:g}" for n in (128, 256) for d in NIAH_DEPTHS} | {"niah/mean"}
    assert set(right) == names
    assert all(v == 1.0 for v in right.values())
    wrong = needle_in_haystack(Oracle(260, "niah", wrong=True), data, 128, device=CPU, samples=3)
    assert all(v == 0.0 for v in wrong.values())


def test_mqar_accuracy_scores_queries_only():
    data = open_data("mqar", 512)
    assert mqar_accuracy(Oracle(512, "mqar"), data, 64, device=CPU, sequences=40, batch=16) == {"mqar/acc": 1.0}
    assert mqar_accuracy(Oracle(512, "mqar", wrong=True), data, 64, device=CPU, sequences=40)["mqar/acc"] == 0.0


def test_validation_loss_is_fixed_and_batch_independent():
    torch.manual_seed(0)
    model = LM(ModelConfig("mamba2", 32, 2, 2, 260))
    data = open_data("stdlib", 260)
    a = validation_loss(model, data, 32, device=CPU, sequences=32, batch=16)
    for batch in (8, 12, 48):  # 12 and 48 do not divide 32: the same 32 sequences all the same
        assert validation_loss(model, data, 32, device=CPU, sequences=32, batch=batch) == pytest.approx(a, rel=1e-5)
    assert a == pytest.approx(np.log(260), rel=0.05)
    assert model.training  # evals restore the mode they found


def test_validation_loss_without_a_labelled_token_is_none(monkeypatch):
    """Validation text whose every target is ignored (fully masked data) has no loss: its mean (0 / 0) raised
    ZeroDivisionError; now it is None, which callers read as "no validation loss", never as a NaN loss."""
    from models.data import Batches

    unmasked = Batches.sequence

    def sequence(self, index):
        x, y = unmasked(self, index)
        return (x, np.full_like(y, -100)) if self.split == "val" else (x, y)

    monkeypatch.setattr(Batches, "sequence", sequence)
    model = LM(ModelConfig("softmax", 16, 1, 1, 260)).train()
    assert validation_loss(model, open_data("stdlib", 260), 32, device=CPU, sequences=8, batch=4) is None
    assert model.training


def test_run_evals_on_a_real_model_and_unknown_name():
    torch.manual_seed(0)
    model = LM(ModelConfig("hybrid", 32, 2, 2, 8192, "LS"))
    data = open_data("mqar", 8192)
    out = run_evals(("mqar",), model, data, 64, device=CPU)
    assert 0.0 <= out["mqar/acc"] < 0.05  # untrained: chance is about 1/4096
    with pytest.raises(ValueError, match="unknown eval"):
        run_evals(("nope",), model, data, 64, device=CPU)


def test_niah_predicts_every_key_digit_inside_the_length_it_is_labelled_with():
    # As in training, where a document of seq_len + 1 tokens ends in the key and its '.', the prompt and the key
    # fill the cell's length: the last digit is predicted at position length - 2 (before, 4 of the 5 digits of the
    # len=seq_len cell were predicted past the trained context).
    seen = []

    class Recording(Oracle):
        def forward(self, idx, targets=None, last_only=False):
            seen.append(idx.shape[1])
            return super().forward(idx, targets, last_only)

    scores = needle_in_haystack(Recording(260, "niah"), open_data("stdlib", 260), 128, device=CPU, samples=2,
                                depths=(0.5,))
    assert scores["niah/mean"] == 1.0
    assert seen == [123, 124, 125, 126, 127, 251, 252, 253, 254, 255]


def test_check_evals_fails_before_training_on_what_the_final_eval_would_fail_on(tmp_path):
    text = tmp_path / "small.txt"
    text.write_bytes(b"some filler text, short. " * 120)  # 3,000 bytes: a validation split of 150
    data = open_data(f"{text}+passkey@0.1", 260)
    data.check(128)  # windows of 128 fit, but NIAH's prompt at twice the length does not
    with pytest.raises(ValueError, match="niah evals at length 256 .seq_len 128.: the passkey filler holds 150"):
        check_evals(("niah",), data, 128, 260)
    check_evals(("niah",), data, 104, 260)
    with pytest.raises(ValueError, match="mqar evals at seq_len 2080: MQAR with 130 pairs needs vocab_size > 261"):
        check_evals(("mqar",), open_data("stdlib", 260), 2080, 260)
    with pytest.raises(ValueError, match="unknown eval 'nope'"):
        check_evals(("nope",), data, 64, 260)


def test_niah_is_refused_on_token_id_data_whose_ids_are_not_bytes(tmp_path):
    # NIAH's prompts are byte text; a model trained on a tokenised .bin reads ids 0-255 as other tokens, so every
    # arch scored 0 and the report read that as a retrieval failure of the architectures.
    (tmp_path / "c.bin").write_bytes((np.arange(20_000, dtype=np.uint16) % 1000).tobytes())
    with pytest.raises(ValueError, match=r"niah evals: data '.*c.bin' holds token ids and no byte-level text"):
        check_evals(("niah",), open_data(str(tmp_path / "c.bin"), 1024), 128, 1024)
    check_evals(("niah",), open_data(f"{tmp_path / 'c.bin'}+passkey@0.1", 1024), 128, 1024)  # byte documents: allowed
    check_evals(("mqar",), open_data(str(tmp_path / "c.bin"), 1024), 128, 1024)


def test_niah_is_refused_on_mqar_data_alone():
    # with a vocab below 256 the byte prompts fell outside the embedding: an IndexError at the end of training
    with pytest.raises(ValueError, match=r"niah evals: data 'mqar' holds token ids and no byte-level text"):
        check_evals(("niah",), open_data("mqar", 64), 128, 64)
    check_evals(("niah",), open_data("mqar+passkey@0.5", 300), 128, 300)
