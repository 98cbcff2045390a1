"""Queue decisions: what starts, in which order, why the rest waits, what is refused at submit."""

import random

from runner.queue import Need, Node, decide, place, refusal


def two_gpu_nodes():
    return [Node("a", cpus=16, gpus=2), Node("b", cpus=16, gpus=2)]


def test_a_worker_must_fit_on_one_node():
    assert place(Need(2, 4, 2), two_gpu_nodes()) is not None  # one worker on each node
    assert place(Need(1, 4, 4), two_gpu_nodes()) is None  # 4 GPUs exist, but not on one node
    assert refusal(Need(1, 4, 4), two_gpu_nodes()) == (
        "needs 1 worker x (4 CPUs + 4 GPUs), which this cluster can never hold (2 nodes: 2 x (16 CPUs, 2 GPUs))")
    assert refusal(Need(4, 8, 1), two_gpu_nodes()) is None
    assert refusal(Need(3, 1, 0), [Node("laptop", cpus=2)]) == (
        "needs 3 workers x (1 CPU), which this cluster can never hold (1 node: 1 x (2 CPUs))")


def test_priority_then_age_and_no_overtaking():
    free = two_gpu_nodes()
    queue = [("big", Need(2, 4, 2)), ("small", Need(1, 2, 1)), ("tiny", Need(1, 1, 0))]
    d = decide(queue, free, backfill=False)
    # big takes all 4 GPUs; small then waits, and tiny waits behind it rather than overtaking
    assert d.start == ["big"]
    assert d.waiting == {"small": (1, "needs 1 GPUs, 0 free"),
                         "tiny": (2, "waiting behind small (first in, first out)")}
    # with backfill, tiny starts: it takes CPUs that small leaves free even when it starts (big's GPUs come back)
    d = decide(queue, free)
    assert d.start == ["big", "tiny"] and "fits beside what small will take" in d.rules["tiny"]


def test_reasons_name_what_is_missing():
    free = [Node("a", cpus=16, gpus=2)]
    d = decide([("j", Need(2, 2, 2))], free)
    assert d.waiting == {"j": (1, "needs 4 GPUs, 2 free")}
    d = decide([("c", Need(3, 2, 0))], [Node("a", cpus=4)])
    assert d.waiting == {"c": (1, "needs 6 CPUs, 4 free")}
    # enough in total, but split across nodes so that no node holds one worker
    d = decide([("s", Need(1, 3, 0))], [Node("a", cpus=2), Node("b", cpus=2)])
    assert d.waiting["s"] == (1, "needs 1 worker x (3 CPUs); free now: a (2 CPUs), b (2 CPUs)")


def test_never_over_committed_over_a_simulated_day():
    """Jobs arrive and end at random; at every step what runs fits in each node's capacity, jobs start in
    queue order, and every job that fits the empty cluster starts eventually."""
    rng = random.Random(0)
    capacity = {"a": (16.0, 2.0), "b": (8.0, 4.0)}
    running: dict[str, tuple[Need, list[tuple[str, float, float]]]] = {}
    queue: list[tuple[str, Need]] = []
    started_order, submitted = [], 0
    for tick in range(400):
        if submitted < 120 and rng.random() < 0.5:
            need = Need(rng.randint(1, 3), rng.choice([1, 2, 4]), rng.choice([0, 0, 1, 2]))
            queue.append((f"j{submitted}", need))
            submitted += 1
        for job_id in [j for j in running if rng.random() < 0.2]:
            del running[job_id]
        used = {k: [0.0, 0.0] for k in capacity}
        for need, where in running.values():
            for node, c, g in where:
                used[node][0] += c
                used[node][1] += g
        free = [Node(k, capacity[k][0] - used[k][0], capacity[k][1] - used[k][1]) for k in capacity]
        assert all(n.cpus >= -1e-9 and n.gpus >= -1e-9 for n in free), "over-committed"
        d = decide(queue, free, backfill=False)
        assert d.start == [j for j, _ in queue[: len(d.start)]], "starts follow the queue order"
        left = free
        for job_id in d.start:
            need = dict(queue)[job_id]
            after = place(need, left)
            where = [(a.id, a.cpus - b.cpus, a.gpus - b.gpus) for a, b in zip(left, after)]
            running[job_id] = (need, where)
            left = after
            started_order.append(job_id)
        queue = [(j, n) for j, n in queue if j not in d.start]
    assert started_order == sorted(started_order, key=lambda j: int(j[1:])), "first come, first served"
    assert len(started_order) > 60


# --- the autoscaler's node types, other users, backfill --------------------------------------------------------------

from runner.queue import NodeType, Queued, Running  # noqa: E402
from runner.timeline import Sim, SimJob, simulate  # noqa: E402


def gpu2(count=0):
    return NodeType("gpu2", cpus=4, gpus=2, max_count=2, count=count)


def test_a_job_that_a_node_type_could_hold_waits_for_that_node_and_asks_for_it():
    head = [Node("head", cpus=2)]
    queue = [("one", Need(1, 1, 2)), ("two", Need(1, 1, 2)), ("three", Need(1, 1, 2))]
    d = decide(queue, head, types=[gpu2()])
    assert d.start == []
    assert d.waiting["one"] == (1, "waiting for the cluster to add a node of type gpu2")
    # the second gets the type's second node; the third finds no node type left to add (max 2) and waits its turn
    assert d.requests == {"one": ["gpu2"], "two": ["gpu2"]}
    assert d.waiting["two"] == (2, "waiting for the cluster to add a node of type gpu2 (behind one)")
    assert d.waiting["three"] == (3, "waiting behind one")
    # one node up: the first job starts on it, the second still asks for its own
    up = head + [Node("n1", cpus=4, gpus=2, type="gpu2")]
    d = decide(queue, up, types=[gpu2(count=1)])
    assert d.start == ["one"] and d.requests == {"two": ["gpu2"]}
    # two workers of 2 GPUs each: two nodes of the type at once
    d = decide([("pair", Need(2, 1, 2))], head, types=[gpu2()])
    assert d.requests == {"pair": ["gpu2", "gpu2"]}
    assert d.waiting["pair"][1] == "waiting for the cluster to add 2 nodes of type gpu2"


def test_refused_only_when_no_node_type_could_ever_hold_it_and_the_types_are_named():
    head = [Node("head", cpus=2)]
    assert refusal(Need(1, 1, 2), head, [gpu2()]) is None
    assert refusal(Need(2, 1, 2), head, [gpu2()]) is None  # both nodes of the type
    assert refusal(Need(3, 1, 2), head, [gpu2()]) is not None  # a third node is past max_count
    assert refusal(Need(1, 1, 4), head, [gpu2()]) == (
        "needs 1 worker x (1 CPU + 4 GPUs), which this cluster can never hold (1 node: 1 x (2 CPUs); node types it "
        "can add: gpu2 (4 CPUs, 2 GPUs; max 2, 0 now))")
    # the nodes already up count once: one up, one more can start
    assert refusal(Need(2, 1, 2), head + [Node("n1", 4, 2, type="gpu2")], [gpu2(count=1)]) is None
    assert refusal(Need(3, 1, 2), head + [Node("n1", 4, 2, type="gpu2")], [gpu2(count=1)]) is not None


def test_capacity_another_ray_user_holds_is_named_as_theirs():
    # node a has 2 GPUs; another user's actor holds one of them: Ray's available resources say 1 free
    free = [Node("a", cpus=8, gpus=1)]
    d = decide([("j", Need(1, 1, 2))], free, others=[Node("a", cpus=1, gpus=1)])
    assert d.start == []
    assert d.waiting["j"][1] == ("needs 2 GPUs, 1 free; the cluster's free GPUs are held by others (1 GPUs, "
                                 "1 CPUs held by other Ray users)")
    # what is missing is not theirs (the job needs more than the node has even without them): no such words
    d = decide([("k", Need(1, 1, 4))], free, others=[Node("a", cpus=1, gpus=1)])
    assert "held by others" not in d.waiting["k"][1]


def whole_cluster():
    return [Node("a", cpus=8, gpus=2), Node("b", cpus=8, gpus=2)]


def test_backfill_rules_on_a_busy_cluster():
    """Node b runs a job bound to end in 600 s; the head needs both nodes. Hand-worked: the head could start in
    600 s; a 300 s job fits before that, a 900 s one would not, an unbounded one could delay it, a preemptible one
    may start and is preempted the moment the head fits without it."""
    free = [Node("a", cpus=8, gpus=2), Node("b", cpus=8, gpus=0)]
    running = [Running("r", {"b": (1.0, 2.0)}, ends_in=600.0)]
    queue = [Queued("head", Need(2, 1, 2)), Queued("long", Need(1, 1, 1), 900, "resources.max_minutes"),
             Queued("short", Need(1, 1, 1), 300, "resources.max_minutes"), Queued("open", Need(1, 1, 1)),
             Queued("spot", Need(1, 1, 1), preemptible=True)]
    d = decide(queue, free, running=running)
    assert d.start == ["short", "spot"]
    assert d.rules["short"] == ("backfilled ahead of head: ends within 5 min (resources.max_minutes), before head "
                                "could start (in 10 min)")
    assert d.rules["spot"].startswith("backfilled ahead of head: preemptible")
    assert d.waiting["head"][1].endswith("could start in 10 min, when running jobs reach their bounds")
    assert "would run 15 min (resources.max_minutes), past when head could start (in 10 min)" in d.waiting["long"][1]
    assert "has no bound" in d.waiting["open"][1]
    # 600 s later: r and short have ended; spot holds one GPU of a: the head fits only without it -> preempted
    free = [Node("a", cpus=7, gpus=1), Node("b", cpus=8, gpus=2)]
    d = decide(queue[:1] + queue[1:2] + queue[3:4], free, running=[Running("spot", {"a": (1.0, 1.0)},
                                                                           preemptible=True)])
    assert d.preempt == {"spot": "preempted for head, which can start on its resources"} and d.start == []
    # without backfill nothing behind the head starts
    d = decide(queue, [Node("a", cpus=8, gpus=2), Node("b", cpus=8, gpus=0)], running=running, backfill=False)
    assert d.start == []


def test_on_a_fake_clock_backfill_keeps_the_head_on_time_and_fills_the_idle_gpus():
    """The scenario above on a timeline: the head starts when it would have without backfill (600 s), the bounded
    and preemptible jobs ran on the idle GPUs meanwhile, the preempted one resumed and finished its work."""
    jobs = [SimJob("r", Need(1, 1, 2), 0, 600, bound_s=600), SimJob("head", Need(2, 1, 2), 1, 300),
            SimJob("short", Need(1, 1, 1), 2, 250, bound_s=300), SimJob("open", Need(1, 1, 1), 3, 100),
            SimJob("spot", Need(1, 1, 1), 4, 2000, preemptible=True)]
    fifo = simulate(jobs, whole_cluster(), backfill=False, tick=1)
    back = simulate(jobs, whole_cluster(), backfill=True, tick=1)
    assert fifo.starts["head"] == back.starts["head"] == [600.0]
    assert back.starts["short"] == [2.0] and fifo.starts["short"][0] > 600
    assert len(back.starts["spot"]) == 2 and back.preempted == {"spot": 1}
    # stopped one tick (the time a checkpoint takes) before the head could start, then went on where it stopped
    assert back.ends["spot"] - back.starts["spot"][1] == 2000 - (599 - 4)
    assert back.utilisation(4) > fifo.utilisation(4)


def random_day(rng, slack: int, kinds=("bounded", "bounded", "open", "spot")) -> list[SimJob]:
    jobs = []
    for i in range(14):
        kind = rng.choice(kinds)
        work = float(rng.randint(20, 200))
        jobs.append(SimJob(f"j{i}", Need(rng.randint(1, 2), 1, rng.choice([1, 2])), float(rng.randint(0, 150)),
                           work, bound_s=work + rng.randint(0, slack) if kind == "bounded" else None,
                           preemptible=kind == "spot"))
    return jobs


def heads_against_fifo(jobs: list[SimJob]) -> list[tuple[str, float, float, float | None]]:
    """(job, its start under backfill, its start without backfill from the moment it became the head, the start
    its plan promised then) for each job that was ever the blocked head."""
    sim = Sim(jobs, whole_cluster(), backfill=True, tick=5)
    checks = []
    while not sim.done():
        before = set(sim.out.head_starts)
        reference = sim.fifo_from_here()  # the state before this tick's decisions, going on without backfill
        sim.step()
        for new in set(sim.out.head_starts) - before:
            checks.append((new, sim.out.head_starts[new][0], reference.run().starts[new][0]))
    assert checks, "no job was ever blocked: the day tests nothing"
    return [(j, min(t for t in sim.out.starts[j] if t >= became), fifo, sim.out.promised[j])
            for j, became, fifo in checks]


def test_over_random_days_no_head_starts_later_than_without_backfill():
    """Every job bounded by its true run time: at each moment a job becomes the blocked head, its start under
    backfill is compared with a run of the same state without backfill from that moment (strict first in, first
    out): never later. (Preemptible jobs: the fake-clock scenario above; jobs that end before their bounds or have
    none: the next test.)"""
    rng = random.Random(7)
    checked = 0
    for _ in range(12):
        for job_id, start, fifo, _ in heads_against_fifo(random_day(rng, 0, ("bounded",))):
            assert start <= fifo, (job_id, start, fifo)
            checked += 1
    assert checked > 20


def test_with_jobs_that_end_early_a_head_still_starts_by_what_its_plan_promised():
    """Bounds above the true run times, and jobs with no bound (their ends unknown until they come): a job
    backfilled on the bounds may hold capacity the head could have had sooner, as in Slurm's backfill. The head still
    starts by the start its plan promised when it became the head, where the bounds gave one (where they did not,
    it waits on a job whose end nobody knows, and nothing can be promised)."""
    rng = random.Random(11)
    promised_kept = 0
    for _ in range(12):
        for job_id, start, fifo, promised in heads_against_fifo(random_day(rng, slack=60)):
            if promised is not None:
                assert start <= promised + 5, (job_id, start, promised)  # the clock moves in ticks of 5 s
                promised_kept += 1
    assert promised_kept > 5


def test_a_node_being_launched_is_used_not_asked_for_again_and_the_request_stands():
    # the type's one node is being launched for the job: it still waits for it (the request is kept, not dropped
    # for want of room), and a second job finds no room left
    launching = NodeType("gpu2", cpus=4, gpus=2, max_count=1, count=1, pending=1)
    d = decide([("one", Need(1, 1, 2)), ("two", Need(1, 1, 2))], [Node("head", cpus=2)], types=[launching])
    assert d.requests == {"one": ["gpu2"]}
    assert d.waiting["one"][1] == "waiting for the cluster to add a node of type gpu2"
    assert d.waiting["two"][1] == "waiting behind one"


def test_only_the_preemptible_jobs_in_the_heads_way_are_preempted():
    free = [Node("a", cpus=8, gpus=0), Node("b", cpus=8, gpus=0)]
    running = [Running("on-a", {"a": (1.0, 2.0)}, preemptible=True, key=(0, 5)),  # newest first
               Running("on-b", {"b": (1.0, 2.0)}, preemptible=True, key=(0, 4))]
    # the head needs 2 GPUs on one node: either node would do, so only one job is stopped, not both
    d = decide([Queued("head", Need(1, 1, 2), key=(0, 1))], free, running=running)
    assert len(d.preempt) == 1
    # a preemptible job is never stopped for a job behind it in the queue
    d = decide([Queued("late", Need(1, 1, 2), key=(0, 9))], free, running=running)
    assert d.preempt == {}


def test_a_job_of_several_workers_never_backfills_by_fitting_beside():
    """Where Ray puts its second worker is not known: it could take what the head needs."""
    free = [Node("a", cpus=8, gpus=2), Node("b", cpus=8, gpus=2), Node("c", cpus=8, gpus=0)]
    running = [Running("r", {"c": (1.0, 2.0)})]  # unbounded: the head's start is not known
    queue = [Queued("head", Need(3, 1, 2)), Queued("pair", Need(2, 1, 1)), Queued("one", Need(1, 1, 0))]
    d = decide(queue, free, running=running)
    assert "pair" not in d.start and "could delay head" in d.waiting["pair"][1]
    assert d.start == ["one"], "a CPU-only worker fits beside the head wherever it lands"


def test_a_preemption_frees_what_the_head_needs_not_a_part_of_it():
    """r1 holds 3 CPUs on a, r2 3 on b, r3 1 on each (all preemptible); the head needs 4 CPUs on one node. Stopping
    r3 alone frees 1 a node: not enough. Worked by hand: r3 and one of r1, r2 must stop."""
    free = [Node("a", cpus=0), Node("b", cpus=0)]
    running = [Running("r3", {"a": (1.0, 0.0), "b": (1.0, 0.0)}, preemptible=True),
               Running("r2", {"b": (3.0, 0.0)}, preemptible=True),
               Running("r1", {"a": (3.0, 0.0)}, preemptible=True)]
    d = decide([Queued("head", Need(1, 4, 0))], free, running=running)
    assert set(d.preempt) in ({"r3", "r2"}, {"r3", "r1"}), d.preempt
