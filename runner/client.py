"""The CLI's side of the runner server's REST API: one `Client`, errors as one line a person can act on.

`connect()` picks the server: RUNNER_SERVER (and RUNNER_TOKEN) when set, else the local one, started on first use
(`runner.local.ensure_local`), with the local server's own token (<RUNNER_HOME>/server_token).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
from httpx_sse import SSEError, connect_sse

from jobs.jobdir import runner_home

__all__ = ["Client", "ClientError", "artifacts_root", "connect", "runner_home"]


class ClientError(Exception):
    """One line for the person at the terminal; `code` is the HTTP status where there was one."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


def artifacts_root(home: Path | None = None) -> Path:
    """Where job folders go: RUNNER_ARTIFACTS, else <RUNNER_HOME>/artifacts. On a cluster of several nodes it must
    be storage every node mounts (the store, runner.db, stays in RUNNER_HOME: SQLite wants a local disk)."""
    given = os.environ.get("RUNNER_ARTIFACTS")
    return Path(given).expanduser() if given else (home or runner_home()) / "artifacts"


class Client:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.token = token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _unreachable(self, e: Exception) -> ClientError:
        hint = "check RUNNER_SERVER" if os.environ.get("RUNNER_SERVER") else "runner server status says more"
        return ClientError(f"cannot reach the runner server at {self.url} ({type(e).__name__}); {hint}")

    def call(self, method: str, path: str, **kwargs) -> dict:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise self._unreachable(e) from None
        if r.status_code == 401:
            raise ClientError(f"the runner server at {self.url} refused the token: set RUNNER_TOKEN to its token",
                              401)
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = r.text.strip()
            raise ClientError(_words(detail) or f"HTTP {r.status_code}", r.status_code)
        return r.json()

    def get(self, path: str, **params) -> dict:
        return self.call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict | None = None) -> dict:
        return self.call("POST", path, json=body or {})

    def events(self, path: str, **params) -> Iterator[tuple[str, str]]:
        """A Server-Sent Events stream as (event, data) pairs, until an `end` event. A stream the server closes
        before that (it bounds each one) is opened again from the last `id:` seen, as a browser would."""
        last = None
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                with connect_sse(self.http, "GET", path, params=params, headers=headers,
                                 timeout=httpx.Timeout(30.0, read=None)) as source:
                    r = source.response
                    if r.status_code >= 400:
                        r.read()
                        raise ClientError(_words(r.json().get("detail")) or f"HTTP {r.status_code}", r.status_code)
                    for sse in source.iter_sse():
                        last = sse.id or last
                        if sse.event != "message" or sse.data:  # not the bare `retry:` line; a blank log line is one
                            yield sse.event, sse.data
                            if sse.event == "end":
                                return
            except httpx.TransportError as e:
                raise self._unreachable(e) from None
            except SSEError as e:
                raise ClientError(f"{self.url}{path} did not answer with an event stream ({e})") from None


def _words(detail) -> str:
    """FastAPI's detail (a string, or the recipe's problems, or validation errors) as lines of text."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, dict) and "problems" in detail:
        return "\n".join([detail.get("message", "")] + [
            f"  {p.get('path') or ''}{':' + str(p['line']) if p.get('line') else ''}: {p['message']}"
            for p in detail["problems"]])
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg')}" for d in detail)
    return str(detail) if detail else ""


def connect(autostart: bool = True, say=lambda m: None) -> Client:
    url = os.environ.get("RUNNER_SERVER")
    if url:
        return Client(url, os.environ.get("RUNNER_TOKEN") or None)
    from runner.local import LocalError, ensure_local, healthy, read_state, server_token

    home = runner_home()
    if not autostart:
        server = read_state(home).get("server") or {}
        if not healthy(server.get("url", "")):
            raise ClientError("no local runner server is running (runner server start starts one)")
        return Client(server["url"], server_token(home))
    try:
        return Client(ensure_local(home, say), server_token(home))
    except LocalError as e:
        raise ClientError(str(e)) from None
