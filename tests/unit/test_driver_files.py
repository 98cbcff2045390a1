"""What the driver does with a job folder before a retry from the start, and which checkpoints it would resume."""

import json

from jobs.driver import set_aside
from jobs.jobdir import checkpoints_newest_first as earlier_checkpoints


def test_a_fresh_retry_sets_the_earlier_attempt_aside(tmp_path):
    ck = tmp_path / "checkpoints" / "checkpoint_a"
    ck.mkdir(parents=True)
    (ck / "state.pt").write_bytes(b"x")
    (ck / "step.json").write_text(json.dumps({"step": 4}))
    (tmp_path / "failure.txt").write_text("worker 0 ran out of memory")
    (tmp_path / "recipe.yaml").write_text("name: x\n")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert earlier_checkpoints(tmp_path) == [str(ck)]
    dest = set_aside(tmp_path)
    assert dest.parent == tmp_path / "earlier"
    assert sorted(p.name for p in dest.iterdir()) == ["checkpoints", "failure.txt"]
    assert earlier_checkpoints(tmp_path) == [], "nothing left to resume from"
    assert (tmp_path / "recipe.yaml").exists() and (tmp_path / "metrics.jsonl").exists(), "the job's record stays"
    assert set_aside(tmp_path) is None, "nothing to move: nothing moved"


def test_the_driver_relays_rank_0s_warnings_into_the_jobs_events(tmp_path):
    """warnings.jsonl has one writer (rank 0, on any node) and events.jsonl one (the driver): the driver's follower
    copies each new warning across, skips a torn line, and never copies an earlier attempt's again."""
    from jobs.progress import Follow

    (tmp_path / "warnings.jsonl").write_text('{"time": 1, "kind": "lr_zero", "step": 3, "message": "before"}\n')
    follow = Follow(tmp_path, interval=0.05)  # an earlier attempt's warning is already there
    follow.start()
    with (tmp_path / "warnings.jsonl").open("a") as f:
        f.write('{"time": 2, "kind": "grad_norm", "step": 9, "message": "the gradient norm exploded at step 9"}\n')
        f.write("\0\0\0\n")
        f.write('{"time": 3, "kind": "baseline", "step": 12, "message": "the model does not beat its baseline"}\n')
    follow.stop()
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["level"], e["kind"], e["step"], e["message"]) for e in events] == [
        ("warning", "grad_norm", 9, "the gradient norm exploded at step 9"),
        ("warning", "baseline", 12, "the model does not beat its baseline")]
