"""Follow a running job: step, loss, samples/s and ETA from its metrics.jsonl (a bar on a terminal, lines
elsewhere), and the new lines of its train.log (what the workers and the driver have to say: world size, resumes,
restarts, the export's checks), so that the driver's output, which is the job's log, tells the whole story."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from jobs.jobdir import event, whole_lines


class Follow(threading.Thread):
    """Also relays the workers' warnings (rank 0's warnings.jsonl) into the job's events.jsonl, so that the driver
    is that file's one writer wherever the workers run (two hosts appending to one file on shared storage can
    interleave)."""

    def __init__(self, job_dir: Path, interval: float = 0.5, console=None):
        super().__init__(daemon=True)
        self.console = console  # a rich Console; default: one on stderr
        self.job_dir = Path(job_dir)
        self.path = self.job_dir / "metrics.jsonl"
        self.log = self.job_dir / "train.log"
        self.warnings = self.job_dir / "warnings.jsonl"
        self.interval = interval
        self._stop_event = threading.Event()
        # from where the files end now: a resumed job does not show its earlier attempt again
        self._offset, self._log_offset, self._warn_offset = (p.stat().st_size if p.exists() else 0
                                                             for p in (self.path, self.log, self.warnings))
        self.last: dict | None = None

    @staticmethod
    def _whole_lines(path: Path, offset: int) -> tuple[list[str], int]:
        """Lines after `offset`; a line being written is read next time."""
        text, end = whole_lines(path, offset)
        return text.splitlines(), end

    def _read(self) -> list[dict]:
        lines, self._offset = self._whole_lines(self.path, self._offset)
        return [json.loads(x) for x in lines if x.strip()]

    def _notes(self) -> list[str]:
        self._relay()
        lines, self._log_offset = self._whole_lines(self.log, self._log_offset)
        return lines

    def _relay(self) -> None:
        lines, self._warn_offset = self._whole_lines(self.warnings, self._warn_offset)
        for line in lines:
            try:
                w = json.loads(line)
                message, kind, step = str(w["message"]), str(w["kind"]), int(w["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn or foreign line: the log (train.log) still has the warning's words
            event(self.job_dir, message, level="warning", kind=kind, step=step)

    def run(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        console = self.console or Console(file=sys.stderr)
        if not console.is_terminal:
            return self._plain()
        with Progress(TextColumn("{task.fields[where]}"), BarColumn(),
                      TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console) as bar:
            task = bar.add_task("train", total=None, where="starting the workers", info="")
            while True:
                stopping = self._stop_event.is_set()
                for line in self._notes():
                    bar.console.print(line, markup=False, highlight=False)
                for rec in self._read():
                    self._show(bar, task, rec)
                if stopping:
                    break
                self._stop_event.wait(self.interval)

    def _show(self, bar, task, rec: dict) -> None:
        if "split" in rec:
            bar.console.print(evaluation_line(rec), markup=False, highlight=False)
            return
        self.last = rec
        bar.update(task, completed=rec["step"], total=rec["total_steps"],
                   where=f"step {rec['step']}/{rec['total_steps']}",
                   info=f"loss {rec['loss']:.4f}  {rec['samples_per_s']:.1f} samples/s")

    def _plain(self) -> None:
        shown = 0.0
        while True:
            stopping = self._stop_event.is_set()
            for line in self._notes():
                print(line, file=sys.stderr, flush=True)
            for rec in self._read():
                if "split" in rec:
                    print(evaluation_line(rec), file=sys.stderr, flush=True)
                elif time.time() - shown > 5 or rec["step"] == rec["total_steps"]:
                    shown = time.time()
                    print(f"step {rec['step']}/{rec['total_steps']} loss {rec['loss']:.4f} "
                          f"{rec['samples_per_s']:.1f} samples/s", file=sys.stderr, flush=True)
            if stopping:
                break
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=5)


NOT_FIGURES = ("step", "epoch", "split", "time", "examples", "tokens")


def evaluation_line(rec: dict) -> str:
    """'step 40: validation loss=0.3120 accuracy=0.9500 macro_f1=0.9496': every figure of an evaluation."""
    figures = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()
                       if k not in NOT_FIGURES)
    return f"step {rec['step']}: {rec['split']} {figures}"
