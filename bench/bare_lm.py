"""The baseline of bench/gpu_check.sh: a causal-LM recipe's training steps in one plain Accelerate process, no Ray.

Same model and tuning (jobs.model.build_model), same tokenized rows, optimizer, schedule, batch and precision, the
loss read back each step as the runner does. Usage: python bench/bare_lm.py RECIPE STEPS; last line JSON with
tokens_per_s (steps after the first few) and peak_gib (torch's peak allocation on the GPU).
"""


import json
import sys
import time

import torch
from accelerate import Accelerator

from jobs import data as D
from jobs.model import build_model
from jobs.modelfiles import load_tokenizer
from jobs.recipe import load_recipe
from jobs.evaluation import collate, per_example_loss, units
from jobs.train import make_optimizer, make_schedule


def main(path: str, steps: str) -> None:
    r = load_recipe(path)
    n_steps = int(steps)
    acc = Accelerator(mixed_precision=r.resources.mixed_precision)
    torch.manual_seed(r.train.seed)
    tok = load_tokenizer(r, r.model.name)
    train = D.tokenize_split(r, tok, D.load_splits(r)["train"])
    model, _, _ = build_model(r, r.model.name, None, tok.pad_token_id)
    opt = make_optimizer(model, r)
    sched = make_schedule(opt, r, n_steps)
    model, opt, sched = acc.prepare(model, opt, sched)
    model.train()
    bs, times, tokens = r.train.batch_size, [], []
    for step in range(n_steps):
        t0 = time.perf_counter()
        rows = [train[(step * bs + i) % len(train)] for i in range(bs)]
        batch = collate(rows, tok.pad_token_id, r.task, acc.device)
        with acc.autocast():
            loss = per_example_loss(model, batch, r.task).sum() / max(1, sum(units(x, r.task) for x in rows))
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), r.train.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
        tokens.append(sum(len(x["input_ids"]) for x in rows))
    skip = min(5, n_steps // 3)
    print(json.dumps({"tokens_per_s": sum(tokens[skip:]) / sum(times[skip:]),
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0}))


if __name__ == "__main__":
    main(*sys.argv[1:])
