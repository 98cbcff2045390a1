"""Faults and records for drills: slow steps, a pause, a worker that dies, and records of what each worker did.

A callback (jobs/callbacks.py) a recipe asks for when it wants them; the runner's own tests and its chaos bench
(bench/chaos.py) use it to run real jobs through real faults:

    train:
      callbacks:
        - use: jobs.faults:Faults
          args: {step_delay: 0.2, crash_after_step: 4}

`hold_file` and `record_seen` name files of the job folder (a plain relative name; nothing outside it).
"""

from __future__ import annotations

import hashlib
import os
import time

from jobs.callbacks import Callback, Loop


class Faults(Callback):
    def __init__(self, step_delay: float = 0.0, pause_after_step: int | None = None, hold_file: str | None = None,
                 crash_after_step: int | None = None, force_sharded: bool = False, record_seen: str | None = None,
                 record_nodes: bool = False, record_weights: bool = False):
        """step_delay: seconds each step lasts at least, so that a watcher sees the run go on.
        pause_after_step: hold after that step until the job is stopped, or while `hold_file` exists.
        crash_after_step: the last rank dies (os._exit) after that step, once a job (a file `crashed` says so).
        force_sharded: take the sharded strategies' checkpoint, resume and save path, on CPUs.
        record_seen: append "<epoch> <row> <row>..." a forward pass to <record_seen>.<rank>.
        record_nodes: rank 0 appends its Ray node id to nodes.txt at each start, and writes its nice value.
        record_weights: each rank writes the SHA-256 of its final weights to weights.<rank>.sha256."""
        if step_delay < 0 or step_delay > 60:
            raise ValueError(f"step_delay {step_delay}: 0 to 60 seconds")
        for key, name in (("hold_file", hold_file), ("record_seen", record_seen)):
            if name is not None and not _in_folder(name):
                raise ValueError(f"{key} {name[:100]!r}: a file of the job folder, named relative to it (no '/' "
                                 f"at the start, no '..')")
        self.step_delay, self.pause_after_step, self.hold_file = step_delay, pause_after_step, hold_file
        self.crash_after_step, self.force_sharded = crash_after_step, force_sharded
        self.record_seen, self.record_nodes, self.record_weights = record_seen, record_nodes, record_weights

    def on_plan(self, plan: dict) -> None:
        if self.force_sharded:
            plan["sharded"] = True

    def on_start(self, loop: Loop) -> None:
        if self.record_nodes and loop.rank == 0:
            import ray

            with (loop.job_dir / "nodes.txt").open("a") as f:
                f.write(ray.get_runtime_context().get_node_id() + "\n")
            (loop.job_dir / "nice.txt").write_text(str(os.nice(0)))

    def on_batch(self, loop: Loop, rows: list[int]) -> None:
        if self.record_seen and rows:
            with open(f"{loop.job_dir / self.record_seen}.{loop.rank}", "a") as f:
                f.write(f"{loop.epoch} " + " ".join(map(str, rows)) + "\n")

    def on_step(self, loop: Loop) -> None:
        if self.step_delay:
            time.sleep(self.step_delay)
        hold = self.hold_file and loop.job_dir / self.hold_file
        while self.pause_after_step == loop.step and (not hold or hold.exists()):
            time.sleep(0.2)
        crashed = loop.job_dir / "crashed"
        if self.crash_after_step == loop.step and loop.rank == loop.world - 1 and not crashed.exists():
            crashed.write_text(str(loop.step))
            time.sleep(3)  # let the controller collect the last checkpoint's report, as a real crash would
            os._exit(1)

    def on_end(self, loop: Loop, model) -> None:
        if self.record_weights:
            h = hashlib.sha256()
            for k, v in sorted(model.state_dict().items()):
                h.update(k.encode() + v.detach().float().cpu().numpy().tobytes())
            (loop.job_dir / f"weights.{loop.rank}.sha256").write_text(h.hexdigest())


def _in_folder(name: str) -> bool:
    from pathlib import PurePosixPath

    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name and "\x00" not in name
