"""What the routes act on: the store, the registry, the dispatcher and the scheduler of one server, its artifacts
folder, and the operations several routes share (describe a job, parse a recipe, queue one, stop one), with the
dispatch loop: a thread that runs the schedules' pass and the dispatcher's every `interval` seconds, and at once
after a submit, cancel or retry (`wake`)."""

from __future__ import annotations

import json
import math
import os
import secrets
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, HTTPException, Request

from jobs.jobdir import STATES, SWEEP, TERMINAL, JobState
from jobs.jobdir import shared_storage_problem, write_json
from jobs.recipe import RecipeError, parse_recipe
from jobs.schema import NAME_RE, NAME_RULE, SELECT_METRICS, callback_refusal
from runner.client import artifacts_root
from runner.jobfiles import read_json
from runner.store import Store, eta_seconds


def need_of_recipe(recipe):
    from runner.queue import Need

    r = recipe.resources
    return Need(sweep_workers(recipe), r.cpus_per_worker, r.gpus_per_worker)


def sweep_metric(snapshot: str) -> tuple[str, bool]:
    """(the metric that chooses a sweep's trial, higher is better), from its recipe snapshot (checked when
    submitted; anything odd reads as the task's default)."""
    doc = _yaml(snapshot)
    task = doc.get("task") if doc.get("task") in SELECT_METRICS else "classification"
    sweep = doc.get("sweep") if isinstance(doc.get("sweep"), dict) else {}
    train = doc.get("train") if isinstance(doc.get("train"), dict) else {}
    for metric in (sweep.get("metric"), train.get("select_metric"), next(iter(SELECT_METRICS[task]))):
        if isinstance(metric, str) and metric in SELECT_METRICS[task]:
            return metric, SELECT_METRICS[task][metric]
    raise AssertionError("unreachable: the task's default is a metric")


def sweep_count(snapshot: str) -> int | None:
    """How many trials a sweep runs, from its snapshot; None where it does not say."""
    from jobs.schema import SweepSpec

    doc = _yaml(snapshot)
    try:
        return SweepSpec.model_validate(doc.get("sweep")).count
    except ValueError:
        return None


def _yaml(snapshot: str) -> dict:
    import yaml

    try:
        doc = yaml.safe_load(snapshot[:1_000_000]) if isinstance(snapshot, str) else None
    except yaml.YAMLError:
        return {}
    return doc if isinstance(doc, dict) else {}


def sweep_workers(recipe) -> int:
    """The workers a job holds at once: a sweep's are max_concurrent trials' (each the recipe's resources)."""
    r = recipe.resources
    if recipe.sweep is None:
        return r.workers
    return r.workers * min(recipe.sweep.max_concurrent, recipe.sweep.count)


class Service:
    def __init__(self, home: Path, clock=time.time, backend=None):
        from runner.cleanup import Retention, keep_from_env
        from runner.dispatch import Dispatcher
        from runner.registry import Registry

        self.clock, self.backend = clock, backend
        self.root = artifacts_root(Path(home)).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = Store(Path(home) / "runner.db", clock=clock)
        self.registry = Registry(self.store, clock=clock)
        self.dispatcher = Dispatcher(self.store, backend, on_success=self._registered, on_start=self._starting,
                                     on_end=Retention(self.store, keep_from_env())) if backend is not None else None
        self.scheduler = None  # set by create_app (runner.api.schedules.make_scheduler)
        self.ray_url = getattr(backend, "address", None)
        self.wake, self._stop = threading.Event(), threading.Event()
        self.artifacts_cache: dict[str, tuple[tuple, dict]] = {}  # an ended job's, by id: its folder no longer changes
        self.streams = {"open": 0}  # log streams open now
        self.max_streams = int(os.environ.get("RUNNER_MAX_LOG_STREAMS", "64"))
        self.sse_max_s = 30.0  # a log stream ends after this long; the client reconnects (create_app sets it)

    # --- the dispatch loop ----------------------------------------------------------------------------------------

    def lifespan(self, interval: float):
        @asynccontextmanager
        async def run(_app):
            thread = threading.Thread(target=self._loop, args=(interval,), daemon=True, name="dispatch")
            thread.start()
            yield
            self._stop.set()
            self.wake.set()
            thread.join(timeout=10)
            if self.dispatcher is not None:  # nothing of the runner's keeps nodes up once it stops
                try:
                    self.dispatcher.release()
                except Exception:  # noqa: BLE001 - the GCS is gone too: nothing to withdraw from
                    pass

        return run

    def _loop(self, interval: float) -> None:
        while not self._stop.is_set():
            self.wake.wait(interval)
            self.wake.clear()
            if self._stop.is_set():
                break
            for what, tick in (("schedules", self.scheduler and self.scheduler.tick),
                               ("dispatch", self.dispatcher and self.dispatcher.tick)):
                try:
                    if tick:
                        tick()
                except Exception as e:  # noqa: BLE001 - a pass that failed: say so, try again next pass
                    print(f"{what}: {type(e).__name__}: {e}", flush=True)

    def _registered(self, job) -> None:
        version = self.registry.register(job)
        if version is not None:
            self.store.note(job.id, f"registered as {version['model']} v{version['version']}: {version['decision']}")

    def _starting(self, job) -> None:
        """The champion a registered model's job will be scored against (jobs.compare), in champion.json."""
        spec = self.registry.champion_for(job)
        path = Path(job.job_dir) / "champion.json"
        if spec is None:
            path.unlink(missing_ok=True)
            return
        write_json(path, spec)  # a link planted there is replaced, not written through

    # --- jobs -----------------------------------------------------------------------------------------------------

    def described(self, job, order: list[str] | None = None) -> dict:
        """A job as the API shows it: with its place in the queue and why it waits, while it is QUEUED.
        order: the queue's job ids, when the caller describes many jobs (read once, not once a job)."""
        out = job.to_json()
        now = self.clock()
        out["duration_s"] = round((job.ended_at or now) - job.started_at, 1) if job.started_at else None
        out["eta_s"] = eta_seconds(out["progress"]) if job.state in (JobState.RUNNING, JobState.RETRYING) else None
        if job.state == JobState.QUEUED:
            order = order if order is not None else [j.id for j in self.store.queue()]
            waits = self.dispatcher.waiting.get(job.id) if self.dispatcher else None
            out["queue_position"] = order.index(job.id) + 1 if job.id in order else None
            out["waiting_for"] = waits[1] if waits else ("no Ray cluster attached" if self.dispatcher is None
                                                         else "the next dispatch pass")
        if job.kind == "sweep":
            out["sweep"] = self.sweep_of(job)
        return out

    def sweep_of(self, job) -> dict:
        """A sweep's trials as its table shows them (values, state, best validation figure, steps, time), the
        metric that chooses, and the trial chosen (sweep.json, once the search is over)."""
        metric, higher = sweep_metric(job.recipe)
        chosen = read_json(job.job_dir, SWEEP)
        index = chosen.get("chosen") if chosen else None
        chosen_id = f"{job.id}-t{index:03d}" if isinstance(index, int) and not isinstance(index, bool) else None
        now, trials = self.clock(), []
        for t in self.store.trials(job.id):
            cols = self.store.metrics_columns(t.id, "validation", (metric,))
            pairs = [(v, s) for v, s in zip(cols[metric], cols["step"]) if isinstance(v, (int, float))
                     and not isinstance(v, bool) and math.isfinite(v)]
            best = (max if higher else min)(pairs, key=lambda p: p[0]) if pairs else None
            progress = json.loads(t.progress) if t.progress else {}
            trials.append({"id": t.id, "state": t.state, "reason": t.reason, "values": json.loads(t.params or "{}"),
                           "best": best and best[0], "best_step": best and best[1],
                           "steps": progress.get("step"), "total_steps": progress.get("total_steps"),
                           "duration_s": round((t.ended_at or now) - t.started_at, 1) if t.started_at else None,
                           "chosen": t.id == chosen_id})
        return {"metric": metric, "higher_is_better": higher, "chosen": chosen_id, "trials": trials,
                "trial_count": sweep_count(job.recipe)}

    def listing(self, state: str | None, name: str | None, q: str | None, limit: int, offset: int) -> dict:
        if state is not None and state.upper() not in STATES:
            raise HTTPException(422, f"state {state!r}: one of {', '.join(STATES)}")
        state = state.upper() if state else None
        store = self.store
        jobs = store.list(state=state, name=name, limit=limit, offset=offset, text=q)
        order = [j.id for j in store.queue()] if any(j.state == JobState.QUEUED for j in jobs) else []
        return {"jobs": [self.described(j, order) for j in jobs], "limit": limit, "offset": offset,
                "total": store.count(state=state, name=name, text=q), "counts": store.counts()}

    @staticmethod
    def parsed(text: str, base_dir: str | None, env: dict, source: str = "recipe.yaml"):
        """A recipe from a request, or a 422 with every problem."""
        if base_dir is not None and (len(base_dir) > 4096 or any(ord(c) < 32 for c in base_dir)):
            raise HTTPException(422, f"base_dir {base_dir[:60]!r}: a folder's path, at most 4,096 characters, with no "
                                     "control characters")
        try:
            recipe = parse_recipe(text, source=source, base_dir=Path(base_dir) if base_dir else None, env=env)
        except RecipeError as e:
            raise HTTPException(422, {"message": "the recipe has problems", "problems": [
                {"path": p.path, "line": p.line, "message": p.message} for p in e.problems]}) from None
        refused = [(i, why) for i, c in enumerate(recipe.train.callbacks) if (why := callback_refusal(c.use))]
        if refused:  # the server's own list (RUNNER_CALLBACKS), never the client's
            raise HTTPException(422, {"message": "the recipe has problems", "problems": [
                {"path": f"train.callbacks.{i}.use", "line": recipe.line_of(f"train.callbacks.{i}.use"),
                 "message": why} for i, why in refused]})
        return recipe

    def queue_recipe(self, recipe, name: str | None = None, priority: int | None = None, job_id: str | None = None):
        """A checked recipe as a new QUEUED job: its folder, its snapshot, its row."""
        name = recipe.name if name is None else name
        fixed = job_id is not None  # a scheduled fire's id, made from its slot
        if not NAME_RE.fullmatch(name):
            raise HTTPException(422, f"name {name!r}: {NAME_RULE}")
        recipe = recipe.model_copy(update={"name": name})
        job_id = job_id or f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(self.clock()))}-" \
                           f"{secrets.token_hex(2)}"
        job_dir = (self.root / job_id).resolve()
        if job_dir.parent != self.root:  # the name rules make this impossible; the check keeps it so
            raise HTTPException(422, f"name {name!r} would leave the artifacts folder")
        res = recipe.resources
        if self.dispatcher is not None:
            why = self.dispatcher.refusal(need_of_recipe(recipe))
            if why:
                raise HTTPException(422, f"refused: the job {why}")
            storage = shared_storage_problem(self.root, len(self.dispatcher.backend.nodes()))
            if storage:
                raise HTTPException(422, f"refused: {storage}")
        job_dir.mkdir(exist_ok=fixed)  # a fire's folder may be there from a server that died before its row
        snapshot = recipe.snapshot_yaml()
        (job_dir / "recipe.yaml").write_text(snapshot, encoding="utf-8")
        priority = priority if priority is not None else recipe.resources.priority
        job = self.store.add_job(job_id, name, snapshot, str(job_dir), sweep_workers(recipe), res.cpus_per_worker,
                                 res.gpus_per_worker, priority=priority,
                                 kind="sweep" if recipe.sweep is not None else None)
        self.wake.set()
        return job

    def stop_job(self, job_id: str, reason: str = "cancelled by the user"):
        """Cancel a job: a queued one at once, a running one through Ray; 409 when it has ended."""
        job = self.store.get(job_id)
        if job.kind == "trial":
            raise HTTPException(409, f"{job_id} is a trial of sweep {job.parent}: its trials end with the sweep "
                                     f"(runner cancel {job.parent})")
        if job.state in TERMINAL:
            raise HTTPException(409, f"job {job_id} has already ended ({job.state})")
        if self.dispatcher is not None and job.state != JobState.QUEUED:
            out = self.dispatcher.cancel(job)
        else:
            out = self.store.set_state(job_id, JobState.CANCELLED, reason=reason, expect=job.state)
        self.wake.set()
        return out


def current(request: Request) -> Service:
    """The routes' dependency: the server's Service (create_app puts it on app.state)."""
    return request.app.state.service


SVC = Depends(current)
