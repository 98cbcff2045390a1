"""From the recipe to Accelerate: the distributed strategy, mixed precision and memory savers of each worker.

`distribution()` is plain data, what an `accelerate config` file would hold for the recipe, so each strategy and
precision is checked without a GPU; `make_accelerator()` builds the Accelerator from it inside a Ray Train worker,
where Ray has already made the process group.

    ddp        a whole copy of the model on each GPU; gradients all-reduced (skipped on all but the last
               micro-batch of a step)
    fsdp       FSDP2 full shard: weights, gradients and optimizer states sharded; each decoder layer (the model's
               own layer class) one unit; checkpoints sharded (each rank writes its part); the whole model is
               gathered on rank 0 only to save and export it
    deepspeed  ZeRO stage 2 (gradients and optimizer states sharded) or 3 (weights as well); DeepSpeed clips the
               gradients, keeps fp32 master weights and scales fp16 losses itself

Mixed precision: bf16 autocast, or fp16 with dynamic loss scaling (Accelerate's GradScaler for ddp and fsdp,
DeepSpeed's own scaler). Gradient checkpointing: transformers' (non-reentrant) for ddp and deepspeed, FSDP's
activation checkpointing of each unit for fsdp.
"""

from __future__ import annotations

from jobs.schema import Recipe

BUCKET = 50_000_000  # DeepSpeed reduce / all-gather bucket, in elements (its default of 5e8 holds 1 GB in bf16)


def distribution(recipe: Recipe, layer_classes: list[str] | None = None, gpu: bool | None = None) -> dict:
    """The Accelerate set-up for `recipe`; `layer_classes` are the model's decoder layer classes (FSDP units);
    `gpu` False trains on CPUs whatever the recipe asks (a worker holding a GPU that CUDA cannot see)."""
    res, t = recipe.resources, recipe.train
    gpu = recipe.needs_gpu if gpu is None else gpu
    strategy = res.strategy if gpu else "ddp"  # check_recipe refuses fsdp / deepspeed without GPUs
    out: dict = {
        "strategy": strategy,
        "cpu": not gpu,
        "mixed_precision": res.mixed_precision,
        "loss_scaling": "dynamic" if res.mixed_precision == "fp16" else None,
        # transformers' checkpointing, set on the model before prepare (FSDP checkpoints its units instead)
        "model_gradient_checkpointing": res.gradient_checkpointing and strategy != "fsdp",
        # skip the gradient all-reduce on all but the last micro-batch (DDP only; ZeRO and FSDP reduce-scatter)
        "no_sync": strategy == "ddp",
        # each rank saves its own part with Accelerator.save_state; the whole model is gathered to save it
        "sharded": strategy in ("fsdp", "deepspeed"),
        # DeepSpeed's backward divides the loss by its gradient_accumulation_steps; the loop's loss is already a
        # step's share, so it is multiplied back
        "loss_multiplier": t.grad_accum if strategy == "deepspeed" else 1,
        "clip_by_engine": strategy == "deepspeed",
    }
    if strategy == "fsdp":
        out["fsdp"] = {
            "fsdp_version": 2,
            "reshard_after_forward": True,  # full shard: weights are gathered per unit, freed after use
            "auto_wrap_policy": "transformer_based_wrap",
            "transformer_cls_names_to_wrap": list(layer_classes or []),
            "state_dict_type": "SHARDED_STATE_DICT",
            "activation_checkpointing": res.gradient_checkpointing,
            "cpu_ram_efficient_loading": False,
        }
    if strategy == "deepspeed":
        stage = res.zero_stage or 2
        zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                      "reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET}
        if stage == 3:
            zero.update({"stage3_gather_16bit_weights_on_model_save": True, "stage3_prefetch_bucket_size": BUCKET,
                         "stage3_param_persistence_threshold": 100_000})
        out["deepspeed"] = {
            "zero_optimization": zero,
            "bf16": {"enabled": res.mixed_precision == "bf16"},
            "fp16": {"enabled": res.mixed_precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                     "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
            "gradient_clipping": t.max_grad_norm or 0.0,
            "gradient_accumulation_steps": t.grad_accum,
            "train_micro_batch_size_per_gpu": t.batch_size,
            "train_batch_size": t.batch_size * t.grad_accum * res.workers,
            "zero_allow_untested_optimizer": True,  # the recipe's torch optimizer, wrapped by ZeRO
            "steps_per_print": 10**9,
        }
    return out


def describe(p: dict, world: int, distributed: str = "NO") -> str:
    """The workers and how they share the work, in words, for the job's log. distributed: Accelerate's
    distributed type (one DDP worker should be "NO": no wrapper around the model)."""
    device = "CPUs" if p["cpu"] else "GPUs"
    name = {"ddp": "DDP", "fsdp": "FSDP full shard",
            "deepspeed": f"DeepSpeed ZeRO stage {p.get('deepspeed', {}).get('zero_optimization', {}).get('stage')}"}
    if world == 1 and p["strategy"] == "ddp":
        if distributed != "NO":
            return f"1 worker on {device}, wrapped for distribution ({distributed}) with no one to exchange with"
        return f"1 worker on {device}: one process, no gradient exchange"
    if world == 1:
        return f"1 worker on {device} with {name[p['strategy']]} (sharded checkpoints; nothing to exchange)"
    how = {"ddp": "each holds the whole model; gradients averaged across them every step",
           "fsdp": "weights, gradients and optimizer states sharded across them",
           "deepspeed": "optimizer states and gradients (and at stage 3 weights) sharded across them"}
    return f"{world} workers, data-parallel on {device}: {how[p['strategy']]} ({name[p['strategy']]})"


def layer_classes(model) -> list[str]:
    """The model's decoder layer classes: transformers' `_no_split_modules`, else the repeated block's class."""
    from jobs.model import transformer_layers

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft's wrapper
    names = list(getattr(base, "_no_split_modules", None) or [])
    if not names:
        blocks = transformer_layers(base)
        names = [type(blocks[0]).__name__] if blocks else []
    return names


def make_accelerator(p: dict):
    """The Accelerator of a plan."""
    import os

    from accelerate import Accelerator

    if p["cpu"]:  # Ray points Accelerate at cuda:N whenever the worker holds a GPU, real or (in tests) not
        os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    kw: dict = {"mixed_precision": p["mixed_precision"], "cpu": p["cpu"]}
    if "fsdp" in p:
        from accelerate.utils import FullyShardedDataParallelPlugin

        kw["fsdp_plugin"] = FullyShardedDataParallelPlugin(**p["fsdp"])
    if "deepspeed" in p:
        from accelerate.utils import DeepSpeedPlugin

        kw["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=p["deepspeed"])
    # One DDP worker has nothing to synchronise, but Ray Train sets LOCAL_RANK in every worker, and Accelerate then
    # wraps the model in a DistributedDataParallel of one (a copy of every gradient each step, for nothing)
    alone = p["strategy"] == "ddp" and os.environ.get("WORLD_SIZE", "1") == "1"
    hidden = {"LOCAL_RANK": os.environ.pop("LOCAL_RANK")} if alone and "LOCAL_RANK" in os.environ else {}
    try:
        return Accelerator(**kw)
    finally:
        os.environ.update(hidden)
