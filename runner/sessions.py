"""The dashboard's sign-ins: random session ids that expire and that logging out revokes, one-time sign-in codes
(what `runner dashboard` opens, so that no token ever sits in a URL, a browser's history or a proxy's log), and a
bound on wrong tokens tried per client. Kept in the server's memory: a restarted server asks for a sign-in again."""

from __future__ import annotations

import secrets
import time
from collections import deque

SESSION_S = 12 * 3600
CODE_S = 600
TRIES = 10  # wrong tokens a client may send...
TRIES_WINDOW_S = 60.0  # ...in this long, before it is told to wait
MOST = 10_000  # sessions, codes and clients remembered at once (the oldest are forgotten first)


class Sessions:
    def __init__(self, clock=time.time):
        self.clock = clock
        self.live: dict[str, float] = {}  # session id -> expiry
        self.codes: dict[str, float] = {}  # sign-in code -> expiry
        self.failures: dict[str, deque] = {}  # client -> times of its wrong tokens

    def _put(self, table: dict, key: str, expiry: float) -> None:
        now = self.clock()
        if len(table) >= MOST:
            for k in [k for k, exp in table.items() if exp <= now] or list(table)[: len(table) - MOST + 1]:
                table.pop(k, None)
        table[key] = expiry

    def start(self) -> str:
        sid = secrets.token_urlsafe(32)
        self._put(self.live, sid, self.clock() + SESSION_S)
        return sid

    def valid(self, sid: str | None) -> bool:
        expiry = self.live.get(sid or "")
        if expiry is None:
            return False
        if expiry <= self.clock():
            self.live.pop(sid, None)
            return False
        return True

    def end(self, sid: str | None) -> None:
        self.live.pop(sid or "", None)

    def code(self) -> str:
        code = secrets.token_urlsafe(24)
        self._put(self.codes, code, self.clock() + CODE_S)
        return code

    def redeem(self, code: str) -> bool:
        """Whether the code is one this server gave and has not been used or expired; it is used up either way."""
        expiry = self.codes.pop(code, None)
        return expiry is not None and expiry > self.clock()

    def throttled(self, client: str) -> float:
        """Seconds the client must wait before its next try (0: it may try)."""
        times = self.failures.get(client)
        now = self.clock()
        while times and times[0] <= now - TRIES_WINDOW_S:
            times.popleft()
        if not times or len(times) < TRIES:
            return 0.0
        return max(1.0, times[0] + TRIES_WINDOW_S - now)

    def failed(self, client: str) -> None:
        if client not in self.failures and len(self.failures) >= MOST:
            self.failures.pop(next(iter(self.failures)))
        self.failures.setdefault(client, deque(maxlen=TRIES)).append(self.clock())
