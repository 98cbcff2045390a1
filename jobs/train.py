"""The training loop each Ray Train worker runs: Accelerate set-up, prepare, loop, evaluate, checkpoint, report.

Read it top to bottom in `train_func`. Ray has already made the process group; the Accelerator joins it
(`cpu=True` where there is no GPU, or every worker would silently train alone on all the data).

Data parallelism is planned here rather than by a DistributedSampler: each epoch is a permutation of the train
rows from (seed, epoch); each optimizer step takes the next `workers x batch_size x grad_accum` rows and deals them
out to the ranks. Every row is seen exactly once per epoch, the last uneven step included, and a resumed run
restarts at the exact step and data position of its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from jobs.recipe import Recipe, parse_recipe

# Metric that picks the best checkpoint and drives early stopping, per task: (name, bigger is better).
SELECT = {"classification": ("accuracy", True), "regression": ("mse", False), "causal_lm": ("loss", False)}


@dataclass
class State:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0
    best: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False


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
def evaluate(model, ds, recipe: Recipe, pad_id: int, acc, batch_size: int) -> dict:
    """Metrics of `ds`, each rank scoring a shard, gathered so every rank holds the same numbers."""
    model.eval()
    rank, world = acc.process_index, acc.num_processes
    mine = list(range(rank, len(ds), world))
    records = []  # (index, loss sum, units, prediction)
    for i in range(0, len(mine), batch_size):
        idx = mine[i:i + batch_size]
        rows = [ds[j] for j in idx]
        batch = collate(rows, pad_id, recipe.task, acc.device)
        with acc.autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        losses = _losses_from_logits(logits, batch["labels"], recipe.task)
        preds = logits.argmax(-1).tolist() if recipe.task == "classification" else \
            logits.squeeze(-1).tolist() if recipe.task == "regression" else [None] * len(idx)
        for j, row, loss, p in zip(idx, rows, losses.tolist(), preds):
            records.append((j, loss, units(row, recipe.task), p))
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    records.sort()
    model.train()
    return metrics(records, [ds[j]["labels"] for j, *_ in records], recipe)


def _losses_from_logits(logits, y, task):
    if task == "classification":
        return torch.nn.functional.cross_entropy(logits, y, reduction="none")
    if task == "regression":
        return (logits.squeeze(-1) - y) ** 2
    sl, sy = logits[:, :-1], y[:, 1:]
    return torch.nn.functional.cross_entropy(sl.reshape(-1, sl.size(-1)), sy.reshape(-1), ignore_index=-100,
                                             reduction="none").view(sy.shape).sum(-1)


def metrics(records: list, labels: list, recipe: Recipe) -> dict:
    n = len(records)
    if recipe.task == "classification":
        preds = [r[3] for r in records]
        k = len(json.loads(os.environ.get("RUNNER_LABELS", "[]"))) or (max(labels + preds) + 1)
        f1s = []
        for c in range(k):
            tp = sum(1 for p, y in zip(preds, labels) if p == c and y == c)
            fp = sum(1 for p, y in zip(preds, labels) if p == c and y != c)
            fn = sum(1 for p, y in zip(preds, labels) if p != c and y == c)
            if tp + fp + fn:
                f1s.append(2 * tp / (2 * tp + fp + fn))
        return {"loss": sum(r[1] for r in records) / n, "accuracy": sum(p == y for p, y in zip(preds, labels)) / n,
                "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0, "examples": n}
    if recipe.task == "regression":
        err = [r[3] - float(y) for r, y in zip(records, labels)]
        mse = sum(e * e for e in err) / n
        return {"loss": mse, "mse": mse, "mae": sum(abs(e) for e in err) / n, "examples": n}
    tokens = sum(r[2] for r in records)
    loss = sum(r[1] for r in records) / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": tokens, "examples": n}


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


def make_schedule(optimizer, recipe: Recipe, steps: int):
    from transformers import get_scheduler

    t = recipe.train
    warmup = t.warmup_steps or int(round(t.warmup_ratio * steps))
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[t.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)


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

    from jobs.model import build_model
    from jobs.strategy import layer_classes, make_accelerator, plan

    job_dir = Path(config["job_dir"])
    prepared = job_dir / "prepared"
    recipe = parse_recipe((job_dir / "recipe.yaml").read_text(), source="recipe.yaml", env=os.environ)
    use_gpu = recipe.needs_gpu and torch.cuda.is_available()
    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(recipe.resources.cpus_per_worker)))
    set_seed(recipe.train.seed)

    # --- data and model -----------------------------------------------------------------------------------------
    data = datasets.load_from_disk(str(prepared / "data"))
    train_ds, val_ds, test_ds = data["train"], data["validation"], data["test"]
    labels = json.loads((prepared / "labels.json").read_text())
    os.environ["RUNNER_LABELS"] = json.dumps(labels or [])
    tokenizer = AutoTokenizer.from_pretrained(str(prepared / "tokenizer"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sp = plan(recipe, gpu=use_gpu)
    model, n_trainable, n_total = build_model(recipe, config["model_path"], labels, pad_id,
                                              gradient_checkpointing=sp["model_gradient_checkpointing"])
    sp = plan(recipe, layer_classes(model), gpu=use_gpu)
    if config.get("force_sharded"):  # tests: the sharded strategies' checkpoint, resume and save path, on CPUs
        sp["sharded"] = True
    acc = make_accelerator(sp)
    rank, world = acc.process_index, acc.num_processes
    if world != ctx.get_world_size():
        raise RuntimeError(f"Accelerate sees {world} processes but Ray started {ctx.get_world_size()} workers")

    def note(msg: str) -> None:  # rank 0's words for the person running the job: train.log, and stdout
        if rank == 0:
            print(msg, flush=True)
            with (job_dir / "train.log").open("a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")

    note(f"world size {world} ({acc.distributed_type.value}); strategy {sp['strategy']}, mixed precision "
         f"{sp['mixed_precision']}{', gradient checkpointing' if recipe.resources.gradient_checkpointing else ''}; "
         f"parameters: {n_trainable:,} trainable of {n_total:,} ({100 * n_trainable / n_total:.2f}%)")
    t = recipe.train
    steps = total_steps(recipe, len(train_ds), world)
    per_epoch = steps_per_epoch(len(train_ds), world, t.batch_size, t.grad_accum)
    eval_every = t.eval_every or per_epoch
    ckpt_every = t.checkpoint_every or eval_every
    optimizer = make_optimizer(model, recipe)
    scheduler = make_schedule(optimizer, recipe, steps)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    raw = acc.unwrap_model(model)
    unit_of = [units(r, recipe.task) for r in train_ds] if recipe.task == "causal_lm" else None
    length_of = [len(x) for x in train_ds["input_ids"]]

    if config.get("record_nodes") and rank == 0:  # tests: the node each start of the workers ran on, its priority
        with (job_dir / "nodes.txt").open("a") as f:
            f.write(ray.get_runtime_context().get_node_id() + "\n")
        (job_dir / "nice.txt").write_text(str(os.nice(0)))

    # --- resume ---------------------------------------------------------------------------------------------------
    state = State()
    saved = _resume_state(ray.train.get_checkpoint(), config.get("resume_from", []), note, acc)
    if saved:
        if "model" in saved:  # a whole-model checkpoint; a sharded one was loaded by _resume_state
            raw.load_state_dict(saved["model"], strict=False)
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
        state = State(**saved["state"])
        note(f"resumed from checkpoint at step {state.step} (epoch {state.epoch + 1}, "
             f"step {state.step_in_epoch} of the epoch)")
    metrics_file = job_dir / "metrics.jsonl"
    seen_file = config.get("record_seen")  # tests: every row index each rank trains on

    def log(rec: dict) -> None:
        if rank == 0:
            with metrics_file.open("a") as f:
                f.write(json.dumps(rec) + "\n")

    wb = _wandb(recipe, job_dir, config, rank)

    # --- the loop -------------------------------------------------------------------------------------------------
    model.train()
    done = state.step >= steps or state.stopped_early
    val = None  # the latest validation metrics, of the weights as they are now
    while not done:
        plan = epoch_plan(len(train_ds), t.seed, state.epoch, world, t.batch_size, t.grad_accum)
        epoch = state.epoch
        while state.epoch == epoch and not done:
            tick = time.perf_counter()
            s = state.step_in_epoch
            micro = plan[s][rank]
            step_rows = [j for r in plan[s] for m in r for j in m]
            step_units = len(step_rows) if unit_of is None else max(1, sum(unit_of[j] for j in step_rows))
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
                if seen_file and idx:
                    with open(f"{seen_file}.{rank}", "a") as f:
                        f.write(f"{epoch} " + " ".join(map(str, idx)) + "\n")
            if t.max_grad_norm and not sp["clip_by_engine"]:
                acc.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.step_in_epoch += 1
            if state.step_in_epoch == len(plan):  # the position a checkpoint records is where to go on
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            loss_value = acc.reduce(local_sum, reduction="sum").item() / step_units
            if not math.isfinite(loss_value):
                reason = (f"the loss became {loss_value} at step {state.step} (epoch {epoch + 1}); no model "
                          f"was saved. Lower train.lr (now {t.lr:g}), or set train.max_grad_norm")
                if rank == 0:
                    (job_dir / "failure.txt").write_text(reason)
                raise Diverged(reason)
            elapsed = time.perf_counter() - tick
            n_tokens = sum(length_of[j] for j in step_rows)
            rec = {"step": state.step, "epoch": round(state.step / per_epoch, 4), "loss": loss_value,
                   "lr": scheduler.get_last_lr()[0], "samples_per_s": len(step_rows) / elapsed,
                   "tokens_per_s": n_tokens / elapsed, "total_steps": steps, "time": time.time()}
            if use_gpu:  # the most this rank's tensors have held so far, for the memory pre-flight's comparison
                rec["gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            log(rec)
            if wb:
                wb.log({k: v for k, v in rec.items() if k not in ("time", "total_steps")}, step=state.step)
            finished = state.step >= steps
            report: dict = {"step": state.step, "loss": loss_value}
            val = None
            if state.step % eval_every == 0 or finished:
                val = evaluate(model, val_ds, recipe, pad_id, acc, t.batch_size * 2)
                report.update({f"val_{k}": v for k, v in val.items()})
                log({"step": state.step, "epoch": rec["epoch"], "split": "validation", **val, "time": time.time()})
                if wb:
                    wb.log({f"val/{k}": v for k, v in val.items()}, step=state.step)
                _track_best(state, val, recipe, raw, job_dir, rank, acc if sp["sharded"] else None)
            done = finished or state.stopped_early
            if state.step % ckpt_every == 0 and not done:
                _checkpoint(report, state, raw, optimizer, scheduler, rank, acc if sp["sharded"] else None)
            elif done:  # the saved model is the end's record; a checkpoint would only be written and hashed
                ray.train.report(report)
            if config.get("step_delay"):  # tests: slow steps, so that a watcher sees the run go on
                time.sleep(config["step_delay"])
            hold = config.get("hold_file")  # tests: hold at pause_after_step until stopped, or while the file
            hold = hold and job_dir / hold  # (relative to the job folder) is there
            while config.get("pause_after_step") == state.step and (not hold or hold.exists()):
                time.sleep(0.2)
            crash = config.get("crash_after_step")  # tests: a worker dies mid-run, once
            if crash and state.step == crash and rank == world - 1 and not (job_dir / "crashed").exists():
                (job_dir / "crashed").write_text(str(state.step))
                time.sleep(3)  # let the controller collect the last checkpoint's report, as a real crash would
                os._exit(1)

    if config.get("record_weights"):  # tests: ranks must end with identical weights
        import hashlib

        h = hashlib.sha256()
        for k, v in sorted(raw.state_dict().items()):
            h.update(k.encode() + v.detach().float().cpu().numpy().tobytes())
        (job_dir / f"weights.{rank}.sha256").write_text(h.hexdigest())
    # --- test with the best weights, then save ------------------------------------------------------------------
    best = job_dir / "best" / "state.pt"
    if state.best_step != state.step or val is None:
        if sp["sharded"] and (job_dir / "best" / "state.json").exists():
            acc.load_state(str(job_dir / "best"))
        elif best.exists():
            raw.load_state_dict(torch.load(best, map_location="cpu"), strict=False)
        val = evaluate(model, val_ds, recipe, pad_id, acc, t.batch_size * 2)
    test = evaluate(model, test_ds, recipe, pad_id, acc, t.batch_size * 2)
    if rank == 0:
        name, _ = SELECT[recipe.task]
        result = {"selected_by": f"validation {name}", "best_step": state.best_step, "steps": state.step,
                  "stopped_early": state.stopped_early, "validation": val, "test": test}
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


def _track_best(state: State, val: dict, recipe: Recipe, raw, job_dir: Path, rank: int, acc=None) -> None:
    """Keep the weights of the best evaluation in <job_dir>/best: the trainable parameters (state.pt), or with
    sharded weights (`acc` given) every rank's part through Accelerator.save_state, all ranks taking part."""
    name, bigger = SELECT[recipe.task]
    value = val[name]
    es = recipe.train.early_stopping
    delta = es.min_delta if es else 0.0
    improved = state.best is None or (value > state.best + delta if bigger else value < state.best - delta)
    if improved:
        state.best, state.best_step, state.evals_without_improvement = value, state.step, 0
        if acc is not None:
            _save_sharded(acc, job_dir / "best", state, rank)
        elif rank == 0:
            (job_dir / "best").mkdir(exist_ok=True)
            tmp = job_dir / "best" / "state.pt.tmp"
            torch.save(trainable_state(raw), tmp)
            tmp.replace(job_dir / "best" / "state.pt")
    else:
        state.evals_without_improvement += 1
        if es and state.evals_without_improvement >= es.patience:
            state.stopped_early = True
            if rank == 0:
                print(f"early stop at step {state.step}: validation {name} has not improved for "
                      f"{es.patience} evaluations (best {state.best:.4f} at step {state.best_step})", flush=True)


def _resume_state(ckpt, candidates: list[str], note, acc) -> dict | None:
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
            return load(Path(d))
    for d in candidates:
        try:
            return load(Path(d))
        except Exception as e:  # noqa: BLE001 - a checkpoint cut short when the job was killed: try the one before
            note(f"skipping checkpoint {Path(d).name}: unreadable ({type(e).__name__})")
    return None


def _checkpoint(report: dict, state: State, raw, optimizer, scheduler, rank: int, acc=None) -> None:
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
            torch.save({"model": trainable_state(raw), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "state": asdict(state)}, Path(d) / "state.pt")
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
