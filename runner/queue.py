"""Which queued jobs start now, and why the others wait: pure decisions over the cluster's nodes and the queue.

A job needs `workers` bundles of (CPUs, GPUs), one per Ray Train worker; each bundle must fit on one node, as Ray's
placement group puts it. The queue is taken in order (priority, then age) and stops at the first job that does not
fit: the jobs behind it wait their turn rather than overtake it, so a big job is never starved by a stream of
small ones. A job that would not fit even on the empty cluster is refused at submit, with the cluster's shape.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Need:
    workers: int
    cpus: float  # per worker
    gpus: float  # per worker

    def words(self) -> str:
        per = f"{_n(self.cpus)} CPU{'s' if self.cpus != 1 else ''}"
        if self.gpus:
            per += f" + {_n(self.gpus)} GPU{'s' if self.gpus != 1 else ''}"
        return f"{self.workers} worker{'s' if self.workers != 1 else ''} x ({per})"


@dataclass
class Node:
    id: str
    cpus: float
    gpus: float = 0.0
    memory: float = 0.0  # bytes Ray may schedule on the node (shown, not planned with: jobs ask for none)


def _n(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def place(need: Need, nodes: list[Node]) -> list[Node] | None:
    """Nodes left after placing every worker of `need` (first fit, roomiest node first), or None if it does not
    fit. The input is not changed."""
    left = [Node(n.id, n.cpus, n.gpus) for n in nodes]
    for _ in range(need.workers):
        fits = [n for n in left if n.cpus + 1e-9 >= need.cpus and n.gpus + 1e-9 >= need.gpus]
        if not fits:
            return None
        best = max(fits, key=lambda n: (n.gpus - need.gpus if need.gpus else -n.gpus, n.cpus))
        best.cpus -= need.cpus
        best.gpus -= need.gpus
    return left


def shape(nodes: list[Node]) -> str:
    """'2 nodes: 2 x (16 CPUs, 2 GPUs)' or a list when the nodes differ."""
    if not nodes:
        return "no nodes"
    kinds: dict[tuple, int] = {}
    for n in nodes:
        kinds[(n.cpus, n.gpus)] = kinds.get((n.cpus, n.gpus), 0) + 1
    parts = [f"{k} x ({_n(c)} CPUs{f', {_n(g)} GPUs' if g else ''})"
             for (c, g), k in sorted(kinds.items(), key=lambda x: (-x[0][1], -x[0][0]))]  # biggest first
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}: " + ", ".join(parts)


def refusal(need: Need, total: list[Node]) -> str | None:
    """Why a job can never run on this cluster, or None when it can (on the empty cluster)."""
    if place(need, total) is not None:
        return None
    return f"needs {need.words()}, which this cluster can never hold ({shape(total)})"


def free_words(need: Need, nodes: list[Node]) -> str:
    gpus, cpus = sum(n.gpus for n in nodes), sum(n.cpus for n in nodes)
    if need.gpus:
        want = need.workers * need.gpus
        if want > gpus + 1e-9:
            return f"needs {_n(want)} GPUs, {_n(gpus)} free"
    want = need.workers * need.cpus
    if want > cpus + 1e-9:
        return f"needs {_n(want)} CPUs, {_n(cpus)} free"
    return f"needs {need.words()}; free now: " + ", ".join(
        f"{n.id} ({_n(n.cpus)} CPUs{f', {_n(n.gpus)} GPUs' if n.gpus else ''})" for n in nodes)


@dataclass
class Decision:
    start: list[str]  # job ids to dispatch now, in order
    waiting: dict[str, tuple[int, str]]  # job id -> (position in the queue, 1-based, reason)


def decide(queue: list[tuple[str, Need]], free: list[Node]) -> Decision:
    """queue: (job id, need) in dispatch order (priority, then age). free: what each node has free now."""
    start: list[str] = []
    waiting: dict[str, tuple[int, str]] = {}
    blocked_by: str | None = None
    left = free
    for job_id, need in queue:
        if blocked_by is None:
            after = place(need, left)
            if after is not None:
                start.append(job_id)
                left = after
                continue
            blocked_by = job_id
            waiting[job_id] = (1, free_words(need, left))
            continue
        waiting[job_id] = (len(waiting) + 1, f"waiting behind {blocked_by}")
    return Decision(start, waiting)
