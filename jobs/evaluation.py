"""Batches, losses and the figures of an evaluation: what the training loop (jobs/train.py), the comparison with
the champion (jobs/compare.py) and the bench scripts share. Every figure is the task's: accuracy and macro-F1, mean
squared and absolute error, or a causal LM's per-token loss and perplexity; and the trivial baseline on the same
test rows, which a model must beat."""

from __future__ import annotations

import math

import torch

from jobs.data import column, predicted_tokens
from jobs.jobdir import first_line
from jobs.schema import Recipe


def collate(rows: list[dict], pad_id: int, task: str, device) -> dict:
    """A batch's tensors, padded on the right. Packed rows (with `position_ids`: jobs.data.pack) get no attention
    mask, so that transformers separates their examples by where the positions restart; their padding continues
    as one more example of its own, which no real token attends to and no label counts."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    out = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if "position_ids" in rows[0]:
        pos = torch.arange(width).repeat(len(rows), 1)
        for i, r in enumerate(rows):
            pos[i, : len(r["position_ids"])] = torch.tensor(r["position_ids"])
            pos[i, len(r["position_ids"]):] = torch.arange(width - len(r["position_ids"]))
        out["position_ids"], out["attention_mask"] = pos.to(device), None
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


MODEL_COLUMNS = ("input_ids", "labels", "position_ids", "units")


def model_view(ds):
    """The dataset with only the columns a batch needs (made once: a narrowed dataset costs datasets a fingerprint)."""
    return ds.select_columns([c for c in MODEL_COLUMNS if c in ds.column_names])


def fetch(ds, idx: list[int]) -> list[dict]:
    """The rows `idx` of a tokenized dataset (best a model_view), the columns a batch needs, in one Arrow take (not
    row by row)."""
    cols = ds[list(idx)]
    keep = [c for c in MODEL_COLUMNS if c in cols]
    return [dict(zip(keep, vals)) for vals in zip(*(cols[c] for c in keep))]


def units(row: dict, task: str) -> int:
    """What the loss is averaged over: examples, or predicted tokens for a causal LM."""
    if task != "causal_lm":
        return 1
    if "units" in row:
        return int(row["units"])
    return predicted_tokens(row["labels"])  # a row tokenized before the units column


def forward(model, batch: dict):
    """The model's logits for a batch of collate's; a packed batch with its position ids and no cache (transformers
    looks for packed examples only then)."""
    if batch["attention_mask"] is None:
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def per_example_loss(model, batch: dict, task: str) -> torch.Tensor:
    """Summed loss of each row of the batch (a causal LM: summed over its predicted tokens; a packed row: over
    all of its examples')."""
    return losses_from_logits(forward(model, batch).float(), batch["labels"], task)


EVAL_BATCH_TIMES = 4  # evaluation batches are this many times train.batch_size (no gradients, no optimizer state)


@torch.no_grad()
def evaluate(model, ds, recipe: Recipe, pad_id: int, acc, batch_size: int, n_labels: int = 0) -> dict:
    """Metrics of `ds`, each rank scoring a shard, gathered so every rank holds the same numbers. The rows go
    longest first (so a batch pads little: the figures are per row, so the order changes none of them), dealt to
    the ranks in turn, fetched a batch at a time."""
    import numpy as np

    model.eval()
    rank, world = acc.process_index, acc.num_processes
    lengths = column(ds, "length") if "length" in ds.column_names else \
        np.fromiter((len(x) for x in ds["input_ids"]), dtype=np.int64, count=len(ds))
    mine = np.argsort(-lengths, kind="stable")[rank::world]
    # a causal LM's logits grow with the vocabulary: its batches hold at most the padded tokens of two training
    # batches at full length (what evaluation held before batches grew), so shorter rows go in larger batches
    tokens = 2 * recipe.train.batch_size * recipe.data.max_seq_len if recipe.task == "causal_lm" else None
    records, view = [], model_view(ds)
    for part in _batches(mine, lengths, batch_size, tokens):
        scored = score_records(model, fetch(view, part), recipe.task, pad_id, acc.device, acc.autocast, len(part))
        records += [(part[j], *rest) for j, *rest in scored]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    records.sort()
    model.train()
    labels = column(ds, "labels").tolist() if recipe.task != "causal_lm" else []  # records hold every row, in order
    return metrics(records, labels, recipe.task, n_labels)


def _batches(order, lengths, rows: int, tokens: int | None) -> list[list[int]]:
    """`order` (longest first) cut into batches of at most `rows` rows and, where given, `tokens` padded tokens."""
    out, i = [], 0
    while i < len(order):
        width = max(1, int(lengths[order[i]]))
        n = rows if tokens is None else max(1, min(rows, tokens // width))
        out.append([int(j) for j in order[i:i + n]])
        i += n
    return out


@torch.no_grad()
def packing_problem(model) -> str | None:
    """Whether the model keeps packed examples apart (train.packing): example b after example a in one row, with
    position ids restarting at b, must give b the logits it gives alone. None when it does; else what is wrong.
    A model whose attention ignores position ids (OPT, Bloom, MPT, remote code) lets b see a, and is refused."""
    model_type = getattr(model.config, "model_type", "?")
    try:
        vocab = model.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError, TypeError):
        vocab = getattr(model.config, "vocab_size", 0)
    if not vocab:
        return f"model type '{model_type}': cannot check that it keeps packed examples apart (no vocabulary size)"
    a, b = [(7 * k + 3) % vocab for k in range(5)], [(11 * k + 5) % vocab for k in range(4)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        alone = model(input_ids=torch.tensor([b], device=device), use_cache=False).logits[0].float()
        ids = torch.tensor([a + b], device=device)
        packed = model(input_ids=ids, position_ids=torch.tensor([list(range(5)) + list(range(4))], device=device),
                       use_cache=False).logits[0, 5:].float()
        leaked = model(input_ids=ids, use_cache=False).logits[0, 5:].float()  # what seeing a would give
    except Exception as e:  # a model whose forward takes no position ids, or none without a mask
        return f"model type '{model_type}': cannot check that it keeps packed examples apart ({first_line(e)})"
    finally:
        model.train(was_training)
    off, leak = (packed - alone).abs().max().item(), (leaked - alone).abs().max().item()
    if off <= 0.1 * leak or off <= 1e-4 * max(1.0, alone.abs().max().item()):
        return None
    return (f"model type '{model_type}' does not keep packed examples apart (its "
            f"attention ignores the position ids that mark them: an example's logits moved by {off:.3g} when "
            f"another came before it in the row)")


@torch.no_grad()
def score_records(model, rows: list[dict], task: str, pad_id: int, device, autocast, batch_size: int) -> list:
    """(row index, summed loss, units, prediction) of each row: what `metrics` reduces. autocast: a context
    manager factory (the Accelerator's, or contextlib.nullcontext)."""
    records = []
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        batch = collate(part, pad_id, task, device)
        with autocast():
            logits = forward(model, batch).float()
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
    import numpy as np

    p, y = np.asarray(preds, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    k = n_labels or int(max(p.max(initial=0), y.max(initial=0)) + 1)
    tp = np.bincount(y[p == y], minlength=k)
    wrong = np.bincount(p, minlength=k) + np.bincount(y, minlength=k) - 2 * tp  # FP + FN
    seen = tp + wrong > 0
    f1 = 2 * tp[seen] / (2 * tp[seen] + wrong[seen])
    return {"accuracy": int((p == y).sum()) / len(y),
            "macro_f1": sum(f1.tolist()) / len(f1) if seen.any() else 0.0}  # Python's sum: the former figure


def baseline(task: str, train_labels: list, test_labels: list, n_labels: int) -> dict:
    """What a model that learned nothing from the text scores on the test rows: the majority class of train
    (its loss: the train label frequencies, add-one smoothed, as the prediction), or the mean of train's targets.
    A causal LM's baseline is the base model's own test figures before tuning, measured by the loop."""
    if task == "classification":
        import numpy as np

        train_y, test_y = np.asarray(train_labels, dtype=np.int64), np.asarray(test_labels, dtype=np.int64)
        counts = np.bincount(train_y, minlength=max(n_labels, 1 + int(max(train_y.max(initial=0),
                                                                            test_y.max(initial=0)))))
        majority = int(np.argmax(counts))  # the first of the most frequent: ties to the lower class
        prior = ((counts + 1) / (len(train_y) + len(counts))).tolist()
        nll = [-math.log(p) for p in prior]  # each class's loss, summed as Python sums (the former figure)
        loss = sum(nll[y] for y in test_y.tolist()) / len(test_y)
        return {"what": "predicting the majority class of train", "majority": majority, "loss": loss,
                **class_figures(np.full(len(test_y), majority), test_y, n_labels), "examples": len(test_y)}
    import numpy as np

    train_y = np.asarray(train_labels, dtype=np.float64).tolist()
    mean = sum(train_y) / len(train_y)
    err = (mean - np.asarray(test_labels, dtype=np.float64)).tolist()
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
