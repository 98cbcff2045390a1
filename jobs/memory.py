"""Memory pre-flight: how much memory each GPU of a job will hold, from the model's config alone.

No weights are read: the model is built on PyTorch's meta device from its config, which gives exact parameter counts
and shapes for any architecture transformers knows. The figure is the sum of parts a person can check by hand:

    weights      every parameter, in the dtype it is loaded in (4-bit linear layers for QLoRA)
    gradients    one per trainable parameter
    optimizer    AdamW 2 states, SGD 1 (momentum), Adafactor factored row and column statistics
    activations  what the forward pass keeps for the backward one; per layer and token 17 h + 4.25 I values
                 (Korthikanti et al. 2022 give 34 h for an MLP of 4 h; attention scores are not kept, as
                 transformers' SDPA kernels keep none); with gradient checkpointing only each layer's input
    logits       a causal LM's seq x batch x vocab scores: the model's, their fp32 copy, log-softmax and gradient
    overhead     CUDA context and allocator slack (1 GiB), DDP's gradient buckets, FSDP / ZeRO-3 gathered layers

Sharding follows the ZeRO paper (Rajbhandari et al. 2020): with mixed precision DeepSpeed keeps 16-bit weights and
gradients and 12 bytes of fp32 master weights and Adam states per trainable parameter; ZeRO-2 divides gradients and
optimizer by the workers, ZeRO-3 and FSDP (full shard) divide everything.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field

from jobs.schema import Recipe

GIB = 2**30
CONTEXT_BYTES = 1 * GIB  # CUDA context, cuBLAS workspaces and allocator slack, seen as 0.5-1 GiB on H100s
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Shape:
    """What the estimate needs to know of a model, read from its config on the meta device."""

    params: int  # all parameters, tied ones once
    linear: int  # parameters of the decoder's linear layers (what QLoRA quantizes; heads excluded)
    head: int  # the task head for classification / regression (trains in every mode)
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    layer_params: int  # parameters of the largest repeated block (FSDP / ZeRO-3 gather one at a time)
    dtype: str  # the checkpoint's own dtype (what `model.dtype: auto` loads)
    lora: dict = field(default_factory=dict)  # target name -> parameters of LoRA rank 1 on those modules
    last_layer_params: list = field(default_factory=list)  # parameters of each block, in order
    adafactor_rows_cols: int = 0  # sum of rows + columns of the 2-D parameters
    layer_class: str | None = None
    model_type: str = ""


@dataclass
class Estimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    overhead: float
    params: int
    trainable: int
    workers: int
    per: str  # "GPU" or "worker"
    notes: list = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.overhead

    def gib(self) -> float:
        return self.total / GIB

    def words(self) -> str:
        parts = [("weights", self.weights), ("gradients", self.gradients), ("optimizer", self.optimizer),
                 ("activations", self.activations), ("logits", self.logits), ("overhead", self.overhead)]
        shown = ", ".join(f"{name} {v / GIB:.1f}" for name, v in parts if v)
        return (f"about {self.gib():.1f} GiB per {self.per} ({shown}); {self.params / 1e6:,.0f}M parameters, "
                f"{self.trainable / 1e6:,.2f}M trainable")

    def to_json(self) -> dict:
        return {**asdict(self), "total": self.total, "total_gib": round(self.gib(), 2)}


def model_shape(recipe: Recipe, config) -> Shape:
    """Build the model of `config` on the meta device (no memory, no weights) and measure it."""
    import torch
    import torch.nn as nn
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from jobs.model import head_names, transformer_layers

    with torch.device("meta"):
        if recipe.task == "causal_lm":
            model = AutoModelForCausalLM.from_config(config)
        else:
            labels = 1 if recipe.task == "regression" else max(2, len(recipe.data.labels or []) or 2)
            config.num_labels = labels
            model = AutoModelForSequenceClassification.from_config(config)
    heads = {n for n in head_names(model)}
    out_emb = model.get_output_embeddings() if recipe.task == "causal_lm" else None
    params = sum(p.numel() for p in model.parameters())
    linear = 0
    lora: dict[str, int] = {}
    for name, mod in model.named_modules():
        top = name.split(".")[0]
        if isinstance(mod, nn.Linear) and top not in heads and mod is not out_emb:
            linear += mod.weight.numel()
            leaf = name.rsplit(".", 1)[-1]
            lora[leaf] = lora.get(leaf, 0) + mod.in_features + mod.out_features
    head = sum(p.numel() for n in heads for p in getattr(model, n).parameters())
    blocks = transformer_layers(model)
    block_params = [sum(p.numel() for p in b.parameters()) for b in blocks]
    rows_cols = sum(sum(p.shape) if p.ndim == 2 else p.numel() for p in model.parameters())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None) or getattr(text, "d_model")
    inter = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    dtype = getattr(config, "dtype", None) or "float32"
    dtype = str(dtype).replace("torch.", "")
    return Shape(params=params, linear=linear, head=head, layers=len(blocks), hidden=hidden, intermediate=inter,
                 vocab=getattr(text, "vocab_size", 0), layer_params=max(block_params, default=0),
                 dtype=dtype if dtype in BYTES else "float32", lora=lora, last_layer_params=block_params,
                 adafactor_rows_cols=rows_cols, layer_class=type(blocks[0]).__name__ if blocks else None,
                 model_type=config.model_type)


def estimate(recipe: Recipe, shape: Shape) -> Estimate:
    """Peak memory of one GPU (or, on CPUs, one worker) for `recipe` on a model of `shape`."""
    res, t, mode = recipe.resources, recipe.train, recipe.tuning.mode
    world = res.workers
    mixed = res.mixed_precision in ("bf16", "fp16")
    notes: list[str] = []
    loaded = shape.dtype if recipe.model.dtype == "auto" else recipe.model.dtype
    w = BYTES[loaded]
    n = shape.params

    # --- what trains ---------------------------------------------------------------------------------------------
    if mode in ("lora", "qlora"):
        targets = recipe.tuning.target_modules
        if targets == "auto":
            from jobs.model import LORA_TARGETS

            targets = LORA_TARGETS.get(shape.model_type, [])
        trainable = recipe.tuning.r * sum(shape.lora.get(k, 0) for k in targets) + shape.head
        adapter_bytes = 4  # peft keeps adapters in fp32 over a 16-bit base (autocast_adapter_dtype)
    elif mode == "freeze":
        k = recipe.tuning.train_last_layers
        trainable = shape.head + sum(shape.last_layer_params[-k:] if k else [])
        adapter_bytes = w
    else:
        trainable = n
        adapter_bytes = w

    # --- weights -------------------------------------------------------------------------------------------------
    if mode == "qlora":
        per_param = 0.5 + (1 / 64 + 4 / (64 * 256) if recipe.tuning.double_quant else 4 / 64)
        # prepare_model_for_kbit_training casts what is not quantized (embeddings, norms, head) to fp32
        weights = shape.linear * per_param + (n - shape.linear) * 4 + trainable * adapter_bytes
    elif mode == "lora":
        weights = n * w + trainable * adapter_bytes
    else:
        weights = n * w
    grad_b = adapter_bytes if mode in ("lora", "qlora") else w
    gradients = trainable * grad_b
    if t.optimizer == "adamw":
        optimizer = 2 * trainable * grad_b
    elif t.optimizer == "sgd":
        optimizer = trainable * grad_b
    else:
        optimizer = 4 * shape.adafactor_rows_cols * (trainable / n)
    overhead = CONTEXT_BYTES if recipe.needs_gpu else 0
    # autocast's cache of 16-bit copies of the trainable weights (DDP; FSDP and DeepSpeed cast themselves)
    autocast_cache = 2 * trainable if mixed and w == 4 and mode in ("full", "freeze") else 0

    # --- sharding ------------------------------------------------------------------------------------------------
    gathered = 2 * shape.layer_params * (2 if mixed else w)  # one layer in use, the next prefetched
    if res.strategy == "deepspeed" and recipe.needs_gpu:
        base = n * (2 if mixed else w) if mode != "qlora" else weights - trainable * adapter_bytes
        lora_w = trainable * (2 if mixed else 4) if mode in ("lora", "qlora") else 0
        gradients = trainable * (2 if mixed else 4)
        optimizer = trainable * (12 if mixed else 8)  # fp32 master weights (mixed only) and Adam's two states
        weights = base + lora_w
        gradients, optimizer = gradients / world, optimizer / world
        if res.zero_stage == 3:
            weights = weights / world + gathered
        overhead += 2 * 50_000_000 * 2  # reduce and all-gather buckets (5e7 elements each, 16-bit)
        notes.append(f"DeepSpeed ZeRO-{res.zero_stage or 2} over {world} worker(s)")
    elif res.strategy == "fsdp" and recipe.needs_gpu:
        weights, gradients, optimizer = weights / world, gradients / world, optimizer / world
        overhead += gathered
        notes.append(f"FSDP full shard over {world} worker(s)")
    else:
        overhead += autocast_cache
        if world > 1:
            overhead += gradients  # DDP's gradient buckets: a second copy of the gradients

    # --- activations ---------------------------------------------------------------------------------------------
    a = 2 if mixed or w == 2 else 4
    tokens = t.batch_size * recipe.data.max_seq_len
    layer_full = tokens * (17 * shape.hidden + 4.25 * shape.intermediate) * a / 2
    layer_input = tokens * shape.hidden * a
    checkpointing = res.gradient_checkpointing or mode == "qlora"  # peft turns it on for k-bit training
    if mode == "freeze":
        k = recipe.tuning.train_last_layers
        activations = k * (layer_input if checkpointing else layer_full) + (layer_full if checkpointing and k else 0)
    elif checkpointing:
        activations = shape.layers * layer_input + layer_full
    else:
        activations = shape.layers * layer_full
    logits = tokens * shape.vocab * (a + (4 if a == 2 else 0) + 4 + 4) if recipe.task == "causal_lm" else 0
    return Estimate(weights=weights, gradients=gradients, optimizer=optimizer, activations=activations,
                    logits=logits, overhead=overhead, params=n, trainable=trainable, workers=world,
                    per="GPU" if recipe.needs_gpu else "worker", notes=notes)


def suggestions(recipe: Recipe, shape: Shape, capacity: float) -> list[str]:
    """Changes to the recipe that would fit `capacity` bytes per GPU, each with its estimate; the mildest first."""
    res, t = recipe.resources, recipe.train
    tries: list[tuple[str, Recipe]] = []

    def with_(what: str, tuning: dict | None = None, **changes) -> None:
        d = recipe.model_dump()
        if tuning is not None:
            d["tuning"] = tuning
        for dotted, v in changes.items():
            sec, key = dotted.split("__")
            d[sec][key] = v
        tries.append((what, Recipe.model_validate(d)))

    if not res.gradient_checkpointing:
        with_("resources.gradient_checkpointing: true", resources__gradient_checkpointing=True)
    b = t.batch_size
    while b > 1:
        b //= 2
        with_(f"train.batch_size: {b} with train.grad_accum: {t.grad_accum * t.batch_size // b} (the same "
              f"effective batch)", train__batch_size=b, train__grad_accum=t.grad_accum * t.batch_size // b)
    if res.workers > 1 and res.strategy == "ddp":
        with_("resources.strategy: fsdp", resources__strategy="fsdp")
        with_("resources.strategy: deepspeed with zero_stage: 3", resources__strategy="deepspeed",
              resources__zero_stage=3)
    elif res.workers == 1 and recipe.needs_gpu and recipe.tuning.mode != "qlora":
        for n in (2, 4, 8):  # sharding over more GPUs: the fewest that fit
            before = len(tries)
            with_(f"resources.strategy: fsdp with resources.workers: {n}", resources__strategy="fsdp",
                  resources__workers=n)
            if estimate(tries[-1][1], shape).total <= capacity:
                break
            del tries[before:]
    if recipe.tuning.mode in ("full", "freeze"):
        with_("tuning: lora", tuning={"mode": "lora"})
    if recipe.tuning.mode in ("full", "freeze", "lora") and recipe.needs_gpu:
        with_("tuning: qlora", tuning={"mode": "qlora"})
    out = []
    for what, r in tries:
        est = estimate(r, shape)
        if est.total <= capacity:
            out.append(f"{what} (about {est.gib():.1f} GiB)")
    return out


def local_gpu_bytes() -> float | None:
    """The memory of the first GPU this process sees, or None."""
    try:
        import torch

        if torch.cuda.is_available():
            return float(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # noqa: BLE001 - no usable CUDA means no local figure
        return None
    return None


def check(recipe: Recipe, model_path: str) -> tuple[Estimate, str | None, str | None]:
    """(estimate, problem or None, note or None) for a recipe whose model config is at `model_path`."""
    from transformers import AutoConfig

    token = recipe.model.token.get_secret_value() if recipe.model.token else None
    config = AutoConfig.from_pretrained(model_path, revision=recipe.model.revision, token=token,
                                        trust_remote_code=recipe.model.trust_remote_code)
    shape = model_shape(recipe, config)
    est = estimate(recipe, shape)
    if not recipe.needs_gpu:
        return est, None, None
    given = recipe.resources.gpu_memory_gib
    cluster = os.environ.get("RUNNER_CLUSTER_GPU_MEMORY_GIB")  # `runner submit`: the server's smallest GPU
    if given:
        capacity, where = given * GIB, "resources.gpu_memory_gib"
    elif cluster:
        capacity = float(cluster) * GIB
        where = f"the cluster's smallest GPU, {os.environ.get('RUNNER_CLUSTER_GPU_NAME') or 'unnamed'}"
    else:
        capacity, where = local_gpu_bytes(), "the local GPU"
    if capacity is None:
        return est, None, ("the GPUs' memory is not known here, so the estimate was not checked; set "
                           "resources.gpu_memory_gib to have validate and submit check it")
    if est.total <= capacity:
        return est, None, None
    fits = suggestions(recipe, shape, capacity)
    hint = ("; would fit: " + "; or ".join(fits[:4])) if fits else \
        "; none of gradient checkpointing, a smaller batch, FSDP / ZeRO-3 or (Q)LoRA alone brings it under"
    return est, (f"needs {est.words()}, more than the {capacity / GIB:.1f} GiB of each GPU ({where}){hint}"), None


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.memory RECIPE`: print the estimate as JSON (for benchmarks)."""
    from jobs.modelfiles import resolve_model
    from jobs.recipe import load_recipe

    import argparse

    ap = argparse.ArgumentParser(prog="python -m jobs.memory", description="Each GPU's peak memory, estimated.")
    ap.add_argument("recipe")
    recipe = load_recipe(ap.parse_args(argv).recipe)
    path, problem = resolve_model(recipe)
    if problem:
        print(problem.message, file=sys.stderr)
        return 2
    est, problem, note = check(recipe, path)
    print(json.dumps({**est.to_json(), "problem": problem, "note": note}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
