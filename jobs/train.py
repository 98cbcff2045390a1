"""The training loop each Ray Train worker runs: Accelerate set-up, prepare, loop, evaluate, checkpoint, report.

Read it top to bottom in `train_func`. Ray has already made the process group; the Accelerator joins it
(`cpu=True` where there is no GPU, or every worker would silently train alone on all the data).

Data parallelism is planned here rather than by a DistributedSampler: each epoch is a permutation of the train
rows from (seed, epoch); each optimizer step takes the next `workers x batch_size x grad_accum` rows and deals them
out to the ranks. Every row is seen exactly once per epoch, the last uneven step included, and a resumed run
restarts at the exact step and data position of its checkpoint.

The learning rate is set before every update from the recipe's schedule at that step (`lr_schedule`), never by a
scheduler object handed to `acc.prepare`: Accelerate steps a prepared scheduler once per process for each optimizer
step, so on N workers the schedule ran N times too fast and ended at step total/N. As a function of the step it is
the same whatever the workers, accumulation, strategy or resume point.

The weights kept are those of the best evaluation by `train.select_metric` (ties to the lower validation loss);
eval.json says which step was chosen and why, and holds the trivial baseline on the same test rows.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from jobs import secrets
from jobs.callbacks import Callbacks, Loop
from jobs.callbacks import build as build_callbacks
from jobs.checkpoints import (
    State, checkpoint, cpu_copy, resume_state, save_model, selection, track_best, trainable_state,
)
from jobs.data import column
from jobs.evaluation import (EVAL_BATCH_TIMES, baseline, collate, evaluate, fetch, model_view, packing_problem,
                             per_example_loss, versus_baseline)
from jobs.jobdir import (EVAL, FAILURE, METRICS, PREEMPTED, RECIPE, WARNINGS, append, note, read_control,
                         write_json)
from jobs.recipe import SNAPSHOT, parse_recipe
from jobs.schema import Recipe


class Unsupported(RuntimeError):
    """What the recipe asks cannot be done with this model (the reason is in failure.txt)."""


class Diverged(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------------
# Planning the data: which rows each rank reads at each step
# ----------------------------------------------------------------------------------------------------------------


GROUP_STEPS = 64  # group_by_length sorts the rows of this many steps at a time


def epoch_plan(n: int, seed: int, epoch: int, world: int, batch: int, accum: int,
               lengths=None) -> list[list[list[list[int]]]]:
    """plan[step][rank] = `accum` micro-batches of row indices (possibly empty). Covers all n rows once.

    lengths (train.group_by_length): each stretch of GROUP_STEPS steps' rows of the shuffled order is sorted by
    length, longest first, cut into steps, and the epoch's steps are shuffled: a step holds rows of similar length
    (little padding) and the rows a step holds do not depend on the worker count (world x batch is the step)."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(n))
    rng.shuffle(order)
    per_step = world * batch * accum
    steps = [order[start:start + per_step] for start in range(0, n, per_step)]
    if lengths is not None:
        span = per_step * GROUP_STEPS
        steps = []
        for start in range(0, n, span):
            part = sorted(order[start:start + span], key=lambda j: -int(lengths[j]))  # stable: ties keep the shuffle
            steps += [part[i:i + per_step] for i in range(0, len(part), per_step)]
        rng.shuffle(steps)
    return [[_deal(r, accum, contiguous=True) for r in _deal(rows, world)] for rows in steps]


def _deal(rows: list[int], parts: int, contiguous: bool = False) -> list[list[int]]:
    """Split rows into `parts` nearly equal lists (the first ones one longer)."""
    q, r = divmod(len(rows), parts)
    out, i = [], 0
    for p in range(parts):
        k = q + (1 if p < r else 0)
        out.append(rows[i:i + k])
        i += k
    return out


def steps_per_epoch(n: int, world: int, batch: int, accum: int) -> int:
    return math.ceil(n / (world * batch * accum))


def total_steps(recipe: Recipe, n: int, world: int) -> int:
    t = recipe.train
    if t.max_steps:
        return t.max_steps
    return max(1, math.ceil(t.epochs * steps_per_epoch(n, world, t.batch_size, t.grad_accum)))


# ----------------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ----------------------------------------------------------------------------------------------------------------


def make_optimizer(model, recipe: Recipe):
    t = recipe.train
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=0.9)
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=t.lr, scale_parameter=False, relative_step=False, warmup_init=False)


def warmup_steps(recipe: Recipe, steps: int) -> int:
    t = recipe.train
    return t.warmup_steps or int(round(t.warmup_ratio * steps))


def make_schedule(optimizer, recipe: Recipe, steps: int):
    """transformers' scheduler for the recipe (linear, cosine or constant after a linear warm-up from 0), on
    `optimizer`, for a loop of one process that steps it once per optimizer step (the bench scripts)."""
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[recipe.train.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(recipe, steps), num_training_steps=steps)


def lr_schedule(recipe: Recipe, steps: int):
    """lr(k): the recipe's learning rate for the update after k optimizer steps, by transformers' own schedule
    (make_schedule, read as a function on a throwaway optimizer) so that it is the one HF Trainer would use."""
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    factor = make_schedule(probe, recipe, steps).lr_lambdas[0]
    peak = recipe.train.lr
    return lambda k: peak * factor(k)


# ----------------------------------------------------------------------------------------------------------------
# The worker
# ----------------------------------------------------------------------------------------------------------------


def train_func(config: dict) -> None:
    """One Ray Train worker's whole run: set up, resume, the loop, then test the kept weights and save them."""
    import ray.train

    run = _set_up(config)
    run.attempt = config.get("attempt")
    phase = config.get("phase", "job")  # "trial": a sweep's (no test); "test": the chosen trial's test, no training
    base = None
    if phase == "test" and run.recipe.task == "causal_lm":  # the base model before the trial's weights are loaded
        base = {"what": "the base model before tuning", **run.evaluate(run.test_ds)}
    state = _resume(run, config.get("resume_from", []))
    if base is not None and state.baseline is None:
        state.baseline = base
    run.callbacks.on_start(run.loop)
    t = run.recipe.train
    if run.recipe.task == "causal_lm" and state.step == 0 and state.baseline is None and phase == "job":
        # the base model before any update (LoRA's B starts at zero): what tuning must beat on the test rows
        state.baseline = {"what": "the base model before tuning", **run.evaluate(run.test_ds)}
    if run.rank == 0:
        from jobs.alarms import Alarms

        run.alarms = Alarms(run.steps, run.per_epoch, warmup_steps(run.recipe, run.steps), t.lr, raised=state.alarms)

    run.model.train()
    done = state.step >= run.steps or state.stopped_early or phase == "test"
    val = None  # the latest validation metrics, of the weights as they are now
    while not done:
        by_step = epoch_plan(len(run.train_ds), t.seed, state.epoch, run.world, t.batch_size, t.grad_accum,
                             run.length_of if run.recipe.group_by_length else None)
        epoch = run.loop.epoch = state.epoch
        while state.epoch == epoch and not done:
            rec = _train_step(run, state, by_step)
            _record(run, state, rec, epoch)
            finished = state.step >= run.steps
            report: dict = {"step": state.step, "loss": rec["loss"]}
            val = None
            if state.step % run.eval_every == 0 or finished:
                val = _validate(run, state, rec["epoch"])
                report.update({f"val_{k}": v for k, v in val.items()})
            done = finished or state.stopped_early
            if done and phase == "trial":
                report["final"] = 1  # a trial's last evaluation (Tune reads "done" as its own): nothing left to stop
            asked, stop = run.asked[0] and not done, run.asked[1] and not done  # the server's (control.json)
            # a trial checkpoints at every evaluation (each is a report the sweep's scheduler judges) and at its
            # end, where the chosen one's test resumes
            if (not done and (state.step % run.ckpt_every == 0 or asked or stop)) or (done and phase == "trial"):
                checkpoint(report, state, run.raw, run.optimizer, run.rank, run.shards)
                if (asked or stop) and run.rank == 0:
                    # the server's (a drained node, a preemption) or a sweep's scheduler's (ASHA), in its words
                    who = "as the sweep asked" if phase == "trial" else "as the server asked"
                    note(run.job_dir, f"checkpoint at step {state.step}, {who}: {run.asked[2]}")
            elif done:  # the saved model is the end's record; a checkpoint would only be written and hashed
                ray.train.report(report)
            run.loop.step = state.step
            run.callbacks.on_step(run.loop)
            if stop:  # preempted: every rank saw it in the same all-reduce; the driver ends without testing
                if run.rank == 0:
                    write_json(run.job_dir / PREEMPTED, {"step": state.step})
                return

    run.callbacks.on_end(run.loop, run.raw)
    if phase == "trial":  # the test split is scored once, on the chosen trial, after the search (jobs.sweep)
        return
    _test_and_save(run, state, val)
    ray.train.report({"step": state.step, "done": 1})


@dataclass
class Run:
    """What one worker's run holds, made once by `_set_up`: the recipe, the data, the prepared model and optimizer,
    the plan of the distribution, the loop's cadence, and where its words and figures go."""

    recipe: Recipe
    job_dir: Path
    model_path: str
    sp: dict  # jobs.strategy.distribution: strategy, mixed precision, sharded or not, ...
    acc: object  # the Accelerator
    model: object  # prepared (wrapped for DDP, FSDP or DeepSpeed)
    raw: object  # the model itself
    optimizer: object
    tokenizer: object
    labels: list | None
    pad_id: int
    train_ds: object
    val_ds: object
    test_ds: object
    callbacks: Callbacks
    loop: Loop
    steps: int
    per_epoch: int
    eval_every: int
    ckpt_every: int
    lr_at: object  # step -> learning rate
    unit_of: object  # a causal LM's predicted tokens of each train row (numpy; what its loss is averaged over)
    length_of: object  # tokens of each train row (numpy)
    use_gpu: bool
    examples_of: object = None  # examples in each train row where packed (numpy), else one each
    wb: object = None  # the W&B run, rank 0's
    alarms: object = None  # rank 0's
    asked: tuple = (False, False, "")  # the server's requests at the last step: (checkpoint, stop, why)
    attempt: str | None = None  # the runner server's attempt number (RUNNER_ATTEMPT); None under `runner run`

    @property
    def rank(self) -> int:
        return self.loop.rank

    @property
    def world(self) -> int:
        return self.loop.world

    @property
    def shards(self):
        """The Accelerator where the weights are sharded (its save_state and load_state take every rank's part)."""
        return self.acc if self.sp["sharded"] else None

    def note(self, msg: str) -> None:
        """Rank 0's words for the person running the job: train.log, and stdout."""
        if self.rank == 0:
            print(msg, flush=True)
            note(self.job_dir, msg)

    def warn(self, kind: str, step: int, msg: str) -> None:
        """Rank 0: a warning in the log and in warnings.jsonl (one writer; the driver relays it as an event)."""
        if self.rank == 0:
            self.note(f"warning: {msg}")
            append(self.job_dir / WARNINGS,
                   json.dumps({"time": time.time(), "kind": kind, "step": step, "message": msg}) + "\n")

    def log(self, rec: dict) -> None:
        """A record of metrics.jsonl (rank 0), strict JSON: a figure that is not finite is written as null."""
        if self.rank == 0:
            append(self.job_dir / METRICS, json.dumps({k: None if isinstance(v, float) and not math.isfinite(v)
                                                       else v for k, v in rec.items()}) + "\n")

    def evaluate(self, ds) -> dict:
        n_labels = len(self.labels or [])
        return evaluate(self.model, ds, self.recipe, self.pad_id, self.acc,
                        self.recipe.train.batch_size * EVAL_BATCH_TIMES, n_labels)


def _set_up(config: dict) -> Run:
    """The recipe and data from the job folder, the model built and tuned, the Accelerator joined to Ray's process
    group, the model and optimizer prepared."""
    import datasets
    import ray.train
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    from jobs.model import build_model
    from jobs.strategy import describe, distribution, layer_classes, make_accelerator

    job_dir = Path(config["job_dir"])
    secrets.take(Path(config.get("secrets_dir") or job_dir))  # the driver's (never through Ray's runtime_env)
    prepared = Path(config.get("prepared") or job_dir / "prepared")  # a sweep's trials share the sweep's
    recipe = parse_recipe(Path(config.get("recipe") or job_dir / RECIPE).read_text(), source=RECIPE, env=os.environ,
                          allowed=SNAPSHOT)
    use_gpu = recipe.needs_gpu and torch.cuda.is_available()
    torch.set_num_threads(max(1, int(recipe.resources.cpus_per_worker)))
    set_seed(recipe.train.seed)

    data = datasets.load_from_disk(str(prepared / "data"))
    labels = json.loads((prepared / "labels.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(prepared / "tokenizer"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model, n_trainable, n_total = build_model(recipe, config["model_path"], labels, pad_id, gradient_checkpointing=
                                              distribution(recipe, gpu=use_gpu)["model_gradient_checkpointing"])
    sp = distribution(recipe, layer_classes(model), gpu=use_gpu)
    callbacks = build_callbacks(recipe.train.callbacks)
    callbacks.on_plan(sp)
    acc = make_accelerator(sp)
    world = acc.num_processes
    if world != ray.train.get_context().get_world_size():
        raise RuntimeError(f"Accelerate sees {world} processes but Ray started "
                           f"{ray.train.get_context().get_world_size()} workers")
    t, train_ds = recipe.train, data["train"]
    if t.packing:  # the examples packed by the driver (prepared/packed); validation and test stay one a row
        train_ds = datasets.load_from_disk(str(prepared / "packed"))
        problem = packing_problem(model)
        if problem:
            reason = f"train.packing: {problem}; set train.packing: false for this model"
            (job_dir / FAILURE).write_text(reason)
            raise Unsupported(reason)
    steps = total_steps(recipe, len(train_ds), world)
    per_epoch = steps_per_epoch(len(train_ds), world, t.batch_size, t.grad_accum)
    optimizer = make_optimizer(model, recipe)
    wrapped, optimizer = acc.prepare(model, optimizer)  # not the schedule: see the module's docstring
    run = Run(recipe=recipe, job_dir=job_dir, model_path=config["model_path"], sp=sp, acc=acc, model=wrapped,
              raw=acc.unwrap_model(wrapped), optimizer=optimizer, tokenizer=tokenizer, labels=labels, pad_id=pad_id,
              train_ds=model_view(train_ds), val_ds=data["validation"], test_ds=data["test"], callbacks=callbacks,
              loop=Loop(job_dir, acc.process_index, world), steps=steps, per_epoch=per_epoch,
              eval_every=t.eval_every or per_epoch, ckpt_every=t.checkpoint_every or t.eval_every or per_epoch,
              lr_at=lr_schedule(recipe, steps),
              unit_of=column(train_ds, "units") if recipe.task == "causal_lm" else None,
              length_of=column(train_ds, "length"), use_gpu=use_gpu,
              examples_of=column(train_ds, "examples") if "examples" in train_ds.column_names else None)
    run.wb = _wandb(recipe, job_dir, config, run.rank)
    run.note(f"{describe(sp, world, acc.distributed_type.value)}; mixed precision {sp['mixed_precision']}"
             f"{', gradient checkpointing' if recipe.resources.gradient_checkpointing else ''}; "
             f"parameters: {n_trainable:,} trainable of {n_total:,} ({100 * n_trainable / n_total:.2f}%)")
    return run


def _resume(run: Run, candidates: list[str]) -> State:
    """The loop's state to go on from (a checkpoint's, its weights loaded), or a fresh one."""
    import ray.train

    saved = resume_state(ray.train.get_checkpoint(), candidates, run.note, run.acc, run.job_dir)
    if not saved:
        return State()
    if "model" in saved:  # a whole-model checkpoint; a sharded one was loaded by resume_state
        run.raw.load_state_dict(saved["model"], strict=False)
        run.optimizer.load_state_dict(saved["optimizer"])
    state = State(**{k: v for k, v in saved["state"].items() if k in State.__dataclass_fields__})
    run.note(f"resumed from checkpoint at step {state.step} (epoch {state.epoch + 1}, "
             f"step {state.step_in_epoch} of the epoch)")
    run.loop.step, run.loop.epoch = state.step, state.epoch
    return state


def _train_step(run: Run, state: State, by_step: list) -> dict:
    """One optimizer step over this rank's micro-batches of the step's rows; moves the state on; returns the step's
    record (loss, lr, gradient norm, throughput)."""
    acc, model, optimizer, sp, task = run.acc, run.model, run.optimizer, run.sp, run.recipe.task
    tick = time.perf_counter()
    micro = by_step[state.step_in_epoch][run.rank]
    step_rows = [j for r in by_step[state.step_in_epoch] for m in r for j in m]
    step_units = len(step_rows) if run.unit_of is None else max(1, int(run.unit_of[step_rows].sum()))
    # set on the prepared optimizer's own groups, every step: prepare() and every load_state_dict (a resume)
    # put new dicts in place, so a reference kept from before would set nothing
    for g in optimizer.param_groups:
        g["lr"] = run.lr_at(state.step)
    lr = optimizer.param_groups[0]["lr"]
    local_sum = torch.zeros((), device=acc.device)
    for m, idx in enumerate(micro):
        weight = 1.0 if idx else 0.0  # a rank with no rows left still joins the all-reduce
        rows = fetch(run.train_ds, idx or [0])
        sync = m == len(micro) - 1
        if sp["strategy"] == "deepspeed":  # DeepSpeed steps at the boundary Accelerate tells it
            acc.gradient_state._set_sync_gradients(sync)
        with (contextlib.nullcontext() if sync or not sp["no_sync"] else acc.no_sync(model)), acc.autocast():
            losses = per_example_loss(model, collate(rows, run.pad_id, task, acc.device), task)
            loss = losses.sum() * weight * run.world * sp["loss_multiplier"] / step_units
        acc.backward(loss)
        local_sum += losses.detach().sum() * weight
        run.callbacks.on_batch(run.loop, idx)
    if sp["clip_by_engine"]:  # DeepSpeed clipped (train.max_grad_norm) and stepped inside backward
        grad_norm = _number(getattr(model, "get_global_grad_norm", lambda: None)())
    else:  # the norm before clipping, measured whether or not the recipe clips
        grad_norm = _number(acc.clip_grad_norm_(model.parameters(), run.recipe.train.max_grad_norm or math.inf))
    optimizer.step()
    skipped = bool(acc.optimizer_step_was_skipped)  # fp16: the loss scaler found inf/nan and skipped it
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.step_in_epoch += 1
    if state.step_in_epoch == len(by_step):  # the position a checkpoint records is where to go on
        state.epoch, state.step_in_epoch = state.epoch + 1, 0
    # the server's requests ride on the loss's all-reduce, so that every rank acts on them at the same step; one
    # made for another attempt of the job (left by a server that died) is not this one's
    ask = read_control(run.job_dir)
    if run.attempt is not None and str(ask.get("attempt")) != str(run.attempt):
        ask = {"checkpoint": False, "stop": False, "why": ""}
    sums = acc.reduce(torch.stack([local_sum, torch.tensor(float(ask["checkpoint"]), device=acc.device),
                                   torch.tensor(float(ask["stop"]), device=acc.device)]), reduction="sum").tolist()
    loss_value = sums[0] / step_units
    run.asked = (sums[1] > 0, sums[2] > 0, ask["why"] or "a request of the server")
    elapsed = time.perf_counter() - tick
    examples = len(step_rows) if run.examples_of is None else int(run.examples_of[step_rows].sum())
    rec = {"step": state.step, "epoch": round(state.step / run.per_epoch, 4), "loss": loss_value, "lr": lr,
           "grad_norm": grad_norm, "samples_per_s": examples / elapsed,
           "tokens_per_s": int(run.length_of[step_rows].sum()) / elapsed, "total_steps": run.steps,
           "time": time.time()}
    if skipped:
        rec["skipped"] = True
    return rec


def _record(run: Run, state: State, rec: dict, epoch: int) -> None:
    """A step's record: the alarms it raises, a loss that is no longer finite (the job fails with what to try),
    metrics.jsonl and W&B."""
    for alarm in run.alarms.see(rec) if run.alarms else ():
        run.warn(alarm["kind"], alarm["step"], alarm["message"])
        state.alarms.append(alarm["kind"])  # rank 0's; rank 0 writes the checkpoints
    if not math.isfinite(rec["loss"]):
        reason = (f"the loss became {rec['loss']} at step {state.step} (epoch {epoch + 1}); no model was saved. "
                  f"Lower train.lr (now {run.recipe.train.lr:g}), or set train.max_grad_norm")
        if run.rank == 0:
            (run.job_dir / FAILURE).write_text(reason)
        raise Diverged(reason)
    if run.use_gpu:  # the most this rank's tensors have held so far, for the memory pre-flight's comparison
        rec["gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    run.log(rec)
    if run.wb:
        run.wb.log({k: v for k, v in rec.items() if k not in ("time", "total_steps")}, step=state.step)


def _validate(run: Run, state: State, epoch: float) -> dict:
    """Validation figures now, logged; the best weights kept (and early stopping judged) by them."""
    val = run.evaluate(run.val_ds)
    run.log({"step": state.step, "epoch": epoch, "split": "validation", **val, "time": time.time()})
    if run.wb:
        run.wb.log({f"val/{k}": v for k, v in val.items()}, step=state.step)
    track_best(state, val, run.recipe, run.raw, run.job_dir, run.rank, run.shards)
    return val


def _test_and_save(run: Run, state: State, val: dict | None) -> None:
    """The kept weights loaded back, scored on validation and test against the baseline (eval.json), and saved as
    model/ (and adapter/)."""
    recipe, job_dir, acc = run.recipe, run.job_dir, run.acc
    best = job_dir / "best" / "state.pt"
    if state.best_step != state.step or val is None:
        if run.shards and (job_dir / "best" / "state.json").exists():
            acc.load_state(str(job_dir / "best"))
        elif best.exists():
            run.raw.load_state_dict(torch.load(best, map_location="cpu"), strict=False)
        val = run.evaluate(run.val_ds)
    test = run.evaluate(run.test_ds)
    if run.rank == 0:
        name, higher = recipe.select_metric
        chosen = selection(state, name, higher, run.steps)
        run.note(f"kept the weights of step {chosen['step'] or state.step} of {state.step}: {chosen['why']}")
        base = state.baseline if recipe.task == "causal_lm" else \
            baseline(recipe.task, column(run.train_ds, "labels"), column(run.test_ds, "labels"), len(run.labels or []))
        if base is not None:  # None: a causal LM resumed from a checkpoint older than baselines
            beats, verdict = versus_baseline(test, base, *recipe.gate_metric)
            base = {**base, "beaten": beats, "verdict": verdict}
            if not beats:
                run.warn("baseline", state.step, f"the model does not beat its baseline: {verdict}")
        result = {"selected_by": f"validation {name}", "best_step": state.best_step, "steps": state.step,
                  "stopped_early": state.stopped_early, "selection": chosen, "validation": val, "test": test,
                  "baseline": base}
        (job_dir / EVAL).write_text(json.dumps(result, indent=2))
        if run.wb:
            run.wb.log({f"test/{k}": v for k, v in test.items()})
            run.wb.finish()
    if run.shards or recipe.tuning.mode == "qlora":
        # weights sharded across the ranks (gathered here, a collective) or 4-bit: saved from a CPU copy
        whole = acc.get_state_dict(run.model) if run.shards else trainable_state(run.raw)
        if run.rank == 0:
            save_model(cpu_copy(recipe, run.model_path, run.labels, run.pad_id, whole), run.tokenizer, recipe,
                       run.labels, job_dir)
    elif run.rank == 0:
        save_model(run.raw, run.tokenizer, recipe, run.labels, job_dir)
    acc.wait_for_everyone()


def _number(x) -> float | None:
    """A norm as a float (a tensor, a sharded DTensor, a number), or None where there is none."""
    if x is None:
        return None
    try:
        if hasattr(x, "full_tensor"):
            x = x.full_tensor()
        return float(x)
    except (TypeError, ValueError, RuntimeError):
        return None


def _wandb(recipe: Recipe, job_dir: Path, config: dict, rank: int):
    if rank != 0 or recipe.tracking.mode == "disabled":
        return None
    import wandb

    # a sweep's trial (<sweep>/trials/tNNN): named with its sweep, or every sweep's t000 would be one run
    name = f"{job_dir.parent.parent.name}-{job_dir.name}" if config.get("phase") == "trial" else job_dir.name
    return wandb.init(project=recipe.tracking.project or recipe.name, entity=recipe.tracking.entity,
                      mode=recipe.tracking.mode, dir=str(job_dir), name=name, id=name,
                      resume="allow", config=recipe.redacted())
