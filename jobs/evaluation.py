"""Batches, losses and the figures of an evaluation: what the training loop (jobs/train.py), the comparison with
the champion (jobs/compare.py) and the bench scripts share. Every figure is the task's: accuracy and macro-F1, mean
squared and absolute error, or a causal LM's per-token loss and perplexity; and the trivial baseline on the same
test rows, which a model must beat."""

from __future__ import annotations

import math

import torch

from jobs.schema import Recipe


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
    return losses_from_logits(logits, batch["labels"], task)


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
        losses = losses_from_logits(logits, batch["labels"], task)
        preds = logits.argmax(-1).tolist() if task == "classification" else \
            logits.squeeze(-1).tolist() if task == "regression" else [None] * len(part)
        for j, (row, loss, p) in enumerate(zip(part, losses.tolist(), preds)):
            records.append((i + j, loss, units(row, task), p))
    return records


def losses_from_logits(logits, y, task):
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
        return {"loss": sum(r[1] for r in records) / n, **class_figures(preds, labels, n_labels), "examples": n}
    if task == "regression":
        err = [r[3] - float(y) for r, y in zip(records, labels)]
        mse = sum(e * e for e in err) / n
        return {"loss": mse, "mse": mse, "mae": sum(abs(e) for e in err) / n, "examples": n}
    tokens = sum(r[2] for r in records)
    loss = sum(r[1] for r in records) / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": tokens, "examples": n}


def class_figures(preds: list[int], labels: list[int], n_labels: int) -> dict:
    """Accuracy, and macro-F1 over the classes that occur among labels or predictions (F1 = 2TP / (2TP+FP+FN))."""
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
                **class_figures([majority] * len(test_labels), [int(y) for y in test_labels], n_labels),
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
