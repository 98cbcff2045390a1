"""The queue on a simulated timeline: jobs of known durations arrive, `runner.queue.decide` starts, backfills and
preempts them on fixed nodes, a clock moves in ticks. The tests check backfill against strict first in, first out on
the same timeline (the head never starts later), and bench/elastic.py measures GPU utilisation with and without it.
The dispatcher makes the same calls on the real cluster; nothing here is used by it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from runner.queue import Need, Node, Queued, Running, decide, place, taken


@dataclass
class SimJob:
    id: str
    need: Need
    arrive: float
    work: float  # seconds of running it needs in all (a preempted job goes on where it stopped)
    bound_s: float | None = None  # its resources.max_minutes, in seconds (>= work here)
    preemptible: bool = False


@dataclass
class _Run:
    job: SimJob
    held: dict[str, tuple[float, float]]
    started: float
    left: float  # seconds of work still to do


@dataclass
class Timeline:
    starts: dict[str, list[float]] = field(default_factory=dict)  # job id -> each start (a preempted job has more)
    ends: dict[str, float] = field(default_factory=dict)
    preempted: dict[str, int] = field(default_factory=dict)
    gpu_seconds: float = 0.0
    head_starts: dict[str, tuple[float, float]] = field(default_factory=dict)  # id -> (became head at, started)
    promised: dict[str, float | None] = field(default_factory=dict)  # id -> when it could start, as it became head

    def utilisation(self, gpus: float) -> float:
        """GPU-seconds used over GPU-seconds there were, from the first start to the last end."""
        span = max(self.ends.values()) - min(min(s) for s in self.starts.values()) if self.ends else 0.0
        return self.gpu_seconds / (gpus * span) if span > 0 and gpus else 0.0


class Sim:
    def __init__(self, jobs: list[SimJob], nodes: list[Node], backfill: bool = True, tick: float = 1.0):
        self.pending = sorted(jobs, key=lambda j: (j.arrive, j.id))
        self.nodes = nodes
        self.backfill = backfill
        self.tick = tick
        self.now = 0.0
        self.queue: list[SimJob] = []
        self.running: dict[str, _Run] = {}
        self.out = Timeline()

    def free(self) -> list[Node]:
        left = [Node(n.id, n.cpus, n.gpus) for n in self.nodes]
        for r in self.running.values():
            for n in left:
                c, g = r.held.get(n.id, (0.0, 0.0))
                n.cpus -= c
                n.gpus -= g
        return left

    def step(self) -> None:
        """One tick: arrivals, decisions, then the clock moves and running jobs do a tick of work."""
        while self.pending and self.pending[0].arrive <= self.now + 1e-9:
            self.queue.append(self.pending.pop(0))
        self.queue.sort(key=lambda j: (j.arrive, j.id))
        running = [Running(r.job.id, r.held, None if r.job.bound_s is None else
                           r.job.bound_s - (self.now - r.started), r.job.preemptible, (r.job.arrive, r.job.id))
                   for r in sorted(self.running.values(), key=lambda r: -r.started)]
        d = decide([Queued(j.id, j.need, j.bound_s, "max_minutes", j.preemptible, (j.arrive, j.id))
                    for j in self.queue], self.free(),
                   running=running, backfill=self.backfill, lead_s=self.tick)
        if d.head and d.head not in self.out.head_starts:
            self.out.head_starts[d.head] = (self.now, -1.0)
            self.out.promised[d.head] = None if d.head_in is None else self.now + d.head_in
        for job_id in d.preempt:  # checkpointed and queued again at its step
            r = self.running.pop(job_id)
            r.job.work = r.left
            self.queue.append(r.job)
            self.out.preempted[job_id] = self.out.preempted.get(job_id, 0) + 1
        left = self.free()
        for job_id in d.start:
            job = next(j for j in self.queue if j.id == job_id)
            after = place(job.need, left)
            held = taken(left, after)
            left = after
            self.queue.remove(job)
            self.running[job_id] = _Run(job, held, self.now, job.work)
            self.out.starts.setdefault(job_id, []).append(self.now)
            if job_id in self.out.head_starts and self.out.head_starts[job_id][1] < 0:
                self.out.head_starts[job_id] = (self.out.head_starts[job_id][0], self.now)
        self.now += self.tick
        for job_id, r in list(self.running.items()):
            self.out.gpu_seconds += sum(g for _, g in r.held.values()) * self.tick
            r.left -= self.tick
            if r.left <= 1e-9:
                del self.running[job_id]
                self.out.ends[job_id] = self.now

    def done(self) -> bool:
        return not (self.pending or self.queue or self.running)

    def run(self, limit: float = 10**6) -> Timeline:
        while not self.done() and self.now < limit:
            self.step()
        return self.out

    def fifo_from_here(self) -> Sim:
        """A copy of this timeline's state that goes on without backfill: the reference for the head's start."""
        other = copy.deepcopy(self)
        other.backfill = False
        other.out = Timeline()
        return other


def simulate(jobs: list[SimJob], nodes: list[Node], backfill: bool = True, tick: float = 1.0) -> Timeline:
    return Sim(copy.deepcopy(jobs), nodes, backfill, tick).run()
