"""The mapping from a recipe to Accelerate's set-up, for each strategy and precision, and gradient checkpointing."""

import pytest
import torch

from jobs.recipe import RecipeError, parse_recipe
from jobs.strategy import distribution, make_accelerator


def recipe(resources: str = "", tuning: str = "full", train: str = "batch_size: 4, grad_accum: 2"):
    return parse_recipe(f"name: s\nmodel: {{name: m}}\ntask: causal_lm\ndata: {{train: a.jsonl}}\ntuning: {tuning}\n"
                        f"train: {{{train}}}\nresources: {{{resources}}}\n", source="r.yaml")


GPU2 = "workers: 2, gpus_per_worker: 1"


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_ddp_reduces_once_a_step_and_scales_fp16_losses(precision):
    p = distribution(recipe(f"{GPU2}, mixed_precision: {precision}"))
    assert (p["strategy"], p["cpu"], p["mixed_precision"]) == ("ddp", False, precision)
    assert p["no_sync"] and not p["sharded"] and not p["clip_by_engine"] and p["loss_multiplier"] == 1
    assert p["loss_scaling"] == ("dynamic" if precision == "fp16" else None)
    assert "fsdp" not in p and "deepspeed" not in p


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fsdp_full_shard_wraps_each_decoder_layer_and_checkpoints_sharded(checkpointing):
    p = distribution(recipe(f"{GPU2}, strategy: fsdp, mixed_precision: bf16, gradient_checkpointing: {checkpointing}"),
             ["LlamaDecoderLayer"])
    f = p["fsdp"]
    assert f["fsdp_version"] == 2 and f["reshard_after_forward"] is True
    assert f["auto_wrap_policy"] == "transformer_based_wrap"
    assert f["transformer_cls_names_to_wrap"] == ["LlamaDecoderLayer"]
    assert f["state_dict_type"] == "SHARDED_STATE_DICT"
    # FSDP checkpoints its own units; transformers' checkpointing would gather every layer twice
    assert f["activation_checkpointing"] is checkpointing and p["model_gradient_checkpointing"] is False
    assert p["sharded"] and not p["no_sync"]
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(**f)  # the installed Accelerate takes every key as given
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]


@pytest.mark.parametrize("stage,precision", [(2, "bf16"), (3, "bf16"), (2, "fp16"), (3, "fp16"), (3, "no")])
def test_deepspeed_zero_config(stage, precision):
    p = distribution(recipe(f"{GPU2}, strategy: deepspeed, zero_stage: {stage}, mixed_precision: {precision}, "
                    f"gradient_checkpointing: true", train="batch_size: 4, grad_accum: 3, max_grad_norm: 0.5"))
    ds = p["deepspeed"]
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False) is (stage == 3)
    assert ds["bf16"]["enabled"] is (precision == "bf16") and ds["fp16"]["enabled"] is (precision == "fp16")
    assert ds["fp16"]["loss_scale"] == 0  # 0 is DeepSpeed's dynamic loss scaling
    assert ds["gradient_clipping"] == 0.5 and p["clip_by_engine"]
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == \
        (4, 3, 4 * 3 * 2)
    assert p["loss_multiplier"] == 3 and not p["no_sync"] and p["sharded"]
    assert p["model_gradient_checkpointing"] is True


def test_without_gpus_every_recipe_trains_ddp_on_cpus():
    p = distribution(recipe("workers: 2"))
    assert (p["strategy"], p["cpu"]) == ("ddp", True)
    # a worker that holds a GPU CUDA cannot see (Ray's fake GPUs in tests) trains on its CPU, unsharded
    p = distribution(recipe(f"{GPU2}, strategy: fsdp, mixed_precision: bf16"), ["LlamaDecoderLayer"], gpu=False)
    assert (p["strategy"], p["cpu"], p["sharded"]) == ("ddp", True, False) and "fsdp" not in p


def test_make_accelerator_on_cpu_takes_the_precision():
    acc = make_accelerator(distribution(recipe("mixed_precision: bf16")))
    assert acc.device.type == "cpu" and acc.mixed_precision == "bf16" and acc.num_processes == 1


@pytest.mark.parametrize("resources,tuning,message", [
    ("zero_stage: 3", "full", "applies to strategy 'deepspeed' only"),
    (f"{GPU2}, strategy: fsdp", "qlora", "'fsdp' with mode 'qlora' is not supported"),
    ("strategy: deepspeed", "full", "'deepspeed' needs GPUs"),
])
def test_combinations_refused(resources, tuning, message):
    with pytest.raises(RecipeError) as e:
        recipe(resources, tuning)
    assert message in e.value.render()


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    from tests.tiny import tiny_model_dir

    from jobs.model import build_model

    path = tiny_model_dir(tmp_path / "m", weights=True)
    r = recipe("", "lora")
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, _, _ = build_model(r, str(path), None, 0, gradient_checkpointing=checkpointing)
        model.train()
        base = model.base_model.model
        assert getattr(base, "is_activation_checkpointing", None) is checkpointing or \
            base.is_gradient_checkpointing is checkpointing
        ids = torch.randint(5, 300, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)
