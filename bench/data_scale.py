"""How the runner's data path grows with the data: validate, tokenizing, the first training step, evaluation,
memory, and packing a causal LM's examples.

    python bench/data_scale.py [--sizes 10000,100000,1000000] [--instruction 50000] [--seed 0] [--skip-runs]

Generated classification rows (short texts of 4-30 words, 58 labels), one JSONL file a size, with all-MiniLM-L6-v2
(the local Hugging Face cache; `make install` seeds it) at max_seq_len 64. For each size:
- `validate_s`: `runner validate` on the recipe, as a user runs it (the whole file read; lengths on a sample);
  below 1M rows the median of 3 runs, each reading the file from its JSON again (a datasets cache of its own);
- `tokenize_rows_per_s` (jobs.data.tokenize_split, one process, every column the workers read) against
  `plain_map_rows_per_s`, a plain `datasets.map(tok(b["text"], truncation=True, max_length=64), batched=True)`,
  and both with 2 processes (`*_2proc`);
- `prepare_cold_s` / `prepare_cached_s`: the driver's whole prepare_data (read, split, tokenize, check, save; below
  1M rows the median of 3 cold runs, each with caches of its own), then for a second job on the same files (the
  tokenized cache);
- `first_step_cold_s` / `first_step_cached_s`: `runner run` from its start to the first training step in
  metrics.jsonl, then stopped (Ctrl-C), twice, after `runner validate` on the same RUNNER_HOME (as a user runs
  them): the first reads the data without checking its rows again (validate proved them), the second finds the
  tokenized data cached (`first_step_*_data_from` says which the job log reported); with the driver's and
  a training worker's peak resident memory (`driver_peak_gib`, `worker_peak_gib`, Linux's VmHWM; the driver's
  tokenizing processes apart: the most they held at once, sampled every 0.2 s);
- per phase, the cost of a further row between consecutive sizes (`marginal_us_per_row`: the fixed part, such as
  starting Ray, left out) and its spread across the sizes (`marginal_spread`, 1.0 is flat); the plain seconds per
  row are in each size's figures.
Then evaluation rows/s on 20,000 tokenized rows (jobs.evaluation.evaluate: longest first, batches of 4 x
train.batch_size, fetched a batch at a time) against the former way (rows in order, 2 x batch, one row at a time),
the same loss to 0.1% and accuracy to 0.2 points (other padding moves near ties of an untrained head); and, on
generated instruction rows (`--instruction`), a small Llama built from a config trained for 20 steps of the same tokens with and without train.packing at max_seq_len 512: real tokens/s, the
padding share, and the held-out loss after training (the same within noise when packing is right).
Figures are from this machine (2 cores here). Last line: one JSON object.
"""


import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from procmem import rss_mb  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "po", "ru", "sa", "ti") for b in
         ("ba", "de", "fi", "go", "hu", "ja", "ke", "lu", "mo", "ni", "pe", "qi")] + \
    "the of and to in is for on with as at by from that this it be are was".split()


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30))), "label": f"l{rng.randrange(58)}"}
            for _ in range(n)]


def instruction_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"instruction": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))), "input": "",
             "output": " ".join(rng.choice(WORDS) for _ in range(int(rng.expovariate(1 / 40)) + 2))}
            for _ in range(n)]


def write_jsonl(path: Path, items) -> None:
    with path.open("w") as f:
        for r in items:
            f.write(json.dumps(r) + "\n")


def recipe_text(data: Path, steps: int = 3) -> str:
    return (f"name: scale\nmodel:\n  name: {MODEL}\ntask: classification\ndata:\n  train: {data}\n"
            f"  max_seq_len: 64\ntrain:\n  max_steps: {steps}\n  batch_size: 16\n")


def runner(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


def tokenizing(n: int, data_rows: list[dict], tok, recipe, ids) -> dict:
    import datasets

    from jobs import data as D

    ds = datasets.Dataset.from_list(data_rows)
    figures = {}
    for procs in (1, 2):
        old = D.PARALLEL_ROWS
        D.PARALLEL_ROWS = 1  # the bench says how many processes, whatever the size
        t = time.perf_counter()
        D.tokenize_split(recipe, tok, D.Split("train", ds, "generated"), ids, processes=procs)
        figures["tokenize_rows_per_s" + ("_2proc" if procs == 2 else "")] = round(n / (time.perf_counter() - t))
        D.PARALLEL_ROWS = old
        t = time.perf_counter()
        ds.map(lambda b: tok(b["text"], truncation=True, max_length=64), batched=True, load_from_cache_file=False,
               num_proc=procs if procs > 1 else None)
        figures["plain_map_rows_per_s" + ("_2proc" if procs == 2 else "")] = round(n / (time.perf_counter() - t))
    return figures


def first_step(recipe_file: Path, home: Path) -> dict:
    """`runner run` until metrics.jsonl has a step, then Ctrl-C; seconds and peak memory of driver and worker."""
    import psutil

    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "run", str(recipe_file)], cwd=ROOT,
                            env={**os.environ, "RUNNER_HOME": str(home)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    peaks = {"driver": 0.0, "worker": 0.0}
    helpers = 0.0  # the most the driver's tokenizing processes (spawned: workers, their manager) held at once
    seconds, data_from = None, None
    before = set((home / "artifacts").glob("scale-*"))
    try:
        while proc.poll() is None and time.perf_counter() - t < 900:
            together = 0.0
            for p in psutil.Process(proc.pid).children(recursive=True) + _train_workers():
                try:
                    cmd = " ".join(p.cmdline())
                    kind = "driver" if "jobs.entrypoint" in cmd else "worker" if "RayTrainWorker" in cmd else \
                        "helper" if "multiprocess" in cmd else None
                    if kind == "helper":
                        together += rss_mb(p.pid)[0]
                    elif kind:
                        peaks[kind] = max(peaks[kind], rss_mb(p.pid)[1])
                except (psutil.Error, OSError, KeyError):
                    pass
            helpers = max(helpers, together)
            started = [d for d in set((home / "artifacts").glob("scale-*")) - before
                       if (d / "metrics.jsonl").exists() and (d / "metrics.jsonl").stat().st_size]
            if started:
                seconds = time.perf_counter() - t
                said = (started[0] / "train.log").read_text()
                data_from = "tokenized cache" if "tokenized data reused from" in said else \
                    "read, checks proved by validate" if "data checks reused from runner validate" in said else \
                    "read and checked"
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    if seconds is None:
        raise RuntimeError(f"no training step: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
    return {"s": round(seconds, 1), "driver_gib": round(peaks["driver"] / 1024, 3),
            "worker_gib": round(peaks["worker"] / 1024, 3), "helpers_gib": round(helpers / 1024, 3),
            "data_from": data_from}


def _train_workers() -> list:
    import psutil

    out = []
    for p in psutil.process_iter(["name"]):
        try:
            if "RayTrainWorker" in (p.info["name"] or "") or "RayTrainWorker" in " ".join(p.cmdline()[:1]):
                out.append(p)
        except psutil.Error:
            pass
    return out


def evaluation(n_rows: int, seed: int) -> dict:
    """jobs.evaluation.evaluate against the former way, on the same tokenized rows and the real MiniLM."""
    import datasets
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from jobs import data as D
    from jobs.evaluation import evaluate, metrics, score_records
    from jobs.recipe import parse_recipe

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(MODEL)
    recipe = parse_recipe("name: b\nmodel:\n  name: m\ntask: classification\ndata:\n  train: x.jsonl\n"
                          "  max_seq_len: 64\ntrain:\n  batch_size: 16\n", base_dir=".", env={})
    ids = {f"l{i}": i for i in range(58)}
    ds = D.tokenize_split(recipe, tok, D.Split("v", datasets.Dataset.from_list(rows(n_rows, seed + 1)), "g"), ids)
    model = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=58).eval()
    acc = Accelerator(cpu=True)
    t = time.perf_counter()
    new = evaluate(model, ds, recipe, tok.pad_token_id, acc, 16 * 4, 58)
    new_s = time.perf_counter() - t
    t = time.perf_counter()  # the former way: in row order, batches of 2 x batch_size, each row fetched alone
    with torch.no_grad():
        records = score_records(model, [ds[j] for j in range(len(ds))], "classification", tok.pad_token_id, "cpu",
                                acc.autocast, 16 * 2)
    old = metrics(records, [ds[j]["labels"] for j in range(len(ds))], "classification", 58)
    old_s = time.perf_counter() - t
    # the same figures, up to float noise from the other padding (an untrained 58-way head has near ties)
    assert abs(new["loss"] - old["loss"]) < 1e-3 * old["loss"] and abs(new["accuracy"] - old["accuracy"]) < 2e-3, \
        (new, old)
    return {"eval_rows_per_s": round(n_rows / new_s), "eval_rows_per_s_former": round(n_rows / old_s),
            "eval_speedup": round(old_s / new_s, 2)}


def packing(n_rows: int, seed: int, steps: int = 20) -> dict:
    """A small Llama (from a config, MiniLM's tokenizer) trained on the same instruction examples for `steps`
    steps with and without packing (max_seq_len 512, AdamW 1e-3): 8 packs a step, or as many single examples as
    8 packs hold on average (the same tokens a step, so the same loss curve is expected); real tokens/s, padding
    share, and the held-out loss after."""
    import datasets
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from jobs import data as D
    from jobs.evaluation import collate, fetch, per_example_loss
    from jobs.recipe import parse_recipe

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(MODEL)
    recipe = parse_recipe("name: b\nmodel:\n  name: m\ntask: causal_lm\ndata:\n  train: x.jsonl\n"
                          "  format: instruction\n  max_seq_len: 512\n", base_dir=".", env={})
    examples = D.tokenize_split(recipe, tok, D.Split("t", datasets.Dataset.from_list(instruction_rows(n_rows, seed)),
                                                     "g"), processes=2)
    held = examples.select(range(200))
    train = examples.select(range(200, len(examples)))
    t = time.perf_counter()
    packed, _ = D.pack(train, 512, seed)
    pack_s = time.perf_counter() - t
    out = {"instruction_rows": n_rows, "pack_s": round(pack_s, 2), "packs": len(packed)}
    per_pack = len(train) / len(packed)
    for name, ds, batch_rows_n in (("unpacked", train, round(8 * per_pack)), ("packed", packed, 8)):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=512,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                             max_position_embeddings=512, pad_token_id=tok.pad_token_id))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        order = list(range(len(ds)))
        random.Random(seed).shuffle(order)
        real = fed = 0
        elapsed = 0.0
        for i in range(0, batch_rows_n * steps, batch_rows_n):
            batch_rows = fetch(ds, order[i:i + batch_rows_n])
            t = time.perf_counter()
            batch = collate(batch_rows, tok.pad_token_id, "causal_lm", "cpu")
            units = sum(r["units"] for r in batch_rows)
            loss = per_example_loss(model, batch, "causal_lm").sum() / max(units, 1)
            loss.backward()
            opt.step()
            opt.zero_grad()
            elapsed += time.perf_counter() - t
            real += sum(len(r["input_ids"]) for r in batch_rows)
            fed += len(batch_rows) * batch["input_ids"].shape[1]
        model.eval()
        with torch.no_grad():
            rows_h = fetch(held, list(range(len(held))))
            losses = [per_example_loss(model, collate(rows_h[j:j + 20], tok.pad_token_id, "causal_lm", "cpu"),
                                       "causal_lm") for j in range(0, len(rows_h), 20)]
            held_loss = float(torch.cat(losses).sum() / sum(r["units"] for r in rows_h))
        out[name] = {"tokens_per_s": round(real / elapsed), "padding_share": round(1 - real / fed, 3),
                     "rows_a_step": batch_rows_n, "real_tokens": real, "held_out_loss": round(held_loss, 4)}
        print(name, out[name], flush=True)
    out["packing_speedup"] = round(out["packed"]["tokens_per_s"] / out["unpacked"]["tokens_per_s"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--instruction", type=int, default=50000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-runs", action="store_true", help="no `runner validate` / `runner run` (in-process only)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    from transformers import AutoTokenizer

    from jobs.driver import prepare_data
    from jobs.recipe import parse_recipe

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(MODEL)
    model_path = _model_path()
    ids = {f"l{i}": i for i in range(58)}
    scratch = Path(tempfile.mkdtemp(prefix="bench-data-"))
    result: dict = {"per_size": {}}
    sizes = [int(s) for s in args.sizes.split(",")]
    for n in sizes:
        data_rows = rows(n, args.seed)
        folder = scratch / str(n)
        folder.mkdir()
        write_jsonl(folder / "rows.jsonl", data_rows)
        (folder / "recipe.yaml").write_text(recipe_text(folder / "rows.jsonl"))
        recipe = parse_recipe((folder / "recipe.yaml").read_text(), base_dir=folder, env={})
        figures = tokenizing(n, data_rows, tok, recipe, ids)
        del data_rows
        # below 1M rows each cold figure is the median of 3 runs (a second or two, where one run's noise moved the
        # per-row cost by a third): each run in artifacts of its own (so the tokenized cache misses) and with a
        # datasets cache of its own (so the file is read from its JSON again)
        repeats = 3 if n < 1_000_000 else 1
        colds = []
        for i in range(repeats):
            datasets.config.HF_DATASETS_CACHE = Path(tempfile.mkdtemp(dir=scratch, prefix="hf-datasets-"))
            job = folder / f"artifacts{i}" / "cold"
            job.mkdir(parents=True)
            t = time.perf_counter()
            prepare_data(recipe, job, model_path)
            colds.append(time.perf_counter() - t)
        figures["prepare_cold_s"] = round(statistics.median(colds), 2)
        job = job.parent / "cached"  # beside the last cold run: its tokenized cache
        job.mkdir()
        t = time.perf_counter()
        prepare_data(recipe, job, model_path)
        figures["prepare_cached_s"] = round(time.perf_counter() - t, 2)
        if not args.skip_runs:
            home = folder / "home"  # validate, then run, as a user does: the driver finds what validate proved
            took = []
            for _ in range(repeats):
                fresh = tempfile.mkdtemp(dir=scratch, prefix="hf-datasets-")  # the file read from its JSON again
                t = time.perf_counter()
                out = runner("validate", str(folder / "recipe.yaml"),
                             env={"RUNNER_HOME": str(home), "HF_DATASETS_CACHE": fresh})
                took.append(time.perf_counter() - t)
                assert out.returncode == 0, out.stderr[-2000:]
            figures["validate_s"] = round(statistics.median(took), 1)
            for name in ("cold", "cached"):
                got = first_step(folder / "recipe.yaml", home)
                figures[f"first_step_{name}_s"] = got["s"]
                figures[f"driver_peak_gib_{name}"], figures[f"worker_peak_gib_{name}"] = \
                    got["driver_gib"], got["worker_gib"]
                figures[f"tokenizer_processes_peak_gib_{name}"] = got["helpers_gib"]  # those alive at once
                figures[f"first_step_{name}_data_from"] = got["data_from"]
            runner("cluster", "down", env={"RUNNER_HOME": str(home)})
        for k in [k for k in figures if k.endswith("_s") and not k.endswith("per_s")]:  # microseconds a row
            figures[f"{k}_per_row_us"] = round(figures[k] / n * 1e6, 2)
        result["per_size"][n] = figures
        print(n, figures, flush=True)
    big = result["per_size"][max(sizes)]
    result.update({k: big[k] for k in ("tokenize_rows_per_s", "plain_map_rows_per_s", "tokenize_rows_per_s_2proc",
                                       "plain_map_rows_per_s_2proc")})
    result["tokenize_vs_plain"] = round(big["tokenize_rows_per_s"] / big["plain_map_rows_per_s"], 2)
    if not args.skip_runs:
        label = {1_000_000: "1m"}.get(max(sizes), str(max(sizes)))
        result.update({f"validate_{label}_s": big["validate_s"], f"first_step_{label}_cold_s": big["first_step_cold_s"],
                       f"first_step_{label}_cached_s": big["first_step_cached_s"],
                       "driver_peak_gib": max(big["driver_peak_gib_cold"], big["driver_peak_gib_cached"]),
                       "worker_peak_gib": max(big["worker_peak_gib_cold"], big["worker_peak_gib_cached"])})
    # each phase's cost of a further row between consecutive sizes (its fixed part, e.g. starting Ray, left out),
    # and the spread of those across the sizes (1.0: flat)
    phases = [k for k in result["per_size"][min(sizes)] if k.endswith("_s") and not k.endswith("per_s")
              and "cached" not in k]
    marginal = {k: [round((result["per_size"][b][k] - result["per_size"][a][k]) / (b - a) * 1e6, 2)
                    for a, b in zip(sizes, sizes[1:])] for k in phases}
    result["marginal_us_per_row"] = marginal
    result["marginal_spread"] = {k: round(max(v) / min(v), 2) if v and min(v) > 0 else None
                                 for k, v in marginal.items()}
    result.update(evaluation(20_000, args.seed))
    pk = packing(args.instruction, args.seed)
    result.update(packing_speedup=pk["packing_speedup"], padding_share_packed=pk["packed"]["padding_share"],
                  padding_share_unpacked=pk["unpacked"]["padding_share"], packing=pk)
    print(json.dumps(result))


def _model_path() -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(MODEL, local_files_only=True)


if __name__ == "__main__":
    main()
