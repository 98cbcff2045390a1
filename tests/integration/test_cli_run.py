"""`runner run` as a person runs it: Ctrl-C stops every process of the job, and `--resume` goes on from the last
checkpoint at the step and data position it recorded. The CLI starts its own local Ray here (token auth on)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny import faults, keyword_rows, tiny_model_dir

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def processes_with(marker: str) -> list[str]:
    """Every live process whose environment carries marker: the CLI, the driver, Ray's servers and workers."""
    found = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in env.read_bytes():
                found.append((env.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:100])
        except OSError:
            pass
    return found


def wait_for(cond, what: str, timeout: float = 240):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def steps_logged(job: Path) -> list[int]:
    path = job / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(x)["step"] for x in lines if x.strip() and '"split"' not in x]


def test_ctrl_c_leaves_no_process_and_resume_goes_on(tmp_path, tokenizer):
    model = tiny_model_dir(tmp_path / "bert", "bert", tokenizer, weights=True)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keyword_rows(120)))
    (tmp_path / "recipe.yaml").write_text(
        f"name: cc\nmodel:\n  name: {model}\ntask: classification\ndata:\n  train: data.jsonl\n  max_seq_len: 16\n"
        "train:\n  epochs: 2\n  batch_size: 4\n  lr: 0.003\n  checkpoint_every: 4\n  eval_every: 4\n"
        + faults(pause_after_step=6, hold_file="hold", record_seen="seen")
        + "resources:\n  workers: 2\n  cpus_per_worker: 1\n")
    marker = f"RUNNER_TEST_MARK={os.getpid()}-{time.time_ns()}"
    env = {**os.environ, "RUNNER_HOME": str(tmp_path / "home"), marker.split("=")[0]: marker.split("=")[1]}
    env.pop("RAY_ADDRESS", None)
    # started as a shell starts a background job (SIGINT ignored): Ctrl-C must work all the same
    cli = subprocess.Popen([sys.executable, "-m", "runner.cli", "run", str(tmp_path / "recipe.yaml")], env=env,
                           cwd=ROOT, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_for(lambda: list((tmp_path / "home" / "artifacts").glob("cc-*")), "the job folder")
        job = next((tmp_path / "home" / "artifacts").glob("cc-*"))
        (job / "hold").touch()  # the first run holds after step 6 while it is there (Ray takes longer to start)
        wait_for(lambda: 6 in steps_logged(job) and list((job / "checkpoints").glob("checkpoint_*")),
                 "step 6 and a checkpoint")
        running = processes_with(marker)
        assert len(running) >= 5, f"the job's processes were found while it ran: {running}"
        cli.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends the foreground process
        _, err = cli.communicate(timeout=90)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 130, err
    assert f"job {job.name}: cancelled" in err and f"runner run --resume {job.name}" in err
    wait_for(lambda: not processes_with(marker), "every process of the job to end", timeout=10)
    assert not (job / "model").exists() and not (job / "eval.json").exists()

    (job / "hold").unlink()  # the resumed run passes step 6 again without a pause
    out = subprocess.run([sys.executable, "-m", "runner.cli", "run", "--resume", job.name], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr
    assert "going on from checkpoint_" in out.stderr and f"job {job.name} SUCCEEDED" in out.stdout
    assert "resumed from checkpoint at step 4 " in (job / "train.log").read_text()
    n = json.loads((job / "manifest.json").read_text())["rows"]["train"]  # 120 less the validation and test split
    total = 2 * -(-n // 8)  # 2 epochs of 2 workers x batch 4
    steps = steps_logged(job)
    assert steps == list(range(1, 7)) + list(range(5, total + 1)), "steps 5-6 again after the checkpoint at 4"
    lrs = {m["step"]: m["lr"] for m in map(json.loads, (job / "metrics.jsonl").read_text().splitlines())
           if "split" not in m}  # a step's last record: the resumed run's
    want = [0.003 * (total - (s - 1)) / total for s in range(1, total + 1)]  # linear, no warm-up, by hand
    assert [lrs[s] for s in range(1, total + 1)] == pytest.approx(want, rel=1e-9), "the schedule resumed at step 4"
    # data position: epoch 0 saw every train row, and only the rows of steps 5-6 (2 steps x 2 ranks x 4) twice
    seen = {0: [], 1: []}
    for rank in (0, 1):
        for line in (job / f"seen.{rank}").read_text().splitlines():
            epoch, *rows = map(int, line.split())
            seen[epoch] += rows
    assert sorted(set(seen[0])) == list(range(n)) and len(seen[0]) == n + 16
    assert sorted(seen[1]) == list(range(n))
    assert json.loads((job / "eval.json").read_text())["steps"] == total
    assert (job / "model" / "config.json").exists()
    assert not processes_with(marker), "the resumed run left nothing behind either"

    again = subprocess.run([sys.executable, "-m", "runner.cli", "run", "--resume", job.name], env=env, cwd=ROOT,
                           capture_output=True, text=True)
    assert again.returncode == 2 and f"job {job.name} has already finished" in again.stderr
