"""Who may ask the server what: the token, the dashboard's sessions, and the checks every request passes first.

With a token, every route but /health (and the login page) needs it: `Authorization: Bearer <token>` from
programs, or the session cookie that the dashboard's login form (or a one-time sign-in link) sets. The token is
checked on the headers before a body is read, and bodies are bounded. Requests that change something refuse to come
from another site (`Sec-Fetch-Site`, `Origin`), and one that rides on the cookie must carry the page's CSRF token
(`X-Runner-CSRF`). Bound to loopback, requests must name a loopback host (no DNS rebinding onto the local server).
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import secrets
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from runner.api.pages import SECURITY, UI

MAX_BODY = 2**20  # a request body: a recipe is at most 256 KiB (jobs.recipe.MAX_RECIPE_BYTES), sent as JSON
MAX_LOGIN_BODY = 4096
SESSION_COOKIE = "runner_session"
UNSAFE = ("POST", "PUT", "PATCH", "DELETE")
DOCS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
NO_TOKEN = "missing or wrong token: send Authorization: Bearer $RUNNER_TOKEN"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Off loopback the server needs a token; raises ValueError with the fix."""
    if not is_loopback(host) and not token:
        raise ValueError(f"refusing to listen on {host} without a token: set RUNNER_TOKEN (for example "
                         f"RUNNER_TOKEN={secrets.token_urlsafe(24)}), or bind to 127.0.0.1")


def derived(secret: str, purpose: str) -> str:
    """A value made from the token for one purpose (the session cookie, the CSRF token): neither gives the token."""
    return hmac.new(secret.encode(), purpose.encode(), "sha256").hexdigest()


def cross_site(request: Request) -> str | None:
    """Why a request that changes something looks sent by another site's page, or None. Browsers say where a
    request comes from (Sec-Fetch-Site, Origin); programs such as the CLI send neither and are let through to the
    token check."""
    site = request.headers.get("sec-fetch-site")
    if site and site not in ("same-origin", "none"):
        return f"a {site} request (Sec-Fetch-Site); this server takes changes only from its own pages"
    origin = request.headers.get("origin")
    if origin and origin != "null" and origin.split("://", 1)[-1] != request.headers.get("host"):
        return f"the request comes from {origin}, not from this server's pages"
    if origin == "null":
        return "the request comes from an opaque origin, not from this server's pages"
    return None


class Gate:
    """The token (None: an open local server), the sessions, and whether only loopback hosts are served."""

    def __init__(self, token: str | None, sessions, loopback_only: bool):
        self.token, self.sessions, self.loopback_only = token, sessions, loopback_only
        self.csrf = derived(token or secrets.token_hex(32), "runner-csrf")

    def bearer_ok(self, request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return bool(self.token) and given.startswith("Bearer ") and \
            hmac.compare_digest(given[7:].encode(), self.token.encode())

    def authorized(self, request: Request) -> bool:
        if not self.token or self.bearer_ok(request):
            return True
        return self.sessions.valid(request.cookies.get(SESSION_COOKIE))

    def require(self, request: Request) -> None:
        """The routes' dependency: 401 without the token or a session."""
        if not self.authorized(request):
            raise HTTPException(401, NO_TOKEN)

    async def guard(self, request: Request, call_next):
        """Every request, before its route: host check, body bounds, the token on headers, cross-site refusal."""
        refusal = self._refusal(request)
        if refusal is not None:
            return JSONResponse({"detail": refusal[1]}, status_code=refusal[0])
        return await call_next(request)

    def _refusal(self, request: Request) -> tuple[int, str] | None:
        name = request.headers.get("host", "").rsplit(":", 1)[0].strip("[]")
        if self.loopback_only and not is_loopback(name):
            return 421, f"host {name!r} is not served here: use 127.0.0.1 or localhost"
        # the body: bounded, and not read at all for a request without the token (checked on headers alone)
        size = request.headers.get("content-length")
        limit = MAX_LOGIN_BODY if request.url.path == "/login" else MAX_BODY
        if size is not None and not (size.isascii() and size.isdigit() and int(size) <= limit):
            return 413, f"the request body is {size[:20]} bytes; at most {limit:,} are taken here"
        if "transfer-encoding" in request.headers:  # a chunked body is bounded by nothing said before it comes
            return 411, "send the body with a Content-Length, not chunked"
        if self.token and request.headers.get("authorization") is not None and not self.bearer_ok(request):
            who = request.client.host if request.client else "?"
            wait = self.sessions.throttled(who)
            if wait:
                return 429, f"too many wrong tokens: try again in {wait:.0f} s"
            self.sessions.failed(who)
            return 401, NO_TOKEN
        changes = request.method in UNSAFE
        if changes and self.token and request.url.path not in ("/login", "/logout") and \
                not self.authorized(request):
            return 401, NO_TOKEN
        if request.url.path in DOCS and not self.authorized(request):  # the API's own pages need the token too
            return 401, NO_TOKEN
        if changes:
            why = cross_site(request)
            if why is None and self.token and not self.bearer_ok(request) and self.authorized(request) and \
                    request.url.path not in ("/login", "/logout") and \
                    not hmac.compare_digest(request.headers.get("x-runner-csrf", "").encode(), self.csrf.encode()):
                why = "a request riding on the session cookie needs the page's X-Runner-CSRF token"
            if why:
                return 403, f"refused: {why}"
        return None


def require(request: Request) -> None:
    """The routes' dependency: the token or a session (Gate.require of the server's gate)."""
    request.app.state.gate.require(request)


# --- the dashboard's sign-in: /login (a form, or a one-time code), /logout ------------------------------------------

login = APIRouter(include_in_schema=False)  # the pages a browser signs in with
codes = APIRouter()  # the API's: a one-time sign-in code for the token's holder (runner dashboard)
LOGIN_FORM = (UI / "login.html").read_text(encoding="utf-8")


@codes.post("/login/code", dependencies=[Depends(require)])
def login_code(request: Request) -> dict:
    """A one-time sign-in code for the dashboard (`runner dashboard` opens /login?code=...): used once, valid for
    ten minutes; only a holder of the token (not a session) gets one."""
    gate = request.app.state.gate
    if not gate.bearer_ok(request):
        raise HTTPException(403, "a sign-in code is given for the token (Authorization: Bearer), not a session")
    from runner.sessions import CODE_S

    return {"code": gate.sessions.code(), "expires_in": CODE_S}


def login_page(next_url: str, error: str = "", code: int = 200) -> HTMLResponse:
    body = (LOGIN_FORM.replace("{{next}}", html.escape(next_url, quote=True))
            .replace("{{error}}", f'<p class="error">{html.escape(error)}</p>' if error else ""))
    return HTMLResponse(body, status_code=code, headers={
        "Cache-Control": "no-store", **SECURITY, "Content-Security-Policy": "default-src 'none'; style-src "
        "'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"})


def signed_in(next_url: str, request: Request) -> Response:
    from runner.sessions import SESSION_S

    out = RedirectResponse(next_url, status_code=303)
    out.set_cookie(SESSION_COOKIE, request.app.state.gate.sessions.start(), httponly=True, samesite="strict", path="/",
                   max_age=SESSION_S, secure=request.url.scheme == "https")
    return out


def client(request: Request) -> str:
    return request.client.host if request.client else "?"


@login.get("/login")
def login_form(request: Request, next: str = "/ui/jobs"):
    """The login page; with ?code= (what `runner dashboard` opens), a sign-in without the form."""
    gate = request.app.state.gate
    next_url = _local(next)
    if gate.token is None:
        return RedirectResponse(next_url, status_code=303)
    if request.query_params.get("token") is not None:  # a URL is kept in history and proxies' logs
        return login_page(next_url, "A token in the address is not taken: type it below, or run "
                                    "`runner dashboard` for a sign-in link.", 400)
    code = request.query_params.get("code")
    if code is not None:
        if gate.sessions.redeem(code[:100]):
            return signed_in(next_url, request)
        return login_page(next_url, "That sign-in link was used or has expired: run `runner dashboard` for "
                                    "another.", 401)
    return login_page(next_url)


@login.post("/login")
async def login_post(request: Request):
    """The form's token: a session (a cookie) when it is the server's; wrong ones are limited per client."""
    gate = request.app.state.gate
    sessions = gate.sessions
    wait = sessions.throttled(client(request))
    if wait:
        return login_page("/ui/jobs", f"Too many wrong tokens: try again in {wait:.0f} s.", 429)
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    next_url = _local((form.get("next") or ["/ui/jobs"])[0])
    given = (form.get("token") or [""])[0]
    if gate.token is None:
        return RedirectResponse(next_url, status_code=303)
    if hmac.compare_digest(given.encode(), gate.token.encode()):
        return signed_in(next_url, request)
    sessions.failed(client(request))
    return login_page(next_url, "That token is not this server's.", 401)


@login.post("/logout")
def logout(request: Request):
    gate = request.app.state.gate
    if not gate.authorized(request):
        raise HTTPException(401, "not logged in")
    gate.sessions.end(request.cookies.get(SESSION_COOKIE))
    out = RedirectResponse("/login", status_code=303)
    out.delete_cookie(SESSION_COOKIE, path="/")
    return out


def _local(url: str) -> str:
    """Only a path on this server is followed after login (never another site)."""
    return url if url.startswith("/") and not url.startswith("//") and "\\" not in url else "/ui/jobs"
