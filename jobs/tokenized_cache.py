"""Tokenized data kept for the next job that would tokenize the same rows the same way.

A retry, a resume, a schedule's fire on unchanged data and the trials of a sweep all tokenize what the job before
them tokenized. `prepare_data` (jobs/driver.py) asks `lookup` first: a hit links the cached splits into the job's
prepared/ and the job's log says where they came from; a miss tokenizes and `store`s the result.

The key is a hash of everything that changes the result: the content of every local data file (sha256, not its
time), a hub dataset's id, subset, split and commit (one named by a branch or tag is never cached: its rows may
change under the same name), the recipe's whole `data` section and task, every file of the model folder but its
weights (the tokenizer's files, config.json, custom code), the versions of transformers, tokenizers and datasets,
and jobs/data.py's own source (for a hub id, the files of its snapshot in the local cache; a model not there is
not cached). The key is computed again after
tokenizing, and a file rewritten meanwhile is not cached.

The cache lives beside the job folders (`<artifacts>/.tokenized/`, shared storage on a cluster). An entry is linked
into a folder aside and renamed into place, so a reader never finds half of one, and it records its files and
sizes: a hit links them into the job's prepared/ and checks them, and an entry that is not whole is discarded and
the data tokenized. It holds at most RUNNER_TOKENIZED_CACHE_GB (default 20; 0 turns it off); past that the entries
used least recently go first (renamed out of sight, then removed), and folders a crash left half written go after
six hours.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from pathlib import Path

from jobs.jobdir import file_sha256

TOKENIZE_VERSION = 2  # raised by hand when tokenizing changes; jobs/data.py's own source is in the key as well
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".data", ".gguf", ".h5", ".msgpack", ".ckpt")
USED = ".used"  # touched on every hit: the eviction's clock
STALE_S = 6 * 3600  # a folder being written for longer than this was left by a crash


def bound_bytes() -> int:
    try:
        gb = float(os.environ.get("RUNNER_TOKENIZED_CACHE_GB", "20"))
    except ValueError:
        gb = 20.0
    return int(max(gb, 0.0) * 2**30) if gb == gb else 0  # NaN: off


def root_for(job_dir: Path) -> Path:
    return Path(job_dir).parent / ".tokenized"


def key(recipe, model_path: str, parts: list | None = None) -> str | None:
    """The cache key of the recipe's tokenized data, or None where it cannot be known (the cache off, a model not
    in a local folder, an unpinned hub dataset, a file that cannot be read). parts: `data_parts(recipe)`, where the
    caller has them already (each is a pass over every data file)."""
    import tokenizers
    import transformers

    if bound_bytes() == 0:
        return None
    model = Path(model_path)
    if not model.is_dir():  # a hub id: the snapshot of its revision in the local cache, as the tokenizer loads it
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_path, "config.json", revision=recipe.model.revision)
        if not isinstance(cached, str):
            return None
        model = Path(cached).parent
    try:
        # every file of the model folder but its weights: the tokenizer's files whatever their names, config.json
        # (which class AutoTokenizer picks), custom tokenizer code
        tok_files = sorted(f for f in model.rglob("*") if f.is_file() and not f.name.endswith(WEIGHTS))
        tok = [recipe.model.trust_remote_code, transformers.__version__, tokenizers.__version__,
               [(str(f.relative_to(model)), file_sha256(f)) for f in tok_files]]
    except OSError:
        return None
    data = parts if parts is not None else data_parts(recipe)
    if data is None:
        return None
    return hashlib.sha256(json.dumps([TOKENIZE_VERSION, tok, data], sort_keys=True, default=str).encode()
                          ).hexdigest()[:32]


def data_parts(recipe) -> list | None:
    """What the recipe's rows are: its task and whole data section, the content of every local data file (sha256),
    a hub dataset's id and commit, the versions of the code that reads them. None where they cannot be known."""
    import datasets

    from jobs import data as D
    from jobs import schema

    settings = recipe.data.model_dump(mode="json")
    for split in ("train", "validation", "test"):  # a path as the file it names (validate's recipe may say
        src = getattr(recipe.data, split)  # rows.jsonl where the job's snapshot has the absolute path)
        if src is not None and src.path is not None and isinstance(settings.get(split), dict):
            settings[split]["path"] = str(recipe.resolve_path(src.path))
    try:
        parts: list = [recipe.task, settings, datasets.__version__, file_sha256(Path(D.__file__)),
                       file_sha256(Path(schema.__file__))]
        for split in ("train", "validation", "test"):
            src = getattr(recipe.data, split)
            if src is None:
                parts.append(None)
            elif src.path is not None:
                p = recipe.resolve_path(src.path)
                files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
                parts.append([(str(f.relative_to(p)) if p.is_dir() else f.name, file_sha256(f)) for f in files])
            elif src.revision and re.fullmatch(r"[0-9a-f]{40}", src.revision):  # a commit: a branch or tag moves
                parts.append([src.hub, src.subset, src.split, src.revision])
            else:
                return None
    except OSError:
        return None
    return parts


def _files(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in folder.rglob("*")
            if f.is_file() and f.name not in (USED, "meta.json")}


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


def _link(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_into(entry: Path, prepared: Path) -> dict:
    """prepared/ as the entry (hard links where the filesystem allows: the Arrow files are only read), checked
    against the file list the entry was stored with; returns its meta. Raises ValueError for an entry that is not
    whole (being evicted, or written by something else)."""
    info = json.loads((entry / "meta.json").read_text())
    if not isinstance(info, dict) or not isinstance(info.get("rows"), dict) or not isinstance(info.get("files"), dict) \
            or not isinstance(info.get("notes"), list) or not all(isinstance(n, str) for n in info["notes"]):
        raise ValueError("its meta.json is not the cache's")
    shutil.rmtree(prepared, ignore_errors=True)
    shutil.copytree(entry, prepared, copy_function=_link, symlinks=True,
                    ignore=shutil.ignore_patterns(USED, "meta.json"))
    got = _files(prepared)
    if got != info["files"] or any((prepared / f).is_symlink() for f in got):
        shutil.rmtree(prepared, ignore_errors=True)
        raise ValueError("its files are not those it was stored with")
    return info


def store(job_dir: Path, k: str | None, prepared: Path, info: dict) -> Path | None:
    """prepared/ into the cache under key k (linked into a folder aside, then renamed into place); then the entries
    used least recently are removed until the cache is within its bound. Returns the entry, or None. Never raises:
    the job goes on without the cache."""
    bound = bound_bytes()
    if k is None or bound == 0:
        return None
    root = root_for(job_dir)
    entry = root / k
    aside = root / f".{k}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        files = _files(prepared)
        if sum(files.values()) > bound:
            return None  # larger than the whole cache: it would only push everything else out
        if (entry / "meta.json").is_file():
            return entry
        root.mkdir(parents=True, exist_ok=True)
        if entry.exists():  # a folder without meta.json: half removed, or touched as it went
            discard(entry)
        shutil.copytree(prepared, aside, copy_function=_link)
        (aside / "meta.json").write_text(json.dumps({**info, "files": files, "key": k, "stored_at": time.time()}))
        (aside / USED).touch()
        aside.rename(entry)
    except OSError:  # another job stored it first, or the disk is full
        shutil.rmtree(aside, ignore_errors=True)
        return entry if (entry / "meta.json").is_file() else None
    try:
        evict(root, bound, keep=entry)
    except OSError:
        pass
    return entry


def discard(entry: Path) -> None:
    """Out of sight first (a reader then finds no entry, not half of one), then removed."""
    dead = entry.with_name(f".{entry.name}.{uuid.uuid4().hex[:8]}.dead.tmp")
    try:
        entry.rename(dead)
    except OSError:
        return
    shutil.rmtree(dead, ignore_errors=True)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def evict(root: Path, bound: int, keep: Path | None = None) -> list[str]:
    """Remove the entries used least recently until the cache holds at most `bound` bytes (never `keep`), and the
    folders a crash left half written."""
    entries, now = [], time.time()
    for e in root.iterdir():
        try:
            if not e.is_dir():
                continue
            if e.name.startswith(".") or not (e / "meta.json").is_file():
                if now - e.stat().st_mtime > STALE_S:
                    shutil.rmtree(e, ignore_errors=True)
                continue
            used = e / USED
            entries.append((used.stat().st_mtime if used.exists() else 0.0, e, _size(e)))
        except OSError:  # removed by another job as we looked
            continue
    total = sum(size for _, _, size in entries)
    removed = []
    for _, e, size in sorted(entries, key=lambda x: x[0]):
        if total <= bound:
            break
        if keep is not None and e == keep:
            continue
        discard(e)
        total -= size
        removed.append(e.name)
    return removed


# ----------------------------------------------------------------------------------------------------------------
# What `runner validate` proved of the data
# ----------------------------------------------------------------------------------------------------------------
#
# `runner validate` and `runner submit` read the whole data and check every row (jobs.preflight). Where the CLI
# knows the artifacts folder the driver will use (a local server, or RUNNER_ARTIFACTS on shared storage), it passes
# it as RUNNER_VALIDATE_ARTIFACTS, and a clean pre-flight leaves a proof in <artifacts>/.validated, named by the
# data's key (`data_key`: the same parts as the tokenized cache's data, sha256 of every file, the same before and
# after the read). The driver finds it by the key it computes from the files as they are when it starts (so a file
# changed since is a miss), reads the data without checking each row again, and checks that it read the rows the
# proof counted and that the files did not change as it read them.

PROOF_VERSION = 1
VALIDATED = ".validated"
PROOFS_KEPT = 1000  # the newest proofs kept; older ones are removed as new ones are written


def validated_root(job_dir: Path) -> Path:
    return Path(job_dir).parent / VALIDATED


def data_key(recipe, parts: list | None = None) -> str | None:
    parts = parts if parts is not None else data_parts(recipe)
    if parts is None:
        return None
    return hashlib.sha256(json.dumps([PROOF_VERSION, parts], sort_keys=True, default=str).encode()).hexdigest()[:32]


def prove(root: Path, key: str, rows: dict[str, int]) -> Path | None:
    """Record that the data of `key` passed every check, with its rows per split (written aside, renamed into
    place); the oldest proofs beyond PROOFS_KEPT, and what a crash left half written, go. Never raises: without a
    proof the driver checks the data itself."""
    if not PROOF_NAME.fullmatch(f"{key}.json"):
        return None
    root = Path(root)
    aside = root / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        aside.write_text(json.dumps({"key": key, "rows": rows, "at": time.time()}))
        aside.rename(root / f"{key}.json")
        now, ours = time.time(), []
        for f in root.iterdir():  # only the names proofs have: the folder may be one a user named
            if PROOF_NAME.fullmatch(f.name):
                ours.append((f.stat().st_mtime, f))
            elif PROOF_ASIDE.fullmatch(f.name) and now - f.stat().st_mtime > STALE_S:
                f.unlink(missing_ok=True)
        for _, old in sorted(ours)[:-PROOFS_KEPT]:
            old.unlink(missing_ok=True)
    except OSError:
        with contextlib.suppress(OSError):
            aside.unlink(missing_ok=True)
        return None
    return root / f"{key}.json"


PROOF_NAME = re.compile(r"[0-9a-f]{32}\.json")
PROOF_ASIDE = re.compile(r"\.[0-9a-f]{32}\.[0-9a-f]{8}\.tmp")  # one being written (or left by a crash)
PROOF_BYTES = 64 * 1024


def proven(root: Path, recipe, parts: list | None = None) -> dict | None:
    """The proof that the recipe's data as it is now passed `runner validate` ({"key", "rows", "at"}), or None
    (no proof, other files, or a file that is not one of ours: never followed through a link, never more than
    PROOF_BYTES read, a FIFO or device never waited on)."""
    if not Path(root).is_dir():
        return None
    k = data_key(recipe, parts)
    if k is None:
        return None
    try:
        fd = os.open(Path(root) / f"{k}.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        raw = os.read(fd, PROOF_BYTES + 1)
        if len(raw) > PROOF_BYTES:
            return None
        proof = json.loads(raw)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if not isinstance(proof, dict) or proof.get("key") != k or not isinstance(proof.get("at"), (int, float)) \
            or not isinstance(proof.get("rows"), dict) or not proof["rows"] \
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in proof["rows"].values()):
        return None
    return proof
