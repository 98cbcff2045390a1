"""Decode speed of an exported causal LM with its KV cache against PyTorch `generate`, greedy, on the same prompts.

    python bench/decode.py [MODEL_DIR] [--new-tokens 32] [--prompt-tokens 16] [--rounds 5]

MODEL_DIR is a causal LM folder (a job's model/); without one, a Llama-shaped model is built from a config with
random weights (hidden 512, 4 layers, 8 heads over 4 KV heads, 32,000-token vocabulary: 44M parameters), which
times the same graph a trained one would. The model is exported the way a job's export does it (torch.onnx with the
KV cache as inputs and outputs, the optimisation stage, int8 dynamic quantization), then each variant decodes
`--new-tokens` tokens after the same prompts at batch 1 and 4, 2 threads, the variants taking turns round after
round. Tokens per second = batch x new tokens / the median time of a whole generation (prompt included).
`same_tokens_fp32` says whether the fp32 ONNX model produced exactly `generate`'s tokens; `int8_agreement` is the
share of int8's tokens that are `generate`'s (low on random weights, whose logits are nearly tied: a speed figure,
not a quality one; the export's quality gate is on real held-out rows). Last line: one JSON object.
"""


import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def build_model(out: Path):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", nargs="?", type=Path)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from jobs.export import export_onnx, onnx_bytes
    from jobs.export_checks import ort_decode, session
    from jobs.onnx_fusion import fuse_file, fused_ops, op_counts
    from jobs.quantize import prepare, quantize

    scratch = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    model_dir = args.model_dir or build_model(scratch / "model")
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    t0 = time.perf_counter()
    kv = export_onnx(model, "causal_lm", scratch / "model.onnx", 18, 0)
    fusions = fuse_file(scratch / "model.onnx", scratch / "fused.onnx")
    prepare(scratch / "fused.onnx", scratch / "pre.onnx")
    quantize(scratch / "pre.onnx", scratch / "int8.onnx", "int8_dynamic")
    print(f"exported, fused and quantized in {time.perf_counter() - t0:.1f} s; fusions "
          f"{ {k: v for k, v in fusions.items() if v} }", flush=True)
    files = {"onnx_fp32": scratch / "model.onnx", "onnx_fp32_fused": scratch / "fused.onnx",
             "onnx_int8_fused": scratch / "int8.onnx"}
    sessions = {name: session(path, 2) for name, path in files.items()}
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    result: dict = {"model": str(args.model_dir or "llama-44M from a config"),
                    "parameters": sum(p.numel() for p in model.parameters()), "new_tokens": args.new_tokens,
                    "prompt_tokens": args.prompt_tokens, "fused_ops": fused_ops(op_counts(files["onnx_fp32_fused"])),
                    "bytes": {"pytorch_fp32": sum(p.numel() * 4 for p in model.parameters()),
                              **{k: onnx_bytes(p) for k, p in files.items()}}}
    for batch in (1, 4):
        prompts = rng.integers(3, vocab, (batch, args.prompt_tokens)).astype(np.int64)

        def torch_run():
            with torch.no_grad():
                out = model.generate(torch.from_numpy(prompts), attention_mask=torch.ones_like(
                    torch.from_numpy(prompts)), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                    do_sample=False, pad_token_id=0)
            return out[:, args.prompt_tokens:].numpy()

        runs = {"pytorch_fp32": torch_run,
                **{name: (lambda s=s: ort_decode(s, kv, prompts, args.new_tokens)) for name, s in sessions.items()}}
        tokens = {name: run() for name, run in runs.items()}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                time.sleep(0.05)  # the other variants' thread pools go quiet
                t = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t)
        tps = {name: round(batch * args.new_tokens / statistics.median(t), 1) for name, t in times.items()}
        result[f"tokens_per_s_b{batch}"] = tps
        result[f"same_tokens_fp32_b{batch}"] = bool((tokens["onnx_fp32"] == tokens["pytorch_fp32"]).all())
        result[f"int8_agreement_b{batch}"] = round(float((tokens["onnx_int8_fused"] == tokens["pytorch_fp32"]).mean()),
                                                   3)
        result[f"speedup_int8_b{batch}"] = round(tps["onnx_int8_fused"] / tps["pytorch_fp32"], 2)
        print(f"batch {batch}: tokens/s " + ", ".join(f"{k} {v}" for k, v in tps.items()), flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
