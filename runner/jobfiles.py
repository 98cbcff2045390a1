"""Reading inside a job folder, for the server and the dispatcher: every read goes through `inside`, so that a link
(or a `..`) in a job folder, made by the job's own code or by anyone who can write there, never shows the server a
file outside it. The folder's own files are written by the driver; a reader still takes them as untrusted: sizes are
bounded and a file that is not what it should be reads as absent. (A folder swapped for a link between the check
and the read is not caught: the check is on names, as files are served by name.)"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from jobs.jobdir import read_at

MAX_JSON = 16 * 2**20  # eval.json, export_report.json: far larger would be no file the runner wrote
MAX_TEXT = 64 * 1024  # failure.txt


def inside(job_dir: str | Path, rel: str) -> Path | None:
    """The file at `rel` under job_dir, where it resolves (every link followed) to a plain file inside the folder;
    None otherwise (absent, a folder, a link leading out)."""
    root = Path(job_dir).resolve()
    try:
        target = (root / rel).resolve()
        if root not in target.parents:
            return None
        # .secrets.json (jobs.secrets) and any dotfile, asked for by name or through a link to it
        if any(part.startswith(".") for part in target.relative_to(root).parts):
            return None
        st = target.stat()
    except (OSError, RuntimeError, ValueError):  # a loop of links, a NUL in the name, gone
        return None
    # a plain file (no pipe to hang a reader) with one name (no hard link to a file of someone else's)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        return None
    return target


def read_text(job_dir: str | Path, rel: str, limit: int = MAX_TEXT) -> str | None:
    """The start of a text file inside the folder (at most `limit` bytes, invalid UTF-8 replaced); None where there
    is none."""
    path = inside(job_dir, rel)
    if path is None:
        return None
    return read_at(path, 0, limit).decode("utf-8", "replace")


def read_json(job_dir: str | Path, rel: str, limit: int = MAX_JSON) -> dict | None:
    """A JSON object inside the folder; None where there is none, or it is larger than `limit`, or not an object."""
    path = inside(job_dir, rel)
    if path is None:
        return None
    raw = read_at(path, 0, limit + 1)
    if len(raw) > limit:
        return None
    try:
        out = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return out if isinstance(out, dict) else None


def export_note(job_dir: str | Path) -> str | None:
    """What a SUCCEEDED job's state line says about its export: the words of onnx/export_report.json when no
    quantized model met its bound and the fp32 ONNX model ships (None otherwise, and for a report that is not the
    runner's shape)."""
    report = read_json(job_dir, "onnx/export_report.json")
    shipped = report.get("shipped") if report else None
    if not isinstance(shipped, dict) or shipped.get("quantized") is not False:
        return None
    note = shipped.get("note")
    return f"export: {note[:2000]}" if isinstance(note, str) and note.strip() else None


def listing(job_dir: str | Path, skip: tuple[str, ...] = ("prepared",), most: int = 5000) -> list[dict]:
    """The folder's plain files (path, bytes), links and what is under `skip` left out, at most `most` of them."""
    root = Path(job_dir)
    out: list[dict] = []
    for top, dirs, files in os.walk(root):  # os.walk follows no link to a folder
        rel_top = Path(top).relative_to(root)
        if rel_top.parts and rel_top.parts[0] in skip:
            dirs[:] = []
            continue
        dirs.sort()
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in sorted(files):
            if name.startswith("."):  # .secrets.json while the job runs
                continue
            p = Path(top) / name
            try:
                st = p.lstat()
            except OSError:
                continue
            if not p.is_symlink() and p.is_file():
                out.append({"path": str(rel_top / name), "bytes": st.st_size})
                if len(out) >= most:
                    return sorted(out, key=lambda f: f["path"])
    return sorted(out, key=lambda f: f["path"])
