"""Tuning modes, optimizers and the data plan, on tiny models built from config (no Ray)."""

import pytest
import torch

from jobs.model import build_model, merged
from jobs.recipe import parse_recipe
from jobs.evaluation import per_example_loss
from jobs.train import epoch_plan, make_optimizer, make_schedule


def recipe(tuning: str, task: str = "classification", train: str = ""):
    return parse_recipe(f"name: t\nmodel:\n  name: x\ntask: {task}\ndata:\n  train: a.jsonl\ntuning: {tuning}\n"
                        f"{train}", env={})


@pytest.fixture(scope="module")
def bert(tmp_path_factory, tokenizer):
    from tiny import tiny_model_dir

    return str(tiny_model_dir(tmp_path_factory.mktemp("m") / "bert", "bert", tokenizer, weights=True))


def batch(tokenizer, n=4):
    enc = tokenizer(["good apple", "bad river stone", "good cloud", "bad"][:n], padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([1, 0, 1, 0][:n])}


def test_lora_trains_only_adapters_and_head_and_merges_to_identical_outputs(bert, tokenizer):
    model, trainable, total = build_model(recipe("{mode: lora, r: 4}"), bert, ["neg", "pos"], 0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "classifier" in n for n in names)
    assert any("lora_" in n for n in names) and trainable < total / 5
    with torch.no_grad():  # make the adapters non-trivial (B starts at zero)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.eval()
    b = batch(tokenizer)
    before = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    plain = merged(model)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    after = plain(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)


def test_freeze_trains_only_the_head_and_last_layers(bert):
    model, *_ = build_model(recipe("{mode: freeze}"), bert, ["neg", "pos"], 0)
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"classifier"}
    model, *_ = build_model(recipe("{mode: freeze, train_last_layers: 1}"), bert, ["neg", "pos"], 0)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("bert.encoder.layer.1.") for n in trained)
    assert not any(n.startswith(("bert.encoder.layer.0.", "bert.embeddings.")) for n in trained)


@pytest.mark.parametrize("opt", ["adamw", "sgd", "adafactor"])
def test_each_optimizer_lowers_the_loss(bert, tokenizer, opt):
    torch.manual_seed(0)
    lr = 0.1 if opt == "sgd" else 0.01  # plain SGD takes steps ten times larger than Adam's to move as far
    r = recipe("full", train=f"train:\n  optimizer: {opt}\n  lr: {lr}\n  max_steps: 20\n  schedule: cosine\n")
    model, *_ = build_model(r, bert, ["neg", "pos"], 0)
    optimizer = make_optimizer(model, r)
    sched = make_schedule(optimizer, r, 20)
    b = batch(tokenizer)
    losses = []
    for _ in range(20):
        loss = per_example_loss(model, b, "classification").mean()
        loss.backward()
        optimizer.step()
        sched.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9, (opt, losses[0], losses[-1])


@pytest.mark.parametrize("n,world,batch,accum", [(103, 2, 4, 2), (17, 2, 8, 1), (5, 4, 2, 1), (64, 3, 3, 3)])
def test_epoch_plan_covers_every_row_once_with_equal_step_counts(n, world, batch, accum):
    plan = epoch_plan(n, seed=7, epoch=0, world=world, batch=batch, accum=accum)
    rows = [j for step in plan for rank in step for micro in rank for j in micro]
    assert sorted(rows) == list(range(n))
    assert all(len(step) == world and all(len(r) == accum for r in step) for step in plan)
    assert all(len(m) <= batch for step in plan for r in step for m in r)
    assert epoch_plan(n, 7, 0, world, batch, accum) == plan
    assert epoch_plan(n, 7, 1, world, batch, accum) != plan  # a new order each epoch
