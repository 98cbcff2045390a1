"""What the driver does with a job folder before a retry from the start, and which checkpoints it would resume."""

import json

from jobs.driver import earlier_checkpoints, set_aside


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
