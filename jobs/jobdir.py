"""The job folder: the contract between the processes that write a job (its driver, rank 0 of its workers) and those
that read it (the runner server, its dispatcher, the CLI). Torch-free, so that both sides import it.

A job is a folder, <RUNNER_HOME>/artifacts/<job id>/, and its state:

    recipe.yaml      the recipe as submitted, every default filled in       (written once, by the server or `run`)
    job.log          the driver's stdout and stderr                          (grows)
    train.log        lines for the person running the job                   (grows: `note`)
    events.jsonl     the job's changes of state and its warnings            (grows: `event`; the server follows it)
    metrics.jsonl    one record per logged step and per evaluation          (grows: rank 0)
    warnings.jsonl   alarms rank 0 raised (loss not finite, ...)            (grows; the driver relays them as events)
    checkpoints/     checkpoint_<n>/ with state.pt and step.json             (the newest `keep` of them)
    model/ eval.json manifest.json onnx/ exports/   what a SUCCEEDED job leaves; failure.txt what a FAILED one does
    control.json     the server's requests to the workers: checkpoint at the next step (a node is being drained),
                     and stop there (preempted for a job ahead in the queue)          (the server; workers read it)
    preempted.json   the step a job stopped at when preempted                 (rank 0; the server requeues the job)

A sweep (a recipe with `sweep`) is a job folder too, whose trials are job folders inside it:

    trials/t<NNN>/       each trial: recipe.yaml with its values, metrics, checkpoints, events, best/, and
                         trial.json: its index, values, state (RUNNING, SUCCEEDED, STOPPED, FAILED) and reason
                                                                              (the sweep's driver; the server follows)
    sweep.json           every trial's values, state and best validation figure, and the one chosen (the driver)
    recipe.chosen.yaml   the chosen trial's recipe: what model/, eval.json and onnx/ of the sweep were trained by

Files that grow are written by `append`: one write of whole lines, O_APPEND, 0600, so that two writers never
interleave a line; readers take only whole lines (`lines_after`) and take every file as untrusted (`read_at`: no
link followed, nothing but a plain file, bounded).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from enum import Enum
from pathlib import Path


def runner_home() -> Path:
    """RUNNER_HOME (default ~/.runner): the store, the local server's and Ray's state, and artifacts/."""
    return Path(os.environ.get("RUNNER_HOME") or Path.home() / ".runner").expanduser()


RECIPE, JOB_LOG, TRAIN_LOG = "recipe.yaml", "job.log", "train.log"
EVENTS, METRICS, WARNINGS = "events.jsonl", "metrics.jsonl", "warnings.jsonl"
FAILURE, EVAL, MANIFEST = "failure.txt", "eval.json", "manifest.json"
CHECKPOINTS, MODEL, ONNX, EXPORTS = "checkpoints", "model", "onnx", "exports"
EXPORT_REPORT = "export_report.json"
CONTROL, PREEMPTED = "control.json", "preempted.json"
TRIALS, TRIAL, SWEEP, CHOSEN = "trials", "trial.json", "sweep.json", "recipe.chosen.yaml"


def model_recipe(job_dir: Path) -> Path:
    """The recipe the folder's model was trained by: a sweep's chosen trial's, any other job's own."""
    chosen = Path(job_dir) / CHOSEN
    return chosen if chosen.is_file() else Path(job_dir) / RECIPE


# --- the states -----------------------------------------------------------------------------------------------


class JobState(str, Enum):
    """Where a job is. The store keeps one per job; `TRANSITIONS` says which moves exist."""

    QUEUED = "QUEUED"  # waiting for the resources it asks for, in priority then submission order
    STARTING = "STARTING"  # handed to Ray; its driver has not yet said it runs
    RUNNING = "RUNNING"  # its workers train
    RETRYING = "RETRYING"  # a worker or node was lost; Ray Train restarts the workers from the last checkpoint
    EXPORTING = "EXPORTING"  # trained and evaluated; the model is being merged, exported and checked
    SUCCEEDED = "SUCCEEDED"  # ended with its model, eval.json and a passing export (final)
    FAILED = "FAILED"  # ended with a reason (failure.txt, the store's reason); `runner retry` queues it again
    CANCELLED = "CANCELLED"  # stopped by a person; `runner retry` queues it again
    STOPPED = "STOPPED"  # a sweep's trial stopped early by the sweep's scheduler (ASHA): it trailed the others

    def __str__(self) -> str:  # the same on every Python: the name, as stored and printed
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


S = JobState
TERMINAL = (S.SUCCEEDED, S.FAILED, S.CANCELLED, S.STOPPED)
ACTIVE = (S.STARTING, S.RUNNING, S.RETRYING, S.EXPORTING)  # handed to Ray, not yet ended: the dispatcher follows it
TRAINING = (S.RUNNING, S.RETRYING, S.EXPORTING)  # the driver's own moves, which it writes into events.jsonl
_ENDINGS = (S.FAILED, S.CANCELLED)
TRANSITIONS: dict[JobState, tuple[JobState, ...]] = {
    S.QUEUED: (S.STARTING, *_ENDINGS),
    S.STARTING: (S.RUNNING, S.QUEUED, *_ENDINGS),  # QUEUED: preempted (it goes back to the queue at its step)
    S.RUNNING: (S.EXPORTING, S.SUCCEEDED, S.RETRYING, S.QUEUED, S.STOPPED, *_ENDINGS),
    S.RETRYING: (S.RUNNING, S.QUEUED, S.STOPPED, *_ENDINGS),
    S.EXPORTING: (S.SUCCEEDED, *_ENDINGS),
    S.SUCCEEDED: (),
    S.FAILED: (S.QUEUED,),  # a retry: a new attempt of the same job
    S.CANCELLED: (S.QUEUED,),
    S.STOPPED: (),
}
STATES = tuple(JobState)


def is_terminal(state: str) -> bool:
    return state in TERMINAL


def can_move(old: str, new: str) -> bool:
    """Whether a job in state `old` may move to `new` (both as stored: the states' names)."""
    return old in TRANSITIONS and new in TRANSITIONS[JobState(old)]


# --- writing ------------------------------------------------------------------------------------------------------

PRIVATE = 0o600


def append(path: Path, text: str) -> None:
    """Add `text` (whole lines, ending with a newline) to the file at path, creating it 0600."""
    fd = open_private(path)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def open_private(path: Path) -> int:
    """A descriptor that appends to path, the file created 0600 (the driver's stdout and stderr go there)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE)


def event(job_dir: Path, message: str, state: JobState | None = None, level: str | None = None, **extra) -> None:
    """A line of events.jsonl: one of the driver's moves (`TRAINING`) or a note (level "warning" for what a person
    should look at: an alarm, a baseline not beaten), which the runner server copies into its store as it follows
    the job."""
    if state is not None and state not in TRAINING:
        raise ValueError(f"a job's driver moves it to {', '.join(TRAINING)} only, not {state}")
    record = {"time": time.time(), "state": None if state is None else str(state), "message": message,
              "level": level, **extra}
    append(job_dir / EVENTS, json.dumps(record) + "\n")


def note(job_dir: Path, msg: str) -> None:
    """A line for the person running the job, in train.log (the driver's `Follow` shows it as it comes)."""
    append(job_dir / TRAIN_LOG, f"{time.strftime('%H:%M:%S')} {msg}\n")


# --- reading ------------------------------------------------------------------------------------------------------


def read_at(path: Path, offset: int, limit: int) -> bytes:
    """Up to `limit` bytes of a plain file from `offset`; nothing where the path is absent, a link, a FIFO, a folder
    or unreadable (opened without following a link and without blocking, so that no file a job's code makes can
    hang or redirect the reader)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        os.lseek(fd, offset, os.SEEK_SET)
        out = bytearray()
        while len(out) < limit:
            part = os.read(fd, min(limit - len(out), 1 << 20))
            if not part:
                break
            out += part
        return bytes(out)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _whole(path: Path, offset: int, limit: int) -> tuple[bytes, bool]:
    """The bytes of the whole lines after `offset`, and whether they are a piece of a line longer than `limit`. The
    part after the last newline is a line still being written: it comes next time; a line longer than `limit`
    comes in pieces of `limit` bytes, so that no reader stalls on it."""
    chunk = read_at(path, offset, limit)
    end = chunk.rfind(b"\n") + 1
    if end == 0 and len(chunk) == limit and limit:
        return chunk, True
    return chunk[:end], False


def whole_lines(path: Path, offset: int, limit: int = 1 << 24) -> tuple[str, int]:
    """The whole lines of a growing file after a byte offset, as one text, and the offset after them."""
    raw, _ = _whole(path, offset, limit)
    return raw.decode("utf-8", "replace"), offset + len(raw)


def lines_after(path: Path, offset: int, limit: int = 1 << 24) -> list[tuple[int, str]]:
    """The whole lines after a byte offset, each with the byte offset after it (where a reader goes on from;
    counted in bytes, so that a line of invalid UTF-8 does not shift it)."""
    raw, piece = _whole(path, offset, limit)
    if piece:
        return [(offset + len(raw), raw.decode("utf-8", "replace"))]
    out, at = [], offset
    for line in raw.split(b"\n")[:-1]:
        at += len(line) + 1
        out.append((at, line.decode("utf-8", "replace")))
    return out


def checkpoints_newest_first(job_dir: Path) -> list[str]:
    """Checkpoints a run of this job folder left (cancelled, failed, killed), newest step first.

    Ray Train restores a rerun by itself only from the snapshot it writes as it goes, which a killed run may not
    have written yet; each checkpoint carries its step in step.json, so the folder alone says where to go on."""
    found = []
    for d in (job_dir / CHECKPOINTS).glob("checkpoint_*"):
        try:
            step = json.loads((d / "step.json").read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if (d / "state.pt").is_file():
            found.append((step, str(d)))
    return [d for _, d in sorted(found, reverse=True)]


def latest_export(job_dir: Path) -> Path | None:
    """The newest export that passed its checks: a re-export under exports/ (named by UTC time), else onnx/."""
    for d in sorted((job_dir / EXPORTS).glob("*"), reverse=True) + [job_dir / ONNX]:
        try:
            report = json.loads((d / EXPORT_REPORT).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and report.get("passed"):
            return d
    return None


def warnings_since(job_dir: Path, since: float = 0.0) -> list[str]:
    """The warnings the job wrote into its events.jsonl (alarms, a baseline not beaten) from `since` on."""
    out = []
    path = job_dir / EVENTS
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and ev.get("level") == "warning" and isinstance(ev.get("message"), str) and \
                isinstance(ev.get("time"), (int, float)) and ev["time"] >= since:
            out.append(ev["message"])
    return out


# --- where the folders live ---------------------------------------------------------------------------------------


# Filesystems every node of a cluster can mount at the same path (/proc/mounts' type names).
SHARED_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "ceph", "cephfs", "glusterfs", "beegfs",
                      "wekafs", "fuse.gcsfuse", "fuse.mountpoint-s3", "fuse.s3fs", "fuse.juicefs", "fuse.goofys",
                      "fuse.rclone", "fuse.efs", "efs", "virtiofs"}


def filesystem_of(path: str | Path, mounts: str | None = None) -> tuple[str, str]:
    """(mount point, filesystem type) that holds `path`, from /proc/mounts (or the text given)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return "/", "unknown"
    target = os.path.realpath(os.path.expanduser(str(path)))
    best = ("/", "unknown")
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
            best = (point, parts[2])
    return best


def shared_storage_problem(path: str | Path, nodes: int, mounts: str | None = None) -> str | None:
    """Why the artifacts folder `path` cannot serve a cluster of `nodes` nodes, or None when it can.

    Every node writes into the job's folder (checkpoints from the workers, the model from rank 0, which Ray may
    place on any node) and the driver reads it back, so with more than one node it must be one filesystem that
    all of them mount: NFS (EFS, Filestore), a parallel filesystem, or a bucket mounted with gcsfuse or
    mountpoint-s3. RUNNER_SHARED_STORAGE=1 vouches for a path whose type is not recognised."""
    if nodes <= 1 or os.environ.get("RUNNER_SHARED_STORAGE") == "1":
        return None
    text = str(path)
    if text.startswith(("s3://", "gs://")):
        return (f"the artifacts path {text} is a bucket URL; the runner writes job folders through a filesystem "
                f"path: mount the bucket on every node (mountpoint-s3, gcsfuse) and set RUNNER_HOME to it")
    point, fstype = filesystem_of(path, mounts)
    if fstype in SHARED_FILESYSTEMS:
        return None
    return (f"the cluster has {nodes} nodes but the artifacts path {text} is on a local filesystem ({fstype} at "
            f"{point}): workers on other nodes would write checkpoints and the model where the driver cannot read "
            f"them. Put RUNNER_HOME on storage every node mounts at the same path (NFS, EFS, Filestore, or an "
            f"s3/gs bucket through mountpoint-s3 or gcsfuse; see cluster/README.md), or set RUNNER_SHARED_STORAGE=1 "
            f"if it is shared already")


def file_sha256(path: Path) -> str:
    """A file's sha256, read a megabyte at a time (a data file may be larger than memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def first_line(e: BaseException, limit: int = 300) -> str:
    """The line of an error worth showing a person: where a library wraps the real error in a page of advice (the
    ONNX exporter: "<class 'x.Y'>: message"), that error; else its first non-empty line, colour codes removed."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
    lines = [ln for ln in lines if ln]
    inner = [m.group(1) + ": " + m.group(2) for ln in lines if (m := re.match(r"<class '[\w.]*?(\w+)'>: (.*)", ln))]
    return (inner[0] if inner else lines[0] if lines else type(e).__name__)[:limit]


# --- the server's requests to a job's workers (control.json) ---------------------------------------------------


def write_json(path: Path, obj) -> None:
    """A small JSON file replaced whole (a temporary file, 0600, renamed into place; a link there is replaced, never
    written through), so that a reader finds the old content or the new."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), PRIVATE)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj))
    os.replace(tmp, path)


def write_control(job_dir: Path, request: dict) -> None:
    write_json(Path(job_dir) / CONTROL, request)


def clear_control(job_dir: Path) -> None:
    (Path(job_dir) / CONTROL).unlink(missing_ok=True)


def read_control(job_dir: Path) -> dict:
    """The request in control.json (all false where there is none or it is not one): {"checkpoint": bool, "stop":
    bool, "why": text, "attempt": the attempt it is for}."""
    raw = read_at(Path(job_dir) / CONTROL, 0, 4096)
    try:
        req = json.loads(raw) if raw else {}
    except ValueError:
        req = {}
    if not isinstance(req, dict):
        req = {}
    return {"checkpoint": req.get("checkpoint") is True, "stop": req.get("stop") is True,
            "why": str(req.get("why") or "")[:300], "attempt": req.get("attempt")}


def read_preempted(job_dir: Path) -> int | None:
    """The step rank 0 wrote into preempted.json as the workers stopped for a preemption, or None."""
    try:
        at = json.loads(read_at(Path(job_dir) / PREEMPTED, 0, 4096) or b"null")
    except ValueError:
        return None
    step = at.get("step") if isinstance(at, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None
