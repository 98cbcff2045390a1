"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright, over the runner's own local
Ray head and server (`runner.local`, token auth on), with real jobs on a tiny BERT.

A job submitted while the jobs page is open appears on it; a second one waits with its reason; the first job's
loss curve grows while it runs and its log streams (the server cuts each stream after 2 s, so the browser's
EventSource reconnects many times: the page's log must still equal job.log line for line); the cluster page says
which job holds the CPUs; Cancel on the job's page, confirmed, stops it. Each page is saved as a screenshot, light
and dark, under build/screenshots/ (RUNNER_SCREENSHOTS moves them).
"""

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("playwright", reason="the playwright package is not installed (pip install -e '.[dev]')")
from web import CHROMIUM, CHROMIUM_ARGS as ARGS  # noqa: E402

if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's (apt-get install chromium; .ci/run does) or set "
                "RUNNER_CHROMIUM", allow_module_level=True)

import httpx  # noqa: E402

from tiny import faults, keyword_rows, tiny_model_dir  # noqa: E402
from web import served  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("RUNNER_SCREENSHOTS") or ROOT / "build" / "screenshots")


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The runner's local Ray head (2 CPUs) and server, as `runner submit` starts them."""
    from runner import local

    home = tmp_path_factory.mktemp("home")
    saved = {k: os.environ.get(k) for k in ("RUNNER_SSE_MAX_S", "RUNNER_PORT")}
    os.environ.update(RUNNER_SSE_MAX_S="2", RUNNER_PORT=str(local.free_port()))
    try:
        ray = local.start_ray(home, num_cpus=2)
        local._write_state(home, {"ray": ray})
        server = local.start_server(home, ray["dashboard"])
        local._write_state(home, {"ray": ray, "server": server})
        yield server["url"], home
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        local.stop(home, "server")
        local.stop(home, "ray")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def shoot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")  # else the sticky header lands mid-page in a full-page capture
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        page.wait_for_timeout(150)
        page.screenshot(path=str(SHOTS / f"{name}-{scheme}.png"), full_page=True)
    page.emulate_media(color_scheme="light")


def test_jobs_live_in_the_browser(local, browser, tmp_path, tokenizer):
    from runner.local import server_token

    url, home = local
    api = httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {server_token(home)}"})

    def signed_in(path: str) -> str:  # the local server has a token: a one-time link, as `runner dashboard` opens
        return f"{url}/login?code={api.post('/login/code').json()['code']}&next={path}"

    model = tiny_model_dir(tmp_path / "bert", "bert", tokenizer, weights=True)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in keyword_rows(160)))
    recipe = (f"name: {{name}}\nmodel:\n  name: {model}\ntask: classification\ndata:\n  train: {data}\n"
              "  max_seq_len: 16\ntrain:\n  max_steps: 40\n  batch_size: 4\n  eval_every: 10\n"
              + faults(step_delay=0.2, pause_after_step=20, hold_file="hold").replace("{", "{{").replace("}", "}}")
              + "resources:\n  workers: 1\n  cpus_per_worker: 2\n")
    if SHOTS.exists():
        shutil.rmtree(SHOTS)
    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    page.on("pageerror", lambda e: errors.append(str(e)))
    follows: list[str] = []
    page.on("request", lambda r: follows.append(r.url) if "/logs?follow=true" in r.url else None)

    def submit(name: str) -> dict:
        r = api.post("/jobs", json={"recipe": recipe.format(name=name)})
        assert r.status_code == 201, r.text
        return r.json()

    assert httpx.get(f"{url}/jobs").status_code == 401, "no token, no answer: not even on loopback"
    page.goto(signed_in("/ui/jobs"))
    page.wait_for_selector("text=No jobs yet")
    a = submit("alpha")
    (Path(a["job_dir"]) / "hold").write_text("")  # alpha holds at step 20 until cancelled
    row_a = page.locator(f'tr[data-id="{a["id"]}"]')
    row_a.wait_for(timeout=10_000)  # appeared without a reload
    b = submit("beta")
    row_b = page.locator(f'tr[data-id="{b["id"]}"]')
    page.wait_for_function(f"""() => {{
        const r = document.querySelector('tr[data-id="{b["id"]}"]');
        return r && r.dataset.state === "QUEUED" && r.querySelector(".queue").textContent.includes("needs 2 CPUs, 0 free");
    }}""", timeout=60_000)
    assert "#1" in row_b.locator(".queue").inner_text()
    page.wait_for_function(f"""() => ["RUNNING"].includes(
        document.querySelector('tr[data-id="{a["id"]}"]').dataset.state)""", timeout=90_000)
    page.fill('input[type="search"]', "beta")
    page.wait_for_function(f"""() => document.querySelectorAll('#jobs tbody tr').length === 1 &&
        document.querySelector('tr[data-id="{b["id"]}"]')""", timeout=10_000)
    assert "q=beta" in page.url
    page.fill('input[type="search"]', "")
    row_a.wait_for(timeout=10_000)
    shoot(page, "jobs")

    page.goto(f"{url}/ui/jobs/{a['id']}")
    points = "Number(document.querySelector('#loss svg')?.dataset.points || 0)"
    page.wait_for_function(f"() => {points} >= 2", timeout=60_000)
    first = page.evaluate(f"() => {points}")
    page.wait_for_function(f"() => {points} >= {first + 4}", timeout=30_000)  # the curve grows while it runs
    page.wait_for_function("() => document.querySelector('#log').textContent.includes('step ')", timeout=30_000)
    lines_then = page.evaluate("() => document.querySelector('#log').textContent.split('\\n').length")
    page.wait_for_function(f"() => document.querySelector('#log').textContent.split('\\n').length > {lines_then}",
                           timeout=30_000)  # and the log streams

    cluster = browser.new_page(viewport={"width": 1366, "height": 768})
    cluster.on("pageerror", lambda e: errors.append(str(e)))
    cluster.goto(signed_in("/ui/cluster"))
    held = cluster.locator(f'#nodes td.held a[href="/ui/jobs/{a["id"]}"]')
    held.wait_for(timeout=20_000)
    assert "2 CPU" in cluster.locator("#nodes td.held").first.inner_text()
    assert "2 / 2 used" in cluster.locator("#nodes tbody tr").first.inner_text()
    shoot(cluster, "cluster")
    cluster.close()

    page.wait_for_function("() => document.querySelector('.card .v') && "
                           "[...document.querySelectorAll('.card .v')].some(e => e.textContent.startsWith('step 20/'))",
                           timeout=60_000)
    shoot(page, "job")
    dialogs = []

    def confirm(d):
        dialogs.append(d.message)
        d.accept()

    page.on("dialog", confirm)
    page.click("#cancel")
    page.wait_for_function("() => document.querySelector('h1 .state').textContent === 'CANCELLED'", timeout=60_000)
    assert dialogs and dialogs[0].startswith(f"Cancel job {a['id']}?")
    page.wait_for_selector("#log[data-ended='true']", timeout=30_000)
    shown = page.evaluate("() => document.querySelector('#log').textContent").split("\n")[:-1]
    on_disk = (Path(a["job_dir"]) / "job.log").read_bytes().decode("utf-8", "replace").replace("\r", "")
    assert shown == on_disk.split("\n")[:-1] and len(shown) >= 5  # nothing lost or repeated
    assert len(follows) >= 4, follows  # across the EventSource's reconnections
    ray_dashboard = json.loads((home / "local.json").read_text())["ray"]["dashboard"]
    assert page.get_attribute("h1 a[target=_blank]", "href") == f"{ray_dashboard}/#/jobs/{a['id']}-1"
    shoot(page, "job-cancelled")

    # Retry, confirmed: alpha goes back in the queue, behind beta, which took its place, and says so
    page.click("#retry")
    page.wait_for_function("() => document.querySelector('h1 .state').textContent === 'QUEUED'", timeout=30_000)
    assert len(dialogs) == 2 and "attempt 2" in dialogs[1]
    page.wait_for_function("() => (document.querySelector('#waiting')?.textContent || '').includes('0 free')",
                           timeout=30_000)
    # stop both, as a user of the API would
    for job in (b, a):
        assert api.post(f"/jobs/{job['id']}/cancel").status_code == 200
    page.goto(f"{url}/ui/jobs?state=CANCELLED")
    page.wait_for_function("() => document.querySelectorAll('#jobs tbody tr[data-state=\"CANCELLED\"]').length === 2",
                           timeout=60_000)
    shoot(page, "jobs-cancelled")
    assert not errors, errors
    assert {p.name for p in SHOTS.iterdir()} >= {f"{n}-{s}.png" for n in ("jobs", "job", "cluster")
                                                   for s in ("light", "dark")}


def test_a_finished_job_shows_its_results_export_and_downloads(browser, tmp_path):
    """A SUCCEEDED job's page over a store of its own (no Ray needed): evaluation metrics, the export report of the
    three variants with its checks, checkpoints, and a file downloaded from the page."""
    from runner.server import create_app

    home = tmp_path / "home"
    app = create_app(home)
    job_dir = home / "artifacts" / "done-1"
    (job_dir / "onnx").mkdir(parents=True)
    (job_dir / "checkpoints" / "checkpoint_2026-11-28_00-01-54").mkdir(parents=True)
    (job_dir / "checkpoints" / "checkpoint_2026-11-28_00-01-54" / "step.json").write_text('{"step": 15}')
    (job_dir / "checkpoints" / "checkpoint_manager_snapshot.json").write_text("{}")
    (job_dir / "eval.json").write_text(json.dumps({
        "selected_by": "validation accuracy", "best_step": 15, "steps": 30,
        "selection": {"metric": "accuracy", "step": 15, "value": 1.0, "loss": 0.08,
                      "why": "validation accuracy 1, the best, reached at 3 evaluations (steps 5, 10, 15); of those "
                             "the lowest validation loss, 0.08"},
        "validation": {"loss": 0.31, "accuracy": 0.9917, "macro_f1": 0.9916, "examples": 120},
        "test": {"loss": 0.29, "accuracy": 0.995, "macro_f1": 0.99499, "examples": 200},
        "baseline": {"what": "predicting the majority class of train", "loss": 1.386, "accuracy": 0.25,
                     "macro_f1": 0.1, "examples": 200, "beaten": True,
                     "verdict": "test accuracy 0.995 beats predicting the majority class of train, 0.25"},
        "champion": {"model": "topics", "version": 3, "job_id": "old-1",
                     "on_this_test": {"rows": 200, "challenger": {"accuracy": 0.995, "loss": 0.29},
                                      "champion": {"accuracy": 0.97, "loss": 0.41}}, "on_champion_test": None}}))
    variant = {"examples": 200, "latency_ms_b1": 13.4, "latency_ms_b8": 43.7}
    (job_dir / "onnx" / "export_report.json").write_text(json.dumps({
        "task": "classification", "passed": True,
        "checks": {"fp32_parity": {"max_abs_diff": 1.1e-7, "passed": True},
                   "quantized_quality": {"compared": "accuracy drop in points", "value": 0.5, "low": -0.48,
                                         "high": 1.48, "rows": 320, "bound": 1.0, "passed": True}},
        "optimize": {"asked": True, "used": True, "reason": None, "fused_ops": {"MultiHeadAttention": 6,
                                                                                  "BiasGelu": 6}},
        "attempts": [{"variant": "onnx_int8_dynamic", "description": "int8_dynamic", "kept_fp32": [],
                      "passed": False, "latency_ms_b8": 6.4,
                      "quality": {"compared": "accuracy drop in points", "value": 1.7, "low": 0.3, "high": 3.1,
                                  "rows": 320}},
                     {"variant": "onnx_int8_dynamic_keep2", "description": "int8_dynamic, 2 MatMuls kept in fp32",
                      "kept_fp32": ["a", "b"], "passed": True, "latency_ms_b8": 6.9,
                      "quality": {"compared": "accuracy drop in points", "value": 0.5, "low": -0.48, "high": 1.48,
                                  "rows": 320}}],
        "shipped": {"variant": "int8_dynamic, 2 MatMuls kept in fp32", "quantized": True, "note": None},
        "variants": {"pytorch_fp32": {**variant, "bytes": 90_859_024, "accuracy": 0.995},
                     "onnx_fp32": {**variant, "bytes": 91_742_487, "accuracy": 0.995},
                     "onnx_int8_dynamic": {**variant, "bytes": 23_002_606, "accuracy": 0.99}}}))
    (job_dir / "onnx" / "labels.json").write_text('["sports", "weather"]')
    store = app.state.store
    store.add_job("done-1", "done", "name: done\nmodel:\n  name: org/m\n", str(job_dir), 1, 1, 0)
    for state in ("STARTING", "RUNNING", "SUCCEEDED"):
        store.set_state("done-1", state)
    store.note("done-1", "the gradient norm exploded at step 12: 40.2, 1200 times its usual 0.0335", level="warning")
    with served(app) as url:
        page = browser.new_page(viewport={"width": 1366, "height": 768}, accept_downloads=True)
        page.goto(f"{url}/ui/jobs/done-1")
        page.wait_for_selector("#export table")
        export = page.inner_text("#export")
        for name, size in (("pytorch_fp32", "90.9 MB"), ("onnx_fp32", "91.7 MB"), ("onnx_int8_dynamic", "23.0 MB")):
            assert name in export and size in export
        assert ("passed quantized_quality (accuracy drop in points: 0.5, 95% interval -0.48 to 1.48 on 320 rows, "
                "bound 1)") in export
        assert page.inner_text("#fusion") == "Fused graph: 6 MultiHeadAttention, 6 BiasGelu"
        assert page.inner_text("#shipped") == "Ships: int8_dynamic, 2 MatMuls kept in fp32 (model.quantized.onnx)"
        tries = page.inner_text("#attempts")
        assert "int8_dynamic\t0\taccuracy drop in points 1.7, 95% interval 0.3 to 3.1 on 320 rows\t6.4 ms\tmissed" \
            in tries and "2 MatMuls kept in fp32\t2\t" in tries and "within the bound" in tries
        assert "The export passed its checks." in export
        results = page.inner_text("#results")
        assert "0.995" in results and "baseline" in results and "0.25" in results
        assert page.inner_text("#selection") == ("Kept the weights of step 15 of 30: validation accuracy 1, the best, "
                                                 "reached at 3 evaluations (steps 5, 10, 15); of those the lowest "
                                                 "validation loss, 0.08.")
        assert page.inner_text("#baseline") == ("Baseline (predicting the majority class of train): test accuracy "
                                                "0.995 beats predicting the majority class of train, 0.25.")
        assert "this job's test split (200 rows): accuracy 0.995 here, 0.97 the champion" in page.inner_text("#champion")
        assert "the gradient norm exploded at step 12" in page.inner_text("#warnings")
        # one time format with the CLI's (runner status prints events as %H:%M:%S), whatever the browser's locale
        import time

        at = store.events("done-1")[-1]["at"]
        assert time.strftime("%H:%M:%S", time.localtime(at)) in page.inner_text("#history")
        assert " AM" not in page.inner_text("#history") and " PM" not in page.inner_text("#history")
        assert page.locator("#checkpoints tbody tr").count() == 1 and "15" in page.inner_text("#checkpoints")
        with page.expect_download() as got:
            page.click('#artifacts a:text("onnx/labels.json")')
        assert Path(got.value.path()).read_text() == '["sports", "weather"]'
        assert page.inner_text("#live") == "up to date"  # an ended job is not polled any more
        assert not page.locator("#cancel").count()
        shoot(page, "job-succeeded")

        # a job whose export ships fp32 because no quantization met its bound: its state line and export say so
        fp32_dir = home / "artifacts" / "fp32-1"
        (fp32_dir / "onnx").mkdir(parents=True)
        note = ("no quantized model met export.max_quality_drop (1) on the held-out rows (tried int8_dynamic: "
                "accuracy drop in points 3.1): the checked fp32 ONNX model is shipped")
        (fp32_dir / "onnx" / "export_report.json").write_text(json.dumps({
            "task": "classification", "passed": True, "checks": {"fp32_parity": {"max_abs_diff": 1e-7, "passed": True}},
            "variants": {}, "shipped": {"variant": "fp32", "quantized": False, "note": note},
            "attempts": [{"description": "int8_dynamic", "kept_fp32": [], "passed": False,
                          "quality": {"compared": "accuracy drop in points", "value": 3.1}}]}))
        store.add_job("fp32-1", "fp32", "name: fp32\nmodel:\n  name: org/m\n", str(fp32_dir), 1, 1, 0)
        for state in ("STARTING", "RUNNING"):
            store.set_state("fp32-1", state)
        store.set_state("fp32-1", "SUCCEEDED", reason="export: " + note)
        page.goto(f"{url}/ui/jobs/fp32-1")
        page.wait_for_selector("#shipped")
        assert page.inner_text("#reason") == "Succeeded, but: export: " + note
        assert page.inner_text("#shipped") == "Ships: fp32 (model.onnx) \u2014 " + note
        assert "missed" in page.inner_text("#attempts")


def test_schedules_and_models_pages(browser, tmp_path):
    """Schedules: next fire, Run now (confirmed) records a fire that queues a job, Pause. Models: versions with the
    gate's decisions and the champion's mark; Roll back (confirmed) moves the mark. A store of its own, no Ray."""
    import httpx

    from runner.server import create_app

    home = tmp_path / "home"
    app = create_app(home)
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    (tmp_path / "test.jsonl").write_text('{"text": "c", "label": "x"}\n')
    base = (f"name: topics\nmodel:\n  name: org/m\ntask: classification\ndata:\n  train: {tmp_path}/train.jsonl\n"
            f"  test: {tmp_path}/test.jsonl\nregister_as: topics\nexport:\n  onnx: true\n")
    store = app.state.store
    for i, accuracy in enumerate((0.8, 0.9, 0.4), start=1):  # v2 better, v3 worse
        job_dir = home / "artifacts" / f"t-{i}"
        (job_dir / "onnx").mkdir(parents=True)
        (job_dir / "eval.json").write_text(json.dumps({"test": {"accuracy": accuracy}}))
        (job_dir / "onnx" / "export_report.json").write_text(
            '{"passed": true, "checks": {"fp32_parity": {"passed": true}}}')
        store.add_job(f"t-{i}", "topics", base, str(job_dir), 1, 1, 0)
        for state in ("STARTING", "RUNNING", "SUCCEEDED"):
            store.set_state(f"t-{i}", state)
    with served(app) as url:
        from runner.registry import Registry

        registry = Registry(store)
        for i in (1, 2, 3):
            registry.register(store.get(f"t-{i}"))
        r = httpx.post(f"{url}/schedules", json={"recipe": base + "schedule:\n  cron: '30 2 * * *'\n  timezone: "
                                                 "Europe/Berlin\n"}, timeout=10)
        assert r.status_code == 201, r.text
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        page.on("dialog", lambda d: d.accept())
        page.goto(f"{url}/ui/schedules")
        row = page.locator('#schedules tr[data-id="topics"]')
        row.wait_for()
        assert "T02:30:00+0" in row.inner_text() and "no fire yet" in row.inner_text()
        row.locator("button.trigger").click()
        page.wait_for_function("() => document.querySelector('#schedules td.last').textContent.includes('submitted')")
        assert "run now by hand" in row.inner_text() and "topics-" in row.locator("td.last a").inner_text()
        row.locator("button.pause").click()
        page.wait_for_function("() => document.querySelector('#schedules tr[data-id=topics]').textContent"
                               ".includes('PAUSED')")
        shoot(page, "schedules")

        page.goto(f"{url}/ui/models")
        champion = "() => document.querySelector('tr[data-version] .state')?.closest('tr').dataset.version"
        page.wait_for_function(f"() => ({champion})() === '2'")
        text = page.inner_text('[data-model="topics"]')
        assert "promoted to champion: accuracy 0.9 against champion v1's 0.8" in text
        assert "not promoted: accuracy 0.4 against champion v2's 0.9" in text
        page.click("button.rollback")
        page.wait_for_function(f"() => ({champion})() === '1'")
        assert "rolled back from v2 to v1" in page.inner_text('[data-model="topics"]')
        shoot(page, "models")


def test_a_sweeps_page_shows_its_trials_their_curves_and_the_chosen_one(browser, tmp_path):
    """A sweep's page over a store of its own (its trials as the dispatcher records them; tests/unit/test_sweep.py
    and tests/integration/test_sweep.py make them from real folders and real runs): the trials table with values,
    state, best validation figure and steps, every trial's validation curve on one chart, the chosen one marked."""
    from runner.server import create_app

    home = tmp_path / "home"
    app = create_app(home)
    store = app.state.service.store
    job_dir = home / "artifacts" / "sw-1"
    job_dir.mkdir(parents=True)
    snapshot = ("name: sw\ntask: classification\nmodel: {name: m}\ndata: {train: t.jsonl}\nsweep:\n  parameters:\n"
                "    train.lr: {choice: [0.003, 1.0e-07, 0.001]}\n  search: grid\n  metric: accuracy\n")
    sweep = store.add_job("sw-1", "sw", snapshot, str(job_dir), 2, 1, 0, kind="sweep")
    curves = {0: [0.6, 0.7, 0.8, 0.9], 1: [0.3], 2: [0.5, 0.55, 0.6, 0.65]}
    for i, lr in enumerate((0.003, 1e-07, 0.001)):
        tid = f"sw-1-t{i:03d}"
        store.add_trial(tid, sweep, "name: sw\n", str(job_dir / "trials" / f"t{i:03d}"), {"train.lr": lr}, "started")
        store.add_metrics(tid, [{"step": 6 * (k + 1), "split": "validation", "accuracy": a, "loss": 1 - a}
                                for k, a in enumerate(curves[i])] +
                          [{"step": 6 * len(curves[i]), "loss": 0.5, "total_steps": 24}])
        store.set_state(tid, "STOPPED" if i == 1 else "SUCCEEDED", reason="stopped early by ASHA" if i == 1 else None)
    (job_dir / "sweep.json").write_text(json.dumps({"chosen": 0, "metric": "accuracy"}))
    with served(app) as url:
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        page.goto(f"{url}/ui/jobs/sw-1")
        page.wait_for_selector("#trials tbody tr")
        rows = page.locator("#trials tbody tr")
        assert rows.count() == 3
        text = [rows.nth(i).inner_text() for i in range(3)]
        assert "0.9 (step 24)" in text[0] and "★ chosen" in text[0] and "SUCCEEDED" in text[0]
        assert "STOPPED" in text[1] and "1.00e-7" in text[1] and "6/24" in text[1] and "chosen" not in text[1]
        assert page.locator("#trials tbody tr.chosen").count() == 1
        assert "sw-1-t000" in page.locator("#chosen").inner_text()
        page.wait_for_selector("#trial-curves svg polyline")
        svg = page.locator("#trial-curves svg.chart")
        assert svg.get_attribute("data-points") == str(sum(len(c) for c in curves.values()))
        assert page.locator("#trial-curves polyline").count() == 2  # trial 1's single point is a circle
        assert page.locator("#trial-curves polyline.strong").count() == 1
        assert "t000 (chosen)" in page.locator("#trial-curves .legend").inner_text()
        page.locator("#trials tbody tr").nth(1).locator("a").click()  # a trial's own page
        page.wait_for_url(f"{url}/ui/jobs/sw-1-t001")
        page.wait_for_selector("#sweep-link")  # its sweep, and no Cancel or Retry of its own
        assert page.locator("#cancel, #retry").count() == 0
        page.goto(f"{url}/ui/jobs/sw-1")
        page.wait_for_selector("#trials tbody tr")
        shoot(page, "sweep")
        page.goto(f"{url}/ui/jobs")
        page.wait_for_selector(".sweep-note")
        assert "sweep: 3 of 3 trials, chose t000" in page.locator(".sweep-note").inner_text()
        page.close()
