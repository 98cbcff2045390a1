"""Tokenized data kept for the next job that would tokenize the same rows the same way.

A retry, a resume, a schedule's fire on unchanged data and the trials of a sweep all tokenize what the job before
them tokenized. `prepare_data` (jobs/driver.py) asks `lookup` first: a hit links the cached splits into the job's
prepared/ and the job's log says where they came from; a miss tokenizes and `store`s the result.

The key is a hash of everything that changes the result: the content of every local data file (sha256, not its
time), a hub dataset's id, subset, split and pinned revision (an unpinned hub dataset is never cached: its rows may
change under the same name), the recipe's whole `data` section and task, the tokenizer's files, and TOKENIZE_VERSION
(raised whenever tokenizing changes). The cache lives beside the job folders (`<artifacts>/.tokenized/`, shared
storage on a cluster), each entry written under a temporary name and renamed into place, so a reader never sees half
of one. It holds at most RUNNER_TOKENIZED_CACHE_GB (default 20; 0 turns it off); past that the entries used least
recently go first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

TOKENIZE_VERSION = 2  # 2: tokenize_batch (same results as 1, a row at a time; a new key costs one tokenization)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
USED = ".used"  # touched on every hit: the eviction's clock


def bound_bytes() -> int:
    try:
        gb = float(os.environ.get("RUNNER_TOKENIZED_CACHE_GB", "20"))
    except ValueError:
        gb = 20.0
    return int(max(gb, 0.0) * 2**30)


def root_for(job_dir: Path) -> Path:
    return Path(job_dir).parent / ".tokenized"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def key(recipe, model_path: str) -> str | None:
    """The cache key of the recipe's tokenized data, or None where it cannot be known (an unpinned hub dataset,
    a tokenizer without files to hash)."""
    parts: list = [TOKENIZE_VERSION, recipe.task, recipe.data.model_dump(mode="json")]
    for split in ("train", "validation", "test"):
        src = getattr(recipe.data, split)
        if src is None:
            parts.append(None)
        elif src.path is not None:
            p = Path(src.path)
            files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
            parts.append([(str(f.relative_to(p)) if p.is_dir() else f.name, _file_digest(f)) for f in files])
        elif src.revision and src.revision != "main":
            parts.append([src.hub, src.subset, src.split, src.revision])
        else:
            return None
    tok_files = [Path(model_path) / n for n in TOKENIZER_FILES if (Path(model_path) / n).is_file()]
    if not tok_files:
        return None
    parts.append([(f.name, _file_digest(f)) for f in tok_files])
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def lookup(job_dir: Path, k: str | None) -> Path | None:
    """The cached entry for key k, marked used now; None when there is none (or the cache is off)."""
    if k is None or bound_bytes() == 0:
        return None
    entry = root_for(job_dir) / k
    if not (entry / "meta.json").is_file():
        return None
    try:
        (entry / USED).touch()
    except OSError:
        return None
    return entry


def link_into(entry: Path, prepared: Path) -> None:
    """prepared/ as a copy of the entry, by hard links where the filesystem allows (the Arrow files are only read)."""
    shutil.rmtree(prepared, ignore_errors=True)

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(entry, prepared, copy_function=link, ignore=shutil.ignore_patterns(USED, "meta.json"))


def meta(entry: Path) -> dict:
    return json.loads((entry / "meta.json").read_text())


def store(job_dir: Path, k: str | None, prepared: Path, info: dict) -> Path | None:
    """prepared/ into the cache under key k (a copy written aside, then renamed into place); then the entries used
    least recently are removed until the cache is within its bound. Returns the entry, or None."""
    bound = bound_bytes()
    if k is None or bound == 0:
        return None
    root = root_for(job_dir)
    entry = root / k
    if entry.exists():
        return entry
    aside = root / f".{k}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(prepared, aside)
        (aside / "meta.json").write_text(json.dumps({**info, "key": k, "stored_at": time.time()}))
        (aside / USED).touch()
        aside.rename(entry)
    except OSError:  # another job stored it first, or the disk is full: the job goes on without the cache
        shutil.rmtree(aside, ignore_errors=True)
        return entry if (entry / "meta.json").is_file() else None
    evict(root, bound, keep=entry)
    return entry


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def evict(root: Path, bound: int, keep: Path | None = None) -> list[str]:
    """Remove the entries used least recently until the cache holds at most `bound` bytes (never `keep`)."""
    entries = []
    for e in root.iterdir():
        if e.is_dir() and not e.name.startswith(".") and (e / "meta.json").is_file():
            used = e / USED
            entries.append((used.stat().st_mtime if used.exists() else 0.0, e))
    total = sum(_size(e) for _, e in entries)
    removed = []
    for _, e in sorted(entries, key=lambda x: x[0]):
        if total <= bound:
            break
        if keep is not None and e == keep:
            continue
        size = _size(e)
        shutil.rmtree(e, ignore_errors=True)
        total -= size
        removed.append(e.name)
    return removed
