"""The dashboard's pages, served by the runner server: Jobs (/ui/jobs), a job (/ui/jobs/<id>), Cluster (/ui/cluster),
Schedules (/ui/schedules) and Models (/ui/models).

Each page is one HTML shell (runner/ui/page.html) with the page's first data inlined as JSON, so the first response
shows the table without a second round trip; runner/ui/app.js draws it and keeps it live from the same REST API the
CLI uses (polling the JSON routes every two seconds while the tab is visible, the job's log over Server-Sent
Events). No build step, nothing from a CDN: the CSS, the script and the charts (SVG drawn by app.js) ship in the
package.

With a token (the local server has one of its own, runner.local), a page asked for without a session sends the
browser to /login: a form that takes the token, or a one-time sign-in link /login?code=...&next=/ui/jobs that
`runner dashboard` opens (runner.sessions). The cookie holds a random session id (never the token), HttpOnly and
SameSite=Strict, that expires and that logging out revokes; wrong tokens are limited per client.
"""

from __future__ import annotations

import hmac
import html
import json
from pathlib import Path
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from runner.store import UnknownJob

UI = Path(__file__).parent / "ui"
# Scripts and styles only from this server (no inline script can run if a job's text ever slipped into a page
# unescaped), and no framing by another site (no clickjacking of the cancel button).
SECURITY = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                                       "base-uri 'none'; form-action 'self'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"}
STATIC = {"app.css": "text/css", "app.js": "text/javascript"}
PAGE_SIZE = 25


def pages(app, store, authorized, csrf: str, sessions, token: str | None) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    shell = (UI / "page.html").read_text(encoding="utf-8")
    login_form = (UI / "login.html").read_text(encoding="utf-8")
    version = str(int(max((UI / n).stat().st_mtime for n in STATIC)))  # cache-busting for app.css/app.js

    def render(request: Request, page: str, title: str, data: dict, code: int = 200) -> Response:
        if not authorized(request):
            return RedirectResponse(f"/login?next={quote(str(request.url.path))}", status_code=303)
        # every <, > and & as \u escapes: no text of a job's can end the script or open a comment (<!--) in it
        blob = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e") \
            .replace("&", "\\u0026")
        body = (shell.replace("{{title}}", html.escape(title)).replace("{{page}}", page)
                .replace("{{csrf}}", csrf).replace("{{version}}", version)
                .replace("{{logout}}", "" if token is None else
                         '<form method="post" action="/logout" class="logout"><button>Log out</button></form>')
                .replace("{{data}}", blob))  # last: a job's text that says {{logout}} stays text
        return HTMLResponse(body, status_code=code, headers={"Cache-Control": "no-store", **SECURITY})

    @router.get("/")
    def root(request: Request):
        if not authorized(request):
            return RedirectResponse("/login?next=/ui/jobs", status_code=303)
        return RedirectResponse("/ui/jobs", status_code=303)

    @router.get("/ui/jobs")
    def jobs_page(request: Request, state: str | None = None, q: str | None = None, page: int = 1):
        page = min(max(1, page), 10**9)  # far past the last page is the last page's emptiness, never an overflow
        first = app.state.listing(state or None, None, q or None, PAGE_SIZE, (page - 1) * PAGE_SIZE) \
            if authorized(request) else {}
        return render(request, "jobs", "Jobs", {"list": first, "page_size": PAGE_SIZE, "state": state or "",
                                                "q": q or "", "page": page})

    @router.get("/ui/jobs/{job_id}")
    def job_page(request: Request, job_id: str):
        if not authorized(request):
            return render(request, "job", job_id, {})
        try:
            job = app.state.described(store.get(job_id))
        except UnknownJob as e:
            return render(request, "job", job_id, {"id": job_id, "missing": str(e)}, 404)
        return render(request, "job", job_id, {"job": job, "id": job_id, "ray_url": app.state.ray_url})

    @router.get("/ui/cluster")
    def cluster_page(request: Request):
        return render(request, "cluster", "Cluster", {"ray_url": app.state.ray_url})

    @router.get("/ui/schedules")
    def schedules_page(request: Request):
        return render(request, "schedules", "Schedules", {})

    @router.get("/ui/models")
    def models_page(request: Request):
        return render(request, "models", "Models", {})

    @router.get("/ui/static/{name}")
    def static(request: Request, name: str):
        if not authorized(request):
            raise HTTPException(401, "log in first")
        if name not in STATIC:
            raise HTTPException(404, f"no file {name!r}")
        return FileResponse(UI / name, media_type=STATIC[name], headers={"Cache-Control": "max-age=86400"})

    def login_page(next_url: str, error: str = "", code: int = 200) -> HTMLResponse:
        body = (login_form.replace("{{next}}", html.escape(next_url, quote=True))
                .replace("{{error}}", f'<p class="error">{html.escape(error)}</p>' if error else ""))
        return HTMLResponse(body, status_code=code, headers={
            "Cache-Control": "no-store", **SECURITY, "Content-Security-Policy": "default-src 'none'; style-src "
            "'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"})

    def signed_in(next_url: str, request: Request) -> Response:
        from runner.sessions import SESSION_S

        out = RedirectResponse(next_url, status_code=303)
        out.set_cookie("runner_session", sessions.start(), httponly=True, samesite="strict", path="/",
                       max_age=SESSION_S, secure=request.url.scheme == "https")
        return out

    def client(request: Request) -> str:
        return request.client.host if request.client else "?"

    @router.get("/login")
    def login(request: Request, next: str = "/ui/jobs"):
        next_url = _local(next)
        if token is None:
            return RedirectResponse(next_url, status_code=303)
        if request.query_params.get("token") is not None:  # a URL is kept in history and proxies' logs
            return login_page(next_url, "A token in the address is not taken: type it below, or run "
                                        "`runner dashboard` for a sign-in link.", 400)
        code = request.query_params.get("code")
        if code is not None:
            if sessions.redeem(code[:100]):
                return signed_in(next_url, request)
            return login_page(next_url, "That sign-in link was used or has expired: run `runner dashboard` for "
                                        "another.", 401)
        return login_page(next_url)

    @router.post("/login")
    async def login_post(request: Request):
        wait = sessions.throttled(client(request))
        if wait:
            return login_page("/ui/jobs", f"Too many wrong tokens: try again in {wait:.0f} s.", 429)
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        next_url = _local((form.get("next") or ["/ui/jobs"])[0])
        given = (form.get("token") or [""])[0]
        if token is None:
            return RedirectResponse(next_url, status_code=303)
        if hmac.compare_digest(given.encode(), token.encode()):
            return signed_in(next_url, request)
        sessions.failed(client(request))
        return login_page(next_url, "That token is not this server's.", 401)

    @router.post("/logout")
    def logout(request: Request):
        if not authorized(request):
            raise HTTPException(401, "not logged in")
        sessions.end(request.cookies.get("runner_session"))
        out = RedirectResponse("/login", status_code=303)
        out.delete_cookie("runner_session", path="/")
        return out

    return router


def _local(url: str) -> str:
    """Only a path on this server is followed after login (never another site)."""
    return url if url.startswith("/") and not url.startswith("//") and "\\" not in url else "/ui/jobs"
