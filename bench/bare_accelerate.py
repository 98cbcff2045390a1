"""The baseline for bench/overhead.py: the same training as the runner's, in one plain Accelerate process, no Ray.

Same model, same tokenized data (jobs.data), same optimizer, schedule, batch, steps, one evaluation at the end and
the model saved. Usage: python bench/bare_accelerate.py RECIPE OUT_DIR
"""


import json
import random
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModelForSequenceClassification

from jobs import data as D
from jobs.modelfiles import load_tokenizer
from jobs.recipe import load_recipe
from jobs.evaluation import collate, per_example_loss
from jobs.train import make_optimizer, make_schedule


def main(recipe_path: str, out: str) -> None:
    r = load_recipe(recipe_path)
    acc = Accelerator(cpu=True)
    torch.manual_seed(r.train.seed)
    splits = D.load_splits(r)
    labels = D.label_names(r, splits["train"])
    ids = {n: i for i, n in enumerate(labels)}
    tok = load_tokenizer(r, r.model.name)
    train = D.tokenize_split(r, tok, splits["train"], ids)
    test = D.tokenize_split(r, tok, splits["test"], ids)
    model = AutoModelForSequenceClassification.from_pretrained(r.model.name, num_labels=len(labels))
    opt = make_optimizer(model, r)
    sched = make_schedule(opt, r, r.train.max_steps)
    model, opt, sched = acc.prepare(model, opt, sched)
    order, step, bs = [], 0, r.train.batch_size
    while step < r.train.max_steps:
        if len(order) < bs:
            order += random.Random(step).sample(range(len(train)), len(train))
        rows = [train[j] for j in order[:bs]]
        order = order[bs:]
        loss = per_example_loss(model, collate(rows, tok.pad_token_id, r.task, acc.device), r.task).mean()
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), r.train.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        step += 1
        if step == 1:
            first_step_done = time.perf_counter()
    loop_s = time.perf_counter() - first_step_done  # steps 2..N, as the runner's figure is taken
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), 32):
            rows = [test[j] for j in range(i, min(i + 32, len(test)))]
            b = collate(rows, tok.pad_token_id, r.task, acc.device)
            pred = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
            correct += (pred == b["labels"]).sum().item()
    acc.unwrap_model(model).save_pretrained(Path(out) / "model")
    print(f"bare: {step} steps, test accuracy {correct / len(test):.4f}, steps 2-{step} took {loop_s:.1f} s")
    print(json.dumps({"loop_s": loop_s}))


if __name__ == "__main__":
    main(*sys.argv[1:])
