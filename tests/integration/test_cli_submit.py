"""`runner submit` and the read verbs as a user runs them: the real `runner` command, which starts the local runner
server and a local Ray head (token auth on) by itself on first use; scheduled retraining and the model registry on
the same server; then the errors a user meets, one line each.

Registry, end to end, on changing data: the test split is cut from the training file, so every change of the file
changes the test rows and no two versions share a test split. The submitted job (registered as `topics`, exported
to ONNX) is version 1, the first champion. A schedule on a better recipe (120 steps) fires by itself when the file
changes (the server firing a due cron slot is test_schedule_cli's, with a fake clock): the champion and the new model
are scored on the new test split, and the better one is promoted. Then a schedule on a worse recipe (60 steps, as
v1) fires on the next change and is refused against the 120-step champion on its own new split. Rollback puts
version 1 back."""

import json
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from runner.local import free_port
from tiny import keyword_rows, tiny_model_dir

pytestmark = pytest.mark.slow


def recipe(model, train: str, steps: int, extra: str = "") -> str:
    return (f"name: topics\nmodel:\n  name: {model}\n  token: ${{HF_TOKEN}}\ntask: classification\ndata:\n"
            f"  train: {train}\n"
            f"  max_seq_len: 16\ntrain:\n  max_steps: {steps}\n  batch_size: 8\n  lr: 0.003\n"
            "resources:\n  workers: 1\n  cpus_per_worker: 1\nexport:\n  onnx: true\n  quantize: none\n  optimize: false\n"
            f"register_as: topics\npromotion:\n  metric: loss\n{extra}")


def wait_ended(runner, job_id, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = runner("status", job_id, "--json")
        assert out.returncode == 0, f"runner status {job_id}: {out.stderr}"
        job = json.loads(out.stdout)
        if job["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            return job
        time.sleep(3)  # each look starts the CLI: on 2 cores, looking often slows the training looked at
    raise AssertionError(f"job {job_id} did not end in {timeout} s")


CANARIES = {"HF_TOKEN": "hf_CanaryHub7f3a9c2e", "WANDB_API_KEY": "CanaryWandb5d1e8b4f",
            "RUNNER_TOKEN": "CanaryRunner9a6c3d7e"}


def find_canaries(runner, state: dict, job_ids: list[str]) -> list[str]:
    """Where a canary shows: every file of RUNNER_HOME (the store, the logs, the job folders), every API answer and
    dashboard page about the jobs, and Ray's job, actor, task and runtime-env state."""
    import httpx

    from runner.local import ray_token, server_token

    hits = []

    def look(where: str, blob: bytes) -> None:
        hits.extend(f"{name} in {where}" for name, value in CANARIES.items() if value.encode() in blob)

    for path in runner.home.rglob("*"):
        if path.is_file() and not path.is_symlink():
            look(str(path.relative_to(runner.home)), path.read_bytes())
    api = httpx.Client(base_url=state["server"]["url"], timeout=30,
                       headers={"Authorization": f"Bearer {server_token(runner.home)}"})
    paths = ["/jobs?limit=500", "/schedules", "/models", "/models/topics", "/cluster", "/metrics", "/ui/jobs",
             "/ui/cluster", "/ui/schedules", "/ui/models"]
    for j in job_ids:
        paths += [f"/jobs/{j}{p}" for p in ("", "/events", "/metrics", "/logs", "/artifacts", "/recipe",
                                           "/checkpoints", "/series")] + [f"/ui/jobs/{j}"]
    for p in paths:
        r = api.get(p)
        assert r.status_code == 200, (p, r.status_code)
        look(p, r.content)
    ray = httpx.Client(base_url=state["ray"]["dashboard"], timeout=30,
                       headers={"Authorization": f"Bearer {ray_token(runner.home)}"})
    for p in ("/api/jobs/", "/api/v0/actors?detail=1&limit=10000", "/api/v0/tasks?detail=1&limit=10000",
              "/api/v0/runtime_envs?detail=1&limit=10000", "/api/v0/placement_groups?detail=1&limit=10000"):
        r = ray.get(p)
        assert r.status_code == 200, (p, r.status_code, r.text[:200])
        look(f"Ray {p}", r.content)
    return hits


def test_submit_schedule_and_registry_through_the_cli(runner, tmp_path, tokenizer):
    plain = runner

    def runner(*args, **env):  # every command run with secrets in its environment, as a user's shell has them
        return plain(*args, **{**CANARIES, **env})

    runner.home = plain.home
    model = tiny_model_dir(tmp_path / "bert", "bert", tokenizer, weights=True)
    rows = keyword_rows(240)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:200]))
    good = tmp_path / "good.yaml"
    good.write_text(recipe(model, "d.jsonl", 60))
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("max_steps: 60", "max_step: 60"))

    out = runner("submit", str(bad))
    assert out.returncode == 2 and "train.max_step: unknown key (did you mean 'max_steps'?)" in out.stderr
    assert not (runner.home / "local.json").exists(), "a bad recipe starts nothing"

    out = runner("submit", str(good))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "starting a local Ray head" in out.stderr and "starting the local runner server" in out.stderr
    job_id = out.stdout.split()[1]
    assert f"job {job_id} SUCCEEDED" in out.stdout and "test:      loss=" in out.stdout and "accuracy=" in out.stdout
    assert "step 60/60" in out.stderr and "RUNNING" in out.stderr
    assert "next: runner artifacts" in out.stdout

    state = json.loads((runner.home / "local.json").read_text())
    try:  # Ray's token auth is on, and the runner holds the token
        urllib.request.urlopen(f"{state['ray']['dashboard']}/api/jobs/", timeout=10)
        raise AssertionError("Ray's dashboard answered without a token")
    except urllib.error.HTTPError as e:
        assert e.code == 401

    listed = json.loads(runner("list", "--json").stdout)
    assert [(j["id"], j["state"]) for j in listed["jobs"]] == [(job_id, "SUCCEEDED")]
    status = runner("status", job_id).stdout
    assert "state:     SUCCEEDED" in status and "QUEUED -> STARTING" in status and "next: " in status
    result = json.loads(runner("status", job_id, "--json").stdout)["result"]  # the job's eval.json, served
    sel, base = result["selection"], result["baseline"]
    assert f"kept:      step {sel['step']} of 60: {sel['why']}" in status, status
    assert f"baseline:  test loss {result['test']['loss']:.4g} beats predicting the majority class of train, " \
        f"{base['loss']:.4g}" in status, status
    log = runner("logs", job_id).stdout
    assert "1 worker on CPUs" in log and "step 60: validation loss=" in log and "accuracy=" in log
    assert not [x for x in ("torchvision", "Loading weights", "Writing model", "Traceback") if x in log], log
    files = [f["path"] for f in json.loads(runner("artifacts", job_id, "--json").stdout)["files"]]
    assert "model/config.json" in files and "eval.json" in files

    out = runner("dashboard", "--no-open")
    link = out.stdout.split()[1]  # a one-time sign-in link to the local server, which has a token of its own
    assert out.returncode == 0 and link.startswith(f"{state['server']['url']}/login?code="), out.stdout
    assert CANARIES["RUNNER_TOKEN"] not in link
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    with browser.open(link, timeout=10) as r:  # the page the browser opens, with the job in it
        assert r.status == 200 and r.url == f"{state['server']['url']}/ui/jobs" and job_id in r.read().decode()
    try:
        browser.open(link, timeout=10)  # another browser with the same link: it was used
        raise AssertionError("a sign-in link worked twice")
    except urllib.error.HTTPError as e:
        assert e.code == 401

    # --- a job that fails: its data is gone when its driver starts -------------------------------------------------
    gone = tmp_path / "gone.jsonl"
    gone.write_text((tmp_path / "d.jsonl").read_text())
    (tmp_path / "gone.yaml").write_text(recipe(model, "gone.jsonl", 60).replace("register_as: topics\n", ""))
    out = runner("submit", "--detach", str(tmp_path / "gone.yaml"))
    failed_id = out.stdout.split()[1]
    gone.unlink()
    job = wait_ended(runner, failed_id)
    assert job["state"] == "FAILED" and "gone.jsonl" in job["reason"], job

    # --- the model registry and schedules, on changing data --------------------------------------------------------
    shown = json.loads(runner("models", "show", "topics", "--json").stdout)
    assert shown["aliases"] == {"champion": 1} and shown["versions"][0]["job_id"] == job_id
    assert shown["versions"][0]["decision"].startswith("promoted to champion: the first version")

    def fires_once_on_a_change(recipe_file, row):
        """Add the schedule, change the data, return the job its one fire queued."""
        out = runner("schedule", "add", str(recipe_file))
        assert out.returncode == 0 and "schedule topics: when the data changes" in out.stdout, out.stdout + out.stderr
        (tmp_path / "d.jsonl").write_text((tmp_path / "d.jsonl").read_text() + json.dumps(row) + "\n")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the server looks at the data every 10 s
            fires = json.loads(runner("schedule", "show", "topics", "--json").stdout)["fires"]
            if fires:
                assert [(f["outcome"], f["reason"][:16]) for f in fires] == [("submitted", "the data changed")]
                assert wait_ended(runner, fires[0]["job_id"])["state"] == "SUCCEEDED"
                return fires[0]["job_id"]
            time.sleep(2)
        raise AssertionError("the data changed and the schedule did not fire in 60 s")

    better, worse = tmp_path / "better.yaml", tmp_path / "worse.yaml"
    when_changed = "schedule:\n  on_data_change: true\n  poll_interval: 10\n"
    better.write_text(recipe(model, "d.jsonl", 120, when_changed))
    worse.write_text(recipe(model, "d.jsonl", 60, when_changed))
    better_id = fires_once_on_a_change(better, rows[200])
    assert runner("schedule", "remove", "topics").returncode == 0
    worse_id = fires_once_on_a_change(worse, rows[201])
    shown = json.loads(runner("models", "show", "topics", "--json").stdout)
    by_job = {v["job_id"]: v for v in shown["versions"]}
    v1, good_v, bad_v = by_job[job_id], by_job[better_id], by_job[worse_id]
    assert len({v1["test_data"], good_v["test_data"], bad_v["test_data"]}) == 3, "each change, a new test split"
    # each decided on the new test split, both models scored there (and on the champion's split, recorded)
    for v, champ in ((good_v, 1), (bad_v, good_v["version"])):
        pair = v["metrics"]["champion"]["on_this_test"]
        assert v["metrics"]["champion"]["version"] == champ and pair["rows"] == v["metrics"]["test"]["examples"]
        assert f"on this version's test split ({pair['rows']} rows, both models scored)" in v["decision"]
        assert f"loss {pair['challenger']['loss']:.4g} against champion v{champ}'s {pair['champion']['loss']:.4g}" \
            in v["decision"], v["decision"]
    assert good_v["promoted"] and good_v["decision"].startswith("promoted to champion: loss "), good_v["decision"]
    assert not bad_v["promoted"] and bad_v["decision"].startswith("not promoted: loss "), bad_v["decision"]
    assert shown["aliases"] == {"champion": good_v["version"]}
    # the version records what its export ships (this recipe asks for no quantization: fp32)
    shipped = json.loads((Path(good_v["artifacts"]["onnx"]) / "export_report.json").read_text())["shipped"]
    assert good_v["export"] == {"passed": True, "variant": shipped["variant"], "quantized": shipped["quantized"]}
    status = runner("status", worse_id).stdout
    assert f"champion:  on this job's test split ({bad_v['metrics']['champion']['on_this_test']['rows']} rows)" \
        in status and f"for topics v{good_v['version']}" in status, status
    out = runner("models", "rollback", "topics")
    assert out.stdout.startswith(f"topics:champion rolled back from v{good_v['version']} to v1"), out.stdout
    assert json.loads(runner("models", "show", "topics", "--json").stdout)["aliases"] == {"champion": 1}
    text = runner("models", "show", "topics").stdout
    assert "v1 [champion]" in text and "rolled back" in text
    d = runner("models", "diff", "topics", "1", str(good_v["version"])).stdout
    assert "same test data: no (the figures above are of other rows)" in d and "max_steps: 120" in d
    assert f"both scored on v{good_v['version']}'s test split ({good_v['metrics']['champion']['on_this_test']['rows']} " \
        "rows):" in d, d

    out = runner("status", "nope")
    assert out.returncode == 1 and out.stderr.strip() == "no job 'nope' (runner list shows the jobs)"
    out = runner("retry", job_id)
    assert out.returncode == 1 and "only a FAILED or CANCELLED job can be retried" in out.stderr

    # --- no secret of the user's shell reached the store, a log, a job folder, the API, a page or Ray's state -------
    assert find_canaries(runner, state, [job_id, failed_id, better_id, worse_id]) == []

    # --- the Ray head goes down: with the server named explicitly, one line says so --------------------------------
    server = state["server"]["url"]
    assert runner("cluster", "down").stdout.startswith("local Ray head stopped")
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"  # a plain ray.init() would look there
    port = state["ray"]["address"].rsplit(":", 1)[-1]
    assert not (current.exists() and current.read_text().strip().endswith(f":{port}")), "stale Ray address left"
    from runner.local import server_token

    out = runner("submit", "--detach", str(good), RUNNER_SERVER=server, RUNNER_TOKEN=server_token(runner.home))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"the Ray cluster at {state['ray']['dashboard']} does not answer"), out.stderr
    out = runner("list", RUNNER_SERVER=f"http://127.0.0.1:{free_port()}")
    assert out.returncode == 1 and out.stderr.startswith("cannot reach the runner server at http://127.0.0.1:")
    assert runner("server", "stop").stdout.startswith("runner server stopped")
    for verb in (["list"], ["status", job_id], ["logs", job_id], ["artifacts", job_id], ["models", "list"],
                 ["schedule", "list"], ["cluster", "status"]):  # read verbs start nothing
        out = runner(*verb)
        assert out.returncode == 1 and out.stderr.strip() == \
            "no local runner server is running (runner server start starts one)", (verb, out.stderr)
    out = runner("server", "status")
    assert out.returncode == 1 and out.stdout.startswith("no local runner server is running")
