"""What disk the runner gives back: `runner rm JOB` (a job's folder and its rows), and the retention of checkpoints.

A SUCCEEDED job's record is its model/ (and adapter/, onnx/, eval.json, manifest.json); its checkpoints/ and best/
serve nothing more. The server keeps those of the newest `keep` SUCCEEDED jobs (RUNNER_KEEP_CHECKPOINTS, default
KEEP) and removes older ones' after each job ends. A FAILED or CANCELLED job keeps its checkpoints, for
`runner retry --from-checkpoint`, until `runner rm`. A registered model version's files (runner.registry: model,
adapter, onnx, eval.json, manifest.json, and prepared/ for the like-for-like comparison) are never removed: `rm`
refuses such a job.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from jobs.jobdir import TERMINAL
from runner.store import Store, StoreError

KEEP = 10
RETAINED = ("checkpoints", "best")  # what retention removes from a job's folder, and from earlier attempts' there


def keep_from_env() -> int:
    """RUNNER_KEEP_CHECKPOINTS as a count of jobs (>= 0); a value that is not one is refused with the fix."""
    raw = os.environ.get("RUNNER_KEEP_CHECKPOINTS", str(KEEP)).strip()
    if not (raw.isascii() and raw.isdigit()):
        raise ValueError(f"RUNNER_KEEP_CHECKPOINTS={raw!r}: give a whole number of jobs (0 or more) whose "
                         f"checkpoints are kept; default {KEEP}")
    return int(raw)


def registered_as(store: Store, job_id: str) -> str | None:
    """'topics v2' when the job is a version of a registered model, else None."""
    row = store.db.execute("SELECT model, version FROM versions WHERE job_id = ?", (job_id,)).fetchone()
    return f"{row[0]} v{row[1]}" if row else None


def remove_job(store: Store, job_id: str, root: Path) -> dict:
    """Delete an ended job: its rows, and its folder when it lies in root. Raises StoreError, saying why, for a job
    that is queued or runs, or that is a registered model version, checked in the transaction that deletes (a retry
    or a registration a moment before wins)."""
    store.get(job_id)
    with store.transaction():
        job = store.get(job_id)
        if job.kind == "trial":
            raise StoreError(f"{job_id} is a trial of sweep {job.parent}: it goes with its sweep (runner rm "
                             f"{job.parent})")
        if job.state not in TERMINAL:
            raise StoreError(f"job {job_id} is {job.state}: cancel it first (runner cancel {job_id})")
        version = registered_as(store, job_id)
        if version:
            raise StoreError(f"job {job_id} is {version} in the model registry: its files stay while the version does")
        trials = [t.id for t in store.trials(job_id)]
        for table in ("events", "metrics", "attempts"):
            for one in (job_id, *trials):
                store.db.execute(f"DELETE FROM {table} WHERE job_id = ?", (one,))
        store.db.execute("DELETE FROM jobs WHERE parent = ?", (job_id,))
        # a schedule's fire keeps its record; with no job id, a restarted server does not queue the job again
        store.db.execute("UPDATE fires SET job_id = NULL, reason = reason || '; its job ' || ? || ' was removed' "
                         "WHERE job_id = ?", (job_id, job_id))
        store.db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
    folder = Path(job.job_dir).resolve()
    if not (folder.parent == root.resolve() and folder.is_dir() and not Path(job.job_dir).is_symlink()):
        return {"removed": job_id, "bytes": 0, "folder": f"left in place: {job.job_dir} is not a job folder under "
                                                         f"{root}"}
    freed = _size(folder)
    shutil.rmtree(folder, ignore_errors=True)
    return {"removed": job_id, "bytes": freed, "folder": "removed"}


def prune_checkpoints(store: Store, keep: int, look_back: int | None = None) -> list[tuple[str, int]]:
    """Remove checkpoints/ and best/ (an earlier attempt's under earlier/ too) of every SUCCEEDED job but the newest
    `keep` (by end time). look_back: consider only that many newest SUCCEEDED jobs (each pass leaves none holding
    checkpoints beyond `keep`, so after a first full sweep the next ones need not look far). Returns (job id, bytes
    freed) of each job pruned."""
    sql = "SELECT id, job_dir FROM jobs WHERE state = 'SUCCEEDED' AND parent IS NULL ORDER BY ended_at DESC, id DESC"
    ended = store.db.execute(sql + (f" LIMIT {int(look_back)}" if look_back else "")).fetchall()
    out = []
    for job_id, job_dir in ended[keep:]:  # SUCCEEDED is final: no retry can want them back
        found = _retained(Path(job_dir))
        if not found:
            continue
        freed = sum(_size(p) for p in found)
        for p in found:
            shutil.rmtree(p, ignore_errors=True)
        store.note(job_id, f"checkpoints removed ({freed / 1e6:.1f} MB): only the newest {keep} succeeded jobs "
                           "keep theirs (RUNNER_KEEP_CHECKPOINTS)")
        out.append((job_id, freed))
    return out


class Retention:
    """The server's retention, run when a job ends: one full sweep first, then a look at the newest jobs only."""

    def __init__(self, store: Store, keep: int):
        self.store, self.keep, self.swept = store, keep, False

    def __call__(self, job=None) -> list[tuple[str, int]]:
        out = prune_checkpoints(self.store, self.keep, None if not self.swept else self.keep + 20)
        self.swept = True
        return out


def _retained(folder: Path) -> list[Path]:
    """checkpoints/ and best/ of a job's folder, of its earlier attempts, and of its trials where it is a sweep."""
    parts = [folder, *sorted((folder / "earlier").glob("*")), *sorted((folder / "trials").glob("t*"))]
    inside = [d / name for d in parts for name in RETAINED]
    return [p for p in inside if p.is_dir() and not p.is_symlink()]


def _size(path: Path) -> int:
    """Bytes under path; a file that goes away meanwhile counts 0."""
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            pass
    return total
