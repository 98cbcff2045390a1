"""Training on a real Ray cluster (one per module) with tiny models built from config."""

import json
import os
import random
from pathlib import Path

import pytest

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_DEDUP_LOGS"] = "0"

ray = pytest.importorskip("ray")

from jobs.driver import run_job  # noqa: E402
from tiny import WORDS, faults, keyword_rows  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=150 * 2**20, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tokenizer):
    from tiny import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("m") / "bert", "bert", tokenizer, weights=True)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer):
    from tiny import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("m") / "llama", "llama", tokenizer, weights=True)


def job(tmp_path: Path, model: Path, body: str, task: str = "classification", rows=None, name="t") -> Path:
    if rows is not None:
        (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = tmp_path / "job"
    d.mkdir()
    from jobs.recipe import parse_recipe

    r = parse_recipe(f"name: {name}\nmodel:\n  name: {model}\ntask: {task}\n{body}", base_dir=tmp_path, env={})
    (d / "recipe.yaml").write_text(r.snapshot_yaml())
    return d


def metrics(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


def linear_lr(step: int, total: int, warmup: int, peak: float) -> float:
    """The lr the update of 1-based `step` uses under a linear schedule with warm-up, by hand: transformers'
    get_linear_schedule_with_warmup after step - 1 updates (0 at the first warm-up step, 0 after the last)."""
    k = step - 1
    return peak * k / warmup if k < warmup else peak * max(0.0, (total - k) / (total - warmup))


def train_records(d: Path) -> dict[int, dict]:
    """The last record of each step (a resumed run writes the steps after its checkpoint again)."""
    return {m["step"]: m for m in metrics(d) if "split" not in m}


@pytest.fixture(scope="module")
def still_bert_dir(tmp_path_factory, tokenizer):
    """The tiny BERT classifier, its head included (no random head at load), with every dropout off: runs over the
    same rows must then end with the same weights."""
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig

    from tiny import tiny_model_dir

    d = tiny_model_dir(tmp_path_factory.mktemp("m") / "still", "bert", tokenizer, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    cfg = BertConfig.from_pretrained(d)
    cfg.num_labels, cfg.id2label, cfg.label2id = 2, {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    cfg.problem_type = "single_label_classification"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(d)
    return d


def one_process_reference(model_dir: Path, job_dir: Path, steps: list[list[int]], total: int, warmup: int,
                          lr: float) -> dict:
    """The same training in one process with plain PyTorch and transformers' own scheduler, stepped once per
    update: AdamW (no weight decay), the mean cross-entropy of each step's rows, clipping at 1.0, the job's tokenized
    rows in the order its run recorded. The reference the runner's weights are held to."""
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    rows = datasets.load_from_disk(str(job_dir / "prepared" / "data"))["train"]
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(opt, warmup, total)
    model.train()
    for idx in steps:
        part = [rows[i] for i in idx]
        width = max(len(r["input_ids"]) for r in part)
        ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in part])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in part])
        logits = model(input_ids=ids, attention_mask=mask).logits
        torch.nn.functional.cross_entropy(logits, torch.tensor([r["labels"] for r in part])).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad()
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_workers_and_accumulation_change_the_speed_not_the_result(tmp_path, still_bert_dir):
    """What data parallelism promises, checked against one process: 2 workers x batch 4 x accumulation 2 and 1
    worker x batch 16 take the same 16 rows a step in the same order, so with dropout off they must follow the same
    learning-rate schedule (the recipe's, by hand: linear with 25% warm-up), the same losses, and end with the same
    weights as each other and as plain PyTorch with transformers' scheduler over those rows (one_process_reference).
    (A job that diverges, its loss no longer finite, is test_dispatch's job c.) The 2-worker run also shows real data parallelism: each row once an
    epoch across the ranks, both ranks training on different rows, identical weights on both."""
    from safetensors.torch import load_file

    rows = keyword_rows(103)
    runs = {}
    for name, (workers, batch, accum) in {"ddp": (2, 4, 2), "one": (1, 16, 1)}.items():
        (tmp_path / name).mkdir()
        d = job(tmp_path / name, still_bert_dir, "data:\n  train: data.jsonl\n  max_seq_len: 16\n"
                f"train:\n  epochs: 2\n  batch_size: {batch}\n  grad_accum: {accum}\n  lr: 0.003\n"
                f"  warmup_ratio: 0.25\n  eval_every: 1000\n"
                + faults(record_seen="seen", record_weights=workers == 2)
                + f"resources:\n  workers: {workers}\n", rows=rows)
        run_job(d)
        runs[name] = d
    d = runs["ddp"]
    assert "2 workers, data-parallel" in (d / "train.log").read_text()
    n_train = json.loads((d / "manifest.json").read_text())["rows"]["train"]
    by_epoch: dict = {}
    for rank in (0, 1):
        for line in Path(f"{d / 'seen'}.{rank}").read_text().splitlines():
            epoch, *idx = map(int, line.split())
            by_epoch.setdefault(epoch, []).extend(idx)
    assert sorted(by_epoch) == [0, 1]
    for epoch, idx in by_epoch.items():
        assert sorted(idx) == list(range(n_train)), f"epoch {epoch}: every row once, none twice"
    ranks = [Path(f"{d / 'seen'}.{r}").read_text() for r in (0, 1)]
    assert ranks[0] != ranks[1] and all(ranks)  # both ranks trained, on different rows
    assert (d / "weights.0.sha256").read_text() == (d / "weights.1.sha256").read_text()

    total = 2 * -(-n_train // 16)
    warmup = round(0.25 * total)
    want = [linear_lr(s, total, warmup, 0.003) for s in range(1, total + 1)]
    for name, d in runs.items():
        recs = train_records(d)
        assert sorted(recs) == list(range(1, total + 1)), name
        got = [recs[s]["lr"] for s in range(1, total + 1)]
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), f"{name}: lr by step {got} != the schedule's {want}"
    losses = {name: [train_records(d)[s]["loss"] for s in range(1, total + 1)] for name, d in runs.items()}
    weights = {name: load_file(d / "model" / "model.safetensors") for name, d in runs.items()}
    steps = [list(map(int, line.split()))[1:] for line in Path(f"{runs['one'] / 'seen'}.0").read_text().splitlines()]
    assert len(steps) == total
    weights["reference"] = one_process_reference(still_bert_dir, runs["one"], steps, total, warmup, 0.003)
    for name in ("ddp", "reference"):
        if name != "reference":
            assert losses[name] == pytest.approx(losses["one"], rel=1e-4), name
        worst = max((weights[name][k] - weights["one"][k]).abs().max().item() for k in weights["one"])
        assert worst < 2e-5, f"{name} ends {worst:.2e} away from one worker with the whole batch"


def test_classifier_learns_and_saves_everything(tmp_path, bert_dir):
    d = job(tmp_path, bert_dir, "data:\n  train: data.jsonl\n  max_seq_len: 16\n"
            "train:\n  epochs: 6\n  batch_size: 8\n  lr: 0.003\n  eval_every: 10\n  keep_checkpoints: 1\n"
            "export:\n  onnx: true\n", rows=keyword_rows(240))
    result = run_job(d)
    steps = [m for m in metrics(d) if "split" not in m]
    first, last = steps[0]["loss"], sum(m["loss"] for m in steps[-5:]) / 5
    assert last < first * 0.5, (first, last)
    assert result["test"]["accuracy"] >= 0.9 and result["test"]["macro_f1"] >= 0.9
    assert {"step", "epoch", "loss", "lr", "samples_per_s", "tokens_per_s"} <= set(steps[0])
    ev = json.loads((d / "eval.json").read_text())
    assert ev["selected_by"] == "validation accuracy"
    # the weights kept, by hand from the evaluations: the best accuracy, of those the lowest loss (accuracy levels
    # off at its best on 20 validation rows: ties are the rule, and the earliest tie was kept before)
    evals = [m for m in metrics(d) if m.get("split") == "validation"]
    top = max(e["accuracy"] for e in evals)
    tied = [e for e in evals if e["accuracy"] == top]
    assert ev["best_step"] == min(tied, key=lambda e: (e["loss"], -e["step"]))["step"], (evals, ev["selection"])
    assert ev["selection"]["step"] == ev["best_step"] and f"validation accuracy {top:.4g}" in ev["selection"]["why"]
    assert len(tied) < 2 or f"reached at {len(tied)} evaluations" in ev["selection"]["why"]
    assert f"kept the weights of step {ev['best_step']} of {ev['steps']}" in (d / "train.log").read_text()
    # the baseline, by hand: the majority label of the train split the job cut, scored on its test split
    import datasets

    split = datasets.load_from_disk(str(d / "prepared" / "data"))
    train_y, test_y = split["train"]["labels"], split["test"]["labels"]
    majority = max(set(train_y), key=lambda y: (train_y.count(y), -y))
    assert ev["baseline"]["accuracy"] == pytest.approx(test_y.count(majority) / len(test_y))
    assert ev["baseline"]["beaten"] and ev["baseline"]["verdict"].startswith(f"test accuracy {ev['test']['accuracy']:.4g} "
                                                                             "beats predicting the majority class")
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(d / "model")
    assert m.config.id2label == {0: "neg", 1: "pos"}
    man = json.loads((d / "manifest.json").read_text())
    paths = {f["path"] for f in man["files"]}
    assert {"model/model.safetensors", "model/config.json", "eval.json", "metrics.jsonl", "recipe.yaml"} <= paths
    assert all(len(f["sha256"]) == 64 for f in man["files"]) and man["versions"]["torch"]
    assert len(list((d / "checkpoints").glob("checkpoint_2*"))) == 1  # keep_checkpoints: the last one
    # the job's export: checked, reported, in the manifest, its table in train.log
    assert man["export"]["passed"] and man["export"]["checks"]["fp32_parity"]["prediction_mismatches"] == 0
    assert {"onnx/model.onnx", "onnx/model.quantized.onnx", "onnx/export_report.json"} <= paths
    assert man["export"]["variants"]["onnx_int8_dynamic"]["accuracy"] >= 0.9
    assert "onnx_int8_dynamic" in (d / "train.log").read_text() and "export_s" in man["timings"]


def test_regression_error_falls_and_freeze(tmp_path, bert_dir):
    rng = random.Random(1)
    rows = []
    for _ in range(200):
        k = rng.randint(0, 4)
        rows.append({"text": " ".join(["good"] * k + rng.sample(WORDS, 3)), "label": float(k)})
    d = job(tmp_path, bert_dir, "data:\n  train: data.jsonl\n  max_seq_len: 16\n"
            "tuning:\n  mode: freeze\n  train_last_layers: 1\n"
            "train:\n  epochs: 5\n  batch_size: 8\n  lr: 0.01\n", task="regression", rows=rows)
    run_job(d)
    evals = [m for m in metrics(d) if m.get("split") == "validation"]
    assert evals[-1]["mse"] < evals[0]["mse"]
    import datasets  # the baseline by hand: the train split's mean target, scored on the test split

    split = datasets.load_from_disk(str(d / "prepared" / "data"))
    mean = sum(split["train"]["labels"]) / len(split["train"])
    mse = sum((mean - y) ** 2 for y in split["test"]["labels"]) / len(split["test"])
    base = json.loads((d / "eval.json").read_text())["baseline"]
    assert base["mean"] == pytest.approx(mean) and base["mse"] == pytest.approx(mse) and base["beaten"]
    log = (d / "train.log").read_text()
    assert "trainable of" in log
    assert "1 worker on CPUs: one process, no gradient exchange" in log, "no DistributedDataParallel of one"


@pytest.mark.parametrize("fmt", ["text", "chat"])  # instruction rows: tokenized in test_data, exported in test_export
def test_causal_lm_formats(tmp_path, llama_dir, fmt):
    rows = {
        "text": [{"text": f"the {w} is near the {v}."} for w in WORDS for v in WORDS[:4]],
        "chat": [{"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]}
                 for w in WORDS] * 4,
    }[fmt]
    tracking = "tracking:\n  mode: offline\nexport:\n  onnx: true\n  quantize: none\n" if fmt == "text" else ""
    tuning = "lora" if fmt == "text" else "full"
    # the chat run recomputes activations in the backward pass (gradient checkpointing) and packs its examples
    # (train.packing): it must learn the same
    resources = "resources:\n  gradient_checkpointing: true\n" if fmt == "chat" else ""
    packing = "  packing: true\n" if fmt == "chat" else ""
    d = job(tmp_path, llama_dir, f"data:\n  train: data.jsonl\n  format: {fmt}\n  max_seq_len: 160\n"
            f"tuning: {tuning}\ntrain:\n  max_steps: 12\n  batch_size: 8\n  lr: 0.01\n  eval_every: 6\n{packing}"
            f"{tracking}{resources}", task="causal_lm", rows=rows)
    result = run_job(d)
    evals = [m for m in metrics(d) if m.get("split") == "validation"]
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert result["test"]["perplexity"] > 1
    # the baseline is the base model's own test loss, by hand: transformers' loss over the same tokenized rows
    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    nll = n = 0
    with torch.no_grad():
        for row in datasets.load_from_disk(str(d / "prepared" / "data"))["test"]:
            out = base_model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]]))
            k = sum(1 for y in row["labels"][1:] if y != -100)
            nll, n = nll + out.loss.item() * k, n + k
    base = json.loads((d / "eval.json").read_text())["baseline"]
    assert base["what"] == "the base model before tuning" and base["loss"] == pytest.approx(nll / n, rel=1e-4)
    assert base["beaten"] == (result["test"]["perplexity"] < base["perplexity"])
    assert (d / "adapter" / "adapter_config.json").exists() == (tuning == "lora")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(d / "model")  # merged: plain transformers
    assert ("gradient checkpointing" in (d / "train.log").read_text()) == (fmt == "chat")
    prepared = datasets.load_from_disk(str(d / "prepared" / "data"))
    manifest = json.loads((d / "manifest.json").read_text())
    if fmt == "chat":  # every train example once, packed; each pack within max_seq_len; the splits as they were
        packed = datasets.load_from_disk(str(d / "prepared" / "packed"))
        assert len(packed) < manifest["rows"]["train"] / 3 == len(prepared["train"]) / 3
        assert sorted(c for cs in packed["content"] for c in cs) == sorted(prepared["train"]["content"])
        assert max(packed["length"]) <= 160 and "position_ids" not in prepared["test"].column_names
        assert f"train: {manifest['rows']['train']} examples packed into {len(packed)} sequences" in \
            (d / "train.log").read_text()
        steps = [m for m in metrics(d) if "split" not in m]  # samples/s counts examples, not packs
        assert all(m["samples_per_s"] > 0 for m in steps)
    if fmt == "text":
        assert list((d / "wandb").glob("offline-run-*")), "W&B offline run written"
        # a LoRA job's checkpoint holds the adapter and its optimizer state, not the whole model
        ckpt = torch.load(sorted((d / "checkpoints").glob("checkpoint_*/state.pt"))[-1], weights_only=False)
        assert ckpt["model"] and all("lora_" in k for k in ckpt["model"]), sorted(ckpt["model"])[:5]
        assert len(ckpt["optimizer"]["state"]) == len(ckpt["model"])
        report = json.loads((d / "onnx" / "export_report.json").read_text())  # LoRA merged, then exported
        assert report["passed"] and report["checks"]["generation"]["passed"]


def warnings_of(d: Path) -> list[dict]:
    """Rank 0's warnings (warnings.jsonl, which the driver relays into events.jsonl as the job runs)."""
    path = d / "warnings.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_a_model_that_learns_nothing_says_so(tmp_path, bert_dir):
    """A learning rate far too small: the loss stays flat over the first epoch (an alarm at its last step, with what
    to try), and the model ends worse than predicting the train mean (a warning, and eval.json's verdict)."""
    rng = random.Random(2)
    rows = [{"text": " ".join(["good"] * k + rng.sample(WORDS, 3)), "label": float(k)}
            for k in (rng.randint(0, 4) for _ in range(200))]
    d = job(tmp_path, bert_dir, "data:\n  train: data.jsonl\n  max_seq_len: 16\n"
            "train:\n  epochs: 1\n  batch_size: 8\n  lr: 1.0e-9\n", task="regression", rows=rows)
    run_job(d)
    per_epoch = -(-json.loads((d / "manifest.json").read_text())["rows"]["train"] // 8)
    warned = {e["kind"]: e for e in warnings_of(d)}
    assert set(warned) == {"loss_flat", "baseline"}, warned
    assert warned["loss_flat"]["step"] == per_epoch and "Try a larger train.lr (now 1e-09)" in warned["loss_flat"]["message"]
    base = json.loads((d / "eval.json").read_text())["baseline"]
    assert not base["beaten"] and base["verdict"].startswith("test mse ") and \
        "is worse than predicting the mean of train" in base["verdict"]
    assert f"warning: the model does not beat its baseline: {base['verdict']}" in (d / "train.log").read_text()


def test_sharded_checkpoints_resume_and_gather(tmp_path, bert_dir):
    """Resume after a killed worker, no step lost or repeated beyond the checkpoint interval, on the path FSDP and
    DeepSpeed take (each rank saves its part with Accelerator.save_state, Ray gathers the parts into one checkpoint,
    the best weights are kept the same way and the model is gathered and saved from a CPU copy), run on CPUs with
    DDP, where Accelerate has no FSDP. Whole-model checkpoints resume in test_dispatch's lost-node test and
    test_cli_run's --resume."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    d = job(tmp_path, bert_dir, "data:\n  train: data.jsonl\n  max_seq_len: 16\n"
            "train:\n  epochs: 2\n  batch_size: 4\n  lr: 0.005\n  checkpoint_every: 4\n  eval_every: 4\n"
            "  warmup_ratio: 0.2\n" + faults(force_sharded=True, crash_after_step=6)
            + "resources:\n  workers: 2\n  max_failures: 1\n", rows=keyword_rows(120))
    result = run_job(d)
    assert (d / "crashed").read_text() == "6"
    assert "resumed from checkpoint at step 4 " in (d / "train.log").read_text()
    steps = [m["step"] for m in metrics(d) if "split" not in m]
    total = steps[-1]
    assert sorted(set(steps)) == list(range(1, total + 1)), "no step lost"
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    assert repeated == [5, 6], "only the steps after the last checkpoint run again"
    recs = train_records(d)  # the schedule goes on from the checkpoint's step, as if nothing had happened
    want = [linear_lr(s, total, round(0.2 * total), 0.005) for s in range(1, total + 1)]
    assert [recs[s]["lr"] for s in range(1, total + 1)] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert json.loads((d / "eval.json").read_text())["steps"] == total
    ckpts = [p.parent for p in (d / "checkpoints").rglob("state.json")]
    assert ckpts, "no sharded checkpoint"
    for ck in ckpts:  # both ranks' parts in the one folder
        assert (ck / "random_states_0.pkl").exists() and (ck / "random_states_1.pkl").exists(), sorted(ck.iterdir())
    assert (d / "best" / "state.json").exists() and not (d / "best" / "state.pt").exists()
    best = load_file(d / "best" / "model.safetensors")
    saved = AutoModelForSequenceClassification.from_pretrained(d / "model").state_dict()
    shared = [k for k in best if k in saved]
    assert len(shared) > 10
    for k in shared:  # the saved model is the best evaluation's weights, gathered
        assert (best[k].float() - saved[k].float()).abs().max() < 1e-6, k
    evals = {m["step"]: m for m in metrics(d) if m.get("split") == "validation"}  # a step's last: after the resume
    best = max(evals.values(), key=lambda e: (e["accuracy"], -e["loss"], e["step"]))  # the rule, by hand
    assert result["best_step"] == best["step"] and result["validation"]["loss"] == pytest.approx(best["loss"])
