"""A sweep: the recipe's own hyperparameters searched on Ray Tune, a TorchTrainer per trial, then the chosen trial
tested once, exported and checked like any job.

The sweep's driver (jobs.driver, for a recipe with `sweep`) prepares the data once; every trial reads it. Each
trial is a job folder of its own, <sweep>/trials/t<NNN>/ (jobs.jobdir), with the recipe as it runs (the sweep's, the
trial's values filled in, `train.select_metric` the sweep's metric), its metrics, events, checkpoints and best
weights. Ray Tune runs `_trial`, a function that runs the trial's TorchTrainer (Ray 2.6x with Train V2: the
trainer inside the Tune function); Ray Train's reports at each evaluation reach Tune (TuneReportCallback), where
ASHA may stop the trial.

Which configurations: `grid` and `random` are drawn here, before the search (`configurations`: the grid in order,
or `random` from numpy's generator seeded by sweep.seed), and Tune runs trial i on configuration i, so the same seed
gives the same trials and a retried sweep the same ones. `tpe` is Optuna's TPE sampler (seeded) through Tune's
OptunaSearch: each trial's values depend on the earlier trials' scores.

Selection reads validation only: each trial's best value of the sweep's metric over its evaluations
(metrics.jsonl). The test split is scored once, after the search, on the chosen trial's best weights: a
TorchTrainer in the sweep's folder resumes the chosen trial's last checkpoint and runs only the test
(jobs.train, phase "test"), so eval.json, model/ and onnx/ of the sweep are the chosen trial's.
"""

from __future__ import annotations

import logging
import json
import math
import os
import shutil
import time
from pathlib import Path

import yaml

from jobs import secrets
from jobs.jobdir import CHOSEN, EVENTS, METRICS, RECIPE, SWEEP, TRIAL, TRIALS, JobState, checkpoints_newest_first, event
from jobs.jobdir import clear_control, note, whole_lines, write_control, write_json
from jobs.recipe import SNAPSHOT, RecipeError, parse_recipe
from jobs.schema import Recipe, SweepSpec

TRIAL_STATES = (JobState.RUNNING, JobState.SUCCEEDED, JobState.STOPPED, JobState.FAILED)


def configurations(recipe: Recipe, seed: int) -> list[dict] | None:
    """Every trial's values, in trial order, for grid and random; None for tpe (jobs.schema.SweepSpec.drawn)."""
    return recipe.sweep.drawn(seed, recipe.swept_values)


def trial_snapshot(snapshot: str, values: dict, metric: str) -> str:
    """A trial's recipe.yaml: the sweep's snapshot without `sweep` (nor registration or schedule: the sweep's
    result is what registers), the values at their dotted paths, the sweep's metric choosing its best weights, and a
    checkpoint at each evaluation (each one a report the scheduler judges)."""
    d = yaml.safe_load(snapshot)
    for key in ("sweep", "register_as", "schedule"):
        d.pop(key, None)
    for path, v in values.items():
        section, key = path.split(".", 1)
        d.setdefault(section, {})[key] = v
    d["train"]["select_metric"] = metric
    d["train"]["checkpoint_every"] = None
    return yaml.safe_dump(d, sort_keys=False, allow_unicode=True)


def trial_dir(job_dir: Path, index: int) -> Path:
    return Path(job_dir) / TRIALS / f"t{index:03d}"


def read_trial(folder: Path) -> dict:
    try:
        doc = json.loads((folder / TRIAL).read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def set_trial(folder: Path, **changes) -> dict:
    doc = {**read_trial(folder), **changes, "updated": time.time()}
    write_json(folder / TRIAL, doc)
    return doc


def _records(folder: Path):
    """The records of a trial's metrics.jsonl with a whole-number step (a torn or foreign line is skipped)."""
    text, _ = whole_lines(folder / METRICS, 0)
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and not isinstance(rec.get("step"), bool):
            yield rec


def best_of(folder: Path, metric: str, higher: bool) -> dict:
    """A trial's best validation value of the metric over its evaluations (metrics.jsonl), the step it was met at,
    its steps so far and evaluations. Validation only: the test split is never read here."""
    steps, by_step = 0, {}
    for rec in _records(folder):
        steps = max(steps, rec["step"])
        if rec.get("split") == "validation":  # the last of a step: a resumed trial redid the steps after its checkpoint
            by_step[rec["step"]] = rec.get(metric)
    best = None
    for step, v in sorted(by_step.items()):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
                (best is None or (v > best[0] if higher else v < best[0])):
            best = (float(v), step)
    return {"best": best and best[0], "best_step": best and best[1], "steps": steps, "evaluations": len(by_step)}


def last_step(folder: Path) -> tuple[int, int | None]:
    """A trial's last trained step and its planned steps (metrics.jsonl's training records)."""
    step, total = 0, None
    for rec in _records(folder):
        if "split" not in rec:
            step = max(step, rec["step"])
            total = rec.get("total_steps") if isinstance(rec.get("total_steps"), int) else total
    return step, total


def choose(trials: list[dict], higher: bool) -> dict | None:
    """The trial with the best validation value (`best`); the first of equals. Trials that failed or never
    evaluated are not candidates. Nothing but `best` is read: a trial's test figures, had it any, do not count."""
    candidates = [t for t in trials if t.get("state") != JobState.FAILED and isinstance(t.get("best"), float)]
    if not candidates:
        return None
    return sorted(candidates, key=lambda t: ((-t["best"] if higher else t["best"]), t["index"]))[0]


def _asha(job_dir: Path, metric: str, higher: bool):
    """ASHA, whose stop is the trial's own: the trial is marked STOPPED and its workers are asked (control.json)
    to checkpoint and stop at their next step, so its TorchTrainer ends as a job's does and gives its resources
    back; a trial's last evaluation is never stopped (it ends by itself). Tune's own stop kills the trial's actor,
    and Ray Train's placement group outlives it where no Ray dashboard answers."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class Asha(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)
            if result.get("final"):  # its last evaluation: it ends by itself (Tune's own stop would kill it)
                return TrialScheduler.CONTINUE
            if decision != TrialScheduler.STOP:
                return decision
            folder = folder_of(job_dir, trial)
            if folder is not None and read_trial(folder).get("state") == JobState.RUNNING:
                n = result.get("training_iteration")
                why = (f"stopped early by ASHA after {n} evaluation{'s' * (n != 1)}: its validation {metric} "
                       f"{result.get(f'val_{metric}', float('nan')):.4g} trailed the other trials'")
                set_trial(folder, state=JobState.STOPPED, reason=why)
                write_control(folder, {"checkpoint": True, "stop": True, "why": why, "attempt": None})
                event(folder, why)
            return TrialScheduler.CONTINUE

    # each report of a trial is an evaluation (jobs.train, phase "trial"): the rungs are at 1, 2, 4, ... of them
    return Asha(time_attr="training_iteration", metric=f"val_{metric}", mode="max" if higher else "min",
                grace_period=1, reduction_factor=2, max_t=1_000_000)


def folder_of(job_dir: Path, trial) -> Path | None:
    """The folder of a Tune trial: by the configuration's index (grid, random) or the trial id's number (tpe)."""
    config = getattr(trial, "config", {}) or {}
    try:
        index = int(config["index"] if "index" in config else config[TRIAL_INDEX])
    except (KeyError, TypeError, ValueError):
        return None
    return trial_dir(job_dir, index)


TRIAL_INDEX = "trial_index"  # a tpe trial's number in its configuration (Tune's own trial ids are random hex)


def searcher(sweep: SweepSpec, seed: int, metric: str, higher: bool, first: dict | None = None):
    """tpe: Optuna's TPE sampler, seeded, through Tune's OptunaSearch; each suggestion numbered in order (the
    trial's folder), the count kept with the searcher's state, so a retried sweep numbers on from there."""
    from optuna.samplers import TPESampler
    from ray.tune.search.optuna import OptunaSearch

    class Numbered(OptunaSearch):
        suggested = 0

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if f"val_{metric}" in result:  # a trial ASHA stops reports once more, maybe between evaluations
                super().on_trial_result(trial_id, result)

        def suggest(self, trial_id: str):
            config = super().suggest(trial_id)
            if isinstance(config, dict):
                config = {**config, TRIAL_INDEX: self.suggested}
                self.suggested += 1
            return config

    inside = first is not None and all(_holds(sweep.parameters[k], v) for k, v in first.items())
    return Numbered(metric=f"val_{metric}", mode="max" if higher else "min",
                    sampler=TPESampler(seed=seed % 2**32),  # numpy's RandomState: 0 to 2^32 - 1
                    points_to_evaluate=[dict(first)] if inside and sweep.start_from_recipe else None)


def _holds(p, v) -> bool:
    """Whether a parameter's space holds the value (Optuna refuses a first point outside it)."""
    if p.kind == "choice":
        return v in p.values
    return isinstance(v, (int, float)) and not isinstance(v, bool) and p.values[0] <= v <= p.values[1]


def search_space(sweep: SweepSpec, configs: list[dict] | None) -> dict:
    """Tune's param_space: the index of a drawn configuration (grid, random), or the parameters' domains (tpe)."""
    from ray import tune

    if configs is not None:  # trial i runs configuration i (drawn here: reproducible, and the same on a retry)
        return {"index": tune.grid_search(list(range(len(configs))))}
    space = {}
    for name, p in sweep.parameters.items():
        if p.kind == "choice":
            space[name] = tune.choice(p.values)
        elif p.kind == "uniform":
            space[name] = tune.uniform(*p.values)
        elif p.kind == "loguniform":
            space[name] = tune.loguniform(*p.values)
        else:
            space[name] = tune.randint(p.values[0], p.values[1] + 1)
    return space


def _trial_function(job_dir: Path, model_path: str, configs: list[dict] | None, names: list[str], metric: str,
                    attempt: str | None, kit):
    """The Tune function of one trial: its folder and recipe, then its TorchTrainer to the end (resuming from the
    trial's own checkpoints where an earlier attempt of the sweep left some)."""

    def trial(config: dict) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        secrets.take(job_dir)  # the tokens the sweep's driver handed over (a gated model's), for the recipe
        if "index" in config:  # grid, random: the configuration drawn before the search
            index = int(config["index"])
            values = configs[index]
        else:  # tpe: the searcher numbers its suggestions (Numbered)
            index = int(config[TRIAL_INDEX])
            values = {n: config[n] for n in names}
        folder = trial_dir(job_dir, index)
        folder.mkdir(parents=True, exist_ok=True)
        if read_trial(folder).get("state") in (JobState.SUCCEEDED, JobState.STOPPED):
            return  # ended before the search's state was saved: a restored search does not run it again
        resumed = checkpoints_newest_first(folder)
        clear_control(folder)  # an earlier attempt's stop is not this one's
        # where this run's lines begin: the server copies the store's lines of the trial from there
        sizes = [(folder / n).stat().st_size if (folder / n).exists() else 0 for n in (METRICS, EVENTS)]
        set_trial(folder, index=index, values=values, state=JobState.RUNNING, reason=None, attempt=attempt,
                  started=time.time(), offsets=sizes)
        (folder / "failure.txt").unlink(missing_ok=True)
        try:
            if not (folder / RECIPE).exists():
                text = trial_snapshot((job_dir / RECIPE).read_text(), values, metric)
                tmp = folder / (RECIPE + ".tmp")
                tmp.write_text(text)
                tmp.replace(folder / RECIPE)
            recipe = parse_recipe((folder / RECIPE).read_text(), source=f"trial {index}'s recipe.yaml",
                                  env=os.environ, allowed=SNAPSHOT)
        except RecipeError as e:  # values the schema takes one by one, refused together (tpe's draws)
            set_trial(folder, state=JobState.FAILED, reason=e.render()[:2000])
            raise RuntimeError(f"trial {index}: {e.render()}") from None
        event(folder, f"trial {index} running on {', '.join(f'{k}={v}' for k, v in values.items())}"
                      + (f", resuming from its checkpoint {Path(resumed[0]).name}" if resumed else ""),
              state=JobState.RUNNING)
        trainer = kit.make_trainer(folder, recipe, model_path, prepared=job_dir / "prepared", phase="trial",
                                   callbacks=(TuneReportCallback(),), secrets_dir=job_dir)
        try:
            kit.fit(trainer, folder)
        except kit.JobFailed as e:
            set_trial(folder, state=JobState.FAILED, reason=str(e)[:2000])
            raise RuntimeError(f"trial {index} failed: {e}") from None
        if read_trial(folder).get("state") == JobState.RUNNING:  # not stopped by the scheduler meanwhile
            set_trial(folder, state=JobState.SUCCEEDED, reason="trained to its end")

    return trial


def _ending_callback(job_dir: Path):
    """A Tune callback (in the driver): a trial whose function raised failed, with its reason."""
    from ray.tune import Callback

    class Endings(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            folder = folder_of(job_dir, trial)
            if folder is None or not folder.exists() or read_trial(folder).get("state") != JobState.RUNNING:
                return
            steps, total = last_step(folder)
            if total and steps >= total:
                set_trial(folder, state=JobState.SUCCEEDED, reason="trained to its end")
            else:
                set_trial(folder, state=JobState.STOPPED, reason=f"ended by Ray Tune at step {steps} of {total}")

        def on_trial_error(self, iteration, trials, trial, **info):
            folder = folder_of(job_dir, trial)
            if folder is not None and folder.exists() and read_trial(folder).get("state") == JobState.RUNNING:
                reason = (folder / "failure.txt").read_text()[:2000] if (folder / "failure.txt").exists() else \
                    "the trial's Tune function failed"
                set_trial(folder, state=JobState.FAILED, reason=reason)

    return Endings()


def sweep_job(job_dir: Path, prep, kit) -> dict:
    """Run the search, choose on validation, test the chosen trial once, export and check it. Returns the eval
    results; raises kit.JobFailed. kit: the driver's pieces (make_trainer, fit, finish_job,
    JobFailed), handed in so that this module does not import the driver that imports it."""
    from ray import tune

    JobFailed, fit, make_trainer = kit.JobFailed, kit.fit, kit.make_trainer

    recipe: Recipe = prep.recipe
    sweep = recipe.sweep
    metric, higher = recipe.sweep_metric
    seed = sweep.seed if sweep.seed is not None else recipe.train.seed
    configs = configurations(recipe, seed)
    attempt = os.environ.get("RUNNER_ATTEMPT")
    timings = prep.timings
    for stale in (SWEEP, CHOSEN, "eval.json", "best"):  # an earlier attempt's choice is not this one's
        p = job_dir / stale
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no CSV, JSON, TensorBoard files per trial
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")  # the search's state, for a retry: every few seconds
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # a trial ASHA stops reports once more, at the step it stops at, maybe between evaluations (see _asha)
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # the results are read from the trial folders, not from Tune's per-trial files (turned off above)
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    function = _trial_function(job_dir, prep.model_path, configs, list(sweep.parameters), metric, attempt, kit)
    # the trial's function only drives its TorchTrainer, whose workers hold the recipe's resources: it takes no CPU
    # (a whole one per trial would starve the workers it starts); Ray wants something in a bundle, so 1 MiB of memory
    trainable = tune.with_resources(function, {"cpu": 0, "memory": 2**20})
    state_dir = job_dir / "tune"
    callbacks = [_ending_callback(job_dir)]
    n = sweep.count
    note(job_dir, f"sweep: {n} trial{'s' * (n != 1)} ({sweep.search}"
                  f"{f', seed {seed}' if sweep.search != 'grid' else ''}), {sweep.max_concurrent} at once, chosen on "
                  f"validation {metric} ({'higher' if higher else 'lower'} is better)"
                  f"{'; ASHA stops trials that trail' if sweep.early_stop == 'asha' else ''}")
    t0 = time.perf_counter()
    if tune.Tuner.can_restore(str(state_dir)):
        note(job_dir, "sweep: going on from the earlier attempt's search: finished trials are kept, the others "
                      "resume from their checkpoints")
        tuner = tune.Tuner.restore(str(state_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(sweep, configs),
            tune_config=tune.TuneConfig(
                num_samples=1 if configs is not None else n, max_concurrent_trials=sweep.max_concurrent,
                search_alg=searcher(sweep, seed, metric, higher, recipe.swept_values) if configs is None else None,
                scheduler=_asha(job_dir, metric, higher) if sweep.early_stop == "asha" else None),
            run_config=tune.RunConfig(name="tune", storage_path=str(job_dir), callbacks=callbacks, verbose=0),
        )
    tuner.fit()
    timings["search_s"] = time.perf_counter() - t0
    trials = summary(job_dir, metric, higher)
    chosen = choose(trials, higher)
    record = {"metric": metric, "higher_is_better": higher, "search": sweep.search, "seed": seed,
              "trials": trials, "chosen": chosen and chosen["index"],
              "selection": "validation only: the test split is scored once, after the search, on the chosen "
                           "trial's best weights"}
    write_json(job_dir / SWEEP, record)
    if chosen is None:
        raise JobFailed(f"sweep: no trial evaluated on validation {metric} ("
                        + "; ".join(f"trial {t['index']}: {t['state']}{': ' + t['reason'] if t.get('reason') else ''}"
                                    for t in trials[:5]) + ")")
    folder = trial_dir(job_dir, chosen["index"])
    event(job_dir, f"sweep: chose trial {chosen['index']} ({', '.join(f'{k}={v}' for k, v in chosen['values'].items())}"
                   f"): best validation {metric} {chosen['best']:.6g} at step {chosen['best_step']}; testing it")
    last = checkpoints_newest_first(folder)
    if not (folder / "best").is_dir() or not last:
        raise JobFailed(f"sweep: the chosen trial {chosen['index']} has no "
                        f"{'best weights (best/)' if last else 'checkpoint'} in {folder}: removed while the sweep "
                        "ran? Retry the sweep (runner retry) to run it again")
    shutil.copyfile(folder / RECIPE, job_dir / CHOSEN)
    shutil.copytree(folder / "best", job_dir / "best")
    chosen_recipe = parse_recipe((folder / RECIPE).read_text(), source=str(folder / RECIPE), env=os.environ,
                                 allowed=SNAPSHOT)
    t0 = time.perf_counter()
    fit(make_trainer(job_dir, chosen_recipe, prep.model_path, prepared=job_dir / "prepared", recipe_file=folder /
                     RECIPE, resume_from=last, phase="test"), job_dir)
    timings["test_s"] = time.perf_counter() - t0
    return kit.finish_job(job_dir, chosen_recipe, prep)


def summary(job_dir: Path, metric: str, higher: bool) -> list[dict]:
    """Every trial's index, values, state, reason and best validation value, from the trial folders."""
    out = []
    root = Path(job_dir) / TRIALS
    for folder in sorted(root.iterdir()) if root.is_dir() else ():
        doc = read_trial(folder)
        if not isinstance(doc.get("index"), int):
            continue
        state = doc.get("state") if doc.get("state") in TRIAL_STATES else JobState.FAILED
        if state == JobState.RUNNING:  # the search is over: a trial still running by its file did not end itself
            state = JobState.FAILED
        out.append({"index": doc["index"], "values": doc.get("values") or {}, "state": str(state),
                    "reason": doc.get("reason"), **best_of(folder, metric, higher)})
    return out
