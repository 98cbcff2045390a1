"""The dashboard's server side, in process (FastAPI's TestClient over the real app and a real store): who may see
and change what, the first page's data, the curves thinned to 2,000 points, Prometheus' metrics, downloads."""

import json
import re

import pytest
from fastapi.testclient import TestClient

from runner.series import lttb, thin
from runner.server import SESSION_COOKIE, create_app

TOKEN = "tok-Secret-123"
RECIPE = "name: {name}\nmodel:\n  name: {model}\ntask: classification\ndata:\n  train: t.jsonl\ntuning: lora\n"


def add(store, home, job_id, name="demo", model="org/tiny-bert", state=None, workers=2):
    job_dir = home / "artifacts" / job_id
    job_dir.mkdir(parents=True, exist_ok=True)
    store.add_job(job_id, name, RECIPE.format(name=name, model=model), str(job_dir), workers, 1, 0)
    for s in {"RUNNING": ["STARTING", "RUNNING"], "SUCCEEDED": ["STARTING", "RUNNING", "SUCCEEDED"],
              "FAILED": ["FAILED"], None: []}[state]:
        store.set_state(job_id, s, reason="it broke" if s == "FAILED" else None)
    return job_dir


def every_route(routes):
    """The app's routes, those of included routers too (FastAPI keeps those behind a wrapper of their own)."""
    for r in routes:
        inner = getattr(r, "original_router", None)
        yield from every_route(inner.routes) if inner is not None else [r]


@pytest.fixture
def app(tmp_path):
    return create_app(tmp_path / "home", TOKEN)


def test_with_a_token_every_page_and_route_but_health_and_login_refuses(app, tmp_path):
    """Walks the app's own route table, so that a route added later without the check fails here."""
    add(app.state.store, tmp_path / "home", "demo-1", state="SUCCEEDED")
    (tmp_path / "home" / "artifacts" / "demo-1" / "eval.json").write_text("{}")
    c = TestClient(app, follow_redirects=False)
    checked = 0
    for route in every_route(app.routes):
        path = re.sub(r"\{[^}:]+(:path)?\}", lambda m: "app.js" if "name" in m.group(0) else
                      ("eval.json" if m.group(1) else "demo-1"), route.path)
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method == "HEAD":
                continue
            r = c.request(method, path, json={} if method == "POST" else None)
            checked += 1
            if path == "/health":
                assert r.status_code == 200
            elif path == "/login":
                assert r.status_code in (200, 401, 429) and "demo-1" not in r.text and 'name="token"' in r.text
            elif r.status_code == 303:  # pages send the browser to the login form, with nothing of the job
                assert r.headers["location"].startswith("/login?next=") and "demo-1" not in r.text, path
            else:
                assert r.status_code == 401, (method, path, r.status_code)
                assert "demo-1" not in r.text and "org/tiny-bert" not in r.text
            bad = c.request(method, path, headers={"Authorization": "Bearer wrong"}, cookies={SESSION_COOKIE: "x"},
                            json={} if method == "POST" else None)
            if path not in ("/health", "/login"):
                assert bad.status_code in (401, 303, 429), (method, path)  # 429: wrong tokens are limited
    assert checked >= 20
    paths = {r.path for r in every_route(app.routes)}
    assert {"/ui/jobs", "/ui/jobs/{job_id}", "/ui/cluster", "/metrics", "/jobs/{job_id}/series", "/openapi.json",
            "/ui/static/{name}", "/jobs/{job_id}/files/{path:path}"} <= paths
    ok = TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.get("/jobs").json()["total"] == 1 and ok.get("/openapi.json").status_code == 200


def test_login_form_and_sign_in_link_set_a_cookie_that_is_not_the_token(app):
    c = TestClient(app, follow_redirects=False)
    assert c.get("/ui/jobs").headers["location"] == "/login?next=/ui/jobs"
    wrong = c.post("/login", content="token=nope&next=/ui/cluster",
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert wrong.status_code == 401 and "not this server" in wrong.text and SESSION_COOKIE not in wrong.cookies
    r = c.post("/login", content=f"token={TOKEN}&next=/ui/cluster",
               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/cluster"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict") and TOKEN not in cookie
    assert c.get("/ui/cluster").status_code == 200 and c.get("/jobs").status_code == 200
    kept = dict(c.cookies)
    c.post("/logout", headers={"Origin": "http://testserver"})
    c.cookies.clear()
    assert c.get("/jobs").status_code == 401
    replay = TestClient(app, follow_redirects=False, cookies=kept)  # the cookie kept from before the logout
    assert replay.get("/jobs").status_code == 401, "logging out revokes the session, not only the browser's copy"
    link = TestClient(app, follow_redirects=False)
    r = link.get("/login", params={"token": TOKEN})  # a token in a URL stays in history and proxies' logs
    assert r.status_code == 400 and SESSION_COOKIE not in r.cookies and "runner dashboard" in r.text
    assert link.post("/login/code").status_code == 401
    code = link.post("/login/code", headers={"Authorization": f"Bearer {TOKEN}"}).json()["code"]
    r = link.get("/login", params={"code": code, "next": "//evil.example/x"})  # never sent to another site
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs"
    assert link.get("/ui/jobs").status_code == 200
    other = TestClient(app, follow_redirects=False)
    assert other.get("/login", params={"code": code}).status_code == 401, "a sign-in code works once"
    assert other.post("/login/code").status_code == 401


def test_sessions_expire_and_wrong_tokens_are_limited(tmp_path):
    from runner.sessions import SESSION_S, TRIES

    clock = [1000.0]
    app = create_app(tmp_path / "home", TOKEN, clock=lambda: clock[0])
    c = TestClient(app, follow_redirects=False)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    first = c.post("/login", content=f"token={TOKEN}", headers=form).cookies[SESSION_COOKIE]
    c.cookies.clear()
    second = c.post("/login", content=f"token={TOKEN}", headers=form).cookies[SESSION_COOKIE]
    assert first != second and TOKEN not in first, "a random id a sign-in, not a value made from the token"
    assert c.get("/jobs").status_code == 200
    clock[0] += SESSION_S + 1
    assert c.get("/jobs").status_code == 401, "a session ends"
    c.cookies.clear()
    for _ in range(TRIES):
        assert c.post("/login", content="token=guess", headers=form).status_code == 401
    r = c.post("/login", content=f"token={TOKEN}", headers=form)
    assert r.status_code == 429 and SESSION_COOKIE not in r.cookies, "even the right token waits"
    clock[0] += 61
    assert c.post("/login", content=f"token={TOKEN}", headers=form).status_code == 303


def test_changes_from_another_site_are_refused(tmp_path):
    home = tmp_path / "home"
    app = create_app(home, TOKEN)
    for i in range(3):
        add(app.state.store, home, f"q-{i}")
    c = TestClient(app)
    code = c.post("/login/code", headers={"Authorization": f"Bearer {TOKEN}"}).json()["code"]
    c.get("/login", params={"code": code})  # the browser now holds the session cookie
    page = c.get("/ui/jobs/q-0").text
    csrf = re.search(r'<meta name="csrf" content="([0-9a-f]+)">', page).group(1)
    assert c.post("/jobs/q-0/cancel").status_code == 403  # the cookie alone is not enough
    assert c.post("/jobs/q-0/cancel", headers={"X-Runner-CSRF": "0" * 64}).status_code == 403
    assert c.post("/jobs/q-0/cancel", headers={"X-Runner-CSRF": csrf, "Origin": "https://evil.example"}).status_code \
        == 403
    assert c.post("/jobs/q-0/cancel", headers={"X-Runner-CSRF": csrf, "Sec-Fetch-Site": "cross-site"}).status_code \
        == 403
    assert app.state.store.get("q-0").state == "QUEUED"
    r = c.post("/jobs/q-0/cancel", headers={"X-Runner-CSRF": csrf, "Origin": "http://testserver",
                                            "Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 200 and r.json()["state"] == "CANCELLED"
    # programs with the token (the CLI) send no Origin and no CSRF token
    assert TestClient(app).post("/jobs/q-1/cancel", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200

    local = create_app(tmp_path / "local", host="127.0.0.1")  # no token: loopback only
    add(local.state.store, tmp_path / "local", "l-0")
    lc = TestClient(local, base_url="http://127.0.0.1:8642")
    assert lc.post("/jobs/l-0/cancel", headers={"Origin": "http://evil.example"}).status_code == 403
    assert lc.post("/jobs/l-0/cancel", headers={"Sec-Fetch-Site": "same-site"}).status_code == 403
    rebound = TestClient(local, base_url="http://evil.example:8642")  # DNS rebinding onto the local server
    assert rebound.get("/jobs").status_code == 421
    assert local.state.store.get("l-0").state == "QUEUED"
    assert lc.post("/jobs/l-0/cancel").json()["state"] == "CANCELLED"


def test_jobs_page_inlines_its_first_page_and_the_listing_filters(tmp_path):
    home = tmp_path / "home"
    clock = [1000.0]
    app = create_app(home, clock=lambda: clock[0])
    store = app.state.store
    for i in range(30):
        add(store, home, f"job-{i:02d}", name="bert" if i % 2 else "gpt", model="Org/Tiny-BERT" if i % 2 else "x/gpt2")
        clock[0] += 1
    add(store, home, "evil", model="</script><script>alert(1)</script>")
    add(store, home, "odd_1", model="100%_real")
    c = TestClient(app)
    page = c.get("/ui/jobs")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "<script><script>" not in page.text and "</script><script>alert" not in page.text
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', page.text).group(1))
    listed = data["list"]
    assert len(listed["jobs"]) == 25 and listed["total"] == 32 and listed["counts"]["QUEUED"] == 32
    assert listed["jobs"][0]["id"] == "odd_1" and listed["jobs"][2]["queue_position"] == 30
    assert listed["jobs"][0]["waiting_for"] == "no Ray cluster attached"
    got = c.get("/jobs", params={"q": "tiny-bert", "limit": 5, "offset": 10}).json()
    assert got["total"] == 15 and [j["id"] for j in got["jobs"]] == [f"job-{i:02d}" for i in (9, 7, 5, 3, 1)]
    assert c.get("/jobs", params={"q": "%_"}).json()["total"] == 1  # % and _ are plain characters
    assert c.get("/jobs", params={"q": "0%"}).json()["jobs"][0]["id"] == "odd_1"
    page2 = c.get("/ui/jobs", params={"state": "QUEUED", "q": "gpt", "page": 2}).text
    data2 = json.loads(re.search(r'type="application/json">(.*?)</script>', page2).group(1))
    assert data2["list"]["total"] == 15 and data2["list"]["offset"] == 25 and len(data2["list"]["jobs"]) == 0
    assert c.get("/ui/jobs/nope").status_code == 404


def test_progress_eta_and_duration(tmp_path):
    home = tmp_path / "home"
    clock = [5000.0]
    app = create_app(home, clock=lambda: clock[0])
    store = app.state.store
    add(store, home, "run-1", state="RUNNING")
    store.add_metrics("run-1", [{"step": s, "loss": 2.0 - s / 100, "samples_per_s": 40.0, "total_steps": 100,
                                 "time": 5000.0 + 2 * s} for s in range(1, 11)])
    store.add_metrics("run-1", [{"step": 11, "loss": 1.5, "samples_per_s": 42.0, "total_steps": 100,
                                 "time": 5022.0}, {"step": 11, "split": "validation", "loss": 1.6, "time": 5023}])
    clock[0] = 5030.0
    job = TestClient(app).get("/jobs/run-1").json()
    p = job["progress"]
    assert (p["step"], p["loss"], p["samples_per_s"], p["step0"], p["t0"]) == (11, 1.5, 42.0, 1, 5002.0)
    assert job["eta_s"] == pytest.approx(89 * 2.0) and job["duration_s"] == 30.0
    store.set_state("run-1", "FAILED", reason="x")
    assert TestClient(app).get("/jobs/run-1").json()["eta_s"] is None


def test_curves_are_thinned_to_2000_points_and_keep_their_shape(tmp_path):
    home = tmp_path / "home"
    app = create_app(home)
    store = app.state.store
    add(store, home, "long", state="RUNNING")
    recs = [{"step": s, "loss": 3.0 / (1 + s / 500), "lr": 1e-3, "samples_per_s": 50.0, "total_steps": 10000}
            for s in range(1, 10001)]
    recs[6000]["loss"] = 9.5  # a spike a person must see
    recs += [{"step": s, "split": "validation", "loss": 1.0, "accuracy": s / 10000} for s in range(500, 10001, 500)]
    store.add_metrics("long", recs)
    got = TestClient(app).get("/jobs/long/series").json()
    loss = got["train"]["loss"]
    assert len(loss["step"]) == 2000 and loss["points"] == 10000
    assert loss["step"][0] == 1 and loss["step"][-1] == 10000 and 9.5 in loss["value"]
    assert loss["step"] == sorted(loss["step"])
    assert len(got["validation"]["accuracy"]["step"]) == 20 and "perplexity" not in got["validation"]
    assert len(TestClient(app).get("/jobs/long/series", params={"max_points": 100}).json()["train"]["lr"]["step"]) \
        == 100
    # the thinning itself: short series untouched, None never chosen, ends kept
    assert lttb([1, 2, 3], [1, 2, 3], 10) == [0, 1, 2]
    kept = thin({"step": list(range(50)), "v": [None if i % 3 else float(i) for i in range(50)]}, 5)["v"]
    assert kept["points"] == 17 and len(kept["step"]) == 5 and all(s % 3 == 0 for s in kept["step"])


def test_prometheus_metrics(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    home = tmp_path / "home"
    app = create_app(home)
    store = app.state.store
    for i in range(3):
        add(store, home, f"q-{i}")
    add(store, home, "f-0", state="FAILED")
    add(store, home, "r-0", name="trainer", state="RUNNING")
    store.add_metrics("r-0", [{"step": 7, "loss": 0.42, "samples_per_s": 31.5, "tokens_per_s": 900.0,
                               "total_steps": 10}])
    r = TestClient(app).get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(r.text) for s in f.samples}
    assert samples[("runner_jobs", (("state", "QUEUED"),))] == 3
    assert samples[("runner_jobs", (("state", "FAILED"),))] == 1
    assert samples[("runner_jobs", (("state", "SUCCEEDED"),))] == 0
    assert samples[("runner_queue_length", ())] == 3
    who = (("job", "r-0"), ("name", "trainer"))
    assert samples[("runner_job_samples_per_second", who)] == 31.5
    assert samples[("runner_job_loss", who)] == 0.42 and samples[("runner_job_step", who)] == 7
    assert not any(k[0].startswith("runner_job_") and ("job", "f-0") in k[1] for k in samples)


def test_downloads_stay_inside_the_job_folder(tmp_path):
    home = tmp_path / "home"
    app = create_app(home)
    job_dir = add(app.state.store, home, "d-1")
    (job_dir / "onnx").mkdir()
    (job_dir / "onnx" / "model.onnx").write_bytes(b"\x08\x01onnx")
    (home / "secret.txt").write_text("not yours")
    c = TestClient(app)
    r = c.get("/jobs/d-1/files/onnx/model.onnx")
    assert r.status_code == 200 and r.content == b"\x08\x01onnx" and "model.onnx" in r.headers["content-disposition"]
    for bad in ("../../secret.txt", "..%2F..%2Fsecret.txt", "/etc/passwd", "onnx", "nope.bin"):
        r = c.get(f"/jobs/d-1/files/{bad}")
        assert r.status_code == 404 and "not yours" not in r.text, bad
