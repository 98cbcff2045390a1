"""The runner leans on three private names of its libraries, where no public way exists yet. Each is exercised here
through the runner's own code with the library's real objects, so that an upgrade that moves one fails this test by
name, not a job at run time:

- Ray Train V2's `ControllerCallback` (ray.train.v2._internal) and a controller state's `_state_type`: the driver's
  callback turns the worker group's restarts into RETRYING / RUNNING events (jobs/driver.py).
- Accelerate's `GradientState._set_sync_gradients`: with DeepSpeed the loop tells Accelerate which micro-batch
  closes an accumulation (jobs/train.py), as Accelerate's own `accumulate` does inside.
"""

import json


def test_ray_train_controller_states_reach_the_drivers_callback(tmp_path):
    from ray.train.v2._internal.execution.callback import ControllerCallback
    from ray.train.v2._internal.execution.controller.state import RestartingState, RunningState, SchedulingState
    from ray.train.v2.api.exceptions import WorkerGroupError

    from jobs.driver import _lifecycle_callback

    cb = _lifecycle_callback(tmp_path, max_failures=2)
    assert isinstance(cb, ControllerCallback)
    died = RuntimeError("The node running worker 1 died unexpectedly")
    lost = WorkerGroupError(f"worker 1 failed:\n{died}", {1: died})
    for before, after in ((SchedulingState(scaling_decision=None), RunningState()),  # the first start: no event
                          (RunningState(), RestartingState(training_failed_error=lost)),
                          (RestartingState(training_failed_error=lost), RunningState())):
        cb.after_controller_state_update(before, after)
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["state"] for e in events] == ["RETRYING", "RUNNING"]
    assert "restart 1 of 2" in events[0]["message"] and "died unexpectedly" in events[0]["message"]


def test_accelerate_takes_the_loops_sync_boundary():
    """What the Accelerator's `sync_gradients` (and DeepSpeed's step) reads. No Accelerator is made here: its state
    is one per process, and the strategy tests make their own."""
    from accelerate.state import GradientState

    state = GradientState()
    try:
        state._set_sync_gradients(False)
        assert state.sync_gradients is False
    finally:
        state._set_sync_gradients(True)
    assert state.sync_gradients is True


def test_the_private_names_are_where_the_runner_uses_them():
    """Read from the source, so that a new use of a private name of a library is added here knowingly."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    uses = {f.relative_to(root).as_posix(): f.read_text() for f in (root / "jobs").glob("*.py")}
    found = sorted(name for name, text in uses.items()
                   for marker in ("ray.train.v2._internal", "._state_type", "._set_sync_gradients") if marker in text)
    assert found == ["jobs/driver.py", "jobs/driver.py", "jobs/train.py"], found
