"""Where training data comes from, without reading it into tensors: a data string's parts and weights, the files a
corpus path reads, and their content digest (what run ids hash), cached on disk. Free of torch, so that plans can use
it."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sysconfig
import tempfile
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

#: Bumped whenever what a cached digest hashes changes (``content_digest``, a token corpus's sha256 or max id, a text
#: corpus's sha256), so that entries written by older code miss instead of answering with the old value. 2: a text
#: folder whose first file of a split was empty had been read with an uninitialised byte, and its digest cached so.
DIGEST_CACHE_VERSION = 2

#: A file as the digest cache knows it: resolved path, size, mtime_ns, ctime_ns, inode. Rewriting a file in place
#: changes its ctime even when its mtime is put back; replacing it changes its inode.
Stamp = tuple[str, int, int, int, int]

#: A file modified less than this long ago (ns) may be written again within the same timestamp tick (coarse on ext4
#: and NFS, 2 s on FAT) and keep its stamp: its digest is cached only once it has been left alone this long, as git
#: does with "racily clean" files.
SETTLE_NS = 2 * 10**9

#: Digest cache entries kept: past this many, the least recently used go. A folder corpus edited now and then leaves
#: an entry per version, each holding every file's stamp (hundreds of kB for thousands of files).
DIGEST_CACHE_ENTRIES = 512


#: Every VAL_EVERY-th file (sorted order) of a folder corpus is held out for validation; a corpus of fewer files, or of
#: one token file, holds out its last 1 / VAL_EVERY.
VAL_EVERY = 20
#: Between the files of a text folder, so that one document's last line does not run into the next one's first.
#: A newline, not EOS: byte corpora are uint8. Folders read before it was added hash differently (``Corpus.sha256``
#: is of the joined bytes), so their checkpoints are refused on resume rather than continued on another stream.
#: The stdlib corpus keeps no separator: its .py files end in a newline, and its hash (every stdlib checkpoint's) stays.
DOC_SEP = b"\n"


#: The stdlib corpus keeps whole files, in sorted order, until it holds this many bytes.
STDLIB_CAP_BYTES = 64 * 2**20
#: Path parts that exclude a stdlib file: installed packages, test suites, caches, and the generated codec tables
#: (encodings/cp037.py and its like repeat one another: 11% of the validation text was in the training split).
STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings"})
#: Fewer validation bytes than the stdlib corpus of any CPython holds (3.11's: 388K): a plan scans the standard
#: library's files (a second or more, past its installed packages) only for a row that needs more than this.
STDLIB_SURE_BYTES = 1 << 16


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The stdlib ``.py`` files the corpus is built from, sorted by relative path, capped in bytes."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p for p in root.rglob("*.py") if not STDLIB_SKIP & set(p.relative_to(root).parts) and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    kept, total = [], 0
    for p in files:
        if total >= STDLIB_CAP_BYTES:
            break
        kept.append(p)
        total += p.stat().st_size
    return kept


@lru_cache(maxsize=1)
def stdlib_split_sizes() -> tuple[int, int, str]:
    """Bytes in the stdlib corpus's train and validation splits, from its files' sizes alone (joined without a
    separator, as ``models.data.stdlib_corpus`` reads them), and how its validation split is held out."""
    sizes = [f.stat().st_size for f in stdlib_files()]
    val = held_out(len(sizes))
    if not any(val):
        cut = tail_cut(sum(sizes))
        return cut, sum(sizes) - cut, f"its last {100 / VAL_EVERY:g}% is held out for validation"
    train = sum(n for n, v in zip(sizes, val) if not v)
    return train, sum(sizes) - train, f"every {VAL_EVERY}th file is held out for validation"


def held_out(n_files: int) -> list[bool]:
    """Which of a corpus's ``n_files`` files (sorted) are validation: every VAL_EVERY-th, or none when it has fewer
    than VAL_EVERY (its last 1 / VAL_EVERY of the joined bytes is, then)."""
    return [n_files >= VAL_EVERY and i % VAL_EVERY == VAL_EVERY - 1 for i in range(n_files)]


def tail_cut(n: int) -> int:
    """Where a corpus of ``n`` tokens that holds out its last 1 / VAL_EVERY splits: tokens before it are training."""
    return n - n // VAL_EVERY


def token_ids_in(file: Path, size: int) -> int:
    """How many uint16 token ids a token file of ``size`` bytes holds; ValueError for an empty or odd-sized one."""
    if size == 0:
        raise ValueError(f"data {file} is an empty file, no uint16 token ids")
    if size % 2:
        raise ValueError(f"data {file}: {size} bytes, not a whole number of uint16 token ids")
    return size // 2


def split_sizes(path: str | Path) -> tuple[int, int, str]:
    """Tokens in a file corpus's train and validation splits, from its files' sizes alone (as ``models.data`` reads
    it), and how its validation split is held out. Raises ValueError for a corpus that cannot be read as one."""
    p = Path(path)
    share = f"{100 / VAL_EVERY:g}%"
    if is_token_source(p):
        files = bin_files(p)
        ids = [token_ids_in(file, file.stat().st_size) for file in files]
        if len(ids) == 2:
            return ids[0], ids[1], f"{files[1].name} is its validation split"
        return tail_cut(ids[0]), ids[0] - tail_cut(ids[0]), f"its last {share} is held out for validation"
    files = text_files(p) if p.is_dir() else [p]
    sizes = [f.stat().st_size for f in files]
    if not any(sizes):
        raise ValueError(f"data {path} holds only empty files" if p.is_dir() else f"data {path} is an empty file")

    def joined(parts: list[int]) -> int:
        return sum(parts) + len(DOC_SEP) * max(0, len(parts) - 1)

    val = held_out(len(files))
    if any(val):
        train = joined([n for n, h in zip(sizes, val) if not h])
        return train, joined([n for n, h in zip(sizes, val) if h]), f"every {VAL_EVERY}th file is held out for validation"
    total = joined(sizes)
    return tail_cut(total), total - tail_cut(total), f"its last {share} is held out for validation"


def parse_data(data: str) -> list[tuple[str, float]]:
    """Split ``a+b@0.1`` into parts and weights; unweighted parts share what the weighted ones leave."""
    parts = []
    for raw in str(data).split("+"):
        name, _, weight = raw.strip().partition("@")
        if not name:
            raise ValueError(f"empty part in data {data!r}")
        parts.append((name, float(weight) if weight else None))
    given = [w for _, w in parts if w is not None]
    if any(not 0 < w for w in given):
        raise ValueError(f"data weights must be positive in {data!r}")
    # inf / inf is NaN and 1 / inf is 0: such weights would sample one part alone, or at random.
    if not math.isfinite(sum(given)):
        raise ValueError(f"data weights and their sum must be finite numbers in {data!r}")
    missing = sum(w is None for _, w in parts)
    if missing == 0:
        total = sum(given)
        return [(n, w / total) for n, w in parts]
    rest = 1.0 - sum(given)
    if rest <= 0:
        raise ValueError(f"the weights in {data!r} add up to {sum(given):g} and leave nothing for its unweighted parts")
    return [(n, w if w is not None else rest / missing) for n, w in parts]


def text_files(folder: Path) -> list[Path]:
    """A text folder's files as the corpus reads them: every non-hidden file, sorted by relative path."""
    visible = (p for p in folder.rglob("*") if not any(s.startswith(".") for s in p.relative_to(folder).parts))
    files = sorted((p for p in visible if p.is_file()), key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise ValueError(f"data folder {folder} holds no files")
    return files


def bin_files(path: Path) -> list[Path]:
    """The token files a ``.bin`` source reads: train.bin of a folder (and its val.bin), or the one file."""
    path = path / "train.bin" if path.is_dir() else path
    sibling = path.with_name("val.bin")
    return [path, sibling] if path.name == "train.bin" and sibling.exists() else [path]


def is_token_source(path: str | Path) -> bool:
    """A data path of token ids (a .bin, or a folder holding train.bin), not of text bytes."""
    path = Path(path)
    return path.suffix == ".bin" or (path.is_dir() and (path / "train.bin").exists())


#: Token ids read at a time when a token file is hashed and its largest id found.
SCAN_CHUNK = 1 << 24


def sha256_and_max(*arrays) -> tuple[str, int]:
    """sha256 of the arrays' bytes, one after another, and their largest value (-1 when empty), in one chunked pass: a
    token file is read once for both, without holding it in memory."""
    import numpy as np  # here, not at the top: planning reads this module and needs numpy only for token files

    h, top = hashlib.sha256(), -1
    for a in arrays:
        for start in range(0, len(a), SCAN_CHUNK):
            block = np.ascontiguousarray(a[start : start + SCAN_CHUNK])
            h.update(block.data)
            top = max(top, int(block.max()))
    return h.hexdigest(), top


def token_max_id(path: str | Path) -> int:
    """The largest token id of a token corpus, from the digest cache entry that ``models.data.bin_corpus`` reads (and
    fills the same way: its sha256 and largest id), so that a plan's check is no second scan at launch."""
    import numpy as np

    files = bin_files(Path(path).expanduser())
    stamps = tuple(file_stamp(f) for f in files)
    for file, (_, size, *_) in zip(files, stamps):
        token_ids_in(file, size)  # np.memmap's own error ("cannot mmap an empty file") names no file

    def scan() -> dict:
        # train then validation split, as bin_corpus hashes them: one file split at 95% is the file's bytes in order
        sha, top = sha256_and_max(*(np.memmap(f, dtype=np.uint16, mode="r") for f in files))
        return {"sha256": sha, "max_id": top}

    return cached_digest("bin-corpus", stamps, scan)["max_id"]


def content_digest(path: str | Path) -> str:
    """sha256 of what a data path holds (each file the corpus would read: its name there and its bytes), so that
    runs on a corpus are known by its contents, wherever it lies."""
    path = Path(path).expanduser()
    files = bin_files(path) if is_token_source(path) else text_files(path) if path.is_dir() else [path]
    names = tuple(f.relative_to(path).as_posix() if path.is_dir() else f.name for f in files)
    stamps = tuple(file_stamp(f) for f in files)
    if not settled(stamps):  # not even in memory: see SETTLE_NS
        return _hash_files(names, stamps)
    return _digest_of_files(names, stamps)


@lru_cache(maxsize=64)
def _digest_of_files(names: tuple[str, ...], stamps: tuple[Stamp, ...]) -> str:
    """The digest of the named files: cached in memory on their stamps, so a process that loads plans naming one corpus
    again and again (several plans, ``slab bench plan``) does not even read the disk cache every time."""
    return cached_digest("content", stamps, lambda: {"sha256": _hash_files(names, stamps)})["sha256"]


def _hash_files(names: tuple[str, ...], stamps: tuple[Stamp, ...]) -> str:
    h = hashlib.sha256()
    for name, (file, size, *_) in zip(names, stamps, strict=True):
        h.update(name.encode() + b"\0")
        h.update(str(size).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """Where built corpora and digests are cached: ``$SLAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/scalinglab`` or
    ``~/.cache/scalinglab``."""
    if os.environ.get("SLAB_CACHE_DIR"):
        return Path(os.environ["SLAB_CACHE_DIR"]).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "scalinglab"


def file_stamp(file: str | Path, st: os.stat_result | None = None) -> Stamp:
    """The digest cache's key for one file; ``st`` (an ``os.fstat`` of an open handle) in place of a fresh stat."""
    st = os.stat(file) if st is None else st
    return str(Path(file).resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def cached_digest(kind: str, stamps: tuple[Stamp, ...], compute: Callable[[], dict]) -> dict:
    """``compute()`` (``{"sha256": hex, ...}`` plus int facts) for files with these stamps, taken before they were
    read: from the disk cache while none of them changed, else computed and stored (``cache_dir()/digests``)."""
    if not settled(stamps):
        return compute()
    key = json.dumps([kind, DIGEST_CACHE_VERSION, stamps])
    entry = cache_dir() / "digests" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    try:
        saved = json.loads(entry.read_bytes())
        if saved["key"] == key and _valid_digest(saved["value"]):
            _touch(entry)
            return saved["value"]
        log.debug("digest cache %s does not hold this key's digest: recomputed", entry)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a torn or foreign file costs a recompute, no more
        log.debug("digest cache %s unreadable (%s): recomputed", entry, exc)
    # Keyed on the stamps from before the read: a file changed since has other stamps, and misses this entry.
    value = compute()
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        # A unique temp file renamed over the entry: processes (and hosts sharing a home) never see half a file.
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"key": key, "value": value}, f)
            os.replace(tmp, entry)
        except BaseException:
            os.unlink(tmp)
            raise
        _prune(entry.parent, DIGEST_CACHE_ENTRIES)
    except OSError as exc:  # a read-only or full cache folder: the digest is right, only slower next time
        log.debug("digest cache %s not written (%s)", entry, exc)
    return value


def _touch(entry: Path) -> None:
    """Mark a cache entry as just used (its mtime), so pruning keeps it; a read-only cache only loses that mark."""
    try:
        os.utime(entry)
    except OSError:
        pass


def _prune(folder: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recently used entries of a digest cache folder."""
    def used(path: Path) -> int:
        try:
            return path.stat().st_mtime_ns
        except FileNotFoundError:  # pruned meanwhile by another process
            return -1
    entries = sorted(folder.glob("*.json"), key=used)
    for old in entries[: max(0, len(entries) - keep)]:
        old.unlink(missing_ok=True)


def settled(stamps: tuple[Stamp, ...]) -> bool:
    """Whether every file was last modified at least ``SETTLE_NS`` ago, so that its digest may be cached."""
    now = time.time_ns()
    return all(now - mtime_ns >= SETTLE_NS for _, _, mtime_ns, _, _ in stamps)


def _valid_digest(value) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", value["sha256"]) is not None
            and all(type(v) is int for k, v in value.items() if k != "sha256"))
