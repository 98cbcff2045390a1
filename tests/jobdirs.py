"""Job folders laid out as training leaves them, without Ray: model/ (weights, tokenizer, labels.json), prepared/ (the
tokenized splits, written by jobs.driver.prepare_data) and recipe.yaml. For the export and comparison tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tiny import keyword_rows, tiny_model_dir


def make_job(tmp_path: Path, model_dir: Path, task: str, rows: list[dict], extra: str = "",
             name: str = "job") -> tuple[Path, object]:
    """<tmp_path>/<name>: a job folder whose model/ is a copy of model_dir, over rows (split by the recipe)."""
    from jobs.driver import prepare_data
    from jobs.recipe import parse_recipe

    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = parse_recipe(f"name: e\nmodel:\n  name: {model_dir}\ntask: {task}\ndata:\n  train: {data.name}\n"
                          f"  max_seq_len: 128\n{extra}", base_dir=tmp_path, env={})
    job = tmp_path / name
    job.mkdir()
    (job / "recipe.yaml").write_text(recipe.snapshot_yaml())
    shutil.copytree(model_dir, job / "model")
    prepare_data(recipe, job, str(model_dir))
    labels = json.loads((job / "prepared" / "labels.json").read_text())
    if labels:
        (job / "model" / "labels.json").write_text(json.dumps(labels))
    return job, recipe


def with_export(recipe, **export):
    return recipe.model_copy(update={"export": recipe.export.model_copy(update={"onnx": True, **export})})


def trained_classifier(d: Path, tokenizer, epochs: int = 6, labels: tuple[str, str] = ("neg", "pos")) -> Path:
    """A tiny BERT classifier trained in-process on keyword_rows until it tells 'good' from 'bad' (epochs=0: the
    untrained one, at chance), saved to d."""
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig

    from jobs.data import tokenize_example
    from jobs.recipe import parse_recipe

    tiny_model_dir(d, "bert", tokenizer)
    cfg = BertConfig.from_pretrained(d)
    cfg.num_labels, cfg.id2label = 2, dict(enumerate(labels))
    cfg.label2id = {n: i for i, n in enumerate(labels)}
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg)
    recipe = parse_recipe("name: x\nmodel:\n  name: m\ntask: classification\ndata:\n  train: t.jsonl\n", env={})
    rows = [tokenize_example(recipe, tokenizer, r, {"neg": 0, "pos": 1}) for r in keyword_rows(256, seed=7)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for epoch in range(epochs):
        for i in range(0, len(rows), 16):
            part = rows[i:i + 16]
            w = max(len(r["input_ids"]) for r in part)
            ids = torch.tensor([r["input_ids"] + [0] * (w - len(r["input_ids"])) for r in part])
            mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (w - len(r["input_ids"])) for r in part])
            loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([r["labels"] for r in part])).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    model.save_pretrained(d)
    return d
