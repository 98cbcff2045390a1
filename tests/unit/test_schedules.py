"""Schedules with a fake clock and no sleeping: cron slots across daylight-saving changes in several time zones,
server restarts and downtime, each concurrency policy, the data-change trigger. The real store; jobs are queued
into it by a submit function standing in for the server's (the server's own is tested through its API)."""

import random
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from jobs.schema import ScheduleSpec
from runner.schedules import Scheduler, cron_slots, next_fires
from runner.store import Store

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()
HOUR = 3600.0


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def scheduler(path, clock, **kw):
    """A server's scheduler over the store at `path`; a new one stands for a restarted server."""
    store = Store(path, clock=clock)
    store.db.execute("PRAGMA synchronous = OFF")  # the test's own speed: thousands of fires on a 2-core machine

    def submit(s, job_id, reason):
        store.add_job(job_id, s.id, s.recipe, f"/tmp/{job_id}", 1, 1, 0)

    def cancel(job_id, reason):
        store.set_state(job_id, "CANCELLED", reason=reason)

    return Scheduler(store, submit, cancel, clock=clock, **kw), store


def spec(**kw):
    return ScheduleSpec(**kw)


def daily_oracle(zone: str, hh: int, mm: int, start: float, end: float) -> set[float]:
    """When a daily hh:mm fires, worked out without cron: each local day, the first instant whose local wall time
    is hh:mm or later (a time in a skipped hour fires when the gap ends; a repeated one the first time)."""
    tz = ZoneInfo(zone)
    out = set()
    d = datetime.fromtimestamp(start, tz).date() - timedelta(days=1)
    last = datetime.fromtimestamp(end, tz).date() + timedelta(days=1)
    while d <= last:
        t = datetime(d.year, d.month, d.day, tzinfo=tz).timestamp()  # local midnight (never in a gap in these zones)
        while datetime.fromtimestamp(t, tz).replace(tzinfo=None) < datetime(d.year, d.month, d.day, hh, mm):
            t += 60
        if start < t <= end:
            out.add(t)
        d += timedelta(days=1)
    return out


def hourly_oracle(zone: str, start: float, end: float) -> set[float]:
    """Every instant whose local minute is 0 (so 23 fires on a spring-forward day, 25 on a fall-back one)."""
    tz = ZoneInfo(zone)
    t = start - start % 1800 + 1800
    out = set()
    while t <= end:
        if datetime.fromtimestamp(t, tz).minute == 0:
            out.add(t)
        t += 1800
    return out


def test_ten_thousand_slots_across_dst_with_two_restarts_and_downtime(tmp_path):
    """An hourly schedule in Berlin and nightly ones (02:30, inside the skipped and the repeated hour) in four
    zones, over 14 months: passes at random 5-60 min intervals (on time: grace 1 h); the server down twice (30 h,
    then 9 days) and restarted each time as a new scheduler over the same store; another restart inside
    Berlin's repeated hour. Every slot the oracle names has exactly one fire; the missed ones fall in the downtime,
    with one catch-up each; nothing else fires."""
    end = datetime(2027, 3, 1, tzinfo=timezone.utc).timestamp()
    clock = Clock(T0)
    sch, store = scheduler(tmp_path / "r.db", clock, grace=HOUR)
    plans = {"hourly-berlin": ("0 * * * *", "Europe/Berlin"),
             **{f"nightly-{z.split('/')[1].lower()}": ("30 2 * * *", z)
                for z in ("Europe/Berlin", "America/New_York", "Australia/Sydney", "Asia/Kolkata")}}
    for name, (cron, zone) in plans.items():
        sch.add(name, f"name: {name}\n", None, spec(cron=cron, timezone=zone, concurrency="allow"))
    down = [(datetime(2026, 3, 28, 20, tzinfo=timezone.utc).timestamp(), 30 * HOUR),   # across Berlin's gap
            (datetime(2026, 10, 30, 9, tzinfo=timezone.utc).timestamp(), 9 * 24 * HOUR)]  # across New York's fold
    # a restart (no downtime to speak of) in Berlin's repeated hour: 02:05 CET, after 02:30 CEST has fired
    fold_restart = datetime(2026, 10, 25, 1, 5, tzinfo=timezone.utc).timestamp()
    rng = random.Random(7)
    windows = []
    while clock.t < end:
        step = rng.uniform(300, 3600)
        nxt = clock.t + step
        for begin, length in down:
            if clock.t < begin <= nxt:  # the server dies at `begin`, comes back `length` later
                last_pass = clock.t  # what came due after this pass, the dead server never saw
                clock.t = begin + length
                windows.append((last_pass, clock.t))
                sch, store = scheduler(tmp_path / "r.db", clock, grace=HOUR)
                nxt = None
                break
        if nxt is not None and clock.t < fold_restart <= nxt:
            nxt = fold_restart
            clock.t = nxt
            sch.tick()
            sch, store = scheduler(tmp_path / "r.db", clock, grace=HOUR)
            continue
        if nxt is not None:
            clock.t = min(nxt, end)
        sch.tick()

    total = 0
    for name, (cron, zone) in plans.items():
        rows = store.db.execute("SELECT slot, slot_at, outcome, reason, job_id FROM fires WHERE schedule_id = ?",
                                (name,)).fetchall()
        slots = [r["slot_at"] for r in rows]
        assert len(slots) == len(set(slots)), f"{name}: a slot fired twice"
        expected = hourly_oracle(zone, T0, end) if cron.startswith("0 *") else daily_oracle(zone, 2, 30, T0, end)
        assert set(slots) == expected, f"{name}: {len(set(slots) ^ expected)} slots differ from the oracle"
        total += len(slots)
        for begin, back in windows:
            late = sorted((r for r in rows if begin < r["slot_at"] < back - HOUR), key=lambda r: r["slot_at"])
            on_time = [r for r in rows if back - HOUR <= r["slot_at"] <= back]
            if not late:
                continue
            # one catch-up for what was missed, unless a slot came due on time at the restart (it is the run)
            catch_up = [] if on_time else [late.pop()]
            assert all(r["outcome"] == "missed" and "the server was not running at" in r["reason"] for r in late)
            assert all(r["outcome"] == "submitted" and r["reason"].startswith(
                "catch-up: the server was not running at ") for r in catch_up), name
            assert name != "hourly-berlin" or (on_time and not catch_up)
        in_downtime = lambda t: any(b < t < e - HOUR for b, e in windows)  # noqa: E731
        assert all(r["outcome"] == "submitted" and r["job_id"] for r in rows if not in_downtime(r["slot_at"]))
        if zone != "Asia/Kolkata" and cron.startswith("30"):  # once a local day, DST days too
            days = [datetime.fromtimestamp(t, ZoneInfo(zone)).date() for t in slots]
            assert len(days) == len(set(days))
    assert total >= 10_000
    jobs = store.db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    assert jobs == store.db.execute("SELECT COUNT(*) FROM fires WHERE outcome = 'submitted'").fetchone()[0]
    berlin = sorted(t for t in daily_oracle("Europe/Berlin", 2, 30, T0, end)
                    if datetime.fromtimestamp(t, timezone.utc).date() in (date(2026, 3, 29), date(2026, 10, 25)))
    assert [datetime.fromtimestamp(t, ZoneInfo("Europe/Berlin")).isoformat() for t in berlin] == \
        ["2026-03-29T03:00:00+02:00", "2026-10-25T02:30:00+02:00"]


def test_cron_slots_never_go_back_inside_a_repeated_hour():
    """cronsim, started at 02:05 of Berlin's second 02:00-03:00 (after 02:30 CEST fired), names 02:30 CEST again:
    an instant already past. cron_slots drops it."""
    start = datetime(2026, 10, 25, 1, 5, tzinfo=timezone.utc).timestamp()
    got = cron_slots("30 2 * * *", "Europe/Berlin", start, start + 3 * 86400)
    assert [datetime.fromtimestamp(t, ZoneInfo("Europe/Berlin")).isoformat() for t in got] == \
        ["2026-10-26T02:30:00+01:00", "2026-10-27T02:30:00+01:00"]
    nxt = next_fires("0 9 * * MON-FRI", "America/New_York", datetime(2026, 3, 6, tzinfo=timezone.utc).timestamp(), 3)
    assert [(f["local"], f["utc"]) for f in nxt] == [
        ("2026-03-06T09:00:00-05:00", "2026-03-06T14:00:00Z"), ("2026-03-09T09:00:00-04:00", "2026-03-09T13:00:00Z"),
        ("2026-03-10T09:00:00-04:00", "2026-03-10T13:00:00Z")]


def _running(store, job_id):
    store.set_state(job_id, "STARTING")
    store.set_state(job_id, "RUNNING")


@pytest.mark.parametrize("policy", ["forbid", "allow", "replace"])
def test_concurrency_policies(tmp_path, policy):
    clock = Clock(T0)
    sch, store = scheduler(tmp_path / "r.db", clock)
    sch.add("n", "name: n\n", None, spec(cron="0 * * * *", concurrency=policy))
    clock.t += HOUR + 5
    first = sch.tick()
    assert [f["outcome"] for f in first] == ["submitted"]
    _running(store, first[0]["job_id"])
    clock.t += HOUR
    second = sch.tick()[0]
    state = store.get(first[0]["job_id"]).state
    if policy == "forbid":
        assert second["outcome"] == "skipped" and second["job_id"] is None and state == "RUNNING"
        assert second["reason"].endswith(f"the previous run {first[0]['job_id']} is still RUNNING (concurrency: "
                                         "forbid)")
    elif policy == "allow":
        assert second["outcome"] == "submitted" and state == "RUNNING"
    else:
        assert second["outcome"] == "submitted" and state == "CANCELLED"
        assert f"replaced {first[0]['job_id']}, which was RUNNING" in second["reason"]
    assert store.db.execute("SELECT COUNT(*) FROM fires").fetchone()[0] == 2


def test_catch_up_after_downtime_runs_once_and_records_the_rest(tmp_path):
    clock = Clock(T0)
    sch, store = scheduler(tmp_path / "r.db", clock)
    sch.add("nightly", "name: nightly\n", None, spec(cron="0 3 * * *", timezone="Europe/Berlin"))
    clock.t += 3 * 86400 + 7 * HOUR  # down from 01:00 on the 1st to 08:00 on the 4th (Berlin): four nights
    sch, store = scheduler(tmp_path / "r.db", clock)
    fires = sch.tick()
    assert [f["outcome"] for f in fires] == ["missed", "missed", "missed", "submitted"]
    assert fires[0]["reason"] == ("the server was not running at 2026-01-01T03:00:00+01:00; after downtime only the "
                                  "latest missed fire runs")
    assert fires[3]["reason"] == ("catch-up: the server was not running at 2026-01-04T03:00:00+01:00; 3 earlier "
                                  "fires recorded as missed")
    assert sch.tick() == []  # nothing twice
    store.set_state(fires[3]["job_id"], "FAILED", reason="x")
    clock.t += 86400
    assert [f["outcome"] for f in sch.tick()] == ["submitted"]


def test_a_fire_recorded_before_a_crash_queues_its_job_once(tmp_path):
    clock = Clock(T0)
    sch, store = scheduler(tmp_path / "r.db", clock)
    sch.add("n", "name: n\n", None, spec(cron="0 * * * *"))
    sch.submit = lambda *a: (_ for _ in ()).throw(SystemExit("the server dies here"))
    clock.t += HOUR + 1
    with pytest.raises(SystemExit):
        sch.tick()
    row = store.db.execute("SELECT * FROM fires").fetchone()
    assert row["outcome"] == "submitted" and row["job_id"]
    sch, store = scheduler(tmp_path / "r.db", clock)  # restarted
    recovered = sch.tick()
    assert [f["job_id"] for f in recovered] == [row["job_id"]] and store.get(row["job_id"]).state == "QUEUED"
    assert sch.tick() == [] and store.db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1


def test_a_recipe_that_cannot_be_queued_is_skipped_with_why(tmp_path):
    clock = Clock(T0)
    sch, store = scheduler(tmp_path / "r.db", clock)
    sch.add("n", "name: n\n", None, spec(cron="0 * * * *"))

    def refuse(*a):
        raise ValueError("recipe.yaml: data.train: file not found: /data/train.jsonl")

    sch.submit = refuse
    clock.t += HOUR + 1
    fire = sch.tick()[0]
    assert fire["outcome"] == "skipped" and fire["job_id"] is None
    assert fire["reason"].endswith("not queued: recipe.yaml: data.train: file not found: /data/train.jsonl")


def test_data_change_fires_once_per_change_and_never_otherwise(tmp_path):
    from jobs.recipe import parse_recipe
    from runner.schedules import data_fingerprint

    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n')
    recipe_text = f"name: d\nmodel:\n  name: m\ntask: classification\ndata:\n  train: {data}\n"
    clock = Clock(T0)

    def fingerprint(s):
        return data_fingerprint(parse_recipe(s.recipe, source="recipe.yaml"))

    sch, store = scheduler(tmp_path / "r.db", clock, fingerprint=fingerprint)
    sch.add("d", recipe_text, None, spec(on_data_change=True, poll_interval=60),
            fingerprint=fingerprint(type("S", (), {"recipe": recipe_text})))
    outcomes = []
    for minute in range(1, 30):
        clock.t = T0 + minute * 30  # passes every 30 s; the data looked at every 60 s
        if minute == 10:
            data.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
        if minute == 20:  # the same bytes written again: a new modification time is a change too
            data.write_text('{"text": "a", "label": "x"}\n')
        fires = sch.tick()
        outcomes += [(minute, f["outcome"]) for f in fires]
        for f in fires:
            store.set_state(f["job_id"], "CANCELLED", reason="done with it")
    assert outcomes == [(10, "submitted"), (20, "submitted")]
    data.unlink()
    clock.t += 120
    fire = sch.tick()[0]
    assert fire["outcome"] == "skipped" and fire["reason"].startswith("the data could not be read: ")
    clock.t += 120
    assert sch.tick() == []  # the same trouble is said once


def test_pause_resume_trigger_and_remove(tmp_path):
    clock = Clock(T0)
    sch, store = scheduler(tmp_path / "r.db", clock)
    sch.add("n", "name: n\n", None, spec(cron="0 * * * *"))
    sch.set_paused("n", True)
    clock.t += HOUR + 1
    fire = sch.tick()[0]
    assert fire["outcome"] == "skipped" and fire["reason"].endswith("the schedule is paused")
    manual = sch.trigger("n")  # by hand, paused or not
    assert manual["outcome"] == "submitted" and manual["slot"] == "manual:1"
    sch.set_paused("n", False)
    clock.t += HOUR
    fire = sch.tick()[0]
    assert fire["outcome"] == "skipped" and manual["job_id"] in fire["reason"]  # forbid: the manual run goes on
    with pytest.raises(Exception, match="a schedule named 'n' exists"):
        sch.add("n", "name: n\n", None, spec(cron="0 * * * *"))
    sch.remove("n")
    assert sch.all() == [] and store.db.execute("SELECT COUNT(*) FROM fires").fetchone()[0] == 0


def test_schedule_section_is_checked_at_validation():
    from jobs.recipe import RecipeError, parse_recipe

    base = "name: x\nmodel:\n  name: m\ntask: classification\ndata:\n  train: t.jsonl\nschedule:\n"
    with pytest.raises(RecipeError) as e:
        parse_recipe(base + "  cron: '0 25 * * *'\n  timezone: America/New_Yrok\n", source="r.yaml")
    text = str(e.value)
    assert "schedule.cron: '0 25 * * *': the hour field is wrong; five fields: minute hour" in text
    assert "schedule.timezone: unknown time zone 'America/New_Yrok': did you mean 'America/New_York'?" in text
    with pytest.raises(RecipeError, match="a schedule needs `cron`, `on_data_change: true`, or both"):
        parse_recipe(base + "  timezone: UTC\n", source="r.yaml")
    r = parse_recipe(base + "  cron: '30 2 * * *'\n  timezone: Europe/Berlin\n", source="r.yaml")
    assert (r.schedule.cron, r.schedule.concurrency, r.schedule.poll_interval) == ("30 2 * * *", "forbid", 600)


def test_a_hub_dataset_is_fingerprinted_by_the_revision_the_hub_names(monkeypatch):
    """The hub is the network edge: its answer is stood in for; a new commit on the dataset is a change."""
    import huggingface_hub

    from jobs.recipe import parse_recipe
    from runner.schedules import data_fingerprint

    asked, head = [], {"sha": "a" * 40}

    def dataset_info(self, repo_id, revision=None, **kw):
        asked.append((repo_id, revision))
        return type("Info", (), {"sha": head["sha"]})()

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    r = parse_recipe("name: h\nmodel:\n  name: m\ntask: classification\ndata:\n  train:\n    hub: org/reviews\n",
                     source="r.yaml")
    first = data_fingerprint(r)
    assert data_fingerprint(r) == first and asked[0] == ("org/reviews", None)  # the default branch
    head["sha"] = "b" * 40
    assert data_fingerprint(r) != first
