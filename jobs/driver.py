"""The job driver: pre-flight again, prepare the data, run the Ray Train workers, write eval and manifest.

`python -m jobs.entrypoint JOB_DIR` runs it (the Ray Jobs entrypoint, and what `runner run` starts in the
foreground). JOB_DIR holds `recipe.yaml`, the recipe as run (absolute paths, secrets as `${VAR}` references).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from jobs import secrets
from jobs.jobdir import JobState, checkpoints_newest_first, event, file_sha256, first_line, note, open_private
from jobs.jobdir import PREEMPTED, read_preempted, shared_storage_problem
from jobs.recipe import RecipeError, SNAPSHOT, load_recipe
from jobs.schema import Recipe


class JobFailed(Exception):
    """The job cannot succeed; the message is the reason a person can act on."""


COMPARE_TIMEOUT_S = 1800  # the like-for-like comparison (jobs.compare): scheduled and done within this, or said so
PACKAGES = ("torch", "transformers", "accelerate", "datasets", "ray", "peft", "onnx", "onnxruntime", "runner")


def prepare_data(recipe: Recipe, job_dir: Path, model_path: str) -> tuple[dict, list[str]]:
    """Tokenize train/validation/test once, for every worker: <job_dir>/prepared/{data,tokenizer,labels.json}, and
    with train.packing the train examples packed (prepared/packed).

    Reads and checks the data (the driver's only read of it), judges the lengths of every row (pre-flight looked at
    the first few thousand) and raises JobFailed where nothing would be learned; or links what an earlier job
    tokenized from the same files (jobs.tokenized_cache). Returns the rows per split and the notes on truncation.
    """
    rows, notes = _tokenized(recipe, job_dir, model_path)
    if recipe.train.packing:
        notes = notes + [_pack(recipe, job_dir / "prepared")]
    return rows, notes


def _tokenized(recipe: Recipe, job_dir: Path, model_path: str) -> tuple[dict, list[str]]:
    import datasets

    from jobs import data as D
    from jobs import tokenized_cache as cache
    from jobs.modelfiles import load_tokenizer
    from jobs.preflight import length_problems

    out = job_dir / "prepared"
    parts = cache.data_parts(recipe)  # the data files hashed once for the cache's key and validate's proof
    k = cache.key(recipe, model_path, parts)
    entry = cache.lookup(job_dir, k)
    if entry is not None:
        try:
            info = cache.link_into(entry, out)
            note(job_dir, f"tokenized data reused from {entry} (the same files, tokenizer and data settings)")
            return info["rows"], info["notes"]
        except (OSError, ValueError, TypeError) as e:  # being evicted, or not the cache's: tokenize, store anew
            note(job_dir, f"the cached tokenized data at {entry} could not be used ({first_line(e)}): tokenizing")
            cache.discard(entry)
    splits, proven = _read(recipe, job_dir, parts)
    labels = D.label_names(recipe, splits["train"]) if recipe.task == "classification" else None
    ids = {n: i for i, n in enumerate(labels)} if labels else None
    tok = load_tokenizer(recipe, model_path)
    tokenized, notes, problems = {}, [], []
    # the tokenized Arrow files until save_to_disk copies them: on local disk (the job folder may be shared
    # storage, where they would cross the network twice)
    scratch = Path(tempfile.mkdtemp(prefix=f"runner-tokenize-{job_dir.name[:40]}-"))
    processes = tokenize_processes()
    try:
        for name, sp in splits.items():
            try:
                ds = D.tokenize_split(recipe, tok, sp, ids, processes=processes, scratch=scratch)
            except Exception as e:
                if proven:  # rows that were not checked here (validate's proof): a bad one is named by its line
                    _checked(recipe)
                if isinstance(e, ValueError):
                    raise JobFailed(f"data.format: {e}") from None
                raise
            problems += length_problems(recipe, name, D.column(ds, "n_tokens"), D.column(ds, "units"),
                                        str(len(ds)), notes)
            tokenized[name] = ds
        if problems:
            raise JobFailed("; ".join(f"{p.path}: {p.message}" for p in problems))
        shutil.rmtree(out, ignore_errors=True)
        datasets.DatasetDict(tokenized).save_to_disk(str(out / "data"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    tok.save_pretrained(out / "tokenizer")
    (out / "labels.json").write_text(json.dumps(labels))
    rows = {name: len(v) for name, v in tokenized.items()}
    if k is not None and cache.key(recipe, model_path) == k:  # files rewritten as they were read: not cached
        cache.store(job_dir, k, out, {"rows": rows, "notes": notes})
    return rows, notes


def _read(recipe: Recipe, job_dir: Path, parts: list | None) -> tuple[dict, bool]:
    """The splits, read once, and whether their rows went unchecked here. Where `runner validate` proved the files
    as they are now (jobs.tokenized_cache.proven), its row checks are not run again: the rows read must then be the
    rows it counted, and the files must not have changed while they were read; otherwise, or where the unchecked
    read fails, every check runs."""
    from jobs import data as D
    from jobs import tokenized_cache as cache

    proof = cache.proven(cache.validated_root(job_dir), recipe, parts)
    if proof is not None:
        try:
            splits = D.load_splits(recipe, proven=True)
        except Exception:  # noqa: BLE001 - not the data validate saw: the checked read says what is wrong
            splits = None
        rows = {name: len(sp.dataset) for name, sp in (splits or {}).items()}
        if splits is not None and rows == proof["rows"] and cache.data_key(recipe) == proof["key"]:
            note(job_dir, f"data checks reused from runner validate at "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(proof['at']))} (the same files by "
                          f"sha256; {', '.join(f'{k} {v}' for k, v in rows.items())} rows)")
            return splits, True
        note(job_dir, "the data is not what runner validate saw (changed since, or as it was read): checking it")
    return _checked(recipe), False


def _checked(recipe: Recipe) -> dict:
    """The splits read with every check; JobFailed naming the key, file and line of what is wrong."""
    from jobs import data as D

    try:
        return D.load_splits(recipe)
    except D.DataError as e:
        raise JobFailed("; ".join(f"{p.path}: {p.message}" for p in e.problems)) from None


def _pack(recipe: Recipe, prepared: Path) -> str:
    """The tokenized train examples packed into prepared/packed (jobs.data.pack, by train.seed, after the cache:
    the same tokenized data serves every seed); the note that says how full the packs are."""
    import datasets

    from jobs import data as D

    train = datasets.load_from_disk(str(prepared / "data" / "train"))
    scratch = Path(tempfile.mkdtemp(prefix="runner-pack-"))
    try:
        try:
            packed, sizes = D.pack(train, recipe.data.max_seq_len, recipe.train.seed, scratch=scratch)
        except ValueError as e:
            raise JobFailed(f"train.packing: {e}") from None
        shutil.rmtree(prepared / "packed", ignore_errors=True)
        packed.save_to_disk(str(prepared / "packed"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    fed = int(D.column(packed, "length").sum())
    return (f"train: {len(train)} examples packed into {len(sizes)} sequences of at most {recipe.data.max_seq_len} "
            f"tokens ({fed / (len(sizes) * recipe.data.max_seq_len):.0%} full, "
            f"{len(train) / len(sizes):.1f} examples each)")


def tokenize_processes() -> int:
    """Processes that tokenize a big split: the CPUs this driver may use (its affinity, and a container's CPU quota
    where cgroup v2 sets one), at most RUNNER_TOKENIZE_PROCESSES (default 8: more than a few rarely pay for their
    start)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    raw = os.environ.get("RUNNER_TOKENIZE_PROCESSES", "").strip() or "8"
    try:
        most = max(1, int(raw))
    except ValueError:
        raise JobFailed(f"RUNNER_TOKENIZE_PROCESSES={raw[:40]!r}: expected a whole number of processes, 1 or more") \
            from None
    return max(1, min(cpus, most))


@dataclass
class Prepared:
    recipe: Recipe
    model_path: str
    rows: dict
    timings: dict


def run_job(job_dir: Path) -> dict:
    """Run one job to the end on the Ray already connected. Returns the eval results ({"preempted": step} where the
    server preempted it); raises JobFailed."""
    job_dir = Path(job_dir).resolve()
    return train_job(job_dir, prepare_job(job_dir))


def prepare_job(job_dir: Path) -> Prepared:
    """Everything before the workers: the recipe, pre-flight again (the data may have changed), the tokenized data."""
    from jobs.preflight import preflight

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        recipe = load_recipe(job_dir / "recipe.yaml", allowed=SNAPSHOT)
    except RecipeError as e:
        raise JobFailed(e.render()) from None
    report = preflight(recipe, lengths=False, data=False)  # the data: read and checked once, by prepare_data
    if not report.ok:
        raise JobFailed("; ".join(f"{p.path}: {p.message}" for p in report.problems))
    timings["preflight_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows, notes = prepare_data(recipe, job_dir, report.model_path)
    timings["prepare_s"] = time.perf_counter() - t0
    for n in report.notes + notes:
        note(job_dir, n)
    (job_dir / "failure.txt").unlink(missing_ok=True)
    return Prepared(recipe, report.model_path, rows, timings)


def worker_env() -> dict:
    """The environment of the training workers: no secret among it (Ray shows runtime envs to whoever reaches its
    dashboard; jobs.secrets hands the secrets over)."""
    env_vars = {k: os.environ[k] for k in ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                             "WANDB_MODE",
                                             "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS",
                                             "TRANSFORMERS_VERBOSITY")
                if k in os.environ}
    env_vars["TOKENIZERS_PARALLELISM"] = "false"  # the driver's is "true" (it tokenizes); workers only read
    env_vars.update(WORKER_PRIORITY)
    # the driver turns Ray's failure signal handler off (a cancel's SIGTERM is no crash); a worker's SIGSEGV is one
    env_vars["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"] = "0"
    return env_vars


def make_trainer(job_dir: Path, recipe: Recipe, model_path: str, *, prepared: Path | None = None,
                 recipe_file: Path | None = None, resume_from: list[str] | None = None, phase: str = "job",
                 callbacks: tuple = (), secrets_dir: Path | None = None):
    """The TorchTrainer of a job (phase "job"), of a sweep's trial ("trial": no test, a checkpoint at every
    evaluation and at the end) or of the chosen trial's test ("test": no training). prepared: the tokenized data
    (default <job_dir>/prepared); recipe_file: the recipe the workers read (default <job_dir>/recipe.yaml)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.train import train_func

    res = recipe.resources
    use_gpu = res.gpus_per_worker > 0
    per_worker = {"CPU": res.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    config = {"job_dir": str(job_dir), "model_path": model_path,
              "resume_from": checkpoints_newest_first(job_dir) if resume_from is None else resume_from,
              "attempt": os.environ.get("RUNNER_ATTEMPT") if phase == "job" else None, "phase": phase}
    if prepared is not None:
        config["prepared"] = str(prepared)
    if recipe_file is not None:
        config["recipe"] = str(recipe_file)
    if secrets_dir is not None:  # a sweep's trials: the sweep's driver handed the secrets over in its folder
        config["secrets_dir"] = str(secrets_dir)
    return TorchTrainer(
        train_func,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if use_gpu and _has_cuda() else "gloo"),
        run_config=RunConfig(name="checkpoints", storage_path=str(job_dir),
                             failure_config=FailureConfig(max_failures=res.max_failures),
                             callbacks=[_lifecycle_callback(job_dir, res.max_failures), *callbacks],
                             checkpoint_config=CheckpointConfig(num_to_keep=recipe.train.keep_checkpoints),
                             worker_runtime_env={"env_vars": worker_env()}),
    )


def fit(trainer, job_dir: Path) -> None:
    """trainer.fit(); JobFailed with the reason a person can act on."""
    import ray.train

    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        reason = (job_dir / "failure.txt").read_text() if (job_dir / "failure.txt").exists() else _reason(e)
        raise JobFailed(reason) from None


def train_job(job_dir: Path, prep: Prepared) -> dict:
    """Run the Ray Train workers, then write the manifest. Returns the eval results ({"preempted": step} where the
    server preempted it: nothing tested or exported); raises JobFailed."""
    if prep.recipe.sweep is not None:
        from types import SimpleNamespace

        from jobs.sweep import sweep_job

        return sweep_job(job_dir, prep, SimpleNamespace(make_trainer=make_trainer, fit=fit, finish_job=finish_job,
                                                        JobFailed=JobFailed))
    recipe, timings = prep.recipe, prep.timings
    trainer = make_trainer(job_dir, recipe, prep.model_path)
    (job_dir / PREEMPTED).unlink(missing_ok=True)  # an earlier attempt's, never this one's
    t0 = time.perf_counter()
    fit(trainer, job_dir)
    timings["train_s"] = time.perf_counter() - t0
    stopped = read_preempted(job_dir)
    if stopped is not None:  # the server preempted it for a job ahead in the queue: it resumes from this step
        event(job_dir, f"preempted: checkpointed at step {stopped} and stopped; the server queues it again")
        return {"preempted": stopped}
    return finish_job(job_dir, recipe, prep)


def finish_job(job_dir: Path, recipe: Recipe, prep: Prepared) -> dict:
    """After the test (eval.json): the comparison with a registered model's champion, the export and its checks,
    manifest.json. Returns the eval results; raises JobFailed."""
    import ray

    timings, res = prep.timings, recipe.resources
    use_gpu = res.gpus_per_worker > 0
    env_vars = worker_env()
    if (job_dir / "champion.json").exists():  # a registered model's champion to meet, like for like
        from jobs.compare import compare_task

        t0 = time.perf_counter()
        compare = ray.remote(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker if use_gpu else 0)(compare_task)
        task = compare.options(runtime_env={"env_vars": env_vars}).remote(str(job_dir), int(res.cpus_per_worker))
        try:
            ray.get(task, timeout=COMPARE_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - it died (out of memory...) or never got its resources: the job stands
            ray.cancel(task, force=True)
            from jobs.compare import record

            record(job_dir, {"note": f"the comparison's Ray task failed: {_reason(e)}"})
            note(job_dir, f"no like-for-like comparison with the champion: its task failed ({_reason(e)})")
        timings["compare_s"] = time.perf_counter() - t0
    result = json.loads((job_dir / "eval.json").read_text())
    export = None
    if recipe.export.onnx:
        from jobs.export import ExportFailed, export_job

        t0 = time.perf_counter()
        event(job_dir, "exporting to ONNX and checking the export", state=JobState.EXPORTING)
        try:
            export = export_job(job_dir, recipe, log=lambda m: note(job_dir, m))
        except ExportFailed as e:
            try:  # refused before it began (not an export folder), an export writes no report
                report = json.loads((job_dir / "onnx.failed" / "export_report.json").read_text())
            except (OSError, ValueError):
                report = {"passed": False, "failure": str(e)}
            timings["export_s"] = time.perf_counter() - t0
            write_manifest(job_dir, recipe, timings, result, prep.rows, report)
            raise JobFailed(str(e)) from None
        timings["export_s"] = time.perf_counter() - t0
        shipped = export.get("shipped") or {}
        if shipped.get("note"):  # no quantized model met its bound: the fp32 ONNX model ships, and the job says so
            event(job_dir, f"export: {shipped['note']}", level="warning")
    write_manifest(job_dir, recipe, timings, result, prep.rows, export)
    return result


def _lifecycle_callback(job_dir: Path, max_failures: int):
    """A Ray Train controller callback (it runs in the controller actor, beside the driver) that writes the
    restarts of the worker group to events.jsonl: RETRYING with the failure, RUNNING when the workers are back."""
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class Lifecycle(ControllerCallback):
        def __init__(self):
            self.failures, self.announced = 0, 0

        def after_controller_state_update(self, previous_state, current_state) -> None:
            kind = current_state._state_type.name
            if kind == "RESTARTING":
                self.failures += 1
                err = getattr(current_state, "training_failed_error", None)
                note(job_dir, f"the workers failed: {err}")
                event(job_dir, f"the workers failed ({_lost_reason(err)}); restart {self.failures} of "
                               f"{'unlimited' if max_failures < 0 else max_failures}, from the last checkpoint",
                      state=JobState.RETRYING)
            elif kind == "RUNNING" and self.announced < self.failures:
                self.announced = self.failures
                event(job_dir, f"workers running again after restart {self.failures}", state=JobState.RUNNING)

    return Lifecycle()


def _lost_reason(e: BaseException | None) -> str:
    """Why Ray Train's workers failed, in a line: the dead node or actor where Ray says so, else the error."""
    lines = [ln.strip() for ln in str(e or "").splitlines() if ln.strip() and not ln.strip().endswith(":")]
    for subject in ("node", "actor"):
        for ln in lines:
            low = ln.lower()
            if subject in low and any(w in low for w in ("died", "dead", "lost", "unexpectedly")):
                return ln[:300]
    return _reason(e) if e else "no reason given"


def _reason(e: BaseException) -> str:
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[:500]
    return (lines[-1] if lines else type(e).__name__)[:500]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def write_manifest(job_dir: Path, recipe: Recipe, timings: dict, result: dict, rows: dict,
                   export: dict | None = None) -> dict:
    """manifest.json: every artifact with size and sha256, package versions, timings, metrics."""
    files = []
    for p in sorted(job_dir.rglob("*")):
        rel = p.relative_to(job_dir)
        if not p.is_file() or rel.parts[0] in ("prepared", "wandb", "earlier", "trials", "tune") or \
                str(rel) in ("manifest.json", "job.log", "driver.pid"):  # still being written, or not this attempt's
            continue
        files.append({"path": str(rel), "bytes": p.stat().st_size, "sha256": file_sha256(p)})
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    manifest = {"job": job_dir.name, "name": recipe.name, "task": recipe.task, "tuning": recipe.tuning.mode,
                "rows": rows, "metrics": {"validation": result["validation"], "test": result["test"]},
                "timings": timings, "versions": {"python": platform.python_version(), **versions},
                "export": export and {k: export[k] for k in ("passed", "quantize", "opset", "checks", "variants",
                                                              "shipped", "optimize", "attempts", "failure")
                                     if k in export},
                "files": files}
    (job_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> int:
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    import argparse

    ap = argparse.ArgumentParser(prog="python -m jobs.entrypoint", description="Drive one job to its end.")
    ap.add_argument("job_dir", type=Path, help="The job's folder (its recipe.yaml, prepared data, checkpoints).")
    ap.add_argument("--fresh", action="store_true", help="A retry from the start: set the earlier attempt's "
                                                         "results aside first.")
    a = ap.parse_args(argv)
    fresh, job_dir = a.fresh, a.job_dir.resolve()
    (job_dir / "driver.pid").write_text(str(os.getpid()))
    # the driver shows progress itself (jobs.progress): the libraries' bars (loading and writing weights, mapping
    # datasets) are noise, and redrawn in a log file they are garbage
    for k in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(k, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if os.environ.get("RUNNER_LOG_TO_FILE") == "1":  # under the runner server: the job's log is <job_dir>/job.log
        log = open_private(job_dir / "job.log")
        for fd in (1, 2):
            os.dup2(log, fd)
        attempt = os.environ.get("RUNNER_ATTEMPT")
        if attempt:  # a retry appends to the same log: say where this attempt begins
            how = " (from the start)" if fresh else " (from its last checkpoint)" if attempt != "1" else ""
            print(f"--- attempt {attempt}{how}, {time.strftime('%Y-%m-%d %H:%M:%S')} ---", flush=True)
    if fresh:
        set_aside(job_dir)
    return run_with_ray(job_dir)


RESULTS = ("checkpoints", "best", "eval.json", "model", "adapter", "onnx", "onnx.failed", "manifest.json",
           "failure.txt", "train.log", "trials", "tune", "sweep.json", "recipe.chosen.yaml")


def set_aside(job_dir: Path) -> Path | None:
    """Before a retry from the start: move what the earlier attempt left (checkpoints, results) into
    <job_dir>/earlier/<UTC time>/, so nothing of it is resumed from or mistaken for this attempt's."""
    there = [job_dir / n for n in RESULTS if (job_dir / n).exists()]
    if not there:
        return None
    dest = job_dir / "earlier" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest.mkdir(parents=True, exist_ok=True)
    for p in there:
        p.rename(dest / p.name)
    return dest


# Ray starts its workers at nice 15, under its own daemons and everything else on the node; the training loop is the
# node's work, at the priority a process of the user's would have
WORKER_PRIORITY = {"RAY_worker_niceness": "0"}


def ray_settings(local: bool) -> None:
    """Ray and Ray Train settings of a driver (environment variables, before ray.init; a setting already in the
    environment wins). Ray Train's controller inherits them from the driver."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
    # a cancelled job's driver gets SIGTERM; Ray's failure signal handler would dump "*** SIGTERM received ..." and
    # a stack into the job's log, which reads as a crash. Read when ray is imported: set before that. The driver's
    # only: the workers keep their dumps of real crashes (SIGSEGV, SIGABRT in CUDA or NCCL).
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    # the controller polls the workers every 2 s by default, so a finished job waited up to 2 s to be seen
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if local:  # a one-node Ray of the driver's own: nothing to preempt, no one to collect its metrics
        for k in ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_METRICS_ENABLED", "RAY_enable_metrics_collection"):
            os.environ.setdefault(k, "0")


def run_with_ray(job_dir: Path) -> int:
    """Connect to RAY_ADDRESS, or start a local Ray for this job; print progress; exit 0 / 1 with the reason.

    Pre-flight and data preparation run in a thread while Ray starts, since neither needs it. (Ray itself must
    start on the main thread: its servers are set to die with the thread that started them.)
    """
    import threading

    # the driver tokenizes in one process over its CPUs (the fast tokenizer's threads: jobs.data.tokenize_split):
    # set once, before any thread starts (an environment changed while Ray's threads read theirs is undefined);
    # its tokenizing processes (jobs.data.tokenize_split) and the training workers (runtime_env) get "false"
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    address = os.environ.get("RAY_ADDRESS")
    ray_settings(local=not address)  # before ray is imported (in _drive): it reads some of them then
    job_dir = Path(job_dir).resolve()
    prepared: list = []

    def prepare() -> None:
        try:
            prepared.append(prepare_job(job_dir))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            prepared.append(e)

    from jobs.progress import Follow

    follow = Follow(job_dir)  # shows what is written from here on
    preparing = threading.Thread(target=prepare, daemon=True)
    preparing.start()
    follow.start()
    try:
        why = secrets.hand_over(job_dir)
        if why:
            note(job_dir, why)
        return _drive(job_dir, address, preparing, prepared, follow)
    finally:
        secrets.withdraw(job_dir)
        follow.stop()  # whatever the ending: the last lines shown, the last warnings relayed


def _drive(job_dir: Path, address: str | None, preparing, prepared: list, follow) -> int:
    import logging

    import ray

    try:
        if not ray.is_initialized():
            try:
                # "local": a Ray of its own, even where `ray start` (the runner's local head) left its address
                # for ray.init() to find
                ray.init(address=address or "local", include_dashboard=False if not address else None,
                         logging_level=logging.WARNING, log_to_driver=os.environ.get("RUNNER_VERBOSE") == "1",
                         **({} if address else {"object_store_memory": 200 * 2**20}))
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray"
                raise JobFailed(f"cannot start or reach {where}: {_reason(e)}") from None
        storage = shared_storage_problem(job_dir, sum(1 for n in ray.nodes() if n.get("Alive")))
        if storage:
            raise JobFailed(storage)
        preparing.join()
        if isinstance(prepared[0], BaseException):
            raise prepared[0]
        result = train_job(job_dir, prepared[0])
    except JobFailed as e:
        follow.stop()
        (job_dir / "failure.txt").write_text(str(e))
        print(f"FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        follow.stop()
        print("cancelled: stopping the workers", file=sys.stderr, flush=True)
        ray.shutdown()
        return 130
    follow.stop()
    if "preempted" in result:
        print(json.dumps({"job_dir": str(job_dir), "preempted_at_step": result["preempted"]}))
        return 0
    print(json.dumps({"job_dir": str(job_dir), "test": result["test"], "validation": result["validation"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
