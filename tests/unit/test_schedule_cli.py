"""`runner schedule ...` against a real runner server (uvicorn in a thread, no Ray: jobs stay QUEUED): a schedule is
added from a recipe, listed, shown, its next fires named in local time and UTC, paused, triggered by hand,
removed; bad schedules are refused at validation, naming the field."""

import json

import pytest
from typer.testing import CliRunner

from runner.cli import app

RECIPE = ("name: nightly\nmodel:\n  name: m\ntask: classification\ndata:\n  train: train.jsonl\n"
          "schedule:\n  cron: '30 2 * * *'\n  timezone: Europe/Berlin\n  concurrency: {policy}\n")


@pytest.fixture
def cli(server, monkeypatch, tmp_path):
    url = server()
    monkeypatch.setenv("RUNNER_SERVER", url)
    monkeypatch.delenv("RUNNER_TOKEN", raising=False)
    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, list(args), catch_exceptions=False)

    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    return run


def test_schedule_verbs(cli, tmp_path):
    recipe = tmp_path / "nightly.yaml"
    recipe.write_text(RECIPE.format(policy="forbid"))
    out = cli("schedule", "add", str(recipe))
    assert out.exit_code == 0, out.output
    assert "schedule nightly: cron '30 2 * * *' (Europe/Berlin), concurrency forbid" in out.output
    assert "next fire: " in out.output and "T02:30:00+0" in out.output

    again = cli("schedule", "add", str(recipe))
    assert again.exit_code == 1 and "a schedule named 'nightly' exists" in again.output

    listed = json.loads(cli("schedule", "list", "--json").output)["schedules"]
    assert [s["id"] for s in listed] == ["nightly"] and listed[0]["fires"] == []

    nxt = cli("schedule", "next", "nightly", "-n", "3").output.splitlines()
    assert len([x for x in nxt if "T02:30:00" in x]) == 3
    local, utc = nxt[0].split()
    assert utc.endswith("Z") and utc[11:13] in ("00", "01")  # 02:30 in Berlin is 00:30 or 01:30 UTC

    fired = cli("schedule", "trigger", "nightly")
    assert fired.exit_code == 0 and fired.output.startswith("submitted: run now by hand -> job nightly-")
    job_id = fired.output.split("-> job ")[1].split()[0]
    second = cli("schedule", "trigger", "nightly")
    assert second.output.startswith(f"skipped: run now by hand; the previous run {job_id} is still QUEUED "
                                    "(concurrency: forbid)")
    shown = cli("schedule", "show", "nightly").output
    assert "submitted" in shown and "skipped" in shown and f"-> job {job_id}" in shown
    status = json.loads(cli("status", job_id, "--json").output)
    assert status["state"] == "QUEUED"

    assert cli("schedule", "pause", "nightly").output.startswith("schedule nightly paused")
    assert "PAUSED" in cli("schedule", "show", "nightly").output
    assert "next fire" in cli("schedule", "resume", "nightly").output
    assert cli("schedule", "remove", "nightly").output.startswith("schedule nightly removed")
    gone = cli("schedule", "show", "nightly")
    assert gone.exit_code == 1 and "no schedule 'nightly'" in gone.output
    assert json.loads(cli("status", job_id, "--json").output)["id"] == job_id  # its jobs stay


def test_bad_schedules_are_refused_naming_the_field(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.format(policy="sometimes").replace("'30 2 * * *'", "'30 2 * * 9'"))
    out = cli("schedule", "add", str(bad))
    assert out.exit_code == 2
    assert "schedule.cron: '30 2 * * 9': the day-of-week field is wrong" in out.output
    assert "schedule.concurrency" in out.output and "forbid" in out.output
    plain = tmp_path / "plain.yaml"
    plain.write_text(RECIPE.format(policy="forbid").split("schedule:")[0])
    out = cli("schedule", "add", str(plain))
    assert out.exit_code == 2 and "the recipe has no `schedule` section" in out.output
    assert json.loads(cli("schedule", "list", "--json").output)["schedules"] == []


def test_the_server_fires_due_slots_by_itself(tmp_path):
    """The server's own pass (its dispatch thread) fires a slot when the clock reaches it: a fake clock moved past
    02:30 Berlin queues the recipe as a job, once, however many passes follow."""
    import time
    from datetime import datetime, timezone

    from fastapi.testclient import TestClient

    from runner.server import create_app

    now = [datetime(2026, 3, 28, 12, tzinfo=timezone.utc).timestamp()]
    app = create_app(tmp_path / "home", clock=lambda: now[0], interval=0.02)
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "x"}\n')
    with TestClient(app) as c:
        r = c.post("/schedules", json={"recipe": RECIPE.format(policy="forbid"), "base_dir": str(tmp_path)})
        assert r.status_code == 201, r.text
        assert r.json()["next"][0]["local"] == "2026-03-29T03:00:00+02:00"  # 02:30 is skipped that night
        now[0] = datetime(2026, 3, 29, 1, 0, 30, tzinfo=timezone.utc).timestamp()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not c.get("/jobs").json()["jobs"]:
            time.sleep(0.02)
        time.sleep(0.3)  # more passes: nothing twice
        jobs = c.get("/jobs").json()["jobs"]
        fires = c.get("/schedules/nightly").json()["fires"]
    assert len(jobs) == 1 and jobs[0]["state"] == "QUEUED" and jobs[0]["name"] == "nightly"
    assert [(f["outcome"], f["job_id"]) for f in fires] == [("submitted", jobs[0]["id"])]
    assert fires[0]["reason"] == "cron '30 2 * * *' at 2026-03-29T03:00:00+02:00"


def test_a_schedule_keeps_no_secret(cli, tmp_path, monkeypatch):
    import sqlite3

    monkeypatch.setenv("HF_TOKEN", "hf_FromTheEnvironment1")
    for name, token in (("refd", "${HF_TOKEN}"), ("pasted", "hf_PastedIntoTheRecipe2")):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(RECIPE.format(policy="forbid").replace("name: nightly", f"name: {name}")
                          .replace("  name: m\n", f"  name: m\n  token: {token}\n"))
        out = cli("schedule", "add", str(recipe))
        if name == "pasted":
            assert out.exit_code == 2 and "model.token: a token written into a scheduled recipe" in out.output
            assert "hf_PastedIntoTheRecipe2" not in out.output
        else:
            assert out.exit_code == 0, out.output
    shown = cli("schedule", "show", "refd", "--json").output
    db = sqlite3.connect(tmp_path / "home" / "runner.db")
    stored = "\n".join(r[0] for r in db.execute("SELECT recipe FROM schedules"))
    for secret in ("hf_FromTheEnvironment1", "hf_PastedIntoTheRecipe2"):
        assert secret not in stored and secret not in shown
    assert "${HF_TOKEN}" in stored and f"{tmp_path}/train.jsonl" in stored  # paths made absolute
