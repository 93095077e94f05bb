"""Evaluations: validation loss, needle-in-a-haystack passkey retrieval, and MQAR accuracy.

A run's ``spec.evals`` names the retrieval evals it gets at eval time (``EVALS``); validation loss is
always computed. Results are plain ``{name: value}`` dicts that the training loop hands to its reporter.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from models.data import (
    PASSKEY_DIGITS,
    Batches,
    Data,
    MQARSource,
    TextSource,
    passkey_prompt,
    random_passkey,
)

EVALS = ("niah", "mqar")
#: Validation windows are drawn with this seed whatever the run's seed, so runs are scored alike.
VAL_SEED = 0
NIAH_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NIAH_SAMPLES = 8  # prompts per (length, depth) cell
MQAR_EVAL_SEQUENCES = 256


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU runs in fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def val_sequences(seq_len: int) -> int:
    """How many validation sequences to score: about 128K tokens, between 8 and 256 sequences."""
    return max(8, min(256, (1 << 17) // seq_len))


def validation_batches(data: Data, seq_len: int, *, device: torch.device, sequences: int | None = None, batch: int = 16):
    """The fixed seeded validation batches as (x, y, labelled tokens) on ``device``; unlabelled ones skipped.

    Exactly ``sequences`` sequences whatever ``batch`` is (the last batch is cut), so that a run is scored on
    the same text alone, packed, or with the smaller microbatch of an out-of-memory retry."""
    sequences = sequences or val_sequences(seq_len)
    batches = Batches(data, seq_len, batch, seed=VAL_SEED, split="val")
    for first in range(0, sequences, batch):
        x, y = batches.next()
        take = min(batch, sequences - first)
        x, y = x[:take], y[:take]
        n = int((y != -100).sum())
        if n:
            yield x.to(device), y.to(device), n


@torch.no_grad()
def validation_loss(
    model, data: Data, seq_len: int, *, device: torch.device, sequences: int | None = None, batch: int = 16
) -> float | None:
    """Mean cross-entropy (nats per predicted token) over fixed seeded validation sequences; None where none of
    them holds a labelled token (every target -100, as fully masked data gives), so there is no loss to report."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for x, y, n in validation_batches(data, seq_len, device=device, sequences=sequences, batch=batch):
        with autocast(device):
            _, loss = model(x, y)
        total += float(loss) * n
        count += n
    model.train(was_training)
    return total / count if count else None


@torch.no_grad()
def greedy_continue(model, prompts: torch.Tensor, steps: int, device: torch.device) -> torch.Tensor:
    """Greedy-decode ``steps`` tokens after each prompt (B, T), re-running the full prefix each step."""
    tokens = prompts.to(device)
    for _ in range(steps):
        with autocast(device):
            logits, _ = model(tokens, last_only=True)
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[:, prompts.shape[1] :].cpu()


def niah_prompts(
    filler: np.ndarray, length: int, depth: float, samples: int, seed: int
) -> tuple[torch.Tensor, list[str]]:
    """``samples`` passkey prompts with the needle at ``depth``, and their keys: each prompt is ``length`` minus the
    key's digits long, so that prompt and key fill ``length`` tokens, as a training document's do at seq_len."""
    rng = np.random.default_rng([seed, length, round(depth * 1000)])
    keys = [random_passkey(rng) for _ in range(samples)]
    prompts = [passkey_prompt(filler, rng, length - PASSKEY_DIGITS, depth, key)[0] for key in keys]
    return torch.from_numpy(np.stack(prompts)), keys


def niah_lengths(seq_len: int) -> tuple[int, int]:
    """NIAH's default lengths: the training context, and twice it (extrapolation beyond it)."""
    return seq_len, 2 * seq_len


@torch.no_grad()
def needle_in_haystack(
    model,
    data: Data,
    seq_len: int,
    *,
    device: torch.device,
    lengths: tuple[int, ...] | None = None,
    depths: tuple[float, ...] = NIAH_DEPTHS,
    samples: int = NIAH_SAMPLES,
    seed: int = VAL_SEED,
) -> dict[str, float]:
    """Passkey retrieval (Mohtashami & Jaggi 2023) over prompt lengths x needle depths.

    Filler comes from the validation split of the data's text. The prompt is teacher-forced, then five
    tokens are decoded greedily; a sample scores 1 only if all five equal the key's digits. Results are
    ``niah/len=L/depth=D`` (accuracy over ``samples``; prompt and key fill L tokens, so at L = seq_len every
    digit is predicted inside the trained context) and ``niah/mean``. Lengths default to ``niah_lengths``.
    """
    filler = data.text_filler().val
    lengths = lengths or niah_lengths(seq_len)
    was_training = model.training
    model.eval()
    results = {}
    for length in lengths:
        for depth in depths:
            prompts, keys = niah_prompts(filler, length, depth, samples, seed)
            out = greedy_continue(model, prompts, PASSKEY_DIGITS, device)
            want = torch.tensor([list(k.encode()) for k in keys])
            results[f"niah/len={length}/depth={depth:g}"] = (out == want).all(dim=1).float().mean().item()
    model.train(was_training)
    results["niah/mean"] = float(np.mean(list(results.values())))
    return results


@torch.no_grad()
def mqar_accuracy(
    model,
    data: Data,
    seq_len: int,
    *,
    device: torch.device,
    sequences: int = MQAR_EVAL_SEQUENCES,
    batch: int = 32,
) -> dict[str, float]:
    """``mqar/acc``: the fraction of query positions whose greedy prediction is the right value, over ``sequences``
    sequences.

    Sequences come from the validation stream (a seed no training sequence uses): held out.
    """
    source = data.source("mqar") or MQARSource(model.config.vocab_size)
    mqar_only = Data("mqar", ("mqar",), (1.0,), (source,), source.sha256, None)
    batches = Batches(mqar_only, seq_len, batch, seed=VAL_SEED, split="val")
    was_training = model.training
    model.eval()
    right = total = 0
    for first in range(0, sequences, batch):
        x, y = batches.next()
        take = min(batch, sequences - first)  # exactly ``sequences``: the last batch is cut, as validation's is
        x, y = x[:take], y[:take]
        with autocast(device):
            logits, _ = model(x.to(device))
        mask = y != -100
        right += int((logits.argmax(-1).cpu()[mask] == y[mask]).sum())
        total += int(mask.sum())
    model.train(was_training)
    return {"mqar/acc": right / total}


def check_evals(names, data: Data, seq_len: int, vocab_size: int) -> None:
    """Build one input of each named eval now, so that a filler too short for NIAH's longest prompt or an MQAR
    the vocabulary cannot hold fails before training, not at the final eval after every step is spent."""
    rng = np.random.default_rng(VAL_SEED)
    for name in names:
        if name == "niah":
            # MQAR's ids as well: below 256 the prompts' byte ids would index past a small vocabulary's embedding
            token_ids = any(isinstance(s, MQARSource) or (isinstance(s, TextSource) and not s.corpus.is_bytes)
                            for s in data.sources)
            if data.filler is None and token_ids:
                # NIAH's prompts are bytes; to a model of token ids, ids 0-255 are other tokens, so it would score 0
                # whatever its architecture, and the report would read that as a retrieval failure.
                raise ValueError(f"niah evals: data {data.spec!r} holds token ids and no byte-level text, but NIAH's "
                                 "prompts are byte text (add a byte-level part such as passkey, or drop niah)")
            filler = data.text_filler().val
            for length in niah_lengths(seq_len):
                try:
                    niah_prompts(filler, length, 0.5, 1, VAL_SEED)
                except ValueError as exc:
                    raise ValueError(f"niah evals at length {length} (seq_len {seq_len}): {exc}") from None
        elif name == "mqar":
            try:
                (data.source("mqar") or MQARSource(vocab_size)).sample(rng, seq_len, "val")
            except ValueError as exc:
                raise ValueError(f"mqar evals at seq_len {seq_len}: {exc}") from None
        else:
            raise ValueError(f"unknown eval {name!r}: expected one of {', '.join(EVALS)}")


def run_evals(names, model, data: Data, seq_len: int, *, device: torch.device) -> dict[str, float]:
    """Run the named retrieval evals (``EVALS``) and merge their results."""
    results = {}
    for name in names:
        if name == "niah":
            results.update(needle_in_haystack(model, data, seq_len, device=device))
        elif name == "mqar":
            results.update(mqar_accuracy(model, data, seq_len, device=device))
        else:
            raise ValueError(f"unknown eval {name!r}: expected one of {', '.join(EVALS)}")
    return results
