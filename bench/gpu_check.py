"""The body of bench/gpu_check.sh (read that first): model, data, the runs, the figures."""


import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Qwen2.5-0.5B's shape: 494M parameters, tied embeddings, grouped-query attention
QWEN05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
               num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
               tie_word_embeddings=True, rms_norm_eps=1e-6)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
SEQ, BATCH, WORDS = 512, 8, 30000


def build(work: Path) -> tuple[Path, int]:
    """The model folder: config, random bf16 weights, and a word-level tokenizer of WORDS words."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    d = work / "qwen05b"
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    cfg = Qwen2Config(**QWEN05B, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(d)
    fast.save_pretrained(d)
    del model
    torch.cuda.empty_cache()
    return d, n_params


def data(work: Path, rows: int) -> dict[str, Path]:
    """Synthetic tokens: rows of SEQ - 1 random words (one token each; with the end token, SEQ)."""
    rng = random.Random(0)
    out = {}
    for split, n in (("train", rows), ("validation", 16), ("test", 16)):
        p = work / f"{split}.jsonl"
        p.write_text("".join(json.dumps({"text": " ".join(f"w{rng.randrange(WORDS)}" for _ in range(SEQ - 1))})
                             + "\n" for _ in range(n)))
        out[split] = p
    return out


def recipe(work: Path, model: Path, files: dict, mode: str, steps: int, export: bool) -> Path:
    tuning = ("{mode: lora, r: 16, alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
              "down_proj]}" if mode == "lora" else "full")
    dtype = "bfloat16" if mode == "lora" else "float32"  # full: fp32 master weights under bf16 autocast
    p = work / f"{mode}.yaml"
    p.write_text(f"name: gpu-check-{mode}\nmodel: {{name: {model}, dtype: {dtype}}}\ntask: causal_lm\n"
                 f"data: {{train: {files['train']}, validation: {files['validation']}, test: {files['test']}, "
                 f"max_seq_len: {SEQ}}}\ntuning: {tuning}\n"
                 f"train: {{max_steps: {steps}, batch_size: {BATCH}, lr: 0.0001, eval_every: {steps}}}\n"
                 f"resources: {{workers: 1, gpus_per_worker: 1, cpus_per_worker: 8, mixed_precision: bf16}}\n"
                 f"export: {{onnx: {str(export).lower()}, max_quality_drop: 1.5}}\n")
    return p


def throughput(records: list[dict], skip: int) -> float:
    """Tokens per second over the steps after `skip`: all their tokens over all their time."""
    recs = records[skip:]
    seconds = [BATCH / r["samples_per_s"] for r in recs]
    tokens = [r["tokens_per_s"] * s for r, s in zip(recs, seconds)]
    return sum(tokens) / sum(seconds)


def run_runner(rec: Path, home: Path) -> dict:
    env = {**os.environ, "RUNNER_HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "runner.cli", "run", str(rec)], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        sys.exit(f"runner run {rec.name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    job = next((home / "artifacts").iterdir())
    steps = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines() if '"split"' not in x]
    manifest = json.loads((job / "manifest.json").read_text())
    return {"steps": steps, "wall_s": wall, "timings": manifest.get("timings", {}), "job": job}


def run_bare(rec: Path, steps: int) -> dict:
    out = subprocess.run([sys.executable, "bench/bare_lm.py", str(rec), str(steps)], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             [str(ROOT), os.environ.get("PYTHONPATH", "")])})
    if out.returncode:
        sys.exit(f"bare_lm.py {rec.name} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def estimate_gib(rec: Path) -> float:
    from jobs.memory import check
    from jobs.recipe import load_recipe

    r = load_recipe(rec)
    return check(r, r.model.name)[0].gib()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = ap.parse_args()
    import torch

    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    work = args.keep or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, n_params = build(work)
    files = data(work, args.steps * BATCH)
    print(f"gpu_check on {name}: model {n_params / 1e6:.0f}M parameters, seq {SEQ}, batch {BATCH}, "
          f"{args.steps} steps; set-up {time.perf_counter() - t0:.0f} s", flush=True)
    skip = min(5, args.steps // 3)
    result: dict = {"gpu": name, "params": n_params, "seq": SEQ, "batch": BATCH, "steps": args.steps}
    for mode in ("full", "lora"):
        rec = recipe(work, model, files, mode, args.steps, export=mode == "lora")
        r = run_runner(rec, work / f"home-{mode}")
        b = run_bare(rec, args.steps)
        tps_r, tps_b = throughput(r["steps"], skip), b["tokens_per_s"]
        # model FLOPs a token: 6N for a full step (2N forward, 4N backward), 4N with LoRA (no weight gradients
        # of the frozen base), and attention's 12 L h s (6 for LoRA's two passes x 2)
        per_token = (6 if mode == "full" else 4) * n_params + 12 * QWEN05B["num_hidden_layers"] * \
            QWEN05B["hidden_size"] * SEQ
        mfu = tps_r * per_token / peak if peak else None
        peak_gib = max(s.get("gpu_mem_gib", 0) for s in r["steps"])
        est = estimate_gib(rec)
        export_s = r["timings"].get("export_s")
        print(f"{mode}: runner {tps_r:,.0f} tokens/s, bare Accelerate {tps_b:,.0f} tokens/s, ratio "
              f"{tps_r / tps_b:.3f}; MFU {mfu:.1%}; peak GPU memory {peak_gib:.1f} GiB (bare {b['peak_gib']:.1f}), "
              f"pre-flight estimate {est:.1f} GiB; runner run took {r['wall_s']:.0f} s"
              + (f"; ONNX export and checks {export_s:.0f} s" if export_s else ""), flush=True)
        keys = {"tokens_per_s_runner": tps_r, "tokens_per_s_bare": tps_b, "ratio": tps_r / tps_b, "mfu": mfu,
                "peak_gib": peak_gib, "bare_peak_gib": b["peak_gib"], "estimate_gib": est, "wall_s": r["wall_s"]}
        if mode == "full":
            result.update({k: round(v, 4) if isinstance(v, float) else v for k, v in keys.items()})
        else:
            result.update({f"lora_{k}": round(v, 4) if isinstance(v, float) else v for k, v in keys.items()})
            result["onnx_export_s"] = round(export_s, 1) if export_s else None
            report = r["job"] / "onnx" / "export_report.json"
            if report.exists():
                result["onnx_report"] = {k: v for k, v in json.loads(report.read_text()).items()
                                         if k in ("passed", "checks")}
    result["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
