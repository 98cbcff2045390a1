"""The recipe's schema: every key, its type, its default and its meaning, and the rules that span several keys.

This module is the single home of every default. It imports no torch (the control plane imports it). Reading a
recipe from YAML, with its problems located and said, is jobs/recipe.py.
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

MAX_TEXT = 4096  # a name, id, path or setting (PATH_MAX); a chat template may hold more
MAX_TEMPLATE = 65536


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    @field_validator("*", mode="after")
    @classmethod
    def _plain_text(cls, v, info):
        """No text of a recipe holds a NUL or a control character other than tab and newline, or runs past
        MAX_TEXT characters: none is a name, path or setting, and each would break a file name or a log line."""
        if isinstance(v, str):
            most = MAX_TEMPLATE if info.field_name == "chat_template" else MAX_TEXT
            if len(v) > most:
                raise ValueError(f"{len(v):,} characters long; at most {most:,}")
            bad = next((c for c in v if ord(c) < 32 and c not in "\t\n\r"), None)
            if bad is not None:
                raise ValueError(f"holds the control character {bad!r}; a name, path or setting holds none")
        return v


class ModelSpec(_Strict):
    """The base model."""

    name: str = Field(description="Hub id (`org/name`) or a local folder holding `config.json`.")
    revision: str = Field("main", description="Hub branch, tag or commit; ignored for a local folder.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype the weights are loaded in; `auto` keeps the checkpoint's own."
    )
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with the model (off unless you trust it).")
    token: SecretStr | None = Field(None, description="Hub token for gated models; write `${HF_TOKEN}`, never the token itself.")


Task = Literal["classification", "regression", "causal_lm"]
DataFormat = Literal["text", "instruction", "chat"]

# Column roles each task (and causal-LM format) reads; the recipe's `data.columns` maps a role to a column name.
ROLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # key: (required roles, optional roles)
    "classification": (("text", "label"), ("text_pair",)),
    "regression": (("text", "label"), ("text_pair",)),
    "causal_lm/text": (("text",), ()),
    "causal_lm/instruction": (("instruction", "output"), ("input",)),
    "causal_lm/chat": (("messages",), ()),
}


def roles_for(task: str, layout: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) column roles of a task; layout: a causal LM's format in effect (DataSpec.layout)."""
    return ROLES[f"causal_lm/{layout}" if task == "causal_lm" else task]


class Source(_Strict):
    """One split's data: a local file or folder, or a hub dataset. A plain string is shorthand for `path`."""

    path: str | None = Field(
        None,
        description="Local `.jsonl`, `.json`, `.csv`, `.parquet` file, or a `datasets` save_to_disk folder; "
        "relative to the recipe file.",
    )
    hub: str | None = Field(None, description="Hub dataset id, e.g. `stanfordnlp/imdb`.")
    subset: str | None = Field(None, description="Hub dataset configuration name, where it has several.")
    split: str | None = Field(None, description="Split to read; default: the split this source stands for.")
    revision: str | None = Field(None, description="Hub dataset branch, tag or commit.")

    @model_validator(mode="after")
    def _one_location(self) -> "Source":
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' (a local file or folder) or 'hub' (a hub dataset id)")
        if self.path is not None and (self.subset or self.revision):
            raise ValueError("'subset' and 'revision' apply to hub datasets only")
        return self


def _source(v: Any) -> Any:
    return {"path": v} if isinstance(v, str) else v


class SplitSpec(_Strict):
    """How validation and test are carved from train when the recipe does not give them."""

    validation: float = Field(0.1, gt=0, lt=1, description="Fraction of train held out for validation (on "
                              "average: each row is placed by a hash of its content).")
    test: float = Field(0.1, gt=0, lt=1, description="Fraction of train held out for test (on average).")
    seed: int = Field(42, description="Seed of the split. A row's split follows from its content and the seed "
                      "alone: the same row stays in the same split when the file grows, and copies of a row share it.")

    @model_validator(mode="after")
    def _fits(self) -> "SplitSpec":
        if self.validation + self.test >= 0.9:
            raise ValueError(
                f"validation + test = {self.validation + self.test:g} leaves too little to train on; keep it below 0.9"
            )
        return self


class DataSpec(_Strict):
    """Where the examples come from and how they become model inputs."""

    train: Source = Field(description="Training data (required).")
    validation: Source | None = Field(None, description="Validation data; split off train when absent.")
    test: Source | None = Field(None, description="Test data; split off train when absent.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Role -> column name where they differ. Roles: `text`, `text_pair`, `label` "
        "(classification, regression); `text` (causal_lm text); `instruction`, `input`, `output` (instruction); "
        "`messages` (chat).",
    )
    format: DataFormat | None = Field(
        None,
        description="Causal LM only: `text` (raw text, loss on every token), `instruction` (alpaca, loss on the "
        "response), `chat` (role/content messages through the chat template, loss on assistant turns). "
        "Default `text`.",
    )
    chat_template: str | None = Field(
        None, description="Jinja chat template for a tokenizer that has none (chat format only)."
    )
    labels: list[str | int] | None = Field(
        None, description="Classification only: label names in order; default: the sorted labels found in train."
    )
    max_seq_len: int = Field(512, ge=8, le=131072, description="Tokens per example; longer ones are truncated.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="Used only for splits the recipe does not give.")

    @property
    def layout(self) -> str:
        """The causal-LM format in effect: `format`, or `text` where the recipe gives none."""
        return self.format or "text"

    @field_validator("train", "validation", "test", mode="before")
    @classmethod
    def _coerce_sources(cls, v: Any) -> Any:
        return _source(v)


class FullTuning(_Strict):
    """Train every parameter."""

    mode: Literal["full"] = "full"


class LoraTuning(_Strict):
    """Low-rank adapters (peft); only the adapters train, merged into the model at the end."""

    mode: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, le=1024, description="Adapter rank.")
    alpha: int = Field(16, ge=1, description="Adapter scale numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: Literal["auto"] | list[str] = Field(
        "auto", description="Module names to adapt; `auto` picks the attention projections of the architecture."
    )


class QloraTuning(LoraTuning):
    """LoRA on a 4-bit quantized base model (bitsandbytes); needs GPUs."""

    mode: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base weights.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")


class FreezeTuning(_Strict):
    """Freeze the backbone; train the task head and, optionally, the last N transformer layers."""

    mode: Literal["freeze"] = "freeze"
    train_last_layers: int = Field(0, ge=0, description="How many of the last transformer layers also train.")


TUNING_MODES = ("full", "lora", "qlora", "freeze")
Tuning = Annotated[Union[FullTuning, LoraTuning, QloraTuning, FreezeTuning], Field(discriminator="mode")]


class EarlyStopping(_Strict):
    """Stop when the validation metric has not improved for `patience` evaluations."""

    patience: int = Field(3, ge=1, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0, description="Smallest gain of the select metric that resets the patience (the "
                             "weights kept are the best whatever the gain).")


class CallbackSpec(_Strict):
    """Code of your own called at fixed points of the training loop on every worker (jobs/callbacks.py)."""

    use: str = Field(description="`package.module:Class`, a subclass of `jobs.callbacks.Callback` importable where "
                                 "the workers run (e.g. `jobs.faults:Faults`, faults for drills).")
    args: dict[str, typing.Any] = Field(default_factory=dict, max_length=32,
                                        description="Keyword arguments of its constructor: text, numbers, booleans.")

    @field_validator("use")
    @classmethod
    def _importable_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", v):
            raise ValueError(f"{v[:200]!r} is not `package.module:Class` (a module the workers import, never a "
                             f"file path)")
        return v

    @field_validator("args")
    @classmethod
    def _scalars(cls, v: dict) -> dict:
        for k, x in v.items():
            if not isinstance(x, (str, int, float, bool, type(None))):
                raise ValueError(f"{k}: {type(x).__name__}; a callback's arguments are text, numbers, true/false "
                                 f"or null")
        return v


CALLBACKS_VAR = "RUNNER_CALLBACKS"  # the operator's list of modules a recipe's callbacks may come from


def callback_modules(environ=None) -> list[str]:
    """The modules a recipe's callbacks may come from (RUNNER_CALLBACKS; default: jobs.faults only)."""
    given = (environ if environ is not None else os.environ).get(CALLBACKS_VAR)
    return [m.strip() for m in (given if given is not None else "jobs.faults").split(",") if m.strip()]


def callback_refusal(use: str, environ=None) -> str | None:
    """Why a callback's `use` may not be imported here, or None."""
    module = use.partition(":")[0]
    allowed = callback_modules(environ)
    if any(module == m or (m.endswith(".") and module.startswith(m)) for m in allowed):
        return None
    return (f"{use}: module {module} is not among the callbacks this runner takes ({CALLBACKS_VAR}: "
            f"{', '.join(allowed) or 'none'}); its operator lists a module there to allow it")


class TrainSpec(_Strict):
    """The optimisation."""

    epochs: float | None = Field(3, gt=0, description="Passes over train; ignored when `max_steps` is set.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps in all; overrides `epochs`.")
    optimizer: Literal["adamw", "sgd", "adafactor"] = Field("adamw", description="Optimizer.")
    lr: float = Field(5e-5, gt=0, le=10, description="Peak learning rate.")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="Learning-rate decay after warm-up.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warm-up as a fraction of all steps.")
    warmup_steps: int = Field(0, ge=0, description="Warm-up in steps; give this or `warmup_ratio`, not both.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (not applied to biases and norms).")
    batch_size: int = Field(8, ge=1, description="Examples per worker per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Forward passes per optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; null turns it off.")
    seed: int = Field(42, description="Seed of initialisation, shuffling and dropout.")
    eval_every: int | None = Field(None, ge=1, description="Evaluate on validation every N steps; default each epoch.")
    checkpoint_every: int | None = Field(
        None, ge=1, description="Checkpoint every N steps; default at each evaluation."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept, besides the best one.")
    early_stopping: EarlyStopping | None = Field(None, description="Off unless given.")
    select_metric: str | None = Field(
        None, description="Validation metric that picks the weights kept (and drives early stopping), its direction "
        "known: default `accuracy` for classification, `mse` for regression, `loss` for causal LM (also `macro_f1`, "
        "`loss`, `mae`, `perplexity`). Ties go to the lower validation loss, then the later step.")
    group_by_length: bool | None = Field(
        None, description="Put rows of similar length in the same step (less padding, the same rows once per epoch "
        "across the workers): each stretch of 64 steps' rows of the shuffled order sorted by length, cut into steps, "
        "the steps shuffled. Default: on for classification and regression, off for a causal LM.")
    packing: bool = Field(
        False, description="Causal LM: pack train examples whole into sequences of `data.max_seq_len` (position ids "
        "restart at each, so attention never crosses examples; loss masks kept). Validation and test stay one "
        "example a row.")
    callbacks: list[CallbackSpec] = Field(
        default_factory=list, max_length=16,
        description="Code of your own at fixed points of the loop, on every worker, in this order: each "
        "`{use: package.module:Class, args: {...}}`, a subclass of `jobs.callbacks.Callback` importable where the "
        "workers run, built with `args` (text, numbers, booleans). `jobs.faults:Faults` injects faults for drills.")

    @model_validator(mode="after")
    def _consistent(self) -> "TrainSpec":
        if self.epochs is None and self.max_steps is None:
            raise ValueError("give 'epochs' or 'max_steps'")
        if self.warmup_ratio and self.warmup_steps:
            raise ValueError("give 'warmup_ratio' or 'warmup_steps', not both")
        return self


class ResourcesSpec(_Strict):
    """What the job asks of the cluster."""

    workers: int = Field(1, ge=1, le=1024, description="Ray Train workers (data-parallel processes).")
    gpus_per_worker: float = Field(0, ge=0, le=16, description="GPUs each worker holds; 0 trains on CPUs.")
    cpus_per_worker: float = Field(1, gt=0, le=256, description="CPUs each worker holds.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Autocast precision of the forward pass.")
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="How the workers share the model: `ddp` keeps a whole copy on each GPU; `fsdp` shards "
        "weights, gradients and optimizer states (each decoder layer a unit); `deepspeed` shards by `zero_stage`.")
    zero_stage: Literal[2, 3] | None = Field(None, description="DeepSpeed ZeRO stage with strategy `deepspeed` "
                                             "(default 2): 2 shards gradients and optimizer states, 3 the weights "
                                             "as well.")
    gradient_checkpointing: bool = Field(False, description="Keep only each layer's input and recompute the rest in "
                                         "the backward pass: far less activation memory for about a third more "
                                         "compute.")
    gpu_memory_gib: float | None = Field(None, gt=0, le=4096, description="Memory of each GPU, for the pre-flight "
                                         "memory check; default: the local GPU's, where there is one.")
    max_failures: int = Field(0, ge=-1, description="Worker or node losses survived by resuming from the last "
                              "checkpoint; -1 retries forever.")
    priority: int = Field(0, ge=-100, le=100, description="Place in the runner's queue: a higher priority "
                          "starts first, then the older job; `runner submit --priority` overrides it.")
    max_minutes: float | None = Field(None, gt=0, le=525_600, description="The most minutes the job may run, "
                                      "from its start to its end (export included); past it the runner stops the "
                                      "job as FAILED. A bounded job may start ahead of a bigger one that waits, on "
                                      "capacity that one cannot use before the bound ends (backfill).")
    preemptible: bool = Field(False, description="The runner may stop the job at any step to give its resources to "
                              "a job ahead of it in the queue: it checkpoints at that step, goes back to the queue "
                              "and resumes there. Such a job may start ahead of a bigger one that waits (backfill).")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `no` as false: accept what the user meant.
        return "no" if v is False else v


class TrackingSpec(_Strict):
    """Experiment tracking besides the runner's own store."""

    mode: Literal["disabled", "offline", "online"] = Field(
        "disabled", description="Weights & Biases: `online` needs WANDB_API_KEY; `offline` writes runs locally."
    )
    project: str | None = Field(None, description="W&B project; default: the recipe name.")
    entity: str | None = Field(None, description="W&B team or user.")

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "disabled" if v is False else v


class ExportSpec(_Strict):
    """What the finished model is exported to, and the checks it must pass for the job to succeed."""

    onnx: bool = Field(False, description="Export the merged model to ONNX and check it against PyTorch.")
    quantize: Literal["none", "int8_dynamic", "int8_static", "int4_weight_only"] = Field(
        "int8_dynamic", description="Quantization of the ONNX model (applies when `onnx` is true): int8 dynamic "
        "per-channel; int8 static (MatMul only, calibrated on train samples); int4 weight-only (MatMulNBits, "
        "for decoders)."
    )
    opset: int = Field(18, ge=14, le=22, description="ONNX opset. 23 breaks int8 BERT and Llama in onnxruntime 1.32.")
    max_quality_drop: float | None = Field(
        None, ge=0, description="How much worse the quantized model may be than PyTorch on the held-out rows "
        "(test and validation, with a 95% interval in the report): "
        "accuracy points for classification (default 1.0); a ratio of perplexities for causal LM, or of mean "
        "squared errors for regression (default 1.05 and 1.10)."
    )
    calibration_samples: int = Field(64, ge=1, le=10_000, description="Train rows that calibrate `int8_static`.")
    optimize: bool = Field(True, description="Fuse the ONNX graph into onnxruntime's transformer ops (attention, "
                           "skip layer norm, bias GELU, RMS norm, rotary) before quantizing. The fused graph passes "
                           "the same checks as the plain one, or the plain one is used and the report says why.")
    require_quantized: bool = Field(False, description="Fail the job when no quantized model meets "
                                    "`max_quality_drop`. By default the export then keeps the most hurt layers in "
                                    "fp32, tries static int8, and ships the checked fp32 ONNX model if none passes.")


CRON_FIELDS = "five fields: minute hour day-of-month month day-of-week (for example '30 2 * * *': 02:30 every day)"


class ScheduleSpec(_Strict):
    """When the runner server retrains this recipe by itself (`runner schedule add recipe.yaml`)."""

    cron: str | None = Field(None, description="Cron expression, five fields, read in `timezone`: `30 2 * * *` is "
                             "02:30 every day. Across daylight-saving changes a daily time fires once a local day: "
                             "a skipped time at the first minute after the gap, a repeated one the first time.")
    timezone: str = Field("UTC", description="IANA time zone of `cron` (`Europe/Berlin`, `America/New_York`).")
    on_data_change: bool = Field(False, description="Also retrain when the data changes (sizes, times and hashes of "
                                 "local files; the revision of hub datasets).")
    poll_interval: int = Field(600, ge=10, description="Seconds between two looks at the data (`on_data_change`).")
    concurrency: Literal["forbid", "allow", "replace"] = Field(
        "forbid", description="A fire while the previous run still goes: `forbid` records it as skipped, `allow` "
        "starts another, `replace` cancels the running one first.")

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from datetime import datetime

        from cronsim import CronSim, CronSimError

        try:
            CronSim(v, datetime(2000, 1, 1))
        except CronSimError as e:  # "Bad minute", "Bad day-of-week", "Wrong number of fields"
            what = f"the {str(e)[4:]} field is wrong" if str(e).startswith("Bad ") else str(e).lower()
            raise ValueError(f"{v!r}: {what}; {CRON_FIELDS}") from None
        return v

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            close = difflib.get_close_matches(v, sorted(available_timezones()), n=1)
            hint = f"did you mean {close[0]!r}?" if close else \
                "an IANA name such as 'UTC', 'Europe/Berlin' or 'America/New_York'"
            raise ValueError(f"unknown time zone {v!r}: {hint}") from None
        return v

    @model_validator(mode="after")
    def _something(self) -> "ScheduleSpec":
        if self.cron is None and not self.on_data_change:
            raise ValueError("a schedule needs `cron`, `on_data_change: true`, or both")
        return self


Scalar = Union[bool, int, float, str]  # bool first: YAML's true stays a bool, not 1
GRID_MAX = 256  # a grid of more combinations than this is refused (say a random search of so many trials instead)
SWEEP_SECTIONS = ("train", "tuning")  # what a sweep may search: a trial's data and model are the sweep's
EXPONENT = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+")


class ParameterSpec(_Strict):
    """How a swept parameter's values are drawn; exactly one key."""

    choice: list[Scalar] | None = Field(None, min_length=1, max_length=64, description="These values (a grid's "
                                        "points with `search: grid`).")
    uniform: list[float] | None = Field(None, min_length=2, max_length=2, description="`[low, high]`: any number "
                                        "between, evenly.")
    loguniform: list[float] | None = Field(None, min_length=2, max_length=2, description="`[low, high]`, both "
                                           "above 0: evenly on a log scale (learning rates).")
    randint: list[int] | None = Field(None, min_length=2, max_length=2, description="`[low, high]`: a whole "
                                      "number from low to high, both included.")

    @field_validator("choice", mode="after")
    @classmethod
    def _exponents(cls, v):
        """`1e-5` is text to YAML 1.1 (PyYAML), a number to YAML 1.2 and to whoever wrote it: a number here."""
        return None if v is None else [float(x) if isinstance(x, str) and EXPONENT.fullmatch(x) else x for x in v]

    @model_validator(mode="after")
    def _one(self) -> "ParameterSpec":
        given = [k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, uniform, loguniform, randint (got "
                             f"{', '.join(given) or 'none'})")
        lo_hi = self.uniform or self.loguniform or self.randint
        numbers = [x for x in (lo_hi or self.choice or []) if isinstance(x, (int, float)) and not isinstance(x, bool)]
        if any(not math.isfinite(x) or abs(x) > 2**62 for x in numbers):
            raise ValueError(f"{given[0]} {[x for x in numbers if not math.isfinite(x) or abs(x) > 2**62][0]!r}: "
                             f"finite numbers only, within ±2^62")
        if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
            raise ValueError(f"{given[0]} [{lo_hi[0]:g}, {lo_hi[1]:g}]: the low end must be below the high end")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform [{self.loguniform[0]:g}, {self.loguniform[1]:g}]: both ends above 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    @property
    def values(self) -> list:
        return getattr(self, self.kind)


class SweepSpec(_Strict):
    """Search this recipe's own hyperparameters: each trial is the recipe with the parameters filled in."""

    parameters: dict[str, ParameterSpec] = Field(min_length=1, max_length=16, description="Dotted paths into the "
                                                 "recipe's `train` and `tuning` (`train.lr`, `tuning.r`) and how "
                                                 "their values are drawn.")
    trials: int | None = Field(None, ge=1, le=1000, description="Configurations to try; default 10 (random, "
                               "tpe), every combination once (grid).")
    search: Literal["grid", "random", "tpe"] = Field("random", description="`grid`: every combination of the "
                                                     "`choice` lists; `random`; `tpe`: Optuna's Tree-structured "
                                                     "Parzen Estimator, each trial drawn where earlier ones scored "
                                                     "well.")
    seed: int | None = Field(None, description="Seed of the draws (random, tpe); default `train.seed`. The same "
                             "seed draws the same configurations (tpe: given the same scores, in the same order).")
    metric: str | None = Field(None, description="Validation metric that chooses the trial (and each trial's best "
                               "weights); default the task's select metric. Its direction is the task's.")
    max_concurrent: int = Field(1, ge=1, le=64, description="Trials at once; each holds the recipe's `resources`.")
    start_from_recipe: bool = Field(True, description="Trial 0 is the recipe's own values (random; tpe where the "
                                    "values lie in its space, even outside the ranges for random), so they always "
                                    "compete: without early stopping the sweep never chooses worse on validation.")
    early_stop: Literal["none", "asha"] = Field("none", description="`asha`: stop trials whose validation metric "
                                                "trails the others' at an evaluation (Asynchronous Successive "
                                                "Halving); `none`: every trial runs to its end.")

    @property
    def grid_size(self) -> int:
        n = 1
        for p in self.parameters.values():
            n *= len(p.values) if p.kind == "choice" else 0
        return n

    def drawn(self, seed: int, first: dict | None = None) -> list[dict] | None:
        """Every trial's values, in trial order: the grid's combinations in order, or `random`'s draws from numpy's
        generator seeded by `seed` (the same seed, the same trials), after `first` (the recipe's own values) where
        start_from_recipe; None for tpe (drawn as the search goes)."""
        names = list(self.parameters)
        if self.search == "grid":
            return [dict(zip(names, combo)) for combo in itertools.product(*(self.parameters[n].values
                                                                             for n in names))]
        if self.search != "random":
            return None
        import numpy as np

        rng = np.random.default_rng(seed % 2**63)  # any whole number (numpy takes none below 0)
        out = [dict(first)] if first is not None and self.start_from_recipe else []
        while len(out) < self.count:
            values = {}
            for n in names:
                p = self.parameters[n]
                lo, hi = p.values[0], p.values[-1]
                if p.kind == "choice":
                    values[n] = p.values[int(rng.integers(len(p.values)))]
                elif p.kind == "uniform":
                    values[n] = float(rng.uniform(lo, hi))
                elif p.kind == "loguniform":
                    values[n] = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
                else:  # randint: both ends included
                    values[n] = int(rng.integers(lo, hi + 1))
            out.append(values)
        return out

    @property
    def count(self) -> int:
        """How many trials the sweep runs."""
        if self.search == "grid":
            return self.grid_size
        return self.trials or 10


# The validation metric that picks the best weights, per task, and whether higher is better; the first is the default.
SELECT_METRICS = {
    "classification": {"accuracy": True, "macro_f1": True, "loss": False},
    "regression": {"mse": False, "mae": False, "loss": False},
    "causal_lm": {"loss": False, "perplexity": False},
}

# The test metric a registered model is judged by, per task, and whether higher is better; the first is the default,
# and the task's headline figure wherever one figure stands for a model (an export's table and quality bound).
GATE_METRICS = {
    "classification": {"accuracy": True, "macro_f1": True, "loss": False},
    "regression": {"mse": False, "mae": False},
    "causal_lm": {"perplexity": False, "loss": False},
}


def headline(task: str) -> str:
    """The one figure that stands for a model of the task: accuracy, mse or perplexity."""
    return next(iter(GATE_METRICS[task]))


class PromotionSpec(_Strict):
    """When a new version of a registered model (`register_as`) becomes its `champion`."""

    metric: str | None = Field(None, description="Test metric compared: default `accuracy` for classification, "
                               "`mse` for regression, `perplexity` for causal LM (also `macro_f1`, `loss`, `mae`).")
    min_improvement: float = Field(0.0, ge=0, description="How much better than the champion's it must be (in the "
                                   "metric's units; any gain when 0).")


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # also a folder name: no '/', no leading '.'
NAME_RULE = "use letters, digits, '-', '_' and '.', starting with a letter or digit (at most 100)"


class Recipe(_Strict):
    """A fine-tuning job."""

    name: str = Field(description="Job name: letters, digits, `-`, `_`, `.`; starts with a letter or digit.")
    model: ModelSpec
    task: Task = Field(description="`classification`, `regression` (numeric target, mean squared error) or `causal_lm`.")
    data: DataSpec
    tuning: Tuning = Field(default_factory=FullTuning, description="`full`, `lora`, `qlora` or `freeze`.")
    train: TrainSpec = Field(default_factory=TrainSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    schedule: ScheduleSpec | None = Field(None, description="Retrain on a cron schedule or when the data changes; "
                                          "used by `runner schedule add`, ignored by `runner run` and `submit`.")
    register_as: str | None = Field(None, description="Model registry name: each SUCCEEDED job of the runner "
                                    "server becomes a version of it, promoted to `champion` when it beats the current "
                                    "one (see `promotion`).")
    promotion: PromotionSpec = Field(default_factory=PromotionSpec)
    sweep: SweepSpec | None = Field(None, description="Search hyperparameters: one sweep job whose trials are "
                                    "this recipe with other values; the best on validation is tested, exported "
                                    "and registered.")

    @model_validator(mode="after")
    def _gate_metric(self) -> "Recipe":
        if self.register_as is not None and not NAME_RE.fullmatch(self.register_as):
            raise ValueError(f"register_as {self.register_as!r}: {NAME_RULE}")
        known = GATE_METRICS[self.task]
        if self.promotion.metric is not None and self.promotion.metric not in known:
            raise ValueError(f"promotion.metric {self.promotion.metric!r} is not a test metric of {self.task}: one "
                             f"of {', '.join(known)}")
        return self

    @property
    def select_metric(self) -> tuple[str, bool]:
        """(validation metric that picks the best weights, higher is better)."""
        metric = self.train.select_metric or next(iter(SELECT_METRICS[self.task]))
        return metric, SELECT_METRICS[self.task][metric]

    @property
    def sweep_metric(self) -> tuple[str, bool]:
        """(validation metric that chooses a sweep's trial, higher is better)."""
        metric = (self.sweep and self.sweep.metric) or self.select_metric[0]
        return metric, SELECT_METRICS[self.task].get(metric, False)

    @property
    def swept_values(self) -> dict | None:
        """The recipe's own values of the keys its sweep searches (a sweep's trial 0, start_from_recipe)."""
        if self.sweep is None:
            return None
        out = {}
        for path in self.sweep.parameters:
            section, _, key = path.partition(".")
            part = getattr(self, section, None)
            if part is None or key not in type(part).model_fields:
                return None  # a key of another tuning mode: check_sweep says so
            out[path] = getattr(part, key)
        return out

    @property
    def group_by_length(self) -> bool:
        """Whether training steps group rows of similar length (train.group_by_length, or the task's default)."""
        g = self.train.group_by_length
        return self.task != "causal_lm" if g is None else g

    @property
    def gate_metric(self) -> tuple[str, bool]:
        """(metric, higher is better) that promotion compares."""
        metric = self.promotion.metric or headline(self.task)
        return metric, GATE_METRICS[self.task][metric]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(NAME_RULE)
        return v

    @field_validator("tuning", mode="before")
    @classmethod
    def _mode_shorthand(cls, v: Any) -> Any:
        return {"mode": v} if isinstance(v, str) else v

    # Where a recipe was read from: relative data paths resolve against it. Not part of the schema.
    _base_dir: Path = Path(".")
    _secrets: dict[tuple, str] = {}
    _lines: dict[tuple, int] = {}

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def written_as(self, *path: str) -> str | None:
        """The text a field was written as where it was a `${VAR}` reference (or a secret typed in): what the
        snapshot keeps instead of the value; None for any other field."""
        return self._secrets.get(tuple(path))

    def resolve_path(self, p: str) -> Path:
        q = Path(os.path.expanduser(p))
        return q if q.is_absolute() else (self._base_dir / q).resolve()

    @property
    def needs_gpu(self) -> bool:
        return self.resources.gpus_per_worker > 0

    def redacted(self) -> dict:
        """The recipe with defaults filled in, every interpolated value put back as its `${VAR}` reference."""
        d = self.model_dump(mode="json")
        for path, original in self._secrets.items():
            put_at(d, path, original)
        if not d["train"]["callbacks"]:  # none: said by its absence, as recipes written before the key say it
            del d["train"]["callbacks"]
        return d

    def line_of(self, dotted: str) -> int | None:
        """Line in the recipe file of a dotted key path (or of its nearest given parent)."""
        return key_line(self._lines, tuple(dotted.split(".")))

    def to_yaml(self) -> str:
        return yaml.dump(self.redacted(), Dumper=_Dumper, sort_keys=False, allow_unicode=True)

    def snapshot_yaml(self) -> str:
        """The recipe as run, for the job folder: defaults filled in, secrets as `${VAR}`, local paths absolute
        (so that it loads the same data from anywhere)."""
        d = self.redacted()
        for split in ("train", "validation", "test"):
            src = getattr(self.data, split)
            if src is not None and src.path is not None and ("data", split) not in self._secrets \
                    and ("data", split, "path") not in self._secrets:
                try:
                    d["data"][split]["path"] = str(self.resolve_path(src.path))
                except (OSError, ValueError, RuntimeError):  # no file system takes it: kept as written
                    pass
        try:
            local = self.resolve_path(self.model.name)
            here = local.exists()
        except (OSError, ValueError, RuntimeError):  # a name no file system takes: a hub id then
            here = False
        if here and ("model", "name") not in self._secrets:
            d["model"]["name"] = str(local)
        return yaml.dump(d, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


class _Dumper(yaml.SafeDumper):
    """safe_dump that writes a value met twice out twice: a recipe may hold no aliases (see _yaml_limits)."""

    def ignore_aliases(self, data) -> bool:
        return True


# Names other tools use for our keys: "did you mean" knows them even where the spelling is far.
def key_line(lines: dict, path: tuple) -> int | None:
    """The line of a key path in the recipe file (or of its nearest given parent)."""
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return None


def put_at(d: dict, path: tuple, value: Any) -> None:
    """Set the value at a key path of a dumped recipe (a source given as a plain string: its path)."""
    for part in path[:-1]:
        d = d[int(part)] if isinstance(d, list) else d[part]
    last = path[-1]
    if isinstance(d, list):
        d[int(last)] = value
    elif isinstance(d.get(last), dict) and "path" in d[last]:  # a source given as a plain string
        d[last]["path"] = value
    else:
        d[last] = value
