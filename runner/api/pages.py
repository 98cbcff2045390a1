"""The dashboard's pages, served by the runner server: Jobs (/ui/jobs), a job (/ui/jobs/<id>), Cluster (/ui/cluster),
Schedules (/ui/schedules) and Models (/ui/models).

Each page is one HTML shell (runner/ui/page.html) with the page's first data inlined as JSON, so the first response
shows the table without a second round trip; runner/ui/app.js draws it and keeps it live from the same REST API the
CLI uses (polling the JSON routes every two seconds while the tab is visible, the job's log over Server-Sent
Events). No build step, nothing from a CDN: the CSS, the script and the charts (SVG drawn by app.js) ship in the
package.

With a token (the local server has one of its own, runner.local), a page asked for without a session sends the
browser to /login (runner/api/auth.py).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from runner.api.service import current
from runner.store import UnknownJob

UI = Path(__file__).parents[1] / "ui"
# Scripts and styles only from this server (no inline script can run if a job's text ever slipped into a page
# unescaped), and no framing by another site (no clickjacking of the cancel button).
SECURITY = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                                       "base-uri 'none'; form-action 'self'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"}
STATIC = {"app.css": "text/css", "app.js": "text/javascript"}
PAGE_SIZE = 25


router = APIRouter(include_in_schema=False)
SHELL = (UI / "page.html").read_text(encoding="utf-8")
VERSION = str(int(max((UI / n).stat().st_mtime for n in STATIC)))  # cache-busting for app.css/app.js


def authorized(request: Request) -> bool:
    return request.app.state.gate.authorized(request)


def render(request: Request, page: str, title: str, data: dict, code: int = 200) -> Response:
    gate = request.app.state.gate
    if not gate.authorized(request):
        return RedirectResponse(f"/login?next={quote(str(request.url.path))}", status_code=303)
    # every <, > and & as \u escapes: no text of a job's can end the script or open a comment (<!--) in it
    blob = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e") \
        .replace("&", "\\u0026")
    body = (SHELL.replace("{{title}}", html.escape(title)).replace("{{page}}", page)
            .replace("{{csrf}}", gate.csrf).replace("{{version}}", VERSION)
            .replace("{{logout}}", "" if gate.token is None else
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
    first = current(request).listing(state or None, None, q or None, PAGE_SIZE, (page - 1) * PAGE_SIZE) \
        if authorized(request) else {}
    return render(request, "jobs", "Jobs", {"list": first, "page_size": PAGE_SIZE, "state": state or "",
                                            "q": q or "", "page": page})


@router.get("/ui/jobs/{job_id}")
def job_page(request: Request, job_id: str):
    if not authorized(request):
        return render(request, "job", job_id, {})
    try:
        svc = current(request)
        job = svc.described(svc.store.get(job_id))
    except UnknownJob as e:
        return render(request, "job", job_id, {"id": job_id, "missing": str(e)}, 404)
    return render(request, "job", job_id, {"job": job, "id": job_id, "ray_url": svc.ray_url})


@router.get("/ui/cluster")
def cluster_page(request: Request):
    return render(request, "cluster", "Cluster", {"ray_url": current(request).ray_url})


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
