"""A recipe's model files: where they are (a local folder, or a hub id in the local cache, fetched where allowed)
and its tokenizer. Used by pre-flight, the memory estimate and the driver."""

from __future__ import annotations

import os
from pathlib import Path

from jobs.jobdir import first_line
from jobs.recipe import Problem
from jobs.schema import Recipe


def resolve_model(recipe: Recipe) -> tuple[str | None, Problem | None]:
    """Where the model's files are: a local folder, or the hub id once its config is in the local cache."""
    name, rev = recipe.model.name, recipe.model.revision
    local = recipe.resolve_path(name)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if local.exists():
        if not (local / "config.json").exists():
            return None, Problem("model.name", f"{name}: the folder has no config.json; point at a folder written "
                                               f"by save_pretrained, or at a hub id")
        return str(local), None
    if looks_local:
        return None, Problem("model.name", f"{name}: no such folder (looked for {local})")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=rev)
    if isinstance(cached, str):
        return name, None
    fix = f"hf download {name}" + (f" --revision {rev}" if rev != "main" else "")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return None, Problem("model.name", f"'{name}' (revision '{rev}') is not in the local cache "
                                           f"({_hf_home()}) and HF_HUB_OFFLINE=1; fetch it once with: {fix}")
    from huggingface_hub import hf_hub_download

    token = recipe.model.token.get_secret_value() if recipe.model.token else None
    try:
        hf_hub_download(name, "config.json", revision=rev, token=token, etag_timeout=10)
    except Exception as e:  # not found, gated, or no network: all mean the job cannot start
        reason = first_line(e, 500)
        return None, Problem("model.name", f"'{name}' (revision '{rev}') cannot be fetched from the hub: {reason}. "
                                           f"Check the id, set model.token for a gated model, or fetch it with: {fix}")
    return name, None


def load_tokenizer(recipe: Recipe, model_path: str):
    from transformers import AutoTokenizer

    token = recipe.model.token.get_secret_value() if recipe.model.token else None
    local_only = Path(model_path).exists() or os.environ.get("HF_HUB_OFFLINE") == "1" or _cached(recipe)
    tok = AutoTokenizer.from_pretrained(model_path, revision=recipe.model.revision, token=token,
                                        trust_remote_code=recipe.model.trust_remote_code,
                                        local_files_only=local_only)
    if recipe.data.chat_template:
        tok.chat_template = recipe.data.chat_template
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _cached(recipe: Recipe) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(recipe.model.name, "config.json", revision=recipe.model.revision), str)


def _hf_home() -> str:
    from huggingface_hub import constants

    return constants.HF_HOME
