"""How tokenizing grows with the data: the driver's tokenization against a plain batched `datasets.map`.

    python bench/data_scale.py [--sizes 10000,100000] [--seed 0]

For each size, generated classification rows (short texts of 4-30 words, 58 labels) are tokenized with
all-MiniLM-L6-v2's fast tokenizer (from the local Hugging Face cache, `make install` seeds it) at max_seq_len 64:
- `runner`: jobs.data.tokenize_split, as the driver calls it (every column the workers read, the untruncated
  length, the row digests);
- `plain`: what a plain script does, `datasets.map(lambda b: tok(b["text"], truncation=True, max_length=64),
  batched=True)`;
- `per_row`: the runner's former way, tokenize_example a row at a time (on the smallest size only: it is slow);
- the driver's whole `prepare_data` on the largest size, cold and then for a second job on the same files (served by
  the tokenized cache, jobs/tokenized_cache.py).
Figures are rows per second on this machine (2 cores here). Last line: one JSON object.

Issue 20 asks for more of this bench (validate, first step, evaluation, packing, memory); this is its first part.
"""


import argparse
import json
import os
import random
import time


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "po", "ru", "sa", "ti") for b in
             ("ba", "de", "fi", "go", "hu", "ja", "ke", "lu", "mo", "ni", "pe", "qi")] + \
        "the of and to in is for on with as at by from that this it be are was".split()
    return [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(4, 30))), "label": f"l{rng.randrange(58)}"}
            for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    from transformers import AutoTokenizer

    from jobs import data as D
    from jobs.recipe import parse_recipe

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    recipe = parse_recipe("name: b\nmodel:\n  name: m\ntask: classification\ndata:\n  train: x.jsonl\n"
                          "  max_seq_len: 64\n", base_dir=".", env={})
    ids = {f"l{i}": i for i in range(58)}
    result: dict = {"per_size": {}}
    sizes = [int(s) for s in args.sizes.split(",")]
    for n in sizes:
        ds = datasets.Dataset.from_list(rows(n, args.seed))
        figures = {}
        t = time.perf_counter()
        D.tokenize_split(recipe, tok, D.Split("train", ds, "generated"), ids)
        figures["runner_rows_per_s"] = round(n / (time.perf_counter() - t))
        t = time.perf_counter()
        ds.map(lambda b: tok(b["text"], truncation=True, max_length=64), batched=True, load_from_cache_file=False)
        figures["plain_map_rows_per_s"] = round(n / (time.perf_counter() - t))
        if n == min(sizes):
            part = ds.select(range(min(n, 10000)))
            t = time.perf_counter()
            for row in part:
                D.tokenize_example(recipe, tok, row, ids)
                D.content_key(row)
            figures["per_row_rows_per_s"] = round(len(part) / (time.perf_counter() - t))
        result["per_size"][n] = figures
        print(n, figures, flush=True)
    # the driver's whole prepare_data (read, split, tokenize, check lengths, save) on the largest size: cold, and
    # again for a second job on the same files (a retry, a schedule fire), which the tokenized cache serves
    import tempfile
    from pathlib import Path

    from huggingface_hub import snapshot_download

    from jobs.driver import prepare_data

    model_path = snapshot_download("sentence-transformers/all-MiniLM-L6-v2", local_files_only=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-data-"))
    data = scratch / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(max(sizes), args.seed)))
    big_recipe = parse_recipe(f"name: b\nmodel:\n  name: m\ntask: classification\ndata:\n  train: {data}\n"
                              "  max_seq_len: 64\n", base_dir=scratch, env={})
    for name in ("cold", "cached"):
        job = scratch / "artifacts" / name
        job.mkdir(parents=True)
        t = time.perf_counter()
        prepare_data(big_recipe, job, model_path)
        result[f"prepare_{name}_s"] = round(time.perf_counter() - t, 2)
    print(f"prepare_data of {max(sizes)} rows: cold {result['prepare_cold_s']} s, "
          f"cached {result['prepare_cached_s']} s", flush=True)
    big = result["per_size"][max(sizes)]
    result.update(tokenize_rows_per_s=big["runner_rows_per_s"], plain_map_rows_per_s=big["plain_map_rows_per_s"],
                  tokenize_vs_plain=round(big["runner_rows_per_s"] / big["plain_map_rows_per_s"], 2),
                  per_row_rows_per_s=result["per_size"][min(sizes)]["per_row_rows_per_s"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
