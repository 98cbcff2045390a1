"""A process's memory for the bench scripts: resident now and at its peak (Linux's VmHWM, which psutil does not
give), in MB."""

from __future__ import annotations

from pathlib import Path


def rss_mb(pid: int) -> tuple[float, float]:
    """(resident MB now, the most it has been resident), from /proc/<pid>/status."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
