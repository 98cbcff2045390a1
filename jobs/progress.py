"""Follow a running job's metrics.jsonl and show step, loss, samples/s and ETA (a bar on a terminal, lines
elsewhere)."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path


class Follow(threading.Thread):
    def __init__(self, job_dir: Path, interval: float = 0.5):
        super().__init__(daemon=True)
        self.path = Path(job_dir) / "metrics.jsonl"
        self.interval = interval
        self._stop_event = threading.Event()
        self._offset = 0
        self.last: dict | None = None

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self.path.open() as f:
            f.seek(self._offset)
            chunk = f.read()
        # only whole lines: a line being written is read next time
        end = chunk.rfind("\n") + 1
        self._offset += len(chunk[:end].encode())
        return [json.loads(x) for x in chunk[:end].splitlines() if x.strip()]

    def run(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(file=sys.stderr)
        if not console.is_terminal:
            return self._plain()
        with Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                      TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console) as bar:
            task = bar.add_task("train", total=None, info="starting workers")
            while not self._stop_event.is_set():
                for rec in self._read():
                    self._show(bar, task, rec)
                self._stop_event.wait(self.interval)
            for rec in self._read():
                self._show(bar, task, rec)

    def _show(self, bar, task, rec: dict) -> None:
        if "split" in rec:
            extra = " ".join(f"{k}={rec[k]:.4g}" for k in ("accuracy", "mse", "perplexity") if k in rec)
            bar.console.print(f"step {rec['step']}: validation loss={rec['loss']:.4f} {extra}")
            return
        self.last = rec
        bar.update(task, completed=rec["step"], total=rec["total_steps"],
                   info=f"loss {rec['loss']:.4f}  {rec['samples_per_s']:.1f} samples/s")

    def _plain(self) -> None:
        shown = 0.0
        while not self._stop_event.is_set():
            for rec in self._read():
                if "split" in rec:
                    print(f"step {rec['step']}: validation loss={rec['loss']:.4f}", file=sys.stderr, flush=True)
                elif time.time() - shown > 5 or rec["step"] == rec["total_steps"]:
                    shown = time.time()
                    print(f"step {rec['step']}/{rec['total_steps']} loss {rec['loss']:.4f} "
                          f"{rec['samples_per_s']:.1f} samples/s", file=sys.stderr, flush=True)
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=5)
