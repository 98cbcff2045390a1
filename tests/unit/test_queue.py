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
    d = decide(queue, free)
    # big takes all 4 GPUs; small then waits, and tiny waits behind it rather than overtaking
    assert d.start == ["big"]
    assert d.waiting == {"small": (1, "needs 1 GPUs, 0 free"), "tiny": (2, "waiting behind small")}


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
        d = decide(queue, free)
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
