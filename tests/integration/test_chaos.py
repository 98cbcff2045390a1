"""The chaos harness (bench/chaos.py) in small, with a fixed plan: on a simulated 3-node cluster, each kind of fault
once while three jobs train, then every job ends with nothing lost, nothing done twice, at most one checkpoint
interval of steps redone after each recovery, and a reason for every failure. bench/chaos.py runs it at size with a
seeded schedule and prints the figures."""

import os
import sys
from pathlib import Path

import pytest

os.environ["RAY_AUTH_MODE"] = "disabled"
pytest.importorskip("ray")
BENCH = str(Path(__file__).resolve().parents[2] / "bench")
sys.path.insert(0, BENCH)
import chaos  # noqa: E402

while BENCH in sys.path:  # off again: spawned processes inherit sys.path, and bench/ is no package of theirs
    sys.path.remove(BENCH)

pytestmark = pytest.mark.slow
# the faults that need a job past its checkpoint first; then cancel, which frees a node for the job that
# down_submit submits (the last job to end: the sooner it starts, the sooner the test ends); kill_server needs
# nothing running
PLAN = ("kill_worker", "torn_line", "kill_driver", "cancel", "remove_node", "down_submit", "kill_server")


def test_jobs_come_through_one_fault_of_each_kind(tmp_path):
    import ray

    c, workers, dashboard = chaos.cluster()
    try:
        out = chaos.run(tmp_path, c, workers, dashboard, jobs=3, faults=len(PLAN), seed=0, every=4, plan=PLAN)
    finally:
        ray.shutdown()
        c.shutdown()
    assert out["faults_by_kind"] == {k: 1 for k in PLAN}, out
    assert out["lost"] == 0 and out["duplicated"] == 0 and out["failed_without_reason"] == 0, out["details"]
    # a restart that goes on from the checkpoint of the step just done redoes nothing and shows no drop: the count
    # of recoveries seen in metrics.jsonl is not fixed; the work redone after each is bounded
    assert out["max_steps_lost"] <= out["checkpoint_interval"], out
    assert out["ended_by_state"].get("CANCELLED") == 1 and out["details"]["notes"] == [], out
    # three jobs, the one submitted again after the refused submit, and one more where all had ended before the
    # plan was through (the harness keeps something running to inject into): every one of them ended
    assert sum(out["ended_by_state"].values()) == out["jobs"] >= 4, out
