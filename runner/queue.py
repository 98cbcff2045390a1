"""Which queued jobs start now, and why the others wait: pure decisions over the cluster's nodes and the queue.

A job needs `workers` bundles of (CPUs, GPUs), one per Ray Train worker; each bundle must fit on one node, as Ray's
placement group puts it. The queue is taken in order (priority, then age). The first job that does not fit is the
head; the jobs behind it never delay it:

- a job behind the head starts only on capacity the head cannot use before it could start (backfill, as Slurm's
  and Kueue's): because it is bounded to end before then (`resources.max_minutes`, or a bound measured on earlier
  runs of the recipe), because it fits beside what the head will take when it starts (one worker, on whichever
  node Ray puts it), or because it is preemptible (`resources.preemptible`: stopped at a checkpoint and queued
  again the moment the head fits without it). The promise is as good as the bounds: a job that ends early can
  leave the head waiting for what its plan said, not for what became free sooner;
- where the cluster can add nodes (an autoscaler with node types and their max counts), a job that fits a node type
  that can still start waits "for the cluster to add a node of type X" and the runner asks Ray for it; a job that no
  node type could ever hold is refused at submit, with the node types.

`decide` is a function of what it is given (free capacity by node, what each running job holds and when it is
bound to end, the node types), so the dispatcher, the tests and bench/elastic.py's simulated timelines call the same
code.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

UNBOUNDED = 10**6  # a node type's max count of -1 (no limit)


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
    type: str | None = None  # the autoscaler's node type, where it has one


@dataclass(frozen=True)
class NodeType:
    """A kind of node the autoscaler can start: its resources, its max count and how many it has now (alive or
    being launched)."""

    name: str
    cpus: float
    gpus: float
    max_count: int
    count: int = 0  # alive or being launched
    pending: int = 0  # of count, being launched: capacity on its way

    @property
    def could_start(self) -> int:
        top = UNBOUNDED if self.max_count < 0 else self.max_count
        return max(0, top - self.count)

    def words(self) -> str:
        res = f"{_n(self.cpus)} CPUs{f', {_n(self.gpus)} GPUs' if self.gpus else ''}"
        top = "no limit" if self.max_count < 0 else f"max {self.max_count}"
        return f"{self.name} ({res}; {top}, {self.count} now)"


@dataclass(frozen=True)
class Queued:
    """A queued job as the queue sees it. bound_s: the most seconds it runs once started (None: no bound)."""

    id: str
    need: Need
    bound_s: float | None = None
    bound_from: str = ""  # where the bound comes from, in words ("resources.max_minutes")
    preemptible: bool = False
    key: tuple = ()  # its place in the queue's order (priority, then age): what it may be preempted for


@dataclass(frozen=True)
class Running:
    """A running job of the runner's: what it holds on each node (node id -> (CPUs, GPUs)), the seconds until it
    is bound to end (None: no bound), and whether it may be preempted for a job ahead of it in the queue."""

    id: str
    held: dict[str, tuple[float, float]]
    ends_in: float | None = None
    preemptible: bool = False
    key: tuple = ()  # its place in the queue's order: it is preempted only for a job ahead of it

    def yields_to(self, q: Queued) -> bool:
        return self.preemptible and (not self.key or not q.key or q.key < self.key)


@dataclass
class Decision:
    start: list[str]  # job ids to dispatch now, in order
    waiting: dict[str, tuple[int, str]]  # job id -> (position in the queue, 1-based, reason)
    rules: dict[str, str] = field(default_factory=dict)  # job id started -> the rule that let it start
    requests: dict[str, list[str]] = field(default_factory=dict)  # job id -> node types to add for it
    preempt: dict[str, str] = field(default_factory=dict)  # running job id -> why it is preempted now
    head: str | None = None  # the first job that does not fit
    head_in: float | None = None  # seconds until it could start, by the bounds of running jobs (None: not known)


FIRST_FIT = "fits the free capacity, first in the queue"  # the rule of a job that starts in its turn


def taken(before: list[Node], after: list[Node]) -> dict[str, tuple[float, float]]:
    """What a placement took of each node (`place`'s input and output): (CPUs, GPUs) by node id, the nodes it did
    not touch left out."""
    return {a.id: (a.cpus - b.cpus, a.gpus - b.gpus) for a, b in zip(before, after)
            if a.cpus != b.cpus or a.gpus != b.gpus}


def _n(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _copy(nodes: list[Node]) -> list[Node]:
    return [Node(n.id, n.cpus, n.gpus, type=n.type) for n in nodes]


def place(need: Need, nodes: list[Node]) -> list[Node] | None:
    """Nodes left after placing every worker of `need` (first fit, roomiest node first), or None if it does not
    fit. The input is not changed."""
    left = _copy(nodes)
    for _ in range(need.workers):
        fits = [n for n in left if n.cpus + 1e-9 >= need.cpus and n.gpus + 1e-9 >= need.gpus]
        if not fits:
            return None
        best = max(fits, key=lambda n: (n.gpus - need.gpus if need.gpus else -n.gpus, n.cpus))
        best.cpus -= need.cpus
        best.gpus -= need.gpus
    return left


def grow(need: Need, nodes: list[Node], types: list[NodeType]) -> list[str] | None:
    """The node types to add so that `need` fits on `nodes` plus them (the fewest, each the smallest type that holds
    a worker that fits nowhere yet), [] when it fits already, or None when the types that can still start cannot
    make it fit."""
    pool, added = _copy(nodes), []
    room = {t.name: t.could_start + t.pending for t in types}  # a node being launched is one to use, not to add
    for _ in range(need.workers):
        fits = [n for n in pool if n.cpus + 1e-9 >= need.cpus and n.gpus + 1e-9 >= need.gpus]
        if not fits:
            kinds = sorted((t for t in types if room[t.name] > 0 and t.cpus + 1e-9 >= need.cpus
                            and t.gpus + 1e-9 >= need.gpus), key=lambda t: (t.gpus, t.cpus, t.name))
            if not kinds:
                return None
            t = kinds[0]
            room[t.name] -= 1
            added.append(t.name)
            pool.append(Node(f"(new {t.name} {len(added)})", t.cpus, t.gpus, type=t.name))
            fits = [pool[-1]]
        best = max(fits, key=lambda n: (n.gpus - need.gpus if need.gpus else -n.gpus, n.cpus))
        best.cpus -= need.cpus
        best.gpus -= need.gpus
    return added


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


def refusal(need: Need, total: list[Node], types: list[NodeType] = ()) -> str | None:
    """Why a job can never run on this cluster, or None when it can: on the empty cluster, grown by every node the
    autoscaler could still start."""
    types = [t for t in types if t.max_count != 0]
    if grow(need, total, types) is not None:
        return None
    where = shape(total)
    if types:
        where += "; node types it can add: " + ", ".join(t.words() for t in types)
    return f"needs {need.words()}, which this cluster can never hold ({where})"


def free_words(need: Need, nodes: list[Node], others: list[Node] = ()) -> str:
    """What is missing for `need` on `nodes` (the free capacity); `others`: what other users of the cluster hold on
    each node, named where it is what keeps the job out."""
    gpus, cpus = sum(n.gpus for n in nodes), sum(n.cpus for n in nodes)
    held_g, held_c = sum(n.gpus for n in others), sum(n.cpus for n in others)
    by_others = ""
    if others and place(need, _sum(nodes, others)) is not None:
        by_others = (f"; the cluster's free {'GPUs' if need.gpus and held_g else 'CPUs'} are held by others "
                     f"({_n(held_g) + ' GPUs, ' if held_g else ''}{_n(held_c)} CPUs held by other Ray users)")
    if need.gpus:
        want = need.workers * need.gpus
        if want > gpus + 1e-9:
            return f"needs {_n(want)} GPUs, {_n(gpus)} free{by_others}"
    want = need.workers * need.cpus
    if want > cpus + 1e-9:
        return f"needs {_n(want)} CPUs, {_n(cpus)} free{by_others}"
    return f"needs {need.words()}; free now: " + ", ".join(
        f"{n.id} ({_n(n.cpus)} CPUs{f', {_n(n.gpus)} GPUs' if n.gpus else ''})" for n in nodes) + by_others


def _sum(nodes: list[Node], more: list[Node] | dict) -> list[Node]:
    """nodes plus `more` (nodes, or node id -> (CPUs, GPUs)) added node by node; ids not in nodes are left out."""
    add = dict(more) if isinstance(more, dict) else {}
    if not isinstance(more, dict):
        for n in more:
            c, g = add.get(n.id, (0.0, 0.0))
            add[n.id] = (c + n.cpus, g + n.gpus)
    out = _copy(nodes)
    for n in out:
        c, g = add.get(n.id, (0.0, 0.0))
        n.cpus += c
        n.gpus += g
    return out


def _secs(s: float) -> str:
    return f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


@dataclass
class _Head:
    """The first job that does not fit, and what decides whether a job behind it may start: `shadow`, the seconds
    until it could start (None: not known); `later`, the capacity it will have then besides what is free now (jobs
    that end, nodes being added, preemptible jobs stopped); `view`, the capacity free now as it will be when it starts
    (what jobs started behind it that end before then take is not taken out)."""

    id: str
    need: Need
    shadow: float | None
    later: list[Node]
    view: list[Node]

    def safe_beside(self, need: Need, left: list[Node]) -> list[Node] | None:
        """`view` after a one-worker job of `need` that runs past the head's start took its place, if the head
        still fits on whichever node Ray puts it (each node that holds it is tried), else None. The view returned
        takes the job's need out of every such node, since which one Ray picks is not known. A job of several
        workers is never let in this way: where Ray puts the others is not known either."""
        if need.workers != 1:
            return None
        spots = [n for n in left if n.cpus + 1e-9 >= need.cpus and n.gpus + 1e-9 >= need.gpus]
        for spot in spots:  # the caller knows there is one: the job fits now
            view = _sum(self.view, {spot.id: (-need.cpus, -need.gpus)})
            if any(n.cpus < -1e-9 or n.gpus < -1e-9 for n in view) or _reserve(self.need, view, self.later) is None:
                return None
        return _sum(self.view, {n.id: (-need.cpus, -need.gpus) for n in spots})


def decide(queue: list, free: list[Node], *, types: list[NodeType] = (), others: list[Node] = (),
           running: list[Running] = (), backfill: bool = True, lead_s: float = 0.0) -> Decision:
    """queue: Queued jobs (or (job id, Need) pairs) in dispatch order (priority, then age). free: what each node has
    free now, as Ray says (other users' work taken out). types: the node types the autoscaler can start. others:
    what other Ray users hold on each node (for the reasons, and for a head that needs it to end). running: the
    runner's own running jobs.
    backfill=False: strict first in, first out (the jobs behind the head wait). lead_s: how long before the head
    could start the preemptible jobs in its way are stopped (the time a checkpoint takes), so that it starts on
    time."""
    queue = [q if isinstance(q, Queued) else Queued(q[0], q[1]) for q in queue]
    d = Decision([], {})
    left = _copy(free)
    room = list(types)  # node types, their counts raised by each addition planned for a waiting job
    head: _Head | None = None
    running = list(running)
    for q in queue:
        pos = len(d.waiting) + 1
        if head is None:
            after = place(q.need, left)
            if after is not None:
                d.start.append(q.id)
                d.rules[q.id] = FIRST_FIT
                # started in this pass: it holds what it took, until its bound
                running.append(Running(q.id, taken(left, after), q.bound_s, key=q.key))
                left = after
                continue
            head, why = _plan_head(q, left, room, others, running, d, lead_s)
            d.head, d.head_in = head.id, head.shadow
            d.waiting[q.id] = (pos, why)
            continue
        after = place(q.need, left)
        rule = None
        if after is not None and backfill:
            starting = head.shadow is not None and head.shadow <= lead_s  # capacity is being freed for the head
            beside = None
            if q.preemptible and not starting:
                rule = f"backfilled ahead of {head.id}: preemptible, stopped at a checkpoint when {head.id} can start"
            elif q.bound_s is not None and head.shadow is not None and q.bound_s <= head.shadow:
                rule = (f"backfilled ahead of {head.id}: ends within {_secs(q.bound_s)} ({q.bound_from}), before "
                        f"{head.id} could start (in {_secs(head.shadow)})")
            elif (beside := head.safe_beside(q.need, left)) is not None:
                rule = f"backfilled ahead of {head.id}: fits beside what {head.id} will take when it starts"
                head.view = beside
        if rule:
            d.start.append(q.id)
            d.rules[q.id] = rule
            left = after
            continue
        added = grow(q.need, left, room) if room and backfill else None
        if added:
            d.requests[q.id] = added
            room = _count(room, added)
            d.waiting[q.id] = (pos, f"waiting for the cluster to add {_nodes_words(added)} (behind {head.id})")
        elif after is None:
            d.waiting[q.id] = (pos, f"waiting behind {head.id}")
        elif not backfill:
            d.waiting[q.id] = (pos, f"waiting behind {head.id} (first in, first out)")
        elif q.bound_s is None:
            d.waiting[q.id] = (pos, f"waiting behind {head.id}: it fits now, but has no bound (resources.max_minutes"
                                    f" or earlier runs) and is not preemptible, so it could delay {head.id}")
        else:
            when = f"in {_secs(head.shadow)}" if head.shadow is not None else "at a time not known"
            d.waiting[q.id] = (pos, f"waiting behind {head.id}: it would run {_secs(q.bound_s)} ({q.bound_from}), "
                                    f"past when {head.id} could start ({when})")
    return d


def _count(types: list[NodeType], added: list[str]) -> list[NodeType]:
    """The types after nodes planned for a waiting job: each takes a node being launched first, else a new one."""
    out = []
    for t in types:
        n = added.count(t.name)
        on_way = min(n, t.pending)
        out.append(replace(t, count=t.count + n - on_way, pending=t.pending - on_way))
    return out


def _nodes_words(added: list[str]) -> str:
    kinds = sorted(set(added))
    return " and ".join(f"{'a node' if added.count(k) == 1 else f'{added.count(k)} nodes'} of type {k}"
                        for k in kinds)


def _reserve(need: Need, left: list[Node], more: list[Node]) -> list[Node] | None:
    """`left` after setting aside what `need` takes of it when it starts on `left` plus `more` (capacity that is
    not free now but will be, by node id: jobs that end, nodes being added). Each worker goes where the capacity
    free now holds it if it can, and takes what is free now before what comes later. None if it does not fit even
    so. What is left of `left` is what a job that runs past the head's start may take without delaying it."""
    now = {n.id: n for n in _copy(left)}
    ids = list(now) + [m.id for m in more if m.id not in now]
    later = {n.id: n for n in _sum([Node(i, 0.0) for i in dict.fromkeys(ids)], more)}

    def room(i):
        a, b = now.get(i), later[i]
        return (a.cpus if a else 0.0) + b.cpus, (a.gpus if a else 0.0) + b.gpus

    def taken_now(i):  # what a worker would take of the capacity free now: the more, the less it waits on
        a = now.get(i)
        return (min(need.gpus, a.gpus), min(need.cpus, a.cpus)) if a else (0.0, 0.0)

    for _ in range(need.workers):
        fits = [i for i in later if room(i)[0] + 1e-9 >= need.cpus and room(i)[1] + 1e-9 >= need.gpus]
        if not fits:
            return None
        i = max(fits, key=lambda i: (taken_now(i), room(i)[1] if need.gpus else -room(i)[1], room(i)[0]))
        for res, want in (("cpus", need.cpus), ("gpus", need.gpus)):
            a = now.get(i)
            take = min(want, getattr(a, res)) if a else 0.0
            if a:
                setattr(a, res, getattr(a, res) - take)
            setattr(later[i], res, getattr(later[i], res) - (want - take))
    return [now[n.id] for n in left]


def _as_nodes(held: dict[str, tuple[float, float]]) -> list[Node]:
    return [Node(node, c, g) for node, (c, g) in held.items()]


def _plan_head(q: Queued, left: list[Node], types: list[NodeType], others: list[Node], running: list[Running],
               d: Decision, lead_s: float) -> tuple[_Head, str]:
    """The blocked head's plan: ask for nodes if the autoscaler can add what it needs; else preempt preemptible jobs
    behind it if that lets it start now; else wait for running jobs to end (preempting, `lead_s` before it could
    start, the preemptible jobs still in its way). Returns what the jobs behind it may use and the reason it
    waits."""
    if types:
        added = grow(q.need, left, types)
        if added:
            d.requests[q.id] = added
            kinds = {t.name: t for t in types}
            types[:] = _count(types, added)
            new = [Node(f"(new {t} {i})", kinds[t].cpus, kinds[t].gpus, type=t) for i, t in enumerate(added)]
            return _Head(q.id, q.need, None, new, _copy(left)), \
                f"waiting for the cluster to add {_nodes_words(added)}"
    chosen = _preempt_for(q, left, running, d)
    if chosen:
        later = [n for r in chosen for n in _as_nodes(r.held)]
        names = ", ".join(r.id for r in chosen)
        return _Head(q.id, q.need, 0.0, later, _copy(left)), \
            f"waiting for preemptible job{'s' if len(chosen) > 1 else ''} {names} to checkpoint and stop"
    # the runner's own running jobs end, soonest bound first; unbounded ones last (when, nobody knows)
    ordered = sorted((r for r in running if not r.yields_to(q)), key=lambda r: (r.ends_in is None, r.ends_in or 0.0))
    # preemptible jobs behind it give their resources back whenever it can start
    released = [n for r in running if r.yields_to(q) for n in _as_nodes(r.held)]
    ended: list[Node] = []
    shadow = None
    for r in ordered:
        ended += _as_nodes(r.held)
        if _reserve(q.need, left, released + ended) is not None:
            shadow = r.ends_in  # None where it takes an unbounded job's end
            break
    else:  # not even when all of them end: other users' work must end too
        ended += others
    if shadow is not None and shadow <= lead_s:  # it starts within the time a checkpoint takes
        _preempt_for(q, _sum(left, ended), running, d)
    why = free_words(q.need, left, others)
    if shadow is not None:
        shadow = max(0.0, shadow)
        why += f"; could start in {_secs(shadow)}, when running jobs reach their bounds"
    return _Head(q.id, q.need, shadow, released + ended, _copy(left)), why


def _preempt_for(q: Queued, pool: list[Node], running: list[Running], d: Decision) -> list[Running] | None:
    """The preemptible jobs (newest first, as the caller orders them) to stop so that q fits on pool plus what they
    hold, marked in d.preempt; None (nothing marked) if it does not fit even without all of them. Of those taken,
    each that q fits without (given the others kept) is left to run."""
    chosen = []
    for r in (r for r in running if r.yields_to(q)):
        if place(q.need, _sum(pool, _held(chosen))) is not None:
            break
        chosen.append(r)
    if not chosen or place(q.need, _sum(pool, _held(chosen))) is None:
        return None
    for r in list(chosen):
        rest = [x for x in chosen if x is not r]
        if place(q.need, _sum(pool, _held(rest))) is not None:
            chosen = rest
    for r in chosen:
        d.preempt[r.id] = f"preempted for {q.id}, which can start on its resources"
    return chosen


def _held(running: list[Running]) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    for r in running:
        for node, (c, g) in r.held.items():
            oc, og = out.get(node, (0.0, 0.0))
            out[node] = (oc + c, og + g)
    return out
