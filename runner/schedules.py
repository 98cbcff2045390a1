"""Schedules: a recipe retrained by the runner server on a cron, or when its data changes.

`Scheduler.tick()` is one pass (the server runs it with each dispatch pass; tests call it with a fake clock). For
each schedule it works out the time slots that have come due since the last pass and gives each exactly one fire,
with an outcome and a reason, in the store (table `fires`, unique per schedule and slot):

- **submitted**: a job was queued for it (its id is made from the schedule and the slot, so a server that died
  between recording the fire and queueing the job queues that same job on restart, and never a second one);
- **skipped**: the schedule was paused, or the previous run still went (`concurrency: forbid`), or the recipe could
  not be queued (the reason says why);
- **missed**: the server was not running when the slot came. After downtime only the latest missed slot runs (a
  catch-up); the others are recorded as missed.

Cron slots come from cronsim, read in the schedule's time zone (Debian cron's behaviour across daylight-saving
changes: a daily time in a skipped hour fires once, at the first minute after the gap; in a repeated hour, once,
the first time). Slots are keyed by their UTC instant. A slot is on time when the pass sees it within `grace`
seconds; later than that, the server was down.

Data changes: every `poll_interval` seconds the data's fingerprint is computed (sizes, modification times and
sha256 of local files; the revision of a hub dataset, asked of the hub); a new one fires once.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

from jobs.jobdir import TERMINAL, file_sha256
from runner.store import Store, StoreError, UnknownJob

GRACE_S = 120.0
OUTCOMES = ("submitted", "skipped", "missed")


class UnknownSchedule(StoreError):
    pass


@dataclass(frozen=True)
class Schedule:
    id: str
    recipe: str
    base_dir: str | None
    cron: str | None
    timezone: str
    on_data_change: int
    poll_s: float
    concurrency: str
    paused: int
    created_at: float
    checked_until: float
    data_checked_at: float | None
    fingerprint: str | None

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "recipe"}

    def describe(self) -> str:
        parts = [f"cron '{self.cron}' ({self.timezone})"] if self.cron else []
        if self.on_data_change:
            parts.append(f"when the data changes (looked at every {self.poll_s:g} s)")
        return " and ".join(parts)


def cron_slots(cron: str, tz: str, after: float, until: float, limit: int = 100_000) -> list[float]:
    """The cron's fire instants (UTC timestamps) in (after, until], at most `limit`, in order."""
    from cronsim import CronSim

    zone = ZoneInfo(tz)
    out: list[float] = []
    for t in CronSim(cron, datetime.fromtimestamp(after, zone)):
        ts = t.timestamp()
        if ts <= after:  # started inside a repeated hour, cronsim can name the hour's first pass again
            continue
        if ts > until or len(out) >= limit:
            break
        out.append(ts)
    return out


def next_fires(cron: str, tz: str, now: float, n: int) -> list[dict]:
    """The next n fire times, in the schedule's time zone and in UTC."""
    zone = ZoneInfo(tz)
    out = []
    for ts in cron_slots(cron, tz, now, now + 366 * 86400 * 50, limit=n):
        out.append({"at": ts, "local": datetime.fromtimestamp(ts, zone).isoformat(),
                    "utc": datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")})
    return out


def data_fingerprint(recipe, splits: tuple[str, ...] = ("train", "validation", "test")) -> str:
    """What the recipe's data is now: for local files (or folders) each file's path, size, modification time and
    sha256; for hub datasets the revision the hub names for the recipe's. Raises OSError when a file cannot be read."""
    h = hashlib.sha256()
    for split in splits:
        src = getattr(recipe.data, split)
        if src is None:
            continue
        if src.hub:
            from huggingface_hub import HfApi

            sha = HfApi().dataset_info(src.hub, revision=src.revision).sha
            h.update(f"{split} hub {src.hub} {sha}\n".encode())
            continue
        root = recipe.resolve_path(src.path)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            st = f.stat()
            digest = file_sha256(f)
            h.update(f"{split} {f} {st.st_size} {st.st_mtime_ns} {digest}\n".encode())
    return h.hexdigest()


class Scheduler:
    """submit(schedule, job_id, reason) queues the schedule's recipe as a job with that id (raising with a reason
    a person can act on when it cannot); cancel(job_id, reason) stops a job. fingerprint(schedule) -> str."""

    def __init__(self, store: Store, submit, cancel, clock=time.time, fingerprint=None, grace: float = GRACE_S):
        self.store, self.submit, self.cancel, self.clock = store, submit, cancel, clock
        self.fingerprint = fingerprint
        self.grace = grace
        self._recovered = False  # fires left without their job are looked for once, at the first pass
        self._due: dict[tuple, float] = {}  # (id, cron, zone, checked_until) -> its next slot: no cron work before it

    # --- the schedules --------------------------------------------------------------------------------------------

    def add(self, sched_id: str, recipe_text: str, base_dir: str | None, spec, fingerprint: str | None = None) \
            -> Schedule:
        """A new schedule; slots before now never fire. fingerprint: the data as it is now (the baseline)."""
        now = self.clock()
        with self.store.transaction():
            if self.store.db.execute("SELECT 1 FROM schedules WHERE id = ?", (sched_id,)).fetchone():
                raise StoreError(f"a schedule named '{sched_id}' exists (runner schedule remove {sched_id} first)")
            self.store.db.execute(
                "INSERT INTO schedules (id, recipe, base_dir, cron, timezone, on_data_change, poll_s, concurrency, "
                "created_at, checked_until, data_checked_at, fingerprint) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sched_id, recipe_text, base_dir, spec.cron, spec.timezone, int(spec.on_data_change),
                 float(spec.poll_interval), spec.concurrency, now, now, now if fingerprint else None, fingerprint))
        return self.get(sched_id)

    def get(self, sched_id: str) -> Schedule:
        row = self.store.db.execute("SELECT * FROM schedules WHERE id = ?", (sched_id,)).fetchone()
        if row is None:
            raise UnknownSchedule(f"no schedule '{sched_id}' (runner schedule list shows them)")
        return Schedule(**dict(row))

    def all(self) -> list[Schedule]:
        return [Schedule(**dict(r)) for r in self.store.db.execute("SELECT * FROM schedules ORDER BY id")]

    def set_paused(self, sched_id: str, paused: bool) -> Schedule:
        self.get(sched_id)
        self.store.db.execute("UPDATE schedules SET paused = ? WHERE id = ?", (int(paused), sched_id))
        return self.get(sched_id)

    def remove(self, sched_id: str) -> None:
        self.get(sched_id)
        with self.store.transaction():
            self.store.db.execute("DELETE FROM fires WHERE schedule_id = ?", (sched_id,))
            self.store.db.execute("DELETE FROM schedules WHERE id = ?", (sched_id,))

    def fires(self, sched_id: str, limit: int = 50) -> list[dict]:
        """The newest fires first."""
        return [dict(r) for r in self.store.db.execute(
            "SELECT * FROM fires WHERE schedule_id = ? ORDER BY id DESC LIMIT ?", (sched_id, limit))]

    # --- one pass -------------------------------------------------------------------------------------------------

    def tick(self) -> list[dict]:
        """Every slot that has come due gets its fire; returns the fires recorded in this pass."""
        now = self.clock()
        out = [] if self._recovered else self._recover()
        self._recovered = True
        for s in self.all():
            if s.cron:
                out += self._cron(s, now)
            if s.on_data_change and (s.data_checked_at is None or now - s.data_checked_at >= s.poll_s):
                out += self._data(s, now)
        return out

    def trigger(self, sched_id: str) -> dict:
        """Run now (`runner schedule trigger`): a fire of its own, under the concurrency policy."""
        s = self.get(sched_id)
        return self._fire(s, f"manual:{self._count(s, 'manual')}", self.clock(), "run now by hand",
                          paused_skips=False)

    def _cron(self, s: Schedule, now: float) -> list[dict]:
        key = (s.id, s.cron, s.timezone, s.checked_until)
        if now < self._due.get(key, -1.0):  # the server passes 4 times a second; a cron slot comes far less often
            return []
        slots = cron_slots(s.cron, s.timezone, s.checked_until, now)
        if not slots:
            upcoming = cron_slots(s.cron, s.timezone, now, now + 86400 * 400, limit=1)
            self._due = {k: v for k, v in self._due.items() if k[0] != s.id}
            self._due[key] = upcoming[0] if upcoming else float("inf")
            return []
        out = []
        late = [t for t in slots if now - t > self.grace]
        on_time = [t for t in slots if now - t <= self.grace]
        zone = ZoneInfo(s.timezone)
        for i, t in enumerate(late):
            local = datetime.fromtimestamp(t, zone).isoformat()
            if i == len(late) - 1 and not on_time:  # the latest one missed runs, once
                missed = len(late) - 1
                why = (f"catch-up: the server was not running at {local}" +
                       (f"; {missed} earlier fire{'s' if missed != 1 else ''} recorded as missed" if missed else ""))
                out.append(self._fire(s, f"cron:{t:.0f}", t, why))
            else:
                out.append(self._record(s, f"cron:{t:.0f}", t, "missed",
                                        f"the server was not running at {local}; after downtime only the latest "
                                        "missed fire runs"))
        for t in on_time:
            out.append(self._fire(s, f"cron:{t:.0f}", t, f"cron '{s.cron}' at "
                                  f"{datetime.fromtimestamp(t, zone).isoformat()}"))
        if slots:
            self.store.db.execute("UPDATE schedules SET checked_until = ? WHERE id = ? AND checked_until < ?",
                                  (slots[-1], s.id, slots[-1]))
        return [f for f in out if f]

    def _data(self, s: Schedule, now: float) -> list[dict]:
        try:
            fp = self.fingerprint(s)
        except Exception as e:  # noqa: BLE001 - unreadable data: said once a poll in the schedule's record
            self.store.db.execute("UPDATE schedules SET data_checked_at = ? WHERE id = ?", (now, s.id))
            fire = self._record(s, f"data-error:{hashlib.sha256(str(e).encode()).hexdigest()[:16]}", now, "skipped",
                                f"the data could not be read: {e}")
            return [fire] if fire else []
        out = []
        if s.fingerprint is not None and fp != s.fingerprint:
            fire = self._fire(s, f"data:{self._count(s, 'data')}:{fp[:16]}", now,
                              f"the data changed (fingerprint {s.fingerprint[:12]} -> {fp[:12]})")
            out = [fire] if fire else []
        self.store.db.execute("UPDATE schedules SET fingerprint = ?, data_checked_at = ? WHERE id = ?",
                              (fp, now, s.id))
        return out

    # --- fires ----------------------------------------------------------------------------------------------------

    def _count(self, s: Schedule, kind: str) -> int:
        """The number the next fire of this kind (manual, data) takes: one more than those before it."""
        return self.store.db.execute("SELECT COUNT(*) FROM fires WHERE schedule_id = ? AND slot LIKE ?",
                                     (s.id, f"{kind}:%")).fetchone()[0] + 1

    def job_id(self, s: Schedule, slot: str, at: float) -> str:
        stamp = datetime.fromtimestamp(at, timezone.utc).strftime("%Y%m%d-%H%M%S")
        return f"{s.id}-{stamp}-{hashlib.sha256(f'{s.id} {slot}'.encode()).hexdigest()[:4]}"

    def _record(self, s: Schedule, slot: str, at: float, outcome: str, reason: str,
                job_id: str | None = None) -> dict | None:
        """The fire of a slot, once: None when the slot already has one."""
        assert outcome in OUTCOMES
        cur = self.store.db.execute(
            "INSERT OR IGNORE INTO fires (schedule_id, slot, slot_at, at, outcome, reason, job_id) VALUES "
            "(?, ?, ?, ?, ?, ?, ?)", (s.id, slot, at, self.clock(), outcome, reason, job_id))
        if cur.rowcount != 1:
            return None
        return dict(self.store.db.execute("SELECT * FROM fires WHERE id = ?", (cur.lastrowid,)).fetchone())

    def _fire(self, s: Schedule, slot: str, at: float, why: str, paused_skips: bool = True) -> dict | None:
        if s.paused and paused_skips:
            return self._record(s, slot, at, "skipped", f"{why}; the schedule is paused")
        running = self._running(s)
        if running and s.concurrency == "forbid":
            return self._record(s, slot, at, "skipped", f"{why}; the previous run {running[0]} is still "
                                                         f"{running[1]} (concurrency: forbid)")
        if running and s.concurrency == "replace":
            self.cancel(running[0], f"replaced by the schedule's fire for {slot}")
            why += f"; replaced {running[0]}, which was {running[1]}"
        job_id = self.job_id(s, slot, at)
        fire = self._record(s, slot, at, "submitted", why, job_id)
        if fire is not None:
            fire = self._queue(s, fire)
        return fire

    def _queue(self, s: Schedule, fire: dict) -> dict:
        try:
            self.store.get(fire["job_id"])  # queued before a restart: never twice
        except UnknownJob:
            try:
                self.submit(s, fire["job_id"], fire["reason"])
            except Exception as e:  # noqa: BLE001 - the recipe no longer validates, the cluster cannot hold it...
                reason = f"{fire['reason']}; not queued: {e}"
                self.store.db.execute("UPDATE fires SET outcome = 'skipped', reason = ?, job_id = NULL WHERE id = ?",
                                      (reason, fire["id"]))
                fire = {**fire, "outcome": "skipped", "reason": reason, "job_id": None}
        return fire

    def _running(self, s: Schedule) -> tuple[str, str] | None:
        """The schedule's latest job, if it has not ended: (id, state)."""
        row = self.store.db.execute("SELECT job_id FROM fires WHERE schedule_id = ? AND job_id IS NOT NULL "
                                    "ORDER BY id DESC LIMIT 1", (s.id,)).fetchone()
        if row is None:
            return None
        try:
            state = self.store.get(row[0]).state
        except UnknownJob:
            return None
        return None if state in TERMINAL else (row[0], state)

    def _recover(self) -> list[dict]:
        """Fires recorded as submitted whose job is not in the store (the server died in between): queued now."""
        out = []
        for r in self.store.db.execute("SELECT f.* FROM fires f LEFT JOIN jobs j ON j.id = f.job_id WHERE "
                                       "f.outcome = 'submitted' AND f.job_id IS NOT NULL AND j.id IS NULL").fetchall():
            out.append(self._queue(self.get(r["schedule_id"]), dict(r)))
        return out
