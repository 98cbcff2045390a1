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


def test_the_progress_bar_on_a_terminal_shows_the_step_of_the_total_and_every_validation_figure(tmp_path):
    """On a terminal (a rich Console told it is one) the bar reads 'starting the workers' until the first step,
    then 'step 3/10', never 'step 0/None'; each evaluation is a line with every figure."""
    import io
    import time

    from rich.console import Console

    from jobs.progress import Follow

    screen = io.StringIO()
    follow = Follow(tmp_path, interval=0.05, console=Console(file=screen, force_terminal=True, width=120))
    follow.start()
    time.sleep(0.3)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        for step in (1, 2, 3):
            f.write(json.dumps({"step": step, "loss": 1.0 / step, "samples_per_s": 8.0, "total_steps": 10}) + "\n")
        f.write(json.dumps({"step": 3, "epoch": 0.3, "split": "validation", "loss": 0.5, "accuracy": 0.9,
                            "macro_f1": 0.875, "examples": 40, "time": 1.0}) + "\n")
    time.sleep(0.3)
    follow.stop()
    err = screen.getvalue()
    assert "\x1b[" in err, "rich drew a bar (a terminal's escapes), not plain lines"
    assert "starting the workers" in err and "step 3/10" in err and "loss 0.3333" in err
    assert "None" not in err and "step 0/" not in err
    assert "step 3: validation loss=0.5000 accuracy=0.9000 macro_f1=0.8750" in err
