"""Where training data comes from, without reading it into tensors: a data string's parts and weights, the files a
corpus path reads, and their content digest (what run ids hash). Free of torch, so that plans can use it."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path


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


def content_digest(path: str | Path) -> str:
    """sha256 of what a data path holds (each file the corpus would read: its name there and its bytes), so that
    runs on a corpus are known by its contents, wherever it lies."""
    path = Path(path).expanduser()
    files = bin_files(path) if is_token_source(path) else text_files(path) if path.is_dir() else [path]
    listing = []
    for f in files:
        st = f.stat()
        name = f.relative_to(path).as_posix() if path.is_dir() else f.name
        listing.append((name, str(f.resolve()), st.st_size, st.st_mtime_ns, st.st_ino))
    return _digest_of_files(tuple(listing))


@lru_cache(maxsize=64)
def _digest_of_files(listing: tuple[tuple[str, str, int, int, int], ...]) -> str:
    """The digest of (name, path, size, mtime_ns, inode) files: cached on their stat, so a process that loads plans
    naming one corpus again and again (several plans, ``slab bench plan``) reads its bytes once, not every time."""
    h = hashlib.sha256()
    for name, file, size, _, _ in listing:
        h.update(name.encode() + b"\0")
        h.update(str(size).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
