"""Training data: a built-in byte corpus, user text and token files, synthetic retrieval tasks, mixtures.

A spec's ``data`` string names one source or a weighted mixture of sources, joined by ``+``:

- ``stdlib``: the running Python's standard library sources (see ``stdlib_corpus``), as bytes;
- ``passkey``: passkey documents (Mohtashami & Jaggi 2023): a random 5-digit key hidden at a random
  depth in filler text, then the question and the key; training on them teaches retrieval;
- ``mqar``: Zoology's multi-query associative recall task (see ``mqar_example``);
- a path: a ``.txt`` file or a folder of text files (bytes, a newline between files), or a nanoGPT-style
  ``.bin`` of uint16 token ids (or a folder holding ``train.bin`` and ``val.bin``).

``name@w`` gives a part the weight w (the fraction of training sequences drawn from it); parts without a
weight share what the weighted ones leave, e.g. ``stdlib+passkey@0.1`` is 90% stdlib windows and 10%
passkey documents. When every part is weighted the weights are normalised to sum to 1.

Tokens are bytes (0-255) plus four specials, ``BYTE_VOCAB_SIZE = 260``; the specials are reserved ids
that no built-in source emits. ``.bin`` ids and MQAR tokens use the spec's ``vocab_size``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.sources import (  # noqa: F401 (parse_data, cache_dir, VAL_EVERY, DOC_SEP, STDLIB_*: this module's API too)
    DOC_SEP,
    VAL_EVERY,
    SCAN_CHUNK as _SCAN_CHUNK,
    STDLIB_CAP_BYTES,
    STDLIB_SKIP,
    Stamp,
    bin_files,
    cache_dir,
    cached_digest,
    file_stamp,
    held_out,
    is_token_source,
    parse_data,
    sha256_and_max as _sha256_and_max,
    stdlib_files,
    tail_cut,
    text_files,
    token_ids_in,
)

log = logging.getLogger(__name__)

PAD, BOS, EOS, SEP = 256, 257, 258, 259
#: Vocabulary of byte-level data: 256 bytes and the four specials above.
BYTE_VOCAB_SIZE = 260

#: Bumped when the stdlib corpus's selection changes, so that a cached corpus of the old one is not reused.
STDLIB_VERSION = 2

MQAR_VOCAB = 8192  # Zoology's vocabulary, the default for MQAR plans
MQAR_ALPHA = 0.01  # power-law exponent of the query gaps
#: MQAR key-value pairs per sequence: seq_len // MQAR_PAIRS_DIVISOR, Zoology's (64, 4), (128, 8), (256, 16).
MQAR_PAIRS_DIVISOR = 16

PASSKEY_DIGITS = 5
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is "
PASSKEY_SUFFIX = "."  # closes the answer in training documents

BUILTINS = ("stdlib", "passkey", "mqar")
_SPLITS = {"train": 0, "val": 1}


def passkey_needle(key: str) -> str:
    """The sentence that hides a pass key in the haystack."""
    return f" The pass key is {key}. Remember it. {key} is the pass key. "


@dataclass(frozen=True)
class Corpus:
    """A token corpus split by file into train and validation arrays (uint8 bytes or uint16 ids)."""

    name: str
    train: np.ndarray
    val: np.ndarray
    sha256: str
    is_bytes: bool
    max_id: int | None = None  # the largest token id of both splits (token-id corpora; None for bytes)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def stdlib_corpus() -> Corpus:
    """The running Python's standard library sources as bytes, built once and cached per Python version.

    Files under ``sysconfig.get_paths()["stdlib"]`` ending in ``.py``, excluding ``STDLIB_SKIP`` folders,
    in sorted order, whole files until ``STDLIB_CAP_BYTES``; every ``VAL_EVERY``-th file is validation.
    ``sha256`` hashes the train bytes followed by the validation bytes.
    """
    v = sys.version_info
    key = f"stdlib-v{STDLIB_VERSION}-py{v.major}.{v.minor}.{v.micro}"
    folder = cache_dir()
    meta_path = folder / f"{key}.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        train = np.load(folder / f"{key}.train.npy", mmap_mode="r")
        val = np.load(folder / f"{key}.val.npy", mmap_mode="r")
        return Corpus("stdlib", train, val, meta["sha256"], is_bytes=True)
    files = stdlib_files()
    read = _read_text(files, [p.stat().st_size for p in files], sep=b"")
    if read is None:
        raise ValueError(f"{sysconfig.get_paths()['stdlib']}: a file changed size while the stdlib corpus was built")
    _, train, val = read
    sha, _ = _sha256_and_max(train, val)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_save(folder / f"{key}.train.npy", train)
    _atomic_save(folder / f"{key}.val.npy", val)
    # The metadata goes last: a reader that sees it can rely on both arrays being complete.
    tmp = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"sha256": sha, "files": len(files), "train_bytes": len(train), "val_bytes": len(val)}))
    os.replace(tmp, meta_path)
    log.info("built stdlib corpus: %d files, %d bytes, sha256 %s", len(files), len(train) + len(val), sha)
    return Corpus("stdlib", train, val, sha, is_bytes=True)


def _read_text(
    files: list[Path], sizes: list[int], sep: bytes | None = None
) -> tuple[tuple[Stamp, ...], np.ndarray, np.ndarray] | None:
    """The files of ``sizes`` bytes, split into train and validation and joined with ``sep`` (``DOC_SEP`` unless given)
    within each, read straight into two read-only arrays, with their stamps; None when a file no longer has its size.

    Split by ``held_out``: every VAL_EVERY-th file, or with fewer files the last 1 / VAL_EVERY of the joined bytes
    (``models.sources.split_sizes`` counts the same from sizes alone). Joining bytes read first took as long again as
    reading them (200 MB, 2,000 files)."""
    sep = DOC_SEP if sep is None else sep
    val = held_out(len(files))
    arrays = {}
    for side in (False, True):
        side_sizes = [n for n, v in zip(sizes, val, strict=True) if v == side]
        arrays[side] = np.empty(sum(side_sizes) + len(sep) * max(0, len(side_sizes) - 1), dtype=np.uint8)
    at, started, stamps = {False: 0, True: 0}, set(), []
    for file, size, side in zip(files, sizes, val, strict=True):
        out = memoryview(arrays[side])
        # By file count, not bytes written: an empty first file still takes its separator (the arrays count one
        # between every two files), or the array's last bytes stay uninitialised.
        if side in started and sep:
            out[at[side] : at[side] + len(sep)] = sep
            at[side] += len(sep)
        started.add(side)
        with open(file, "rb") as handle:
            # Stamped from the open handle before it is read: the cached digest is of the very bytes read, even if one
            # replaces the file meanwhile.
            st = os.fstat(handle.fileno())
            if st.st_size != size or handle.readinto(out[at[side] : at[side] + size]) != size:
                return None
        stamps.append(file_stamp(file, st))
        at[side] += size
    train, held = arrays[False], arrays[True]
    if not any(val):  # the last 1 / VAL_EVERY of the bytes, as views
        cut = tail_cut(len(train))
        train, held = train[:cut], train[cut:]
    for a in (train, held):
        a.flags.writeable = False
    return tuple(stamps), train, held


def text_corpus(path: Path) -> Corpus:
    """A ``.txt`` file or a folder of text files (every non-hidden file, sorted), read as bytes; a folder's files are
    joined with ``DOC_SEP`` between them. Its sha256 comes from the digest cache while none of its files changed."""
    path = Path(path)
    files = text_files(path) if path.is_dir() else [path]
    for _ in range(3):  # a file written to since it was listed is read again, at its new size
        read = _read_text(files, [f.stat().st_size for f in files])
        if read is not None:
            break
    else:
        raise ValueError(f"{path}: its files kept changing while they were read")
    stamps, train, val = read
    # The split and the separator decide the bytes hashed, so they are part of the key: changing either misses.
    kind = f"text-corpus:{VAL_EVERY}:{DOC_SEP.hex()}"
    facts = cached_digest(kind, stamps, lambda: {"sha256": _sha256_and_max(train, val)[0]})
    return Corpus(str(path), train, val, facts["sha256"], is_bytes=True)


def bin_corpus(path: Path) -> Corpus:
    """nanoGPT-style uint16 token ids: ``train.bin`` with a sibling ``val.bin``, or one file split at 95%. Its sha256
    and largest id come from the digest cache while its files are unchanged (a multi-GB corpus is read once, not
    by every run)."""
    files = bin_files(Path(path))
    path = files[0]
    stamps = []

    def ids_of(file: Path) -> np.memmap:
        with open(file, "rb") as handle:
            # Stamped from the open handle: the cached digest is of the very file mapped, even if one replaces it.
            st = os.fstat(handle.fileno())
            token_ids_in(file, st.st_size)  # np.memmap's own error ("cannot mmap an empty file") names no file
            stamps.append(file_stamp(file, st))
            return np.memmap(handle, dtype=np.uint16, mode="r")

    ids = ids_of(path)
    if len(files) == 2:
        train, val = ids, ids_of(files[1])
    else:
        cut = tail_cut(len(ids))
        train, val = ids[:cut], ids[cut:]

    def scan() -> dict:
        sha, top = _sha256_and_max(train, val)
        return {"sha256": sha, "max_id": top}

    facts = cached_digest("bin-corpus", tuple(stamps), scan)
    return Corpus(str(path), train, val, facts["sha256"], is_bytes=False, max_id=facts["max_id"])


def _check_ids(corpus: Corpus, vocab_size: int) -> None:
    """Refuse a token corpus holding an id the run's vocabulary lacks, naming its file and the id's position."""
    if corpus.is_bytes or corpus.max_id is None or corpus.max_id < vocab_size:
        return
    files = bin_files(Path(corpus.name))
    for split, tokens in (("train", corpus.train), ("val", corpus.val)):
        for start in range(0, len(tokens), _SCAN_CHUNK):
            over = np.flatnonzero(np.asarray(tokens[start : start + _SCAN_CHUNK]) >= vocab_size)
            if not len(over):
                continue
            at = start + int(over[0])
            value = int(tokens[at])
            # A single file split 95/5: its val split's positions count from the start of that file.
            file = files[1] if split == "val" and len(files) == 2 else files[0]
            if split == "val" and len(files) == 1:
                at += len(corpus.train)
            raise ValueError(f"{file} holds token id {value} (at position {at}), not below the run's vocab_size "
                             f"{vocab_size}: the vocabulary must hold every id of the corpus (its largest is "
                             f"{corpus.max_id})")


def _window(tokens: np.ndarray, rng: np.random.Generator, length: int, what: str) -> np.ndarray:
    if len(tokens) < length:
        raise ValueError(f"{what} holds {len(tokens)} tokens, fewer than the {length} a window needs")
    start = int(rng.integers(0, len(tokens) - length + 1))
    return np.asarray(tokens[start : start + length], dtype=np.int64)


class TextSource:
    """Random windows of a corpus: x = tokens[s : s+T], y = tokens[s+1 : s+T+1]."""

    def __init__(self, corpus: Corpus, vocab_size: int):
        # The whole corpus, not only the windows drawn: an id past the vocabulary deep in a file would otherwise
        # fail the run at whatever step first drew it.
        _check_ids(corpus, vocab_size)
        self.corpus, self.vocab_size = corpus, vocab_size
        self.sha256 = corpus.sha256

    def sample(self, rng: np.random.Generator, seq_len: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        """One (x, y) pair of length ``seq_len`` from the given split."""
        tokens = self.corpus.train if split == "train" else self.corpus.val
        w = _window(tokens, rng, seq_len + 1, f"the {split} split of {self.corpus.name}")
        if not self.corpus.is_bytes and w.max() >= self.vocab_size:
            raise ValueError(f"{self.corpus.name} holds token id {w.max()}, not below vocab_size {self.vocab_size}")
        return w[:-1], w[1:]


def passkey_prompt(
    filler: np.ndarray, rng: np.random.Generator, length: int, depth: float, key: str
) -> tuple[np.ndarray, int]:
    """A haystack with the pass key hidden at ``depth`` (0..1) of the filler, ending in the question.

    Returns the prompt (exactly ``length`` byte tokens) and the index where the needle starts, which is
    ``round(depth * F)`` for F filler bytes.
    """
    needle = np.frombuffer(passkey_needle(key).encode(), dtype=np.uint8)
    question = np.frombuffer(PASSKEY_QUESTION.encode(), dtype=np.uint8)
    n_fill = length - len(needle) - len(question)
    if n_fill < 0:
        raise ValueError(f"a passkey prompt needs at least {len(needle) + len(question)} tokens, got {length}")
    hay = _window(filler, rng, n_fill, "the passkey filler")
    at = round(depth * n_fill)
    prompt = np.concatenate([hay[:at], needle, hay[at:], question]).astype(np.int64)
    return prompt, at


def random_passkey(rng: np.random.Generator) -> str:
    """A random 5-digit pass key (no leading zero)."""
    return str(int(rng.integers(10 ** (PASSKEY_DIGITS - 1), 10**PASSKEY_DIGITS)))


class PasskeySource:
    """Passkey training documents: filler with a needle at a uniform random depth, question, key, '.'."""

    def __init__(self, filler: Corpus):
        self.filler = filler
        recipe = f"passkey:{passkey_needle('*')}:{PASSKEY_QUESTION}:{filler.sha256}"
        self.sha256 = hashlib.sha256(recipe.encode()).hexdigest()

    def sample(self, rng: np.random.Generator, seq_len: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        """One (x, y) pair: the whole document is language-modelled; the key digits carry the retrieval signal."""
        key = random_passkey(rng)
        answer = np.frombuffer((key + PASSKEY_SUFFIX).encode(), dtype=np.uint8).astype(np.int64)
        tokens = self.filler.train if split == "train" else self.filler.val
        prompt, _ = passkey_prompt(tokens, rng, seq_len + 1 - len(answer), float(rng.random()), key)
        doc = np.concatenate([prompt, answer])
        return doc[:-1], doc[1:]


def mqar_example(
    rng: np.random.Generator,
    seq_len: int,
    vocab_size: int = MQAR_VOCAB,
    num_pairs: int | None = None,
    alpha: float = MQAR_ALPHA,
) -> tuple[np.ndarray, np.ndarray]:
    """One multi-query associative recall sequence (Zoology, Arora et al. 2023, arXiv 2312.04927).

    Keys are distinct draws from [1, V/2), values distinct draws from [V/2, V); the context is
    k1 v1 ... kn vn; each key then reappears once as a query at position 2n + 2g, the gaps g drawn
    without replacement with p(g) ~ alpha (g+1)^(alpha-1); other positions hold 0. ``y`` is the value
    at each query position and -100 elsewhere. ``num_pairs`` defaults to seq_len // 16; needs 4n <= T.
    """
    n = num_pairs if num_pairs is not None else max(1, seq_len // MQAR_PAIRS_DIVISOR)
    half = vocab_size // 2
    if 4 * n > seq_len:
        raise ValueError(f"MQAR with {n} pairs needs seq_len >= {4 * n}, got {seq_len}")
    if n > half - 1:
        raise ValueError(f"MQAR with {n} pairs needs vocab_size > {2 * n + 1}, got {vocab_size}")
    keys = rng.choice(np.arange(1, half), size=n, replace=False)
    values = rng.choice(np.arange(half, vocab_size), size=n, replace=False)
    x = np.zeros(seq_len, dtype=np.int64)
    x[0 : 2 * n : 2], x[1 : 2 * n : 2] = keys, values
    slots = (seq_len - 2 * n) // 2
    g = np.arange(slots)
    p = alpha * (g + 1.0) ** (alpha - 1.0)
    gaps = rng.choice(slots, size=n, replace=False, p=p / p.sum())
    queries = 2 * n + 2 * gaps
    x[queries] = keys
    y = np.full(seq_len, -100, dtype=np.int64)
    y[queries] = values
    return x, y


class MQARSource:
    """Fresh MQAR sequences (an endless stream rather than Zoology's fixed 100,000 examples)."""

    def __init__(self, vocab_size: int, num_pairs: int | None = None):
        self.vocab_size, self.num_pairs = vocab_size, num_pairs
        self.sha256 = hashlib.sha256(f"mqar:{vocab_size}:{num_pairs}:{MQAR_ALPHA}".encode()).hexdigest()

    def sample(self, rng: np.random.Generator, seq_len: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        """One (x, y) MQAR pair; train and validation differ only by their random streams."""
        return mqar_example(rng, seq_len, self.vocab_size, self.num_pairs)


@dataclass(frozen=True)
class Data:
    """A resolved ``data`` string: sources with their weights, a hash, and the text used as filler."""

    spec: str
    names: tuple[str, ...]
    weights: tuple[float, ...]
    sources: tuple
    sha256: str
    filler: Corpus | None  # text for passkey documents and NIAH prompts (None only when never needed)

    def sha256_by_path(self) -> str:
        """The hash as checkpoints written before 2026-12 carry it: with the file parts' paths, not just contents."""
        return _mixture_sha256(self.names, self.weights, self.sources, by_path=True)

    def source(self, name: str):
        """The source of the named part, or None."""
        return dict(zip(self.names, self.sources, strict=True)).get(name)

    def text_filler(self) -> Corpus:
        """Byte text for needle prompts: the mixture's first byte corpus, else the stdlib corpus."""
        return self.filler if self.filler is not None else stdlib_corpus()

    def check(self, seq_len: int) -> None:
        """Draw one sequence of every part from each split: a corpus too short for ``seq_len`` (or whose ids pass
        the vocabulary) fails before training rather than at the first validation, after every step is spent."""
        rng = np.random.default_rng(0)
        for source in self.sources:
            for split in _SPLITS:
                source.sample(rng, seq_len, split)


def _corpus_for(name: str) -> Corpus:
    path = Path(name).expanduser()
    if not path.exists():
        if "/" in name or "." in name:
            raise FileNotFoundError(f"data {name!r}: no file or folder at {path.resolve()}")
        raise ValueError(f"unknown data name {name!r}: expected one of {', '.join(BUILTINS)} or a path")
    if is_token_source(path):
        return bin_corpus(path)
    return text_corpus(path)


def open_data(data: str, vocab_size: int) -> Data:
    """Resolve a spec's ``data`` string into sources, checking that their tokens fit ``vocab_size``."""
    parts = parse_data(data)
    names = [n for n, _ in parts]
    corpora = {n: (stdlib_corpus() if n == "stdlib" else _corpus_for(n)) for n in names if n not in ("passkey", "mqar")}
    filler = next((c for c in corpora.values() if c.is_bytes), None)
    if "passkey" in names and filler is None:
        filler = stdlib_corpus()
    sources = []
    for name in names:
        if name == "mqar":
            sources.append(MQARSource(vocab_size))
            continue
        if name == "passkey" or corpora[name].is_bytes:
            if vocab_size < BYTE_VOCAB_SIZE:
                raise ValueError(f"byte-level data {name!r} needs vocab_size >= {BYTE_VOCAB_SIZE}, got {vocab_size}")
        sources.append(PasskeySource(filler) if name == "passkey" else TextSource(corpora[name], vocab_size))
    weights = tuple(w for _, w in parts)
    sha = _mixture_sha256(names, weights, sources, by_path=False)
    return Data(str(data), tuple(names), weights, tuple(sources), sha, filler)


def _mixture_sha256(names, weights, sources, by_path: bool) -> str:
    """The hash of a mixture: each part's name, weight and content hash. A file part is named "file" (as run ids name
    it), so the hash follows its contents wherever it lies; ``by_path`` names its path instead, as hashes before
    2026-12 did."""
    h = hashlib.sha256()
    for name, weight, src in zip(names, weights, sources, strict=True):
        label = name if by_path or name in BUILTINS else "file"
        h.update(f"{label}@{weight:.6g}:{src.sha256};".encode())
    return h.hexdigest()


class Batches:
    """Seeded random training (or validation) sequences, reproducible from a position.

    Sequence i of a stream is drawn from its own generator seeded by (seed, split, i), so the batches
    depend only on the position, not on the microbatch size or on where a run was interrupted:
    ``state_dict()`` (the position) in a checkpoint makes a resumed run see exactly the same batches.
    """

    def __init__(self, data: Data, seq_len: int, batch_size: int, seed: int, split: str = "train"):
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.data, self.seq_len, self.batch_size, self.seed, self.split = data, seq_len, batch_size, seed, split
        self.position = 0  # sequences handed out so far
        self._cum = np.cumsum(data.weights)

    def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The (x, y) pair at ``index`` of this stream."""
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], index])
        part = min(int(np.searchsorted(self._cum, rng.random() * self._cum[-1], side="right")), len(self._cum) - 1)
        return self.data.sources[part].sample(rng, self.seq_len, self.split)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next microbatch: int64 tensors x, y of shape (batch_size, seq_len)."""
        pairs = [self.sequence(self.position + i) for i in range(self.batch_size)]
        self.position += self.batch_size
        x = torch.from_numpy(np.stack([p[0] for p in pairs]))
        y = torch.from_numpy(np.stack([p[1] for p in pairs]))
        return x, y

    def state_dict(self) -> dict:
        """The stream position, to store in a checkpoint."""
        return {"position": self.position, "seed": self.seed, "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a stored position (the seed and split must match)."""
        if state["seed"] != self.seed or state["split"] != self.split:
            raise ValueError(
                f"batch state is for seed {state['seed']} split {state['split']!r}, not {self.seed} {self.split!r}"
            )
        self.position = int(state["position"])
