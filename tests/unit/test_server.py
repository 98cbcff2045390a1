"""The runner server over HTTP: a real uvicorn on a free port, the real store; token rules and path safety."""

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from runner.local import free_port
from runner.server import check_bind

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "name: demo\nmodel:\n  name: m\n  token: ${HF_TOKEN}\ntask: classification\ndata:\n  train: t.jsonl\n"


def call(url, method="GET", body=None, token=None):
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_jobs_are_created_listed_cancelled_and_retried(server, tmp_path):
    url = server()
    secret = "hf_ThisIsSecret42"
    code, job = call(f"{url}/jobs", "POST", {"recipe": RECIPE, "env": {"HF_TOKEN": secret}, "priority": 3})
    assert code == 201 and job["state"] == "QUEUED" and job["priority"] == 3 and job["id"].startswith("demo-")
    job_dir = Path(job["job_dir"])
    assert job_dir.parent == (tmp_path / "home" / "artifacts").resolve()
    assert "${HF_TOKEN}" in (job_dir / "recipe.yaml").read_text()
    code, other = call(f"{url}/jobs", "POST", {"recipe": RECIPE, "env": {"HF_TOKEN": "x"}, "name": "second"})
    assert code == 201 and other["id"].startswith("second-")
    code, listed = call(f"{url}/jobs?limit=1")
    assert [j["id"] for j in listed["jobs"]] == [other["id"]]
    code, listed = call(f"{url}/jobs?state=queued")
    assert {j["id"]: j["queue_position"] for j in listed["jobs"]} == {job["id"]: 1, other["id"]: 2}
    code, got = call(f"{url}/jobs/{job['id']}/recipe")
    assert secret not in got["recipe"] and "${HF_TOKEN}" in got["recipe"]
    code, done = call(f"{url}/jobs/{job['id']}/cancel", "POST")
    assert code == 200 and done["state"] == "CANCELLED" and done["reason"] == "cancelled by the user"
    code, again = call(f"{url}/jobs/{job['id']}/cancel", "POST")
    assert code == 409 and again["detail"] == f"job {job['id']} has already ended (CANCELLED)"
    code, back = call(f"{url}/jobs/{job['id']}/retry", "POST", {"from_checkpoint": True})
    assert code == 200 and back["state"] == "QUEUED" and back["resume"] == 1
    code, ev = call(f"{url}/jobs/{job['id']}/events")
    assert [e["state_to"] for e in ev["events"]] == ["QUEUED", "CANCELLED", "QUEUED"]
    code, err = call(f"{url}/jobs/{other['id']}/retry", "POST")
    assert code == 409 and err["detail"].endswith("only a FAILED or CANCELLED job can be retried")
    code, err = call(f"{url}/jobs/nope")
    assert code == 404 and err["detail"] == "no job 'nope'"
    raw = b"".join(p.read_bytes() for p in (tmp_path / "home").glob("runner.db*"))
    assert secret.encode() not in raw


def test_bad_recipes_and_names_are_refused_without_a_trace(server, tmp_path):
    url = server()
    code, err = call(f"{url}/jobs", "POST", {"recipe": "name: x\nmodel:\n  name: m\ntask: clasification\n"})
    assert code == 422 and err["detail"]["message"] == "the recipe has problems"
    assert any(p["path"] == "task" and "did you mean 'classification'" in p["message"]
               for p in err["detail"]["problems"])
    for name in ("../../etc", "a/b", ".hidden", ""):
        code, err = call(f"{url}/jobs", "POST", {"recipe": RECIPE, "env": {"HF_TOKEN": "x"}, "name": name})
        assert code == 422, name
    assert sorted(p.name for p in (tmp_path / "home" / "artifacts").iterdir()) == []
    assert not (tmp_path / "etc").exists()


def test_off_loopback_needs_a_token():
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", "tok")
    with pytest.raises(ValueError, match="refusing to listen on 0.0.0.0 without a token: set RUNNER_TOKEN"):
        check_bind("0.0.0.0", None)
    out = subprocess.run([sys.executable, "-m", "runner.server", "--host", "0.0.0.0", "--port", str(free_port())],
                         capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "RUNNER_HOME": "/tmp/runner-test-unused"})
    assert out.returncode == 2 and out.stderr.startswith("refusing to listen on 0.0.0.0 without a token")


def test_logs_are_read_from_an_offset_and_followed_to_the_end(server, tmp_path):
    import httpx

    from runner.store import Store

    url = server()
    code, job = call(f"{url}/jobs", "POST", {"recipe": RECIPE, "env": {"HF_TOKEN": "x"}})
    log = Path(job["job_dir"]) / "job.log"
    log.write_text("one\ntwo\nthr")  # a line being written is not shown yet
    code, got = call(f"{url}/jobs/{job['id']}/logs")
    assert got == {"text": "one\ntwo\n", "offset": 8}
    assert call(f"{url}/jobs/{job['id']}/logs?offset=4")[1]["text"] == "two\n"
    store = Store(tmp_path / "home" / "runner.db")

    def finish():  # the job writes on, then ends, while the client follows
        time.sleep(1)
        with log.open("a") as f:
            f.write("ee\nfour\n")
        store.set_state(job["id"], "CANCELLED", reason="by the test")

    threading.Thread(target=finish).start()
    seen = []
    with httpx.stream("GET", f"{url}/jobs/{job['id']}/logs", params={"follow": "true", "offset": 4},
                      timeout=20) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith(("event:", "data:", "id:")):
                seen.append(line)
    assert seen == ["id: 8", "event: log", "data: two", "id: 14", "event: log", "data: three", "id: 19",
                    "event: log", "data: four", "event: end", "data: CANCELLED"]


def test_a_followed_log_reconnects_with_last_event_id_and_loses_and_repeats_nothing(server, tmp_path):
    """Each stream is cut after 0.4 s (as a proxy would); the CLI's client, like a browser's EventSource, opens
    it again from the last id. What arrives is the log exactly: lines with a CR (a progress bar), invalid UTF-8."""
    from runner.client import Client
    from runner.store import Store

    url = server(sse_max_s=0.4)
    job = call(f"{url}/jobs", "POST", {"recipe": RECIPE, "env": {"HF_TOKEN": "x"}})[1]
    log = Path(job["job_dir"]) / "job.log"
    lines = [f"step {i} loss {1 / (i + 1):.4f}".encode() for i in range(60)]
    lines[7] = b"progress 10%\rprogress 20%"
    lines[9] = b"bad byte \xff here"
    lines[11] = b""  # a blank line of the log (a traceback's, a table's) comes through as one
    store = Store(tmp_path / "home" / "runner.db")

    def write():
        for i, line in enumerate(lines):
            with log.open("ab") as f:
                f.write(line + b"\n")
            time.sleep(0.03)
        store.set_state(job["id"], "CANCELLED", reason="by the test")

    threading.Thread(target=write).start()
    opened = []
    client = Client(url)
    real_stream = client.http.stream

    def counted(*args, **kwargs):
        opened.append(kwargs.get("headers", {}).get("Last-Event-ID"))
        return real_stream(*args, **kwargs)

    client.http.stream = counted
    got = list(client.events(f"/jobs/{job['id']}/logs", follow="true"))
    assert got[-1] == ("end", "CANCELLED")
    assert [d for e, d in got if e == "log"] == [x.decode("utf-8", "replace").replace("\r", "") for x in lines]
    assert len(opened) >= 3 and opened[0] is None and all(x and x.isdigit() for x in opened[1:])


def test_artifacts_list_the_job_folder(server):
    url = server()
    code, job = call(f"{url}/jobs", "POST", {"recipe": RECIPE, "env": {"HF_TOKEN": "x"}})
    d = Path(job["job_dir"])
    (d / "model").mkdir()
    (d / "model" / "config.json").write_text("{}")
    (d / "eval.json").write_text(json.dumps({"test": {"accuracy": 0.9}, "validation": {}}))
    (d / "prepared").mkdir()
    (d / "prepared" / "x").write_text("tokenized rows are not an artifact")
    code, out = call(f"{url}/jobs/{job['id']}/artifacts")
    assert code == 200 and out["eval"]["test"] == {"accuracy": 0.9}
    assert [f["path"] for f in out["files"]] == ["eval.json", "model/config.json", "recipe.yaml"]
    assert out["files"][1]["bytes"] == 2


def test_the_local_server_has_a_token_of_its_own(tmp_path):
    """`runner submit` starts it (runner.local.start_server): another local process without the token is refused."""
    import httpx

    from runner import local

    home = tmp_path / "home"
    home.mkdir()
    server = local.start_server(home, "http://127.0.0.1:9")  # no Ray there: the API answers all the same
    try:
        token = local.server_token(home)
        assert (home / "server_token").stat().st_mode & 0o777 == 0o600 and len(token) >= 32
        assert httpx.post(f"{server['url']}/jobs/x/cancel").status_code == 401
        assert httpx.get(f"{server['url']}/jobs").status_code == 401
        ok = httpx.get(f"{server['url']}/jobs", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200 and ok.json()["total"] == 0
    finally:
        local._terminate(server["pid"])
