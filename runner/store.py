"""The job store: SQLite in WAL mode under RUNNER_HOME. Jobs, their events, metrics and attempts.

One function changes a job's state (`Store.set_state`): it checks the move against TRANSITIONS, compares and sets
in one statement (so two dispatchers can never both move a job out of QUEUED), and writes the event in the same
transaction. Every FAILED carries a reason in words. The schema grows by numbered migrations (`PRAGMA
user_version`); opening a store runs the ones it has not seen yet.

Recipes are stored as their redacted snapshot (`${VAR}` references, never values): no secret reaches the store.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from jobs.jobdir import ACTIVE, STATES, TERMINAL, TRANSITIONS, JobState, can_move


def _backfill_model_mode(db: sqlite3.Connection) -> None:
    """Migration 3's second half: the model and mode of the jobs stored before it, read from their recipes."""
    for job_id, text in db.execute("SELECT id, recipe FROM jobs WHERE model IS NULL").fetchall():
        model, mode = recipe_summary(text)
        db.execute("UPDATE jobs SET model = ?, mode = ? WHERE id = ?", (model, mode, job_id))


def recipe_summary(text: str) -> tuple[str | None, str | None]:
    """(base model, tuning mode) of a recipe's snapshot; None for what it does not say."""
    import yaml

    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        return None, None
    if not isinstance(doc, dict):  # a trial's recipe.yaml is written by its job: anything may be there
        return None, None
    model = (doc.get("model") or {}).get("name") if isinstance(doc.get("model"), dict) else doc.get("model")
    tuning = doc.get("tuning")
    mode = tuning.get("mode", "full") if isinstance(tuning, dict) else (tuning or "full")
    # text only (a structure of aliases printed could be exponentially long)
    return (model[:4096] if isinstance(model, str) and model else None), (mode[:100] if isinstance(mode, str)
                                                                          else None)


# Each step is SQL (statements split on ';') or a function of the connection, run inside the migration's transaction.
MIGRATIONS: list = [
    # 1: jobs, events, metrics, attempts
    """
    CREATE TABLE jobs (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        state       TEXT NOT NULL,
        reason      TEXT,
        priority    INTEGER NOT NULL DEFAULT 0,
        recipe      TEXT NOT NULL,
        job_dir     TEXT NOT NULL,
        workers     INTEGER NOT NULL,
        cpus        REAL NOT NULL,
        gpus        REAL NOT NULL,
        attempt     INTEGER NOT NULL DEFAULT 0,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL,
        started_at  REAL,
        ended_at    REAL
    );
    CREATE INDEX jobs_state ON jobs (state, priority DESC, created_at);
    CREATE TABLE events (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id      TEXT NOT NULL REFERENCES jobs (id),
        at          REAL NOT NULL,
        state_from  TEXT,
        state_to    TEXT,
        message     TEXT NOT NULL
    );
    CREATE INDEX events_job ON events (job_id, id);
    CREATE TABLE metrics (
        job_id      TEXT NOT NULL REFERENCES jobs (id),
        attempt     INTEGER NOT NULL,
        step        INTEGER NOT NULL,
        split       TEXT NOT NULL DEFAULT 'train',
        at          REAL NOT NULL,
        data        TEXT NOT NULL,
        PRIMARY KEY (job_id, attempt, split, step)
    );
    CREATE TABLE attempts (
        job_id      TEXT NOT NULL REFERENCES jobs (id),
        attempt     INTEGER NOT NULL,
        submission  TEXT,
        started_at  REAL NOT NULL,
        ended_at    REAL,
        outcome     TEXT,
        reason      TEXT,
        PRIMARY KEY (job_id, attempt)
    );
    """,
    # 2: where each attempt's lines of metrics.jsonl and events.jsonl begin and how far they were copied (a
    #    restarted server goes on from there, and a retry's figures never mix with the attempt before); whether
    #    the next attempt goes on from the job's last checkpoint (runner retry --from-checkpoint)
    """
    ALTER TABLE attempts ADD COLUMN metrics_offset INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE attempts ADD COLUMN events_offset INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE attempts ADD COLUMN resume INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN resume INTEGER NOT NULL DEFAULT 0
    """,
    # 3: what the dashboard's job table shows without opening each recipe or reading each job's metrics: the base
    #    model, the tuning mode, and the latest training figures (step, total, loss, throughput, and where this
    #    attempt's timing began, for the ETA); the newest-first index the table pages through
    """
    ALTER TABLE jobs ADD COLUMN model TEXT;
    ALTER TABLE jobs ADD COLUMN mode TEXT;
    ALTER TABLE jobs ADD COLUMN progress TEXT;
    CREATE INDEX jobs_created ON jobs (created_at DESC, id DESC)
    """,
    _backfill_model_mode,
    # 4: schedules (a recipe retrained on a cron or when its data changes) and their fires. A fire is one time slot
    #    of one schedule (`cron:<UTC instant>`, `data:<fingerprint>`, `manual:<n>`), unique per schedule: recorded
    #    once, with its outcome, before anything is submitted, so that no slot runs twice, across restarts too
    """
    CREATE TABLE schedules (
        id              TEXT PRIMARY KEY,
        recipe          TEXT NOT NULL,
        base_dir        TEXT,
        cron            TEXT,
        timezone        TEXT NOT NULL,
        on_data_change  INTEGER NOT NULL,
        poll_s          REAL NOT NULL,
        concurrency     TEXT NOT NULL,
        paused          INTEGER NOT NULL DEFAULT 0,
        created_at      REAL NOT NULL,
        checked_until   REAL NOT NULL,
        data_checked_at REAL,
        fingerprint     TEXT
    );
    CREATE TABLE fires (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        schedule_id  TEXT NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
        slot         TEXT NOT NULL,
        slot_at      REAL NOT NULL,
        at           REAL NOT NULL,
        outcome      TEXT NOT NULL,
        reason       TEXT NOT NULL,
        job_id       TEXT,
        UNIQUE (schedule_id, slot)
    );
    CREATE INDEX fires_schedule ON fires (schedule_id, id)
    """,
    # 5: the model registry: a version per SUCCEEDED job of a recipe with `register_as`, aliases (`champion` and any
    #    a team names) pointing at versions, and every move of an alias as an event
    """
    CREATE TABLE versions (
        model        TEXT NOT NULL,
        version      INTEGER NOT NULL,
        job_id       TEXT NOT NULL UNIQUE,
        created_at   REAL NOT NULL,
        metric       TEXT NOT NULL,
        value        REAL,
        higher       INTEGER NOT NULL,
        metrics      TEXT NOT NULL,
        test_data    TEXT,
        data         TEXT,
        recipe_hash  TEXT NOT NULL,
        export       TEXT,
        artifacts    TEXT NOT NULL,
        decision     TEXT NOT NULL,
        PRIMARY KEY (model, version)
    );
    CREATE TABLE aliases (
        model       TEXT NOT NULL,
        alias       TEXT NOT NULL,
        version     INTEGER NOT NULL,
        updated_at  REAL NOT NULL,
        PRIMARY KEY (model, alias)
    );
    CREATE TABLE model_events (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        model         TEXT NOT NULL,
        at            REAL NOT NULL,
        alias         TEXT,
        from_version  INTEGER,
        to_version    INTEGER,
        kind          TEXT NOT NULL,
        message       TEXT NOT NULL
    );
    CREATE INDEX model_events_model ON model_events (model, id)
    """,
    # 6: an event's level: NULL for a note or a change of state, 'warning' for what a person should look at (an
    #    alarm during training, a model that does not beat its baseline)
    """
    ALTER TABLE events ADD COLUMN level TEXT
    """,
    # 7: sweeps: a trial is a job whose parent is its sweep (kind 'trial', its values as JSON in params); a sweep is
    #    kind 'sweep'; other jobs have neither. Lists show the jobs without a parent; a sweep's trials go with it.
    """
    ALTER TABLE jobs ADD COLUMN parent TEXT;
    ALTER TABLE jobs ADD COLUMN kind TEXT;
    ALTER TABLE jobs ADD COLUMN params TEXT;
    CREATE INDEX jobs_parent ON jobs (parent, id)
    """,
]
LEVELS = ("warning",)


class StoreError(Exception):
    """A request the store refuses; the message says why in words."""


class InvalidTransition(StoreError):
    pass


class UnknownJob(StoreError):
    pass


@dataclass(frozen=True)
class Job:
    id: str
    name: str
    state: str
    reason: str | None
    priority: int
    recipe: str
    job_dir: str
    workers: int
    cpus: float
    gpus: float
    attempt: int
    created_at: float
    updated_at: float
    started_at: float | None
    ended_at: float | None
    resume: int = 0  # the next attempt goes on from the last checkpoint
    model: str | None = None
    mode: str | None = None
    progress: str | None = None  # JSON: the latest training figures (see Store.add_metrics)
    parent: str | None = None  # a trial's sweep
    kind: str | None = None  # 'sweep', 'trial', or None: a job
    params: str | None = None  # JSON: a trial's values

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("recipe", "params")}
        out["progress"] = json.loads(self.progress) if self.progress else None
        if self.kind == "trial":
            out["values"] = json.loads(self.params) if self.params else {}
        return out


class Store:
    def __init__(self, path: Path, clock=time.time):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._migrate()

    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection. The server's request threads and its dispatch thread each have their own:
        SQLite serializes their writes (BEGIN IMMEDIATE, busy timeout), and WAL lets reads go on beside them."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
            self._all.append(db)
        return db

    def close(self) -> None:
        for db in self._all:
            db.close()
        self._all.clear()
        self._local = threading.local()

    # --- schema ---------------------------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        with self.transaction():
            have = self.version
            if have > len(MIGRATIONS):
                raise StoreError(f"{self.path} was written by a newer runner (schema {have}; this one knows "
                                 f"{len(MIGRATIONS)}); upgrade runner")
            for n, step in enumerate(MIGRATIONS[have:], start=have + 1):
                if callable(step):
                    step(self.db)
                    self.db.execute(f"PRAGMA user_version = {n}")
                    continue
                for stmt in (s.strip() for s in step.split(";")):
                    if stmt:
                        self.db.execute(stmt)
                self.db.execute(f"PRAGMA user_version = {n}")

    @contextmanager
    def transaction(self):
        """One write transaction, taken up front (BEGIN IMMEDIATE) so that readers never see half of it."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- jobs -----------------------------------------------------------------------------------------------------

    def add_job(self, job_id: str, name: str, recipe_snapshot: str, job_dir: str, workers: int, cpus: float,
                gpus: float, priority: int = 0, kind: str | None = None) -> Job:
        now = self.clock()
        with self.transaction():
            if not self._insert(id=job_id, name=name, state="QUEUED", priority=priority, recipe=recipe_snapshot,
                                job_dir=job_dir, workers=workers, cpus=cpus, gpus=gpus, kind=kind):
                raise StoreError(f"job id '{job_id}' is taken")
            self._event(job_id, None, JobState.QUEUED, "submitted", now)
        return self.get(job_id)

    def add_trial(self, trial_id: str, sweep: Job, recipe_snapshot: str, job_dir: str, values: dict,
                  message: str) -> Job:
        """A sweep's trial, RUNNING in its first attempt (the sweep's driver started it); never in the queue (the sweep
        holds its resources; Store.queue leaves trials out). Returns the existing one where it is there already (a restarted server)."""
        now = self.clock()
        with self.transaction():
            if not self._insert(id=trial_id, name=sweep.name, state="RUNNING", priority=0, recipe=recipe_snapshot,
                                job_dir=job_dir, workers=max(1, sweep.workers), cpus=sweep.cpus, gpus=sweep.gpus,
                                started_at=now, attempt=1, parent=sweep.id, kind="trial", params=json.dumps(values)):
                return self.get(trial_id)
            self.db.execute("INSERT INTO attempts (job_id, attempt, started_at, metrics_offset, events_offset, resume) "
                            "VALUES (?, 1, ?, 0, 0, 0)", (trial_id, now))
            self._event(trial_id, None, JobState.RUNNING, message, now)
        return self.get(trial_id)

    def _insert(self, **row) -> bool:
        """A jobs row (created and updated now; its model and mode read from its recipe); False where the id is
        taken. Inside the caller's transaction."""
        now = self.clock()
        row["model"], row["mode"] = recipe_summary(row["recipe"])
        row.update(created_at=now, updated_at=now)
        try:
            self.db.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                            tuple(row.values()))
        except sqlite3.IntegrityError:
            return False
        return True

    def trials(self, sweep_id: str) -> list[Job]:
        """A sweep's trials, in their order."""
        return [Job(**dict(r)) for r in self.db.execute("SELECT * FROM jobs WHERE parent = ? ORDER BY id",
                                                        (sweep_id,))]

    def get(self, job_id: str) -> Job:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJob(f"no job '{job_id}'")
        return Job(**dict(row))

    def list(self, state: str | None = None, name: str | None = None, limit: int = 50, offset: int = 0,
             text: str | None = None) -> list[Job]:
        """Newest first; filters by state, by name (exact) and by text (a part of the id, name or model, any case)."""
        where, args = self._where(state, name, text)
        sql = "SELECT * FROM jobs" + where + " ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?"
        return [Job(**dict(r)) for r in self.db.execute(sql, (*args, limit, offset))]

    def count(self, state: str | None = None, name: str | None = None, text: str | None = None) -> int:
        where, args = self._where(state, name, text)
        return self.db.execute("SELECT COUNT(*) FROM jobs" + where, args).fetchone()[0]

    def counts(self) -> dict[str, int]:
        """Jobs by state, every state present (0 where none)."""
        have = dict(self.db.execute("SELECT state, COUNT(*) FROM jobs WHERE parent IS NULL GROUP BY state").fetchall())
        return {s: have.get(s, 0) for s in STATES}

    @staticmethod
    def _where(state: str | None, name: str | None, text: str | None) -> tuple[str, list]:
        if state is not None and state not in STATES:
            raise StoreError(f"state '{state}' is not one of {', '.join(STATES)}")
        where, args = ["parent IS NULL"], []  # a sweep's trials are listed with it (Store.trials)
        if state:
            where.append("state = ?")
            args.append(state)
        if name:
            where.append("name = ?")
            args.append(name)
        if text:
            like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where.append("(id LIKE ? ESCAPE '\\' OR name LIKE ? ESCAPE '\\' OR model LIKE ? ESCAPE '\\')")
            args += [like] * 3
        return (" WHERE " + " AND ".join(where) if where else ""), args

    def queue(self) -> list[Job]:
        """QUEUED jobs in dispatch order: priority, then age."""
        return [Job(**dict(r)) for r in self.db.execute(
            "SELECT * FROM jobs WHERE state = 'QUEUED' AND parent IS NULL ORDER BY priority DESC, created_at, id")]

    def set_state(self, job_id: str, new: str, reason: str | None = None, *, expect: str | None = None,
                  message: str | None = None, resume: bool | None = None, offsets: tuple[int, int] = (0, 0)) -> Job:
        """Move a job to `new`, checked against TRANSITIONS, with an event; the only writer of `state`.

        expect: the state the caller saw. The move happens only if the job is still in it, so of two dispatchers
        racing for one QUEUED job, exactly one gets it; the other gets InvalidTransition.
        resume: with a move to QUEUED (a retry), whether the next attempt goes on from the last checkpoint.
        offsets: with a move to STARTING, where the new attempt's lines of metrics.jsonl and events.jsonl begin.
        """
        if new not in STATES:
            raise StoreError(f"state '{new}' is not one of {', '.join(STATES)}")
        if new == JobState.FAILED and not (reason and reason.strip()):
            raise StoreError(f"job {job_id}: FAILED needs a reason in words")
        now = self.clock()
        with self.transaction():
            cur = self.get(job_id).state
            if expect is not None and cur != expect:
                raise InvalidTransition(f"job {job_id} is {cur}, not {expect}")
            if not can_move(cur, new):
                allowed = ", ".join(TRANSITIONS[cur]) or "nothing (it has ended)"
                raise InvalidTransition(f"job {job_id} cannot go from {cur} to {new}; from {cur} it can go to "
                                        f"{allowed}")
            sets = ["state = ?", "updated_at = ?", "reason = ?"]
            args: list = [new, now, reason if new in (JobState.FAILED, JobState.CANCELLED) or reason else None]
            if new == JobState.STARTING:
                sets += ["attempt = attempt + 1", "started_at = ?", "ended_at = NULL"]
                args.append(now)
            if new in TERMINAL:
                sets.append("ended_at = ?")
                args.append(now)
            if resume is not None:
                sets.append("resume = ?")
                args.append(int(resume))
            done = self.db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND state = ?",
                                   (*args, job_id, cur)).rowcount
            if done != 1:  # cannot happen inside BEGIN IMMEDIATE; kept as the invariant it is
                raise InvalidTransition(f"job {job_id} changed state meanwhile")
            job = self.get(job_id)
            if new == JobState.STARTING:
                self.db.execute("INSERT INTO attempts (job_id, attempt, started_at, metrics_offset, events_offset, "
                                "resume) VALUES (?, ?, ?, ?, ?, ?)", (job_id, job.attempt, now, *offsets, job.resume))
            if (new in TERMINAL or (new == JobState.QUEUED and cur in ACTIVE)) and job.attempt:
                # an attempt ends with the job, or when it is preempted back into the queue
                outcome = "PREEMPTED" if new == JobState.QUEUED else new
                self.db.execute("UPDATE attempts SET ended_at = ?, outcome = ?, reason = ? WHERE job_id = ? AND "
                                "attempt = ?", (now, outcome, reason or message, job_id, job.attempt))
            self._event(job_id, cur, new, message or reason or new.lower(), now)
        return job

    def set_submission(self, job_id: str, submission: str) -> None:
        job = self.get(job_id)
        self.db.execute("UPDATE attempts SET submission = ? WHERE job_id = ? AND attempt = ?",
                        (submission, job_id, job.attempt))

    def attempt(self, job_id: str) -> dict | None:
        """The current attempt's row (submission, offsets, resume), or None before the first."""
        row = self.db.execute("SELECT a.* FROM attempts a JOIN jobs j ON j.id = a.job_id AND j.attempt = a.attempt "
                              "WHERE a.job_id = ?", (job_id,)).fetchone()
        return dict(row) if row else None

    def set_offsets(self, job_id: str, attempt: int, metrics: int | None = None, events: int | None = None) -> None:
        for col, value in (("metrics_offset", metrics), ("events_offset", events)):
            if value is not None:
                self.db.execute(f"UPDATE attempts SET {col} = ? WHERE job_id = ? AND attempt = ?",
                                (value, job_id, attempt))

    def attempts(self, job_id: str) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM attempts WHERE job_id = ? ORDER BY attempt",
                                                 (job_id,))]

    # --- events and metrics ---------------------------------------------------------------------------------------

    def _event(self, job_id: str, old: str | None, new: str | None, message: str, at: float,
               level: str | None = None) -> None:
        self.db.execute("INSERT INTO events (job_id, at, state_from, state_to, message, level) VALUES "
                        "(?, ?, ?, ?, ?, ?)", (job_id, at, old, new, message, level))

    def note(self, job_id: str, message: str, level: str | None = None) -> None:
        """An event that is not a change of state (a checkpoint, a resume, a message from the driver); level
        'warning' for what a person should look at."""
        if level is not None and level not in LEVELS:
            raise StoreError(f"event level {level!r} is not one of {', '.join(LEVELS)}")
        self.get(job_id)
        with self.transaction():
            self._event(job_id, None, None, message, self.clock(), level)

    def events(self, job_id: str, after: int = 0, level: str | None = None, limit: int = -1) -> list[dict]:
        return [dict(r) for r in self.db.execute(
            "SELECT * FROM events WHERE job_id = ? AND id > ? AND (? IS NULL OR level = ?) ORDER BY id LIMIT ?",
            (job_id, after, level, level, limit))]

    def add_metrics(self, job_id: str, records: list[dict]) -> int:
        """Records as metrics.jsonl holds them (step, optional split, the figures). A step written again (a
        resumed attempt repeats the steps after its checkpoint) replaces the earlier figure of that attempt."""
        job = self.get(job_id)
        now = self.clock()
        train = [r for r in records if r.get("split", "train") == "train"]
        with self.transaction():
            for rec in records:
                self.db.execute("INSERT OR REPLACE INTO metrics (job_id, attempt, step, split, at, data) VALUES "
                                "(?, ?, ?, ?, ?, ?)", (job_id, job.attempt, int(rec["step"]),
                                                       rec.get("split", "train"), rec.get("time", now),
                                                       json.dumps(_finite(rec))))
            if train:
                self.db.execute("UPDATE jobs SET progress = ? WHERE id = ?",
                                (json.dumps(_progress(job, train[0], train[-1], now)), job_id))
        return len(records)

    def metrics_columns(self, job_id: str, split: str, keys: tuple[str, ...]) -> dict[str, list]:
        """One split's figures as columns (step and each key), latest attempt's figure of each step, in step
        order: what a chart needs, read without building a dict a record."""
        cols = ", ".join(f"json_extract(m.data, '$.{k}')" for k in keys)
        rows = self.db.execute(
            f"SELECT m.step, {cols} FROM metrics m WHERE m.job_id = ? AND m.split = ? AND m.attempt = (SELECT "
            "MAX(attempt) FROM metrics x WHERE x.job_id = m.job_id AND x.step = m.step AND x.split = m.split) "
            "ORDER BY m.step", (job_id, split)).fetchall()
        out = {"step": [r[0] for r in rows]}
        for i, k in enumerate(keys, start=1):
            out[k] = [r[i] for r in rows]
        return out

    def metrics(self, job_id: str, split: str | None = None, after_step: int = 0, limit: int = -1) -> list[dict]:
        """The latest attempt's figure of each step (earlier attempts' steps that it did not redo stay)."""
        rows = self.db.execute(
            "SELECT m.data FROM metrics m WHERE m.job_id = ? AND m.step > ? AND (? IS NULL OR m.split = ?) AND "
            "m.attempt = (SELECT MAX(attempt) FROM metrics x WHERE x.job_id = m.job_id AND x.step = m.step AND "
            "x.split = m.split) ORDER BY m.step, m.split LIMIT ?", (job_id, after_step, split, split, limit))
        return [json.loads(r[0]) for r in rows]


def _finite(rec: dict) -> dict:
    """A record as strict JSON: SQLite's json_extract refuses the NaN and Infinity that Python's json writes, and
    one such row would break every chart of the job."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in rec.items()}


def _progress(job: Job, first: dict, last: dict, now: float) -> dict:
    """The jobs table's figures: the latest training record, and the step and time this attempt's timing began at
    (kept from the attempt's first record), from which the ETA is reckoned."""
    before = json.loads(job.progress) if job.progress else {}
    if before.get("attempt") == job.attempt and "t0" in before:
        t0, step0 = before["t0"], before["step0"]
    else:
        t0, step0 = first.get("time", now), int(first["step"])
    return {"attempt": job.attempt, "step": int(last["step"]), "total_steps": last.get("total_steps"),
            "loss": last.get("loss"), "samples_per_s": last.get("samples_per_s"),
            "tokens_per_s": last.get("tokens_per_s"), "time": last.get("time", now), "t0": t0, "step0": step0}


def eta_seconds(progress: dict | None) -> float | None:
    """Seconds left at the pace of this attempt so far; None until two steps have been timed."""
    if not progress or not progress.get("total_steps"):
        return None
    steps, spent = progress["step"] - progress["step0"], progress["time"] - progress["t0"]
    if steps <= 0 or spent <= 0:
        return None
    return max(0.0, (progress["total_steps"] - progress["step"]) * spent / steps)
