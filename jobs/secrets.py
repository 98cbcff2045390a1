"""How a job's secrets reach its Ray Train workers without passing through Ray.

Ray shows a task's or actor's runtime_env (its env vars included) to anyone who reaches its dashboard or state API,
so the driver never puts a token there. It writes the secrets of its own environment (SECRET_ENV) to a file in
the job's folder, readable by its owner only; each worker reads them into its environment as it starts (a worker
Ray restarts reads them again), and the driver removes the file when it ends, whatever the ending. The runner
server never serves it (runner.jobfiles refuses it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
FILE = ".secrets.json"


def hand_over(job_dir: Path) -> str | None:
    """Write this process's secrets for the workers (0600; a file or link already there is replaced, never
    written through). Returns why it could not, or None."""
    found = {k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
    path = Path(job_dir) / FILE
    try:
        withdraw(job_dir)
        if not found:
            return None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(found, f)
    except OSError as e:  # the workers go without (a recipe that needs a token then says it is not set)
        return f"the job's secrets could not be handed to its workers ({e.strerror or e})"
    return None


def take(job_dir: Path) -> None:
    """Into this process's environment: the secrets the driver handed over (the names of SECRET_ENV only)."""
    path = Path(job_dir) / FILE
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(found, dict):
        os.environ.update({k: v for k, v in found.items() if k in SECRET_ENV and isinstance(v, str)})


def withdraw(job_dir: Path) -> None:
    path = Path(job_dir) / FILE
    try:
        path.unlink(missing_ok=True)
    except IsADirectoryError:  # not the runner's: something made a folder of that name
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass
