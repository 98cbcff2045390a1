"""Every strategy and precision of the recipe on a real GPU, through `runner run` (Ray Train + Accelerate).

One GPU here, so one worker: what these show is that each strategy's Accelerate set-up trains, checkpoints (sharded
where it shards), resumes, gathers the model for saving and exports; more workers only change the world size.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny import tiny_model_dir, tiny_tokenizer

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
TEXT = [f"the {a} {b} sits by the {c} and sings of {d} {e}" for a, b, c, d, e in
        zip(*(["red", "blue", "old", "small", "green", "quiet", "bright", "cold"] * 8 for _ in range(5)))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    return tiny_model_dir(d / "m", "llama", tiny_tokenizer(), weights=True)


def run(tmp_path: Path, model_dir: Path, resources: str, tuning: str = "full", export: bool = False,
        faults: dict | None = None, train: str = "") -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": TEXT[i % len(TEXT)] + f" {i}"}) + "\n" for i in range(96)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: gpu\nmodel: {{name: {model_dir}, dtype: float32}}\ntask: causal_lm\n"
        f"data: {{train: {data}, max_seq_len: 32}}\ntuning: {tuning}\n"
        f"train: {{max_steps: 8, batch_size: 8, lr: 0.001, eval_every: 4, checkpoint_every: 4{train}"
        + (f", callbacks: [{{use: 'jobs.faults:Faults', args: {json.dumps(faults)}}}]" if faults else "") + "}\n"
        f"resources: {{workers: 1, gpus_per_worker: 1, cpus_per_worker: 2, {resources}}}\n"
        f"export: {{onnx: {str(export).lower()}, max_quality_drop: 10}}\n")
    env = {**os.environ, "RUNNER_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-m", "runner.cli", "run", str(recipe)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return next((tmp_path / "home" / "artifacts").iterdir())


def trained(job: Path, model_dir: Path) -> None:
    """model/ loads with from_pretrained, differs from where it started, and gpu memory was recorded."""
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(job / "model").state_dict()
    changed = [k for k in before if not torch.equal(before[k].float(), after[k].float())]
    assert changed, "the saved model equals the base model"
    steps = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines() if '"split"' not in x]
    assert len({s["step"] for s in steps}) == 8 and all(s["gpu_mem_gib"] > 0 for s in steps)
    lr = {s["step"]: s["lr"] for s in steps}  # the last record of a step: a resumed run's
    want = [0.001 * (8 - (s - 1)) / 8 for s in range(1, 9)]  # linear from 0.001, no warm-up, by hand
    assert [lr[s] for s in range(1, 9)] == pytest.approx(want, rel=1e-9), "the recipe's schedule, step by step"
    assert json.loads((job / "eval.json").read_text())["test"]["loss"] > 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_ddp(tmp_path, model_dir, precision):
    job = run(tmp_path, model_dir, f"mixed_precision: {precision}")
    trained(job, model_dir)
    assert f"1 worker on GPUs: one process, no gradient exchange; mixed precision {precision}" in \
        (job / "train.log").read_text()


def test_fsdp_with_checkpointing_shards_checkpoints_and_gathers_for_export(tmp_path, model_dir):
    job = run(tmp_path, model_dir, "strategy: fsdp, mixed_precision: bf16, gradient_checkpointing: true",
              export=True)
    trained(job, model_dir)
    log = (job / "train.log").read_text()
    assert "with FSDP full shard" in log and "gradient checkpointing" in log
    ckpts = sorted((job / "checkpoints").rglob("state.json"))
    assert ckpts, "no sharded checkpoint"
    shards = list(ckpts[0].parent.rglob("*.distcp"))
    assert shards, f"no torch.distributed.checkpoint shards in {ckpts[0].parent}"
    assert (job / "onnx" / "model.onnx").exists()
    assert json.loads((job / "onnx" / "export_report.json").read_text())


def test_fsdp_resumes_from_its_sharded_checkpoint(tmp_path, model_dir):
    job = run(tmp_path, model_dir, "strategy: fsdp, mixed_precision: bf16, max_failures: 1",
              faults={"crash_after_step": 4})
    assert "resumed from checkpoint at step 4" in (job / "train.log").read_text()
    trained(job, model_dir)


@pytest.mark.parametrize("stage,precision", [(2, "bf16"), (3, "fp16")])
def test_deepspeed(tmp_path, model_dir, stage, precision):
    pytest.importorskip("deepspeed")
    job = run(tmp_path, model_dir, f"strategy: deepspeed, zero_stage: {stage}, mixed_precision: {precision}",
              train=", grad_accum: 2")
    trained(job, model_dir)
    assert f"DeepSpeed ZeRO stage {stage}" in (job / "train.log").read_text()


def test_qlora_trains_4bit_and_saves_a_plain_merged_model(tmp_path, model_dir):
    pytest.importorskip("bitsandbytes")
    job = run(tmp_path, model_dir, "mixed_precision: bf16", tuning="{mode: qlora, r: 8}")
    trained(job, model_dir)
    assert (job / "adapter" / "adapter_config.json").exists()
    cfg = json.loads((job / "model" / "config.json").read_text())
    assert "quantization_config" not in cfg  # merged into full-precision weights, ready for export
