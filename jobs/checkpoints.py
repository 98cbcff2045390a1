"""What a run keeps: the loop's `State` (its position and judgments, in every checkpoint), the best weights by the
select metric (`track_best`, `selection` in words), the checkpoints Ray Train gathers and a resume from them
(whole-model state.pt, or each rank's part through Accelerator.save_state for sharded weights), and the saved
model/ and adapter/."""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from jobs.jobdir import checkpoints_newest_first
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


def trainable_state(model) -> dict:
    """The parameters that train (all of them for `full`; adapters and head otherwise), on CPU."""
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}


def better(value: float, loss: float, state: State, higher: bool) -> bool:
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


def track_best(state: State, val: dict, recipe: Recipe, raw, job_dir: Path, rank: int, acc=None) -> None:
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
    if better(value, loss, state, higher):
        state.best, state.best_loss, state.best_step = value, loss, state.step
        if acc is not None:
            save_sharded(acc, job_dir / "best", state, rank)
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


def resume_state(ckpt, candidates: list[str], note, acc, candidates_root: Path | None = None) -> dict | None:
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


def checkpoint(report: dict, state: State, raw, optimizer, rank: int, acc=None) -> None:
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


def save_sharded(acc, dest: Path, state: State, rank: int) -> None:
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


def cpu_copy(recipe: Recipe, model_path: str, labels, pad_id: int, state: dict):
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


def save_model(raw, tokenizer, recipe: Recipe, labels, job_dir: Path) -> None:
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
