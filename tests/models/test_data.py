"""Data sources: the stdlib corpus, user files, MQAR and passkey generators, mixtures, resumable batches."""

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models import data as D
from models.data import (
    BYTE_VOCAB_SIZE,
    VAL_EVERY,
    Batches,
    mqar_example,
    open_data,
    parse_data,
    passkey_needle,
    passkey_prompt,
)

ROOT = Path(__file__).resolve().parents[2]


def test_vocab_constants():
    assert BYTE_VOCAB_SIZE == 260
    assert (D.PAD, D.BOS, D.EOS, D.SEP) == (256, 257, 258, 259)


def test_stdlib_corpus_is_cached_split_and_hashed():
    c = D.stdlib_corpus()
    assert c.is_bytes and c.train.dtype == np.uint8
    assert len(c.train) > 1_000_000 and len(c.val) > 50_000
    assert c.sha256 == D._sha256_and_max(c.train, c.val)[0]  # the recorded hash is of what was loaded
    again = D.stdlib_corpus()
    assert again.sha256 == c.sha256
    files = D.stdlib_files()
    assert all(not D.STDLIB_SKIP & set(p.parts) for p in files)
    # Every 20th file is validation: the first validation file opens the validation bytes.
    assert bytes(c.val[:200]) == files[D.VAL_EVERY - 1].read_bytes()[:200]
    assert bytes(c.train[:200]) == files[0].read_bytes()[:200]


def test_text_folder_split_by_file_and_text_file(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(40):
        (folder / f"f{i:02d}.txt").write_bytes(f"<file {i}>".encode())
    (folder / ".hidden").write_bytes(b"secret")
    c = D.text_corpus(folder)
    assert bytes(c.val) == b"<file 19>\n<file 39>"
    assert b"<file 0>" in bytes(c.train) and b"secret" not in bytes(c.train)
    single = tmp_path / "one.txt"
    single.write_bytes(bytes(range(100)) * 10)
    c = D.text_corpus(single)
    assert len(c.val) == 50 and len(c.train) == 950
    d = open_data(str(single), 260)
    x, y = Batches(d, 16, 4, seed=0).next()
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_bin_tokens_and_vocab_check(tmp_path):
    (tmp_path / "train.bin").write_bytes(np.arange(1000, dtype=np.uint16).tobytes())
    (tmp_path / "val.bin").write_bytes(np.arange(500, 600, dtype=np.uint16).tobytes())
    d = open_data(str(tmp_path), 1000)
    x, y = Batches(d, 8, 2, seed=0).next()
    assert torch.equal(y, x + 1)  # consecutive ids: y is x shifted by one
    xv, _ = Batches(d, 8, 2, seed=0, split="val").next()
    assert xv.min() >= 500 and xv.max() < 600
    with pytest.raises(ValueError, match="vocab_size"):
        Batches(open_data(str(tmp_path / "train.bin"), 300), 8, 64, seed=0).next()


def test_clear_errors_for_unknown_names_and_missing_paths():
    with pytest.raises(ValueError, match="unknown data name 'wikitext'"):
        open_data("wikitext", 260)
    with pytest.raises(FileNotFoundError, match="no file or folder"):
        open_data("stdlib+/nonexistent/corpus.txt", 260)
    with pytest.raises(ValueError, match="vocab_size >= 260"):
        open_data("stdlib", 128)


def test_mixture_weights():
    assert parse_data("stdlib+passkey@0.1") == [("stdlib", pytest.approx(0.9)), ("passkey", 0.1)]
    assert parse_data("a@1+b@3") == [("a", 0.25), ("b", 0.75)]
    assert parse_data("a+b@0.5+c") == [("a", 0.25), ("b", 0.5), ("c", 0.25)]
    with pytest.raises(ValueError, match="leave nothing"):
        parse_data("a@1+b")
    d = open_data("stdlib+passkey@0.1", 260)
    b = Batches(d, 128, 1, seed=3)
    docs = sum(D.PASSKEY_QUESTION.encode() in bytes(b.sequence(i)[0].astype(np.uint8)) for i in range(600))
    assert 30 <= docs <= 90  # 10% of 600, with room for chance


def check_mqar(x, y, n, vocab):
    half = vocab // 2
    keys, values = x[0 : 2 * n : 2], x[1 : 2 * n : 2]
    assert len(set(keys)) == n and keys.min() >= 1 and keys.max() < half
    assert len(set(values)) == n and values.min() >= half and values.max() < vocab
    assert np.all(y[: 2 * n] == -100)
    q = np.flatnonzero(y != -100)
    assert len(q) == n and np.all(q >= 2 * n) and np.all((q - 2 * n) % 2 == 0)
    value_of = dict(zip(keys, values, strict=True))
    assert sorted(x[q]) == sorted(keys)  # each key is queried exactly once
    assert all(y[p] == value_of[x[p]] for p in q)  # the label at a query is the key's value
    rest = np.ones(len(x), dtype=bool)
    rest[: 2 * n] = False
    rest[q] = False
    assert np.all(x[rest] == 0)
    return (q - 2 * n) // 2


def test_mqar_matches_its_definition():
    rng = np.random.default_rng(0)
    gaps = []
    for _ in range(200):
        x, y = mqar_example(rng, 128, 8192)
        gaps.extend(check_mqar(x, y, 8, 8192))
    # p(g) ~ (g+1)^-0.99 over 56 slots: queries cluster near the context (uniform would give ~27.5).
    assert np.mean(gaps) < 20
    x, y = mqar_example(rng, 64, 300, num_pairs=16)
    check_mqar(x, y, 16, 300)
    with pytest.raises(ValueError, match="seq_len"):
        mqar_example(rng, 64, 8192, num_pairs=17)
    d = open_data("mqar", 8192)
    x, y = Batches(d, 64, 4, seed=0).next()
    check_mqar(x[0].numpy(), y[0].numpy(), 64 // D.MQAR_PAIRS_DIVISOR, 8192)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_passkey_needle_at_depth(depth):
    filler = np.frombuffer(b"abcdefghij" * 100, dtype=np.uint8)
    rng = np.random.default_rng(1)
    prompt, at = passkey_prompt(filler, rng, 300, depth, "12345")
    text = bytes(prompt.astype(np.uint8))
    needle = passkey_needle("12345").encode()
    assert len(prompt) == 300
    assert text.endswith(D.PASSKEY_QUESTION.encode())
    assert text.index(needle) == at
    n_fill = 300 - len(needle) - len(D.PASSKEY_QUESTION)
    assert at == round(depth * n_fill)
    assert text.count(b"12345") == 2  # the key appears only in the needle


def test_passkey_training_document_ends_with_its_key():
    d = open_data("passkey", 260)
    x, y = d.sources[0].sample(np.random.default_rng(5), 256, "train")
    doc = bytes(np.concatenate([x, y[-1:]]).astype(np.uint8))
    key = doc[-6:-1]
    assert doc.endswith(b"is " + key + b".") and passkey_needle(key.decode()).encode() in doc


def test_batches_resume_and_do_not_depend_on_microbatch():
    d = open_data("stdlib+mqar@0.3", 8192)
    straight = Batches(d, 64, 4, seed=7)
    first = [straight.next() for _ in range(5)]
    resumed = Batches(d, 64, 4, seed=7)
    for _ in range(2):
        resumed.next()
    state = resumed.state_dict()
    fresh = Batches(d, 64, 4, seed=7)
    fresh.load_state_dict(state)
    for (x0, y0), (x1, y1) in zip(first[2:], [fresh.next() for _ in range(3)], strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    big = Batches(d, 64, 8, seed=7).next()
    assert torch.equal(big[0], torch.cat([first[0][0], first[1][0]]))
    other = Batches(d, 64, 4, seed=8).next()
    assert not torch.equal(other[0], first[0][0])
    val = Batches(d, 64, 4, seed=7, split="val").next()
    assert not torch.equal(val[0], first[0][0])
    with pytest.raises(ValueError, match="seed"):
        Batches(d, 64, 4, seed=9).load_state_dict(state)


def test_stdlib_validation_text_is_not_in_the_training_split():
    # The generated codec tables (encodings/) repeat one another: with them 11% of the validation text was
    # verbatim in the training split, and validation loss partly scored memorisation.
    c = D.stdlib_corpus()
    train, val = bytes(c.train), bytes(c.val)
    starts = np.linspace(0, len(val) - 256, 300).astype(int)
    found = sum(train.find(val[s:s + 256]) >= 0 for s in starts)
    assert found / len(starts) < 0.03, found


def test_data_too_short_for_the_context_fails_before_training(tmp_path):
    from models.train import pretrain
    from tests.models.test_train import Recorder, spec

    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 2000)  # its validation split, the last 5%, holds 100 bytes
    with pytest.raises(ValueError, match="the val split of .*small.txt holds 100 tokens"):
        pretrain(spec(data=str(small), seq_len=128), Recorder(), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())  # no step was trained
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00" * 1001)
    with pytest.raises(ValueError, match="odd.bin: 1001 bytes, not a whole number of uint16 token ids"):
        D.open_data(str(odd), 50_000)


def test_bin_ids_past_the_vocabulary_are_refused_at_open_wherever_they_lie(tmp_path):
    # One id past the vocabulary deep in the file: a check of the first window passed, and the run failed at
    # whatever step first drew a window over it, after training that far.
    ids = np.arange(100_000, dtype=np.uint16) % 500
    ids[70_000] = 60_000
    (tmp_path / "train.bin").write_bytes(ids.tobytes())
    (tmp_path / "val.bin").write_bytes((np.arange(1000, dtype=np.uint16) % 500).tobytes())
    with pytest.raises(ValueError, match=r"train.bin holds token id 60000 \(at position 70000\), not below the "
                                         r"run's vocab_size 512"):
        open_data(str(tmp_path), 512)
    assert open_data(str(tmp_path), 60_001).sources[0].corpus.max_id == 60_000
    bad_val = np.arange(1000, dtype=np.uint16) % 500
    bad_val[-1] = 999
    (tmp_path / "val.bin").write_bytes(bad_val.tobytes())
    ids[70_000] = 7
    (tmp_path / "train.bin").write_bytes(ids.tobytes())
    with pytest.raises(ValueError, match=r"val.bin holds token id 999 \(at position 999\)"):
        open_data(str(tmp_path), 512)


def test_an_empty_bin_file_is_named(tmp_path):
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.bin is an empty file, no uint16 token ids"):
        open_data(str(tmp_path / "empty.bin"), 512)
    (tmp_path / "train.bin").write_bytes(np.arange(100, dtype=np.uint16).tobytes())
    (tmp_path / "val.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"val.bin is an empty file"):
        open_data(str(tmp_path), 512)


def test_a_folders_files_are_joined_with_a_newline_between_documents(tmp_path):
    # Joined as they were, the last line of one file ran into the first of the next ("end.Start"), in both splits.
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"the end.")
    (folder / "b.txt").write_bytes(b"Start\n")
    (folder / "c.txt").write_bytes(b"more" * 50)
    c = D.text_corpus(folder)
    whole = bytes(c.train) + bytes(c.val)
    assert whole == b"the end.\nStart\n\n" + b"more" * 50
    assert c.sha256 == D._sha256_and_max(c.train, c.val)[0]


def settle(*paths, ago_s=60):
    """Date files' mtime back: the digest cache keeps only files left alone for ``SETTLE_NS``."""
    for p in paths:
        t = p.stat().st_mtime_ns - ago_s * 10**9
        os.utime(p, ns=(t, t))


def hash_reads(tmp_path, monkeypatch) -> list:
    """Cache digests under tmp_path, and list each time a file's bytes are hashed."""
    from models import sources

    monkeypatch.setenv("SLAB_CACHE_DIR", str(tmp_path / "cache"))
    reads = []
    real = sources._hash_files
    monkeypatch.setattr(sources, "_hash_files", lambda *a: reads.append(a) or real(*a))
    return reads


def test_content_digest_reads_a_corpus_once_until_it_changes(tmp_path, monkeypatch):
    from models import sources

    reads = hash_reads(tmp_path, monkeypatch)
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"a" * 1000)
    settle(corpus)
    first = sources.content_digest(corpus)
    assert sources.content_digest(corpus) == first and len(reads) == 1
    before = corpus.stat()
    # Same size and mtime, other bytes: its ctime moved, so the cache misses (it answered the old digest before).
    corpus.write_bytes(b"b" * 1000)
    os.utime(corpus, ns=(before.st_atime_ns, before.st_mtime_ns))
    changed = sources.content_digest(corpus)
    assert changed != first and len(reads) == 2
    os.utime(corpus, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # touched: read again, same digest
    assert sources.content_digest(corpus) == changed and len(reads) == 3
    corpus.write_bytes(b"b" * 1001)  # a new size
    assert sources.content_digest(corpus) not in (first, changed)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.txt").write_bytes(b"x")
    one = sources.content_digest(folder)
    (folder / "y.txt").write_bytes(b"y")  # a file added to a folder
    assert sources.content_digest(folder) != one


def golden_corpora(root):
    """Files whose digests (content_digest, a .bin corpus's sha256 and max id, a text corpus's sha256) were computed by
    the code before the digest cache: the cache must not change a run id or a checkpoint's data hash."""
    (root / "dir").mkdir(parents=True)
    (root / "corpus.txt").write_bytes(b"golden " * 100)
    (root / "text").mkdir()
    for i in range(25):  # enough files for a split by file
        (root / "text" / f"doc{i:02d}.txt").write_bytes(f"document {i}\n".encode() * (i + 1))
    (root / "text" / ".notes").write_bytes(b"not read")
    settle(*(root / "text").iterdir())
    (root / "dir" / "train.bin").write_bytes((np.arange(3000, dtype=np.uint16) * 7 % 1000).tobytes())
    (root / "dir" / "val.bin").write_bytes((np.arange(300, dtype=np.uint16) % 1000).tobytes())
    (root / "one.bin").write_bytes((np.arange(3000, dtype=np.uint16) * 7 % 1000).tobytes())
    settle(root / "corpus.txt", root / "dir" / "train.bin", root / "dir" / "val.bin", root / "one.bin")
    return {
        "corpus.txt": "d5cd10b7564c33b010bee118cc7ef48391cdd60fb128500ec8076b65c0c633e2",
        "dir": "a8c4fe85fe216a54a3db816ae1c1d52f49be62f98286c4b999f503e5ff6140cf",
        "dir corpus": ("89680ab97e028f9a779a3827cfee3050db6e4b132d5d3d5b467457c0dcd5e93b", 999),
        "one.bin corpus": ("06993c5b1f2863e24efbdd585a2f2cc245d7c2edb4e4166e327c49ca8552e622", 999),
        "corpus.txt corpus": "fc16a2c735a4c44f5614e9095b026bc51e671bfbe32b2fbe428e07c9e481477c",
        "text corpus": "f54a25d3cce707e50f7797fdc43250078d18c6095ee6e60fc4362000dc82e252",
    }


def text_sha256(path: Path) -> str:
    """A text corpus's sha256 as text_corpus computed it before the digest cache: its train bytes, then its validation
    bytes (every VAL_EVERY-th file of a folder, else the last 1 / VAL_EVERY of the bytes), a folder's files joined by
    newlines."""
    if not path.is_dir():
        return hashlib.sha256(path.read_bytes()).hexdigest()  # its train bytes, then the rest
    docs = [f.read_bytes() for f in sorted(path.iterdir()) if not f.name.startswith(".")]
    if len(docs) < D.VAL_EVERY:
        return hashlib.sha256(b"\n".join(docs)).hexdigest()
    held = [i % D.VAL_EVERY == D.VAL_EVERY - 1 for i in range(len(docs))]
    train, val = (b"\n".join(d for d, h in zip(docs, held) if h == side) for side in (False, True))
    return hashlib.sha256(train + val).hexdigest()


def test_digests_are_cached_on_disk_across_processes_with_their_old_values(tmp_path, monkeypatch):
    # Every run re-read and re-hashed its whole corpus (0.9 s a GB), and every slab command hashed it again.
    from models import sources

    cache = tmp_path / "cache"
    monkeypatch.setenv("SLAB_CACHE_DIR", str(cache))
    golden = golden_corpora(tmp_path / "data")
    for fresh in (True, False):  # computed, then from the disk cache (as another process would find it)
        sources._digest_of_files.cache_clear()
        if not fresh:
            def unread(*_):
                raise AssertionError("read a corpus whose digest is cached")
            monkeypatch.setattr(sources, "_hash_files", unread)
            monkeypatch.setattr(D, "_sha256_and_max", unread)
        for name in ("corpus.txt", "dir"):
            assert sources.content_digest(tmp_path / "data" / name) == golden[name]
        for name in ("dir", "one.bin"):
            c = D.bin_corpus(tmp_path / "data" / name)
            assert (c.sha256, c.max_id) == golden[f"{name} corpus"]
        # Text corpora were hashed in full by every run that opened them.
        for name in ("corpus.txt", "text"):
            assert D.text_corpus(tmp_path / "data" / name).sha256 == golden[f"{name} corpus"]
        assert len(list((cache / "digests").glob("*.json"))) == 6
    for name in ("corpus.txt", "text"):
        assert text_sha256(tmp_path / "data" / name) == golden[f"{name} corpus"]
    # The cached max id still guards the vocabulary.
    with pytest.raises(ValueError, match=r"its largest is 999\)"):
        open_data(str(tmp_path / "data" / "dir"), 512)


@pytest.fixture
def scans(tmp_path, monkeypatch):
    """A fresh digest cache, and a list that grows by one each time a corpus is hashed."""
    monkeypatch.setenv("SLAB_CACHE_DIR", str(tmp_path / "cache"))
    counted = []
    real = D._sha256_and_max
    monkeypatch.setattr(D, "_sha256_and_max", lambda *a: counted.append(1) or real(*a))
    return counted


def test_a_text_folder_is_hashed_again_when_a_file_is_added_removed_touched_or_rewritten(tmp_path, monkeypatch, scans):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (folder / name).write_bytes(name.encode() * 100)
    settle(*folder.iterdir())

    def opened(expected_scans):
        sha = D.text_corpus(folder).sha256
        assert sha == text_sha256(folder) and len(scans) == expected_scans
        return sha

    first = opened(1)
    assert opened(1) == first  # the second open reads its digest from the cache
    (folder / ".hidden").write_bytes(b"not read")  # not a file of the corpus
    opened(1)
    b = (folder / "b.txt").stat()
    os.utime(folder / "b.txt", ns=(b.st_atime_ns, b.st_mtime_ns + 10**9))  # touched
    assert opened(2) == first
    (folder / "d.txt").write_bytes(b"new")  # added
    settle(folder / "d.txt")
    assert opened(3) != first
    (folder / "a.txt").unlink()  # removed
    opened(4)
    b = (folder / "b.txt").stat()
    (folder / "b.txt").write_bytes(b"B" * len(b"b.txt" * 100))  # rewritten in place, its size and mtime kept
    os.utime(folder / "b.txt", ns=(b.st_atime_ns, b.st_mtime_ns))
    opened(5)
    (folder / "c.txt").rename(folder / "e.txt")  # renamed: the files are read in another order
    opened(6)
    single = folder / "d.txt"
    assert D.text_corpus(single).sha256 == D.text_corpus(single).sha256 == text_sha256(single)
    assert len(scans) == 7


def test_a_text_file_written_to_between_its_listing_and_its_read_is_read_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SLAB_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(VAL_EVERY + 1):
        (folder / f"{i:02d}.txt").write_bytes(b"old %d" % i)
    settle(*folder.iterdir())
    real, sizes = D._read_text, []

    def racing(files, listed):
        sizes.append(listed)
        if len(sizes) == 1:  # appended to once it was listed
            with open(folder / "07.txt", "ab") as f:
                f.write(b" and more")
        return real(files, listed)

    monkeypatch.setattr(D, "_read_text", racing)
    c = D.text_corpus(folder)
    assert len(sizes) == 2 and b"old 7 and more\nold 8" in bytes(c.train)
    assert c.sha256 == text_sha256(folder) and bytes(c.val) == b"old 19"


def test_a_replaced_or_rewritten_token_file_misses_the_digest_cache(tmp_path, monkeypatch, scans):
    path = tmp_path / "tokens.bin"
    ids = np.arange(2000, dtype=np.uint16)
    path.write_bytes(ids.tobytes())
    settle(path)

    def fresh():  # the file's sha256 and largest id, computed here (not counted as a scan)
        ids_now = np.fromfile(path, dtype=np.uint16)
        return hashlib.sha256(ids_now.tobytes()).hexdigest(), int(ids_now.max())

    assert (D.bin_corpus(path).sha256, D.bin_corpus(path).max_id) == fresh() and len(scans) == 1
    st = path.stat()
    ids[5] = 4000  # same size, mtime put back: rewritten in place
    path.write_bytes(ids.tobytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (D.bin_corpus(path).sha256, D.bin_corpus(path).max_id) == fresh() == (fresh()[0], 4000)
    assert len(scans) == 2
    ids[6] = 4001  # replaced by another file (a new inode) of the same size and mtime
    other = tmp_path / "other.bin"
    other.write_bytes(ids.tobytes())
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, path)
    assert D.bin_corpus(path).max_id == 4001 and D.bin_corpus(path).sha256 == fresh()[0] and len(scans) == 3
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    assert D.bin_corpus(path).sha256 == fresh()[0] and len(scans) == 4


def test_a_corrupt_or_unwritable_digest_cache_is_recomputed(tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SLAB_CACHE_DIR", str(cache))
    path = tmp_path / "tokens.bin"
    path.write_bytes(np.arange(2000, dtype=np.uint16).tobytes())
    settle(path)
    right = D.bin_corpus(path).sha256, 1999
    (entry,) = (cache / "digests").glob("*.json")
    saved = json.loads(entry.read_text())
    forged = [{**saved, "value": {"sha256": "0" * 63, "max_id": 1999}},  # not a sha256
              {**saved, "value": {"sha256": "0" * 64, "max_id": "1999"}},  # a max id not an int
              {**saved, "key": saved["key"].replace("bin-corpus", "content")}]  # another key's entry
    for text in [b"", b'{"key": ', b"\xff\xfe", b"[]", *(json.dumps(f).encode() for f in forged)]:
        entry.write_bytes(text)
        with caplog.at_level(logging.DEBUG, logger="models.sources"):
            c = D.bin_corpus(path)
        assert (c.sha256, c.max_id) == right, text
        assert "recomputed" in caplog.text
        assert json.loads(entry.read_text()) == saved  # rewritten whole
        caplog.clear()
    monkeypatch.setenv("SLAB_CACHE_DIR", str(path))  # a file, not a folder: nothing can be cached there
    assert (D.bin_corpus(path).sha256, D.bin_corpus(path).max_id) == right


def test_a_file_written_within_the_settle_time_is_not_cached(tmp_path, monkeypatch):
    # Written again within the same timestamp tick, a file keeps its stamp: a digest cached from a read just before
    # that write would answer for other bytes.
    from models import sources

    reads = hash_reads(tmp_path, monkeypatch)
    corpus = tmp_path / "corpus.bin"
    corpus.write_bytes(b"ab" * 100)
    for _ in range(2):
        assert D.bin_corpus(corpus).max_id == ord("a") + 256 * ord("b")
        sources.content_digest(corpus)
    assert len(reads) == 2 and not (tmp_path / "cache").exists()
    settle(corpus, ago_s=sources.SETTLE_NS // 10**9 + 1)
    for _ in range(2):
        sources.content_digest(corpus)
    assert len(reads) == 3 and len(list((tmp_path / "cache" / "digests").iterdir())) == 1


def test_processes_hashing_one_corpus_at_once_agree_and_leave_one_entry(tmp_path):
    cache = tmp_path / "cache"
    corpus = tmp_path / "corpus.bin"
    corpus.write_bytes(np.arange(1 << 20, dtype=np.uint16).tobytes())
    settle(corpus)
    code = "import sys; from models.sources import content_digest; print(content_digest(sys.argv[1]))"
    env = {**os.environ, "SLAB_CACHE_DIR": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(corpus)], stdout=subprocess.PIPE, env=env, cwd=ROOT)
             for _ in range(4)]
    outs = {p.communicate(timeout=60)[0] for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(outs) == 1
    assert len(list((cache / "digests").iterdir())) == 1  # no temp file left behind
    (entry,) = (cache / "digests").glob("*.json")
    assert json.loads(entry.read_text())["value"]["sha256"] == outs.pop().decode().strip()


def test_a_text_folder_whose_first_file_is_empty_reads_every_byte_it_hashes(tmp_path):
    # The separator went in only after bytes had been written, so an empty first file left the array's last byte
    # uninitialised (np.empty): the corpus and its hash then varied from one read to the next.
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"")
    (folder / "b.txt").write_bytes(b"xyz")
    (folder / "c.txt").write_bytes(b"")
    c = D.text_corpus(folder)
    assert bytes(c.train) + bytes(c.val) == b"\nxyz\n"


def test_stdlib_corpus_is_its_files_split_by_file_without_a_separator(tmp_path, monkeypatch):
    # Built afresh (its own cache folder): every stdlib checkpoint records this hash, so the bytes must not move.
    monkeypatch.setenv("SLAB_CACHE_DIR", str(tmp_path))
    c = D.stdlib_corpus()
    files = D.stdlib_files()
    held = [p.read_bytes() for i, p in enumerate(files) if i % D.VAL_EVERY == D.VAL_EVERY - 1]
    kept = [p.read_bytes() for i, p in enumerate(files) if i % D.VAL_EVERY != D.VAL_EVERY - 1]
    assert bytes(c.val) == b"".join(held) and bytes(c.train) == b"".join(kept)


def test_the_digest_cache_keeps_its_most_recently_used_entries(tmp_path, monkeypatch):
    # Every version of an edited folder corpus left an entry holding each file's stamp, and none was ever removed.
    from models import sources

    monkeypatch.setenv("SLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "DIGEST_CACHE_ENTRIES", 3)
    files = []
    for i in range(4):
        files.append(tmp_path / f"c{i}.txt")
        files[-1].write_bytes(f"corpus {i}".encode())
        settle(files[-1])
    entries = tmp_path / "cache" / "digests"
    for i, f in enumerate(files[:3]):
        before = set(entries.glob("*.json")) if entries.exists() else set()
        sources.content_digest(f)
        (new,) = set(entries.glob("*.json")) - before
        used = new.stat().st_mtime_ns - (10 - i) * 10**9  # a second apart, the first entry the oldest
        os.utime(new, ns=(used, used))
    sources._digest_of_files.cache_clear()
    reads = hash_reads(tmp_path, monkeypatch)
    sources.content_digest(files[0])  # a hit: now the most recently used
    assert reads == []
    sources.content_digest(files[3])  # a fourth entry: the least recently used (files[1]'s) goes
    assert len(list(entries.glob("*.json"))) == 3
    sources._digest_of_files.cache_clear()
    for f in (files[0], files[2], files[3]):
        sources.content_digest(f)
    assert reads == [reads[0]]  # only files[3]'s own first read: the three kept entries answered
    sources.content_digest(files[1])
    assert len(reads) == 2
