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
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from jobs import secrets
from jobs.callbacks import Loop
from jobs.callbacks import build as build_callbacks
from jobs.jobdir import append, checkpoints_newest_first
from jobs.recipe import SNAPSHOT, parse_recipe
from jobs.schema import Recipe


@dataclass
class State:
    """The loop's position and judgments, saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0
    best: float | None = None  # the select metric's value at best_step
    best_loss: float | None = None  # the validation loss at best_step (breaks ties)
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    evals: list = field(default_factory=list)  # [step, select metric, validation loss] of every evaluation
    baseline: dict | None = None  # a causal LM's test figures before tuning (the others' come from the data)
    alarms: list = field(default_factory=list)  # the alarms raised (each once a job, restarts included)


class Diverged(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------------
# Planning the data: which rows each rank reads at each step
# ----------------------------------------------------------------------------------------------------------------


def epoch_plan(n: int, seed: int, epoch: int, world: int, batch: int, accum: int) -> list[list[list[list[int]]]]:
    """plan[step][rank] = `accum` micro-batches of row indices (possibly empty). Covers all n rows once."""
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    per_step = world * batch * accum
    plan = []
    for start in range(0, n, per_step):
        rows = order[start:start + per_step]
        ranks = _deal(rows, world)
        plan.append([_deal(r, accum, contiguous=True) for r in ranks])
    return plan


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
# Batches and losses
# ----------------------------------------------------------------------------------------------------------------


def collate(rows: list[dict], pad_id: int, task: str, device) -> dict:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    out = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if task == "causal_lm":
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
        out["labels"] = labels.to(device)
    elif task == "regression":
        out["labels"] = torch.tensor([float(r["labels"]) for r in rows], dtype=torch.float32, device=device)
    else:
        out["labels"] = torch.tensor([int(r["labels"]) for r in rows], dtype=torch.long, device=device)
    return out


def units(row: dict, task: str) -> int:
    """What the loss is averaged over: examples, or predicted tokens for a causal LM."""
    if task != "causal_lm":
        return 1
    return sum(1 for x in row["labels"][1:] if x != -100)


def per_example_loss(model, batch: dict, task: str) -> torch.Tensor:
    """Summed loss of each example of the batch (a causal LM: summed over its predicted tokens)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return _losses_from_logits(logits, batch["labels"], task)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, ds, recipe: Recipe, pad_id: int, acc, batch_size: int, n_labels: int = 0) -> dict:
    """Metrics of `ds`, each rank scoring a shard, gathered so every rank holds the same numbers."""
    model.eval()
    rank, world = acc.process_index, acc.num_processes
    mine = list(range(rank, len(ds), world))
    records = score_records(model, [ds[j] for j in mine], recipe.task, pad_id, acc.device, acc.autocast, batch_size)
    records = [(mine[i], *rest) for i, *rest in records]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    records.sort()
    model.train()
    return metrics(records, [ds[j]["labels"] for j, *_ in records], recipe.task, n_labels)


@torch.no_grad()
def score_records(model, rows: list[dict], task: str, pad_id: int, device, autocast, batch_size: int) -> list:
    """(row index, summed loss, units, prediction) of each row: what `metrics` reduces. autocast: a context
    manager factory (the Accelerator's, or contextlib.nullcontext)."""
    records = []
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        batch = collate(part, pad_id, task, device)
        with autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        losses = _losses_from_logits(logits, batch["labels"], task)
        preds = logits.argmax(-1).tolist() if task == "classification" else \
            logits.squeeze(-1).tolist() if task == "regression" else [None] * len(part)
        for j, (row, loss, p) in enumerate(zip(part, losses.tolist(), preds)):
            records.append((i + j, loss, units(row, task), p))
    return records


def _losses_from_logits(logits, y, task):
    if task == "classification":
        return torch.nn.functional.cross_entropy(logits, y, reduction="none")
    if task == "regression":
        return (logits.squeeze(-1) - y) ** 2
    sl, sy = logits[:, :-1], y[:, 1:]
    return torch.nn.functional.cross_entropy(sl.reshape(-1, sl.size(-1)), sy.reshape(-1), ignore_index=-100,
                                             reduction="none").view(sy.shape).sum(-1)


def metrics(records: list, labels: list, task: str, n_labels: int = 0) -> dict:
    """The task's figures from score_records' records and each row's label. n_labels: the classes (macro-F1 is
    averaged over those that occur among labels or predictions)."""
    n = len(records)
    if task == "classification":
        preds = [r[3] for r in records]
        return {"loss": sum(r[1] for r in records) / n, **_class_figures(preds, labels, n_labels), "examples": n}
    if task == "regression":
        err = [r[3] - float(y) for r, y in zip(records, labels)]
        mse = sum(e * e for e in err) / n
        return {"loss": mse, "mse": mse, "mae": sum(abs(e) for e in err) / n, "examples": n}
    tokens = sum(r[2] for r in records)
    loss = sum(r[1] for r in records) / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": tokens, "examples": n}


def _class_figures(preds: list[int], labels: list[int], n_labels: int) -> dict:
    k = n_labels or (max(list(labels) + list(preds)) + 1)
    f1s = []
    for c in range(k):
        tp = sum(1 for p, y in zip(preds, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(preds, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(preds, labels) if p != c and y == c)
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": sum(p == y for p, y in zip(preds, labels)) / len(labels),
            "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0}


def baseline(task: str, train_labels: list, test_labels: list, n_labels: int) -> dict:
    """What a model that learned nothing from the text scores on the test rows: the majority class of train
    (its loss: the train label frequencies, add-one smoothed, as the prediction), or the mean of train's targets.
    A causal LM's baseline is the base model's own test figures before tuning, measured by the loop."""
    if task == "classification":
        counts = [0] * max(n_labels, 1 + max(list(train_labels) + list(test_labels)))
        for y in train_labels:
            counts[int(y)] += 1
        majority = max(range(len(counts)), key=lambda c: (counts[c], -c))
        prior = [(c + 1) / (len(train_labels) + len(counts)) for c in counts]
        loss = sum(-math.log(prior[int(y)]) for y in test_labels) / len(test_labels)
        return {"what": "predicting the majority class of train", "majority": majority, "loss": loss,
                **_class_figures([majority] * len(test_labels), [int(y) for y in test_labels], n_labels),
                "examples": len(test_labels)}
    mean = sum(float(y) for y in train_labels) / len(train_labels)
    err = [mean - float(y) for y in test_labels]
    mse = sum(e * e for e in err) / len(err)
    return {"what": "predicting the mean of train", "mean": mean, "loss": mse, "mse": mse,
            "mae": sum(abs(e) for e in err) / len(err), "examples": len(err)}


def versus_baseline(test: dict, base: dict, metric: str, higher: bool) -> tuple[bool, str]:
    """(beats the baseline?, the verdict in words) on the metric the registry judges by."""
    value, ref = test.get(metric), base.get(metric)
    if value is None or ref is None:
        return True, f"no baseline figure for {metric}"
    beats = value > ref if higher else value < ref
    words = f"test {metric} {value:.4g}"
    if beats:
        return True, f"{words} beats {base['what']}, {ref:.4g}"
    return False, f"{words} is {'no better than' if value == ref else 'worse than'} {base['what']}, {ref:.4g}"


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


def trainable_state(model) -> dict:
    """The parameters that train (all of them for `full`; adapters and head otherwise), on CPU."""
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}


# ----------------------------------------------------------------------------------------------------------------
# The worker
# ----------------------------------------------------------------------------------------------------------------


def train_func(config: dict) -> None:
    import datasets
    import ray.train
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    from jobs.alarms import Alarms
    from jobs.model import build_model
    from jobs.strategy import describe, layer_classes, make_accelerator, plan

    job_dir = Path(config["job_dir"])
    secrets.take(job_dir)  # the tokens the driver handed over (never through Ray's runtime_env)
    prepared = job_dir / "prepared"
    recipe = parse_recipe((job_dir / "recipe.yaml").read_text(), source="recipe.yaml", env=os.environ,
                          allowed=SNAPSHOT)
    use_gpu = recipe.needs_gpu and torch.cuda.is_available()
    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(recipe.resources.cpus_per_worker)))
    set_seed(recipe.train.seed)

    # --- data and model -----------------------------------------------------------------------------------------
    data = datasets.load_from_disk(str(prepared / "data"))
    train_ds, val_ds, test_ds = data["train"], data["validation"], data["test"]
    labels = json.loads((prepared / "labels.json").read_text())
    n_labels = len(labels or [])
    tokenizer = AutoTokenizer.from_pretrained(str(prepared / "tokenizer"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sp = plan(recipe, gpu=use_gpu)
    model, n_trainable, n_total = build_model(recipe, config["model_path"], labels, pad_id,
                                              gradient_checkpointing=sp["model_gradient_checkpointing"])
    sp = plan(recipe, layer_classes(model), gpu=use_gpu)
    callbacks = build_callbacks(recipe.train.callbacks)
    callbacks.on_plan(sp)
    acc = make_accelerator(sp)
    rank, world = acc.process_index, acc.num_processes
    loop = Loop(job_dir, rank, world)
    if world != ctx.get_world_size():
        raise RuntimeError(f"Accelerate sees {world} processes but Ray started {ctx.get_world_size()} workers")

    def note(msg: str) -> None:  # rank 0's words for the person running the job: train.log, and stdout
        if rank == 0:
            print(msg, flush=True)
            append(job_dir / "train.log", f"{time.strftime('%H:%M:%S')} {msg}\n")

    def warn(kind: str, step: int, msg: str) -> None:  # rank 0: a warning in the log, and for the job's events
        if rank == 0:  # warnings.jsonl has this one writer; the driver relays its lines into events.jsonl
            note(f"warning: {msg}")
            append(job_dir / "warnings.jsonl",
                   json.dumps({"time": time.time(), "kind": kind, "step": step, "message": msg}) + "\n")

    note(f"{describe(sp, world, acc.distributed_type.value)}; mixed precision {sp['mixed_precision']}"
         f"{', gradient checkpointing' if recipe.resources.gradient_checkpointing else ''}; "
         f"parameters: {n_trainable:,} trainable of {n_total:,} ({100 * n_trainable / n_total:.2f}%)")
    t = recipe.train
    steps = total_steps(recipe, len(train_ds), world)
    per_epoch = steps_per_epoch(len(train_ds), world, t.batch_size, t.grad_accum)
    eval_every = t.eval_every or per_epoch
    ckpt_every = t.checkpoint_every or eval_every
    optimizer = make_optimizer(model, recipe)
    lr_at = lr_schedule(recipe, steps)
    model, optimizer = acc.prepare(model, optimizer)  # not the schedule: see the module's docstring
    raw = acc.unwrap_model(model)
    unit_of = [units(r, recipe.task) for r in train_ds] if recipe.task == "causal_lm" else None
    length_of = [len(x) for x in train_ds["input_ids"]]

    # --- resume ---------------------------------------------------------------------------------------------------
    state = State()
    saved = _resume_state(ray.train.get_checkpoint(), config.get("resume_from", []), note, acc, job_dir)
    if saved:
        if "model" in saved:  # a whole-model checkpoint; a sharded one was loaded by _resume_state
            raw.load_state_dict(saved["model"], strict=False)
            optimizer.load_state_dict(saved["optimizer"])
        state = State(**{k: v for k, v in saved["state"].items() if k in State.__dataclass_fields__})
        note(f"resumed from checkpoint at step {state.step} (epoch {state.epoch + 1}, "
             f"step {state.step_in_epoch} of the epoch)")
    loop.step, loop.epoch = state.step, state.epoch
    callbacks.on_start(loop)
    metrics_file = job_dir / "metrics.jsonl"

    def log(rec: dict) -> None:  # strict JSON: a figure that is not finite is written as null
        if rank == 0:
            append(metrics_file, json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                                             for k, v in rec.items()}) + "\n")

    wb = _wandb(recipe, job_dir, config, rank)
    if recipe.task == "causal_lm" and state.step == 0 and state.baseline is None:
        # the base model before any update (LoRA's B starts at zero): what tuning must beat on the test rows
        state.baseline = {"what": "the base model before tuning",
                          **evaluate(model, test_ds, recipe, pad_id, acc, t.batch_size * 2)}
    alarms = Alarms(steps, per_epoch, warmup_steps(recipe, steps), t.lr, raised=state.alarms) if rank == 0 else None

    # --- the loop -------------------------------------------------------------------------------------------------
    model.train()
    done = state.step >= steps or state.stopped_early
    val = None  # the latest validation metrics, of the weights as they are now
    while not done:
        plan = epoch_plan(len(train_ds), t.seed, state.epoch, world, t.batch_size, t.grad_accum)
        epoch = loop.epoch = state.epoch
        while state.epoch == epoch and not done:
            tick = time.perf_counter()
            s = state.step_in_epoch
            micro = plan[s][rank]
            step_rows = [j for r in plan[s] for m in r for j in m]
            step_units = len(step_rows) if unit_of is None else max(1, sum(unit_of[j] for j in step_rows))
            # set on the prepared optimizer's own groups, every step: prepare() and every load_state_dict (a resume)
            # put new dicts in place, so a reference kept from before would set nothing
            for g in optimizer.param_groups:
                g["lr"] = lr_at(state.step)
            lr = optimizer.param_groups[0]["lr"]
            local_sum = torch.zeros((), device=acc.device)
            for m, idx in enumerate(micro):
                weight = 1.0 if idx else 0.0  # a rank with no rows left still joins the all-reduce
                rows = [train_ds[j] for j in (idx or [0])]
                sync = m == len(micro) - 1
                if sp["strategy"] == "deepspeed":  # DeepSpeed steps at the boundary Accelerate tells it
                    acc.gradient_state._set_sync_gradients(sync)
                with (contextlib.nullcontext() if sync or not sp["no_sync"] else acc.no_sync(model)), acc.autocast():
                    losses = per_example_loss(model, collate(rows, pad_id, recipe.task, acc.device), recipe.task)
                    loss = losses.sum() * weight * world * sp["loss_multiplier"] / step_units
                acc.backward(loss)
                local_sum += losses.detach().sum() * weight
                callbacks.on_batch(loop, idx)
            if sp["clip_by_engine"]:  # DeepSpeed clipped (train.max_grad_norm) and stepped inside backward
                grad_norm = _number(getattr(model, "get_global_grad_norm", lambda: None)())
            else:  # the norm before clipping, measured whether or not the recipe clips
                grad_norm = _number(acc.clip_grad_norm_(model.parameters(), t.max_grad_norm or math.inf))
            optimizer.step()
            skipped = bool(acc.optimizer_step_was_skipped)  # fp16: the loss scaler found inf/nan and skipped it
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.step_in_epoch += 1
            if state.step_in_epoch == len(plan):  # the position a checkpoint records is where to go on
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            loss_value = acc.reduce(local_sum, reduction="sum").item() / step_units
            elapsed = time.perf_counter() - tick
            n_tokens = sum(length_of[j] for j in step_rows)
            rec = {"step": state.step, "epoch": round(state.step / per_epoch, 4), "loss": loss_value, "lr": lr,
                   "grad_norm": grad_norm, "samples_per_s": len(step_rows) / elapsed,
                   "tokens_per_s": n_tokens / elapsed, "total_steps": steps, "time": time.time()}
            if skipped:
                rec["skipped"] = True
            for alarm in alarms.see(rec) if alarms else ():
                warn(alarm["kind"], alarm["step"], alarm["message"])
                state.alarms.append(alarm["kind"])  # rank 0's; rank 0 writes the checkpoints
            if not math.isfinite(loss_value):
                reason = (f"the loss became {loss_value} at step {state.step} (epoch {epoch + 1}); no model "
                          f"was saved. Lower train.lr (now {t.lr:g}), or set train.max_grad_norm")
                if rank == 0:
                    (job_dir / "failure.txt").write_text(reason)
                raise Diverged(reason)
            if use_gpu:  # the most this rank's tensors have held so far, for the memory pre-flight's comparison
                rec["gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            log(rec)
            if wb:
                wb.log({k: v for k, v in rec.items() if k not in ("time", "total_steps")}, step=state.step)
            finished = state.step >= steps
            report: dict = {"step": state.step, "loss": loss_value}
            val = None
            if state.step % eval_every == 0 or finished:
                val = evaluate(model, val_ds, recipe, pad_id, acc, t.batch_size * 2, n_labels)
                report.update({f"val_{k}": v for k, v in val.items()})
                log({"step": state.step, "epoch": rec["epoch"], "split": "validation", **val, "time": time.time()})
                if wb:
                    wb.log({f"val/{k}": v for k, v in val.items()}, step=state.step)
                _track_best(state, val, recipe, raw, job_dir, rank, acc if sp["sharded"] else None)
            done = finished or state.stopped_early
            if state.step % ckpt_every == 0 and not done:
                _checkpoint(report, state, raw, optimizer, rank, acc if sp["sharded"] else None)
            elif done:  # the saved model is the end's record; a checkpoint would only be written and hashed
                ray.train.report(report)
            loop.step = state.step
            callbacks.on_step(loop)

    callbacks.on_end(loop, raw)
    # --- test with the best weights, then save ------------------------------------------------------------------
    best = job_dir / "best" / "state.pt"
    if state.best_step != state.step or val is None:
        if sp["sharded"] and (job_dir / "best" / "state.json").exists():
            acc.load_state(str(job_dir / "best"))
        elif best.exists():
            raw.load_state_dict(torch.load(best, map_location="cpu"), strict=False)
        val = evaluate(model, val_ds, recipe, pad_id, acc, t.batch_size * 2, n_labels)
    test = evaluate(model, test_ds, recipe, pad_id, acc, t.batch_size * 2, n_labels)
    if rank == 0:
        name, higher = recipe.select_metric
        chosen = selection(state, name, higher, steps)
        note(f"kept the weights of step {chosen['step'] or state.step} of {state.step}: {chosen['why']}")
        base = state.baseline if recipe.task == "causal_lm" else \
            baseline(recipe.task, train_ds["labels"], test_ds["labels"], n_labels)
        if base is not None:  # None: a causal LM resumed from a checkpoint older than baselines
            beats, verdict = versus_baseline(test, base, *recipe.gate_metric)
            base = {**base, "beaten": beats, "verdict": verdict}
            if not beats:
                warn("baseline", state.step, f"the model does not beat its baseline: {verdict}")
        result = {"selected_by": f"validation {name}", "best_step": state.best_step, "steps": state.step,
                  "stopped_early": state.stopped_early, "selection": chosen, "validation": val, "test": test,
                  "baseline": base}
        (job_dir / "eval.json").write_text(json.dumps(result, indent=2))
        if wb:
            wb.log({f"test/{k}": v for k, v in test.items()})
            wb.finish()
    if sp["sharded"] or recipe.tuning.mode == "qlora":
        # weights sharded across the ranks (gathered here, a collective) or 4-bit: saved from a CPU copy
        whole = acc.get_state_dict(model) if sp["sharded"] else trainable_state(raw)
        if rank == 0:
            _save(_cpu_copy(recipe, config["model_path"], labels, pad_id, whole), tokenizer, recipe, labels,
                  job_dir)
    elif rank == 0:
        _save(raw, tokenizer, recipe, labels, job_dir)
    acc.wait_for_everyone()
    ray.train.report({"step": state.step, "done": 1})


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


def _better(value: float, loss: float, state: State, higher: bool) -> bool:
    """Whether an evaluation's weights replace the kept ones: a better select metric, or the same and a validation
    loss as low or lower (so that an accuracy that levels off still moves on to better weights, the later of equals).
    train.early_stopping.min_delta does not enter here: like HF Trainer's threshold, it only counts for patience."""
    if not math.isfinite(value):
        return False
    if state.best is None:
        return True
    if value != state.best:
        return value > state.best if higher else value < state.best
    return state.best_loss is None or loss <= state.best_loss


def _track_best(state: State, val: dict, recipe: Recipe, raw, job_dir: Path, rank: int, acc=None) -> None:
    """Keep the weights of the best evaluation in <job_dir>/best: the trainable parameters (state.pt), or with
    sharded weights (`acc` given) every rank's part through Accelerator.save_state, all ranks taking part."""
    name, higher = recipe.select_metric
    value, loss = val[name], val["loss"]
    state.evals.append([state.step, value, loss])
    es = recipe.train.early_stopping
    gain = None if state.best is None else (value - state.best if higher else state.best - value)
    if es and (not math.isfinite(value) or (gain is not None and gain <= es.min_delta)):  # no real gain: patience
        state.evals_without_improvement += 1
    else:
        state.evals_without_improvement = 0
    if _better(value, loss, state, higher):
        state.best, state.best_loss, state.best_step = value, loss, state.step
        if acc is not None:
            _save_sharded(acc, job_dir / "best", state, rank)
        elif rank == 0:
            (job_dir / "best").mkdir(exist_ok=True)
            tmp = job_dir / "best" / "state.pt.tmp"
            torch.save(trainable_state(raw), tmp)
            tmp.replace(job_dir / "best" / "state.pt")
    if es and state.evals_without_improvement >= es.patience:
        state.stopped_early = True
        if rank == 0:
            print(f"early stop at step {state.step}: validation {name} has not improved by more than "
                  f"{es.min_delta:g} for {es.patience} evaluations (best {state.best:.4f} at step {state.best_step})",
                  flush=True)


def selection(state: State, name: str, higher: bool, steps: int) -> dict:
    """Which evaluation's weights were kept and why, in words, from the evaluations' record."""
    if state.best_step is None:
        return {"metric": name, "step": None, "value": None,
                "why": f"no evaluation gave a finite validation {name}: the weights are the last step's"}
    evals = [e for e in state.evals if e[0] == state.best_step]
    if not evals:  # a run resumed from a checkpoint written before evaluations were recorded
        return {"metric": name, "step": state.best_step, "value": state.best,
                "why": f"the best validation {name}, {state.best:.4g} (the evaluations before the resume were not "
                       f"recorded)"}
    step, value, loss = evals[-1]
    others = [e for e in state.evals if e[0] != step]
    out = {"metric": name, "step": step, "value": value, "loss": loss, "evaluations": len(state.evals)}
    if not others:
        out["why"] = f"the only evaluation (validation {name} {value:.4g}, loss {loss:.4g})"
        return out
    tied = [e for e in others if e[1] == value]
    if tied:
        out["why"] = (f"validation {name} {value:.4g}, the best, reached at {len(tied) + 1} evaluations (steps "
                      f"{_steps([e[0] for e in tied] + [step])}); of those the lowest validation loss, {loss:.4g}")
    else:
        runner_up = sorted(others, key=lambda e: -e[1] if higher else e[1])[0]
        out["why"] = (f"the best validation {name}, {value:.4g} (loss {loss:.4g}); next best {runner_up[1]:.4g} at "
                      f"step {runner_up[0]}")
    return out


def _steps(steps: list[int]) -> str:
    steps = sorted(steps)
    return ", ".join(map(str, steps)) if len(steps) <= 6 else f"{steps[0]}, {steps[1]}, ... {steps[-1]}"


def _step_of(d: Path) -> int | None:
    try:
        step = json.loads((d / "step.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) else None


def _resume_state(ckpt, candidates: list[str], note, acc, candidates_root: Path | None = None) -> dict | None:
    """What to go on from: this run's latest checkpoint (after a lost worker), else the newest readable one of
    an earlier run of the job folder (`runner run --resume`), newest first, else nothing.

    A whole-model checkpoint comes back as its state.pt; a sharded one (state.json beside each rank's part) is
    loaded into the prepared model and optimizer here, and only its loop state comes back."""
    def load(d: Path) -> dict:
        if (d / "state.json").exists():
            acc.load_state(str(d))
            return {"state": json.loads((d / "state.json").read_text())}
        return torch.load(d / "state.pt", map_location="cpu", weights_only=False)

    if ckpt:
        with ckpt.as_directory() as d:
            # a checkpoint written to the job folder that Ray Train had not registered yet when the worker was
            # lost (it registers them a moment after the step goes on) is newer: go on from it, and redo less

            registered = _step_of(Path(d))
            for newer in checkpoints_newest_first(Path(candidates_root)) if candidates_root else []:
                if registered is None or _step_of(Path(newer)) <= registered:
                    break
                try:
                    out = load(Path(newer))
                except Exception as e:  # noqa: BLE001 - cut short when the worker died: the registered one then
                    note(f"skipping checkpoint {Path(newer).name}: unreadable ({type(e).__name__})")
                    continue
                note(f"checkpoint {Path(newer).name} (step {_step_of(Path(newer))}) is newer than the one Ray Train "
                     f"registered (step {registered})")
                return out
            return load(Path(d))
    for d in candidates:
        try:
            return load(Path(d))
        except Exception as e:  # noqa: BLE001 - a checkpoint cut short when the job was killed: try the one before
            note(f"skipping checkpoint {Path(d).name}: unreadable ({type(e).__name__})")
    return None


def _checkpoint(report: dict, state: State, raw, optimizer, rank: int, acc=None) -> None:
    """Report a Ray Train checkpoint: rank 0's state.pt, or with sharded weights (`acc` given) each rank's part
    (Accelerator.save_state), which Ray gathers into the one checkpoint folder."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        ck = None
        if acc is not None:
            acc.save_state(d)
            if rank == 0:
                (Path(d) / "state.json").write_text(json.dumps(asdict(state)))
                (Path(d) / "step.json").write_text(json.dumps({"step": state.step}))
            ck = ray.train.Checkpoint.from_directory(d)
        elif rank == 0:
            torch.save({"model": trainable_state(raw), "optimizer": optimizer.state_dict(), "state": asdict(state)},
                       Path(d) / "state.pt")
            (Path(d) / "step.json").write_text(json.dumps({"step": state.step}))
            ck = ray.train.Checkpoint.from_directory(d)
        ray.train.report(report, checkpoint=ck)


def _save_sharded(acc, dest: Path, state: State, rank: int) -> None:
    """Every rank writes its part of model and optimizer into dest.tmp (shared storage), then rank 0 swaps it in."""
    import shutil

    tmp = dest.with_name(dest.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps(asdict(state)))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    acc.wait_for_everyone()


def _cpu_copy(recipe: Recipe, model_path: str, labels, pad_id: int, state: dict):
    """The recipe's model on the CPU (a QLoRA one with its base unquantized) holding `state`: what is saved and
    exported when the trained weights are sharded across GPUs or 4-bit."""
    from jobs.model import build_model

    if recipe.tuning.mode == "qlora":
        d = recipe.model_dump()
        d["tuning"] = {k: v for k, v in d["tuning"].items() if k not in ("quant_type", "double_quant")}
        d["tuning"]["mode"] = "lora"
        recipe = Recipe.model_validate(d)
    model, _, _ = build_model(recipe, model_path, labels, pad_id)
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    model = model.float()
    missing = set(model.load_state_dict(state, strict=False).unexpected_keys)
    if missing:
        raise RuntimeError(f"the trained weights do not fit the model rebuilt to save them: {sorted(missing)[:5]}")
    return model


def _save(raw, tokenizer, recipe: Recipe, labels, job_dir: Path) -> None:
    """model/ (LoRA merged, loadable with from_pretrained), adapter/ for LoRA, written atomically."""
    import shutil

    from jobs.model import merged

    for name in ("adapter", "model"):
        shutil.rmtree(job_dir / f"{name}.tmp", ignore_errors=True)
    if recipe.tuning.mode in ("lora", "qlora"):
        raw.save_pretrained(job_dir / "adapter.tmp", safe_serialization=True)
        tokenizer.save_pretrained(job_dir / "adapter.tmp")
    model = merged(raw)
    model.save_pretrained(job_dir / "model.tmp", safe_serialization=True)
    tokenizer.save_pretrained(job_dir / "model.tmp")
    if labels:
        (job_dir / "model.tmp" / "labels.json").write_text(json.dumps(labels))
    for name in ("adapter", "model"):
        if (job_dir / f"{name}.tmp").exists():
            shutil.rmtree(job_dir / name, ignore_errors=True)
            (job_dir / f"{name}.tmp").rename(job_dir / name)


def _wandb(recipe: Recipe, job_dir: Path, config: dict, rank: int):
    if rank != 0 or recipe.tracking.mode == "disabled":
        return None
    import wandb

    return wandb.init(project=recipe.tracking.project or recipe.name, entity=recipe.tracking.entity,
                      mode=recipe.tracking.mode, dir=str(job_dir), name=job_dir.name, id=job_dir.name,
                      resume="allow", config=recipe.redacted())
