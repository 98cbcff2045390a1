"""Model setup: load the base model for the task, then apply the tuning mode, each a small function in one table."""

from __future__ import annotations

import torch

from jobs.schema import Recipe

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Attention projections per architecture, for `target_modules: auto`.
LORA_TARGETS = {
    "bert": ["query", "key", "value"], "roberta": ["query", "key", "value"], "xlm-roberta": ["query", "key", "value"],
    "distilbert": ["q_lin", "k_lin", "v_lin"], "gpt2": ["c_attn"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"], "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"], "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"], "gpt_neox": ["query_key_value"], "opt": ["q_proj", "k_proj", "v_proj"],
}


def load_base(recipe: Recipe, model_path: str, label_names: list[str] | None, quantization_config=None):
    """The pretrained model with the right head: sequence classification, regression, or causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kw = dict(revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code,
              dtype=DTYPES[recipe.model.dtype])
    if recipe.model.token:
        kw["token"] = recipe.model.token.get_secret_value()
    if quantization_config is not None:
        kw["quantization_config"] = quantization_config
    if recipe.task == "causal_lm":
        return AutoModelForCausalLM.from_pretrained(model_path, **kw)
    if recipe.task == "regression":
        return AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1,
                                                                  problem_type="regression", **kw)
    return AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)}, problem_type="single_label_classification", **kw)


def head_names(model) -> list[str]:
    """Modules that are new for the task (the classification head) and must train in every mode."""
    return [n for n in ("pre_classifier", "classifier", "score") if hasattr(model, n)]


def tune_full(model, recipe: Recipe):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def tune_lora(model, recipe: Recipe):
    from peft import LoraConfig, TaskType, get_peft_model

    t = recipe.tuning
    targets = t.target_modules
    if targets == "auto":
        targets = LORA_TARGETS.get(model.config.model_type)
        if targets is None:
            raise ValueError(f"no default LoRA targets for architecture '{model.config.model_type}'; list them in "
                             f"tuning.target_modules")
    task_type = TaskType.CAUSAL_LM if recipe.task == "causal_lm" else TaskType.SEQ_CLS
    cfg = LoraConfig(r=t.r, lora_alpha=t.alpha, lora_dropout=t.dropout, target_modules=list(targets),
                     task_type=task_type, modules_to_save=head_names(model) or None)
    return get_peft_model(model, cfg)


def tune_qlora(model, recipe: Recipe):
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model)
    return tune_lora(model, recipe)


def tune_freeze(model, recipe: Recipe):
    for p in model.parameters():
        p.requires_grad_(False)
    for name in head_names(model):
        for p in getattr(model, name).parameters():
            p.requires_grad_(True)
    n = recipe.tuning.train_last_layers
    if n:
        layers = transformer_layers(model)
        for layer in layers[-n:]:
            for p in layer.parameters():
                p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("mode 'freeze' left nothing to train: this model has no task head; set train_last_layers")
    return model


TUNERS = {"full": tune_full, "lora": tune_lora, "qlora": tune_qlora, "freeze": tune_freeze}


def transformer_layers(model) -> list:
    """The repeated blocks of the backbone, in order (for `freeze.train_last_layers`)."""
    import torch.nn as nn

    best: list = []
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > len(best):
            best = list(mod)
    return best


def quantization_config(recipe: Recipe):
    if recipe.tuning.mode != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if recipe.resources.mixed_precision == "bf16" else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=recipe.tuning.quant_type,
                              bnb_4bit_use_double_quant=recipe.tuning.double_quant, bnb_4bit_compute_dtype=compute)


def build_model(recipe: Recipe, model_path: str, label_names: list[str] | None, pad_token_id: int | None = None,
                gradient_checkpointing: bool = False):
    """Base model + tuning mode. Returns (model, trainable parameter count, total parameter count)."""
    model = load_base(recipe, model_path, label_names, quantization_config(recipe))
    if gradient_checkpointing:  # non-reentrant: correct with frozen inputs (LoRA) and no_sync
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.20's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id
    model = TUNERS[recipe.tuning.mode](model, recipe)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return model, trainable, total


def merged(model):
    """The plain transformers model with any LoRA adapter merged into its weights."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
