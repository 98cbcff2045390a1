"""The server's routes against what a hostile or broken job folder, URL or page holds (FastAPI's TestClient over
the real app and a real store): links out of a job's folder, a log line of megabytes, script in a query, numbers
past 64 bits, pages of events."""

import json
import os
import re

import pytest
from fastapi.testclient import TestClient

from runner.server import create_app

RECIPE = "name: demo\nmodel:\n  name: m\ntask: classification\ndata:\n  train: t.jsonl\n"


@pytest.fixture
def world(tmp_path):
    home = tmp_path / "home"
    app = create_app(home)
    store = app.state.store
    job_dir = home / "artifacts" / "j-1"
    job_dir.mkdir(parents=True)
    store.add_job("j-1", "demo", RECIPE, str(job_dir), 1, 1, 0)
    return store, job_dir, TestClient(app), tmp_path


def test_no_read_follows_a_link_out_of_the_job_folder(world):
    store, job_dir, c, tmp = world
    secret = tmp / "secret.json"
    secret.write_text(json.dumps({"test": {"accuracy": 1.0}, "key": "not-yours-0451"}))
    (job_dir / "job.log").symlink_to(secret)
    (job_dir / "eval.json").symlink_to(secret)
    (job_dir / "onnx").mkdir()
    (job_dir / "onnx" / "export_report.json").symlink_to(secret)
    (job_dir / "outside").symlink_to(tmp, target_is_directory=True)
    (job_dir / "checkpoints").symlink_to(tmp, target_is_directory=True)
    (job_dir / "real.txt").write_text("mine")
    for s in ("STARTING", "RUNNING", "SUCCEEDED"):
        store.set_state("j-1", s)
    answers = [c.get("/jobs/j-1/logs"), c.get("/jobs/j-1/logs", params={"follow": "true"}), c.get("/jobs/j-1"),
               c.get("/jobs/j-1/artifacts"), c.get("/jobs/j-1/checkpoints"), c.get("/jobs/j-1/files/eval.json"),
               c.get("/jobs/j-1/files/outside/secret.json")]
    for r in answers:
        assert "not-yours-0451" not in r.text, r.url
    assert [f["path"] for f in answers[3].json()["files"]] == ["real.txt"]
    assert "result" not in answers[2].json() and "eval" not in answers[3].json()
    assert answers[5].status_code == answers[6].status_code == 404


def test_the_dispatcher_reads_no_failure_reason_through_a_link(tmp_path):
    from runner.dispatch import Dispatcher
    from runner.queue import Node
    from runner.store import Store

    class Ray:
        def nodes(self):
            return [Node("n", 2, 0)]

        def submit(self, *a, **k):
            pass

        def status(self, sid):
            return "FAILED", "exit 1"

    store = Store(tmp_path / "runner.db")
    job_dir = tmp_path / "j"
    job_dir.mkdir()
    (tmp_path / "secret").write_text("not-yours-0451")
    (job_dir / "failure.txt").symlink_to(tmp_path / "secret")
    store.add_job("j", "j", "name: j\n", str(job_dir), 1, 1, 0)
    d = Dispatcher(store, Ray(), env={})
    d.tick()
    d.tick()
    job = store.get("j")
    assert job.state == "FAILED" and "not-yours" not in job.reason and "exit 1" in job.reason


def test_a_log_line_of_megabytes_comes_in_pieces_and_the_rest_follows(world):
    store, job_dir, c, _ = world
    big = "x" * (3 * 2**20)
    whole = f"first\n{big}\r{big}\nlast line\n"
    (job_dir / "job.log").write_bytes(whole.encode())
    text, offset = "", 0
    for _ in range(10):
        got = c.get("/jobs/j-1/logs", params={"offset": offset}).json()
        if got["offset"] == offset:
            break
        text, offset = text + got["text"], got["offset"]
    assert text == whole
    store.set_state("j-1", "CANCELLED", reason="x")
    stream = c.get("/jobs/j-1/logs", params={"follow": "true"}).text
    assert "data: last line" in stream and "event: end" in stream


def test_page_data_cannot_open_a_comment_or_end_its_script(world):
    store, job_dir, c, _ = world
    store.note("j-1", "</script><!--<script>alert(1)</script>{{logout}}")
    for q in ("<!--<script>", "</script><script>alert(1)//", "{{data}}"):
        page = c.get("/ui/jobs", params={"q": q})
        blob = re.search(r'<script id="data" type="application/json">(.*?)</script>', page.text, re.S).group(1)
        assert "<" not in blob and json.loads(blob)["q"] == q
    page = c.get("/ui/jobs/j-1")
    blob = re.search(r'<script id="data" type="application/json">(.*?)</script>', page.text, re.S).group(1)
    assert "<" not in blob and json.loads(blob)["job"]["id"] == "j-1"


@pytest.mark.parametrize("url", ["/jobs?offset=99999999999999999999", "/jobs/j-1/events?after=99999999999999999999",
                                 "/jobs/j-1/metrics?after_step=99999999999999999999",
                                 "/jobs/j-1/logs?offset=99999999999999999999", "/models?offset=99999999999999999999",
                                 "/models/m/diff?a=1&b=99999999999999999999", "/schedules?offset=-1"])
def test_numbers_past_64_bits_are_refused_not_a_500(world, url):
    r = world[2].get(url)
    assert r.status_code == 422, (url, r.status_code, r.text)


def test_a_huge_last_event_id_is_ignored(world):
    store, job_dir, c, _ = world
    (job_dir / "job.log").write_text("one\n")
    store.set_state("j-1", "CANCELLED", reason="x")
    r = c.get("/jobs/j-1/logs", params={"follow": "true"}, headers={"Last-Event-ID": "9" * 40})
    assert r.status_code == 200 and "data: one" in r.text


def test_events_and_metrics_come_in_pages(world):
    store, job_dir, c, _ = world
    for i in range(30):
        store.note("j-1", f"note {i}")
    store.add_metrics("j-1", [{"step": s, "loss": 1.0 / s} for s in range(1, 51)])
    first = c.get("/jobs/j-1/events", params={"limit": 10}).json()["events"]
    second = c.get("/jobs/j-1/events", params={"limit": 10, "after": first[-1]["id"]}).json()["events"]
    assert len(first) == len(second) == 10 and second[0]["id"] > first[-1]["id"]
    page = c.get("/jobs/j-1/metrics", params={"limit": 20, "after_step": 20}).json()["metrics"]
    assert [m["step"] for m in page] == list(range(21, 41))
    assert c.get("/jobs/j-1/events", params={"limit": 100_000}).status_code == 422


def test_job_logs_are_private_to_their_owner(tmp_path):
    from jobs.jobdir import event, note, open_private  # job.log (the entrypoint), train.log, events.jsonl

    job_dir = tmp_path / "j"
    job_dir.mkdir()
    before = os.umask(0o022)
    try:
        note(job_dir, "hello")
        event(job_dir, "a note")
        os.close(open_private(job_dir / "job.log"))
    finally:
        os.umask(before)
    for name in ("train.log", "events.jsonl", "job.log"):
        assert (job_dir / name).stat().st_mode & 0o077 == 0, name


def aliases(levels: int) -> str:
    """The billion-laughs recipe: each level nine references to the one before."""
    out = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, levels + 1):
        out += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n"
    return out


@pytest.mark.parametrize("text, words", [
    (aliases(8), "YAML anchors and aliases"), ("name: x\nbase: &b {lr: 1}\ntrain: *b\n", "YAML anchors and aliases"),
    ("x: " + "[" * 5000 + "]" * 5000, "nested more"), ("x: [" * 20 + "\0", "not valid YAML"),
    ("x: " + "{a: " * 5000 + "1" + "}" * 5000, "nested more"),
    ("- " * 3000 + "1", "nested more"), ("k: v\n" * 25_000, "more than 20,000 values"),
    ("name: x\n" + "# " + "y" * 300_000, "a recipe is at most 256 KiB"),
])
def test_hostile_yaml_is_refused_at_once_with_the_reason(world, text, words):
    import time

    c = world[2]
    t0 = time.perf_counter()
    r = c.post("/jobs", json={"recipe": text})
    assert r.status_code == 422 and words in json.dumps(r.json()), r.text[:300]
    assert time.perf_counter() - t0 < 2


def test_a_pasted_token_is_refused_not_stored_as_stars(world):
    store, job_dir, c, _ = world
    r = c.post("/jobs", json={"recipe": RECIPE.replace("  name: m\n", "  name: m\n  token: hf_PastedIn0451\n")})
    assert r.status_code == 422 and "${HF_TOKEN}" in r.json()["detail"] and "hf_Pasted" not in r.text
    assert store.count() == 1


def test_the_token_is_checked_before_the_body_is_read_and_bodies_are_bounded(tmp_path):
    c = TestClient(create_app(tmp_path / "home", "tok-0451"))
    r = c.post("/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401, "no token: refused on the headers, before the body is parsed"
    big = b"x" * (2**20 + 1)
    assert c.post("/jobs", content=big, headers={"Authorization": "Bearer tok-0451"}).status_code == 413
    assert c.post("/jobs", content=big).status_code == 413
    assert c.post("/login", content=b"token=" + b"x" * 5000).status_code == 413
    assert c.post("/jobs/x/cancel").status_code == 401


def test_a_schedule_cannot_turn_the_servers_secret_into_a_name_or_a_reason(world, monkeypatch):
    store, job_dir, c, _ = world
    monkeypatch.setenv("HF_TOKEN", "hf_ServerSecret0451")
    for text in (RECIPE.replace("name: demo", "name: ${HF_TOKEN:-nightly}"),
                 RECIPE + "train:\n  epochs: ${HF_TOKEN:-1}\n"):
        r = c.post("/schedules", json={"recipe": text + "schedule:\n  cron: '0 3 * * *'\n"})
        assert r.status_code == 422 and "is not taken here" in r.text and "ServerSecret" not in r.text, r.text
    assert c.get("/schedules").json()["total"] == 0


def test_log_streams_are_bounded(tmp_path, monkeypatch):
    import threading

    import httpx

    from web import served

    monkeypatch.setenv("RUNNER_MAX_LOG_STREAMS", "1")
    home = tmp_path / "home"
    app = create_app(home, sse_max_s=20)
    job_dir = home / "artifacts" / "j-1"
    job_dir.mkdir(parents=True)
    app.state.store.add_job("j-1", "demo", RECIPE, str(job_dir), 1, 1, 0)
    (job_dir / "job.log").write_text("one\n")
    with served(app) as url:
        opened, done = threading.Event(), threading.Event()

        def hold():  # one stream open until the second has been refused
            with httpx.stream("GET", f"{url}/jobs/j-1/logs", params={"follow": "true"}, timeout=30) as r:
                for _ in r.iter_lines():
                    opened.set()
                    done.wait(15)
                    break

        first = threading.Thread(target=hold)
        first.start()
        assert opened.wait(10)
        r = httpx.get(f"{url}/jobs/j-1/logs", params={"follow": "true"}, timeout=10)
        done.set()
        assert r.status_code == 503 and "RUNNER_MAX_LOG_STREAMS" in r.text
        first.join(10)
        assert httpx.get(f"{url}/jobs/j-1/logs", timeout=10).json()["text"] == "one\n", "plain reads still answer"


def test_secrets_reach_the_workers_through_a_private_file_and_go_with_the_job(tmp_path, monkeypatch):
    from jobs import secrets

    job = tmp_path / "j"
    job.mkdir()
    (job / secrets.FILE).symlink_to(tmp_path / "elsewhere")  # planted: replaced, never written through
    monkeypatch.setenv("HF_TOKEN", "hf_Handed0451")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    secrets.hand_over(job)
    assert not (tmp_path / "elsewhere").exists() and (job / secrets.FILE).stat().st_mode & 0o777 == 0o600
    monkeypatch.delenv("HF_TOKEN")
    (job / "other").write_text("")
    secrets.take(job)
    assert os.environ["HF_TOKEN"] == "hf_Handed0451" and "WANDB_API_KEY" not in os.environ
    secrets.withdraw(job)
    assert not (job / secrets.FILE).exists()


def test_no_read_goes_through_a_link_to_a_dotfile_a_pipe_or_a_second_name(world):
    store, job_dir, c, tmp = world
    (job_dir / ".secrets.json").write_text('{"HF_TOKEN": "not-yours-0451"}')
    (job_dir / "x").symlink_to(job_dir / ".secrets.json")
    (job_dir / "job.log").symlink_to(job_dir / ".secrets.json")
    (tmp / "outside.txt").write_text("not-yours-0451")
    os.link(tmp / "outside.txt", job_dir / "hard.txt")
    os.mkfifo(job_dir / "eval.json")
    os.mkfifo(job_dir / "job.log.absent")
    store.set_state("j-1", "CANCELLED", reason="x")
    for path in ("/jobs/j-1/files/x", "/jobs/j-1/files/hard.txt", "/jobs/j-1/logs", "/jobs/j-1/artifacts",
                 "/jobs/j-1/files/.secrets.json", "/jobs/j-1/logs?follow=true"):
        r = c.get(path)  # a pipe would hang a plain open: none is opened
        assert "not-yours-0451" not in r.text, path


def test_a_lone_surrogate_a_chunked_body_and_a_page_past_the_end(world, tmp_path):
    store, job_dir, c, _ = world
    r = c.post("/jobs", content=b'{"recipe": "name: \\ud800"}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "lone surrogate" in r.text
    r = c.post("/jobs", content=b'{"recipe": "x"}', headers={"content-type": "application/json",
                                                            "transfer-encoding": "chunked"})
    assert r.status_code == 411
    assert c.get("/ui/jobs", params={"page": 10**19}).status_code == 200
    r = c.post("/jobs", json={"recipe": RECIPE.replace("  name: m\n", "  name: m\n  token: hf_Real${X:-}\n")})
    assert r.status_code == 422 and "hf_Real" not in r.text, "a token is one ${VAR} reference, nothing pasted"


def test_wrong_bearer_tokens_are_limited_too(tmp_path):
    c = TestClient(create_app(tmp_path / "home", "tok-0451"))
    for _ in range(10):
        assert c.get("/jobs", headers={"Authorization": "Bearer guess"}).status_code == 401
    assert c.get("/jobs", headers={"Authorization": "Bearer guess"}).status_code == 429
    assert c.post("/login/code", headers={"Authorization": "Bearer guess"}).status_code == 429
