"""The one way the job's processes add to the files of its folder that grow (job.log, train.log, metrics.jsonl,
events.jsonl, warnings.jsonl): one write of whole lines, O_APPEND, so that lines of two writers never interleave,
and created readable by their owner only (a log holds what a job printed; other users of the node have no need)."""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE = 0o600


def append(path: Path, text: str) -> None:
    """Add `text` (whole lines, ending with a newline) to the file at path, creating it 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def open_private(path: Path) -> int:
    """A descriptor that appends to path, the file created 0600 (the driver's stdout and stderr go there)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE)
