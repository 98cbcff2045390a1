"""The memory pre-flight against figures worked by hand, and its refusal through `runner validate` and `submit`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

from jobs.memory import GIB, Shape, estimate, model_shape, suggestions
from jobs.recipe import parse_recipe

# Llama-2-7B's published config; 6,738,415,616 parameters is the figure Meta gives
LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, dtype="float16")
N7B = 6_738_415_616


def recipe(tuning="full", resources="gpus_per_worker: 1, mixed_precision: bf16", train="batch_size: 1",
           dtype="float32", seq=512):
    return parse_recipe(f"name: m\nmodel: {{name: x, dtype: {dtype}}}\ntask: causal_lm\n"
                        f"data: {{train: a.jsonl, max_seq_len: {seq}}}\ntuning: {tuning}\ntrain: {{{train}}}\n"
                        f"resources: {{{resources}}}\n", source="r.yaml")


@pytest.fixture(scope="module")
def llama7b():
    return model_shape(recipe(), LlamaConfig(**LLAMA7B))


def test_shape_of_llama_7b_from_its_config_alone(llama7b):
    assert llama7b.params == N7B
    # each decoder layer: q, k, v, o (4 x 4096^2) + gate, up, down (3 x 4096 x 11008) + 2 norms
    assert llama7b.layer_params == 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096 == 202_383_360
    assert llama7b.linear == 32 * (4 * 4096**2 + 3 * 4096 * 11008)  # embeddings, head and norms excluded
    assert (llama7b.layers, llama7b.hidden, llama7b.intermediate, llama7b.vocab) == (32, 4096, 11008, 32000)
    assert llama7b.layer_class == "LlamaDecoderLayer" and llama7b.dtype == "float16"


def test_full_fine_tune_fp32_weights_bf16_autocast_one_gpu(llama7b):
    e = estimate(recipe(), llama7b)
    assert e.weights == 4 * N7B and e.gradients == 4 * N7B and e.optimizer == 8 * N7B  # AdamW: 2 fp32 states
    assert e.overhead == GIB + 2 * N7B  # CUDA context, and autocast's bf16 copies of the weights
    # 512 tokens x 32 layers x (17 x 4096 + 4.25 x 11008) values of 2 bytes
    assert e.activations == 512 * 32 * (17 * 4096 + 4.25 * 11008)
    assert e.logits == 512 * 32000 * (2 + 4 + 4 + 4)  # bf16 logits, fp32 copy, log-softmax, gradient
    assert 115 < e.gib() < 117  # 18 bytes a parameter: the well-known "a 7B model needs ~120 GB to fine-tune"


def test_checkpointing_keeps_only_layer_inputs(llama7b):
    e = estimate(recipe(resources="gpus_per_worker: 1, mixed_precision: bf16, gradient_checkpointing: true",
                        train="batch_size: 8"), llama7b)
    tokens = 8 * 512
    assert e.activations == 32 * tokens * 4096 * 2 + tokens * (17 * 4096 + 4.25 * 11008)


def test_zero_and_fsdp_divide_as_the_zero_paper_says():
    # ZeRO paper, figure 1: 7.5B parameters, Adam with mixed precision (K = 12), 64 GPUs:
    # baseline 120 GB, ZeRO-2 ("Pos+g") 16.6 GB, ZeRO-3 ("Pos+g+p") 1.9 GB
    psi = 7_500_000_000
    shape = Shape(params=psi, linear=psi, head=0, layers=0, hidden=1, intermediate=1, vocab=0, layer_params=0,
                  dtype="float16", last_layer_params=[], adafactor_rows_cols=0)

    def states(res):
        e = estimate(recipe(resources=f"workers: 64, gpus_per_worker: 1, mixed_precision: bf16, {res}",
                            dtype="auto"), shape)
        return (e.weights + e.gradients + e.optimizer) / 1e9

    assert states("strategy: deepspeed, zero_stage: 2") == pytest.approx(2 * 7.5 + 14 * 7.5 / 64)  # 16.64
    assert states("strategy: deepspeed, zero_stage: 3") == pytest.approx(16 * 7.5 / 64)  # 1.875


def test_fsdp_shards_the_states_and_gathers_one_layer_at_a_time(llama7b):
    one = estimate(recipe(), llama7b)
    eight = estimate(recipe(resources="workers: 8, gpus_per_worker: 1, mixed_precision: bf16, strategy: fsdp"),
                     llama7b)
    assert eight.weights == one.weights / 8 and eight.optimizer == one.optimizer / 8
    assert eight.gradients == one.gradients / 8
    # two bf16 layers (in use and prefetched) instead of autocast's copies of all the weights
    assert eight.overhead == GIB + 2 * 202_383_360 * 2 and one.overhead == GIB + 2 * N7B


def test_lora_and_qlora_of_llama_7b(llama7b):
    lora = estimate(recipe("{mode: lora, r: 8}", dtype="float16"), llama7b)
    # r x (in + out) for q, k, v, o in 32 layers: 8 x 32 x 4 x 8192
    assert lora.trainable == 8 * 32 * 4 * (4096 + 4096) == 8_388_608
    assert lora.weights == 2 * N7B + 4 * lora.trainable  # fp16 base, fp32 adapters
    assert lora.optimizer == 8 * lora.trainable
    q = estimate(recipe("{mode: qlora, r: 8}", dtype="float16"), llama7b)
    linear = 32 * (4 * 4096**2 + 3 * 4096 * 11008)
    per = 0.5 + 1 / 64 + 4 / (64 * 256)  # nf4 + double-quantized absmax constants (blocks of 64, then 256)
    assert q.weights == pytest.approx(linear * per + (N7B - linear) * 4 + 4 * q.trainable)
    assert 4.5 < q.gib() < 6.5  # QLoRA's paper: a 7B model fine-tunes in about 5-6 GB at this length


def test_one_gpu_too_small_is_told_how_many_fsdp_workers_would_do(llama7b):
    fits = suggestions(recipe(), llama7b, 80 * GIB)
    fsdp = [s for s in fits if "fsdp" in s]
    # 7B, fp32 weights: 16 bytes a parameter / 2 = 50 GiB + activations; over 2 GPUs it fits 80 GiB
    assert fsdp and fsdp[0].startswith("resources.strategy: fsdp with resources.workers: 2 (about")


def test_suggestions_name_what_would_fit(llama7b):
    r = recipe(train="batch_size: 16", resources="workers: 4, gpus_per_worker: 1, mixed_precision: bf16")
    fits = suggestions(r, llama7b, 80 * GIB)
    assert any(s.startswith("resources.strategy: fsdp") for s in fits)
    assert any(s.startswith("tuning: lora") for s in fits)
    assert not any(s.startswith("resources.gradient_checkpointing") for s in fits)  # 7B x 18 bytes > 80 GiB anyway
    for s in fits:
        assert float(s.rsplit("about ", 1)[1].split(" GiB")[0]) <= 80


def _cli(args, env):
    runner = str(Path(sys.executable).with_name("runner"))  # the installed command, every verb registered
    return subprocess.run([runner, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def one_b_model(tmp_path_factory):
    """A 1.2B-parameter Llama: its config and tokenizer only, no weights (none are needed for the estimate)."""
    from tests.tiny import tiny_tokenizer

    d = tmp_path_factory.mktemp("m") / "llama-1b"
    tok = tiny_tokenizer()
    LlamaConfig(hidden_size=2048, intermediate_size=5504, num_hidden_layers=22, num_attention_heads=16,
                num_key_value_heads=16, vocab_size=32000, pad_token_id=tok.pad_token_id).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_validate_shows_the_estimate_and_validate_and_submit_refuse_what_will_not_fit(one_b_model, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i} of the data"}) + "\n" for i in range(20)))
    base = (f"name: big\nmodel: {{name: {one_b_model}, dtype: float32}}\ntask: causal_lm\n"
            f"data: {{train: {data}, max_seq_len: 256}}\ntuning: full\ntrain: {{batch_size: 8}}\n")
    env = {**os.environ, "RUNNER_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    fits = tmp_path / "fits.yaml"
    fits.write_text(base + "resources: {gpus_per_worker: 1, mixed_precision: bf16, gpu_memory_gib: 80}\n")
    out = _cli(["validate", str(fits), "--json"], env)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert 18 < report["memory"]["total_gib"] < 40
    shown = [n for n in report["notes"] if n.startswith("memory: about")]  # what validate prints as "note: ..."
    assert shown and "per GPU" in shown[0] and "trainable" in shown[0]

    small = tmp_path / "small.yaml"
    small.write_text(base + "resources: {gpus_per_worker: 1, mixed_precision: bf16, gpu_memory_gib: 16}\n")
    for verb in ("validate", "submit"):
        out = _cli([verb, str(small)], env)
        assert out.returncode == 2, out.stdout + out.stderr
        assert "resources.gpu_memory_gib: will not fit: needs about" in out.stderr
        assert "more than the 16.0 GiB of each GPU" in out.stderr and "tuning: lora (about" in out.stderr
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "home" / "local.json").exists()  # submit refused before any server or Ray started

    # LoRA fits 16 GiB; with a typo in its tuning section, the data is still read but no estimate is made of the
    # full fine-tune that stands in for the section: the typo is the one problem
    typo = tmp_path / "typo.yaml"
    typo.write_text(base.replace("tuning: full", "tuning: {mode: lora, rank: 8}")
                    + "resources: {gpus_per_worker: 1, mixed_precision: bf16, gpu_memory_gib: 16}\n")
    report = json.loads(_cli(["validate", str(typo), "--json"], env).stdout)
    assert [p["path"] for p in report["problems"]] == ["tuning.rank"] and report["rows"], report


# --- the GPUs of a remote cluster ---------------------------------------------------------------------------------

A10G = {"index": 0, "name": "NVIDIA A10G", "uuid": "GPU-1", "memoryUsed": 0, "memoryTotal": 23028}


def test_ray_node_summary_gives_each_nodes_smallest_gpu():
    from runner.dispatch import apply_node_summary

    nodes = {i: {"id": i} for i in ("head", "g1", "g2")}
    apply_node_summary(nodes, [  # the shape of Ray 2.60's /nodes?view=summary
        {"raylet": {"nodeId": "head", "isHeadNode": True}, "hostname": "h", "ip": "10.0.0.2",
         "mem": [64 * GIB, 60 * GIB, 6.2, 4 * GIB], "gpus": []},
        {"raylet": {"nodeId": "g1", "isHeadNode": False}, "hostname": "gpu-1", "ip": "10.0.0.5",
         "mem": [192 * GIB, 180 * GIB, 6.2, 12 * GIB],
         "gpus": [{**A10G, "index": i} for i in range(4)] + [{**A10G, "index": 4, "name": "small", "memoryTotal": 8000}]},
        {"raylet": {"nodeId": "elsewhere"}, "gpus": [A10G]},  # a node Ray's state API no longer lists
    ])
    assert nodes["head"]["host"] == "h" and nodes["head"]["head"] and "gpu_memory_bytes" not in nodes["head"]
    assert nodes["g1"]["gpu_name"] == "small" and nodes["g1"]["gpu_memory_bytes"] == 8000 * 2**20
    assert nodes["g1"]["host"] == "gpu-1" and nodes["g1"]["head"] is False and "host" not in nodes["g2"]


class GpuCluster:
    """Ray at the edge: one node of 4 A10Gs, as the server's backend sees it."""

    def nodes(self):
        from runner.queue import Node

        return [Node("g1", 48, 4)]

    def details(self):
        return {"nodes": [{"id": "g1", "host": "gpu-1", "held": [], "gpu_name": "NVIDIA A10G",
                           "gpu_memory_bytes": 23028 * 2**20}]}

    def submit(self, *a, **k):
        raise AssertionError("nothing may be submitted")

    def status(self, sid):
        return "RUNNING", ""

    def stop(self, sid):
        pass


def test_submit_to_a_remote_server_checks_against_its_clusters_gpus(one_b_model, tmp_path):
    from fastapi.testclient import TestClient

    from runner.server import create_app
    from tests.web import served

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i} of the data"}) + "\n" for i in range(20)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: big\nmodel: {{name: {one_b_model}, dtype: float32}}\ntask: causal_lm\n"
                      f"data: {{train: {data}, max_seq_len: 256}}\ntuning: full\ntrain: {{batch_size: 8}}\n"
                      "resources: {gpus_per_worker: 1, mixed_precision: bf16}\n")  # no gpu_memory_gib
    app = create_app(tmp_path / "server", backend=GpuCluster(), interval=3600)
    with served(app) as url:
        env = {**os.environ, "RUNNER_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "RUNNER_SERVER": url}
        out = _cli(["submit", str(recipe)], env)
        status = _cli(["cluster", "status"], env)
    assert "GPUs 4/4  (NVIDIA A10G, 22.5 GiB each)" in status.stdout, status.stdout + status.stderr
    assert out.returncode == 2, out.stdout + out.stderr
    assert "resources: will not fit: needs about 25" in out.stderr
    assert "more than the 22.5 GiB of each GPU (the cluster's smallest GPU, NVIDIA A10G)" in out.stderr
    assert "tuning: lora (about" in out.stderr
    with TestClient(app) as c:
        assert c.get("/jobs").json()["total"] == 0
