"""Like-for-like with the champion: the registered model's current champion and this job's model scored on the same
rows, so that the promotion gate can decide on the data as it is now.

A schedule that retrains when its data changes cuts a new test split from the new data each time; the champion's
test figure was measured on other rows and cannot be held against the new version's. So when the runner server
starts a job of a registered model that has a champion, it writes `champion.json` into the job folder (which model,
version, job, and where its `model/` and `prepared/` are), and after training the driver has one Ray task, with the
resources of one of the job's workers, score:

- both models on this job's test split (the current data), and
- both models on the champion's own test split, where its job folder still holds it (`prepared/data`).

Each pair is scored by the same code on the same rows (at most COMPARE_ROWS of a split, a fixed sample), one model
loaded at a time, so the figures differ only by the weights. A test row whose inputs the other model trained on (its
train or validation split, matched by the digest of each row's inputs that prepare_data keeps, in Arrow) is left
out: the split of a grown file is stable (jobs.data.derive_splits), but an earlier recipe may have cut otherwise.
The result goes into eval.json under `champion`; `runner.registry` decides. Nothing is compared when the two models
do not share a tokenizer or labels, or when the champion's folders are gone or outside the artifacts folder: the
section says why instead.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

COMPARE_ROWS = 5000
KEYS = ("model", "version", "job_id", "model_dir", "prepared")


class NotComparable(Exception):
    """Why the champion and this job's model cannot be scored on the same rows."""


def read_spec(job_dir: Path) -> dict | None:
    """champion.json as the server wrote it, checked (another process's file): None when there is none. Its folders
    must lie in the artifacts folder that holds this job."""
    path = Path(job_dir) / "champion.json"
    if not path.exists():
        return None
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise NotComparable(f"champion.json cannot be read ({type(e).__name__})") from None
    if not isinstance(spec, dict) or not all(k in spec for k in KEYS) or not isinstance(spec["version"], int) \
            or not all(isinstance(spec[k], str) for k in KEYS if k != "version"):
        raise NotComparable(f"champion.json is not what the server writes (keys {', '.join(KEYS)})")
    root = Path(job_dir).resolve().parent
    for key in ("model_dir", "prepared"):
        if root not in Path(spec[key]).resolve().parents:
            raise NotComparable(f"champion.json's {key} {spec[key]!r} is outside the artifacts folder {root}")
    return spec


def compare_with_champion(job_dir: Path, recipe, log=print) -> dict | None:
    """Score this job's model/ and the champion's on both test splits; add the result to eval.json under
    `champion` and return it (None when the job has no champion to meet). Never raises for the comparison itself:
    what could not be compared is said in the section's `note`."""
    job_dir = Path(job_dir)
    spec = None
    try:
        spec = read_spec(job_dir)
        if spec is None:
            return None
        log(f"scoring champion {spec['model']} v{spec['version']} and this model on both test splits")
        found = _compare(job_dir, recipe, spec)
    except NotComparable as e:
        found = {"note": str(e)}
    except Exception as e:  # noqa: BLE001 - a comparison that broke must not fail a trained job; it says why
        found = {"note": f"the comparison failed: {type(e).__name__}: {str(e)[:300]}"}
    out = record(job_dir, {"metric": recipe.gate_metric[0], **found}, spec)
    for line in describe(out):
        log(line)
    return out


def record(job_dir: Path, found: dict, spec: dict | None = None) -> dict:
    """Write the comparison (or why there is none) into eval.json's `champion` section; return the section."""
    if spec is None:
        try:
            spec = read_spec(job_dir)
        except NotComparable:
            spec = None
    out = {**({k: spec[k] for k in ("model", "version", "job_id")} if spec else {}), **found}
    result_file = Path(job_dir) / "eval.json"
    result = json.loads(result_file.read_text())
    result["champion"] = out
    tmp = result_file.with_name("eval.json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(result_file)
    return out


def compare_task(job_dir: str, threads: int) -> dict | None:
    """compare_with_champion inside a Ray task (the driver runs it with one worker's CPUs and GPUs)."""
    import torch

    from jobs.jobdir import model_recipe, note
    from jobs.recipe import SNAPSHOT, load_recipe

    from jobs import secrets

    secrets.take(Path(job_dir))  # a gated model's token: never through Ray's runtime_env (jobs.secrets)
    torch.set_num_threads(max(1, threads))
    return compare_with_champion(Path(job_dir), load_recipe(model_recipe(Path(job_dir)), allowed=SNAPSHOT),
                                 log=lambda m: note(Path(job_dir), m))


def describe(out: dict) -> list[str]:
    """The comparison in words, for the job's log."""
    who = f"champion {out.get('model')} v{out.get('version')}"
    if "note" in out:
        return [f"no like-for-like comparison with {who}: {out['note']}"]
    metric = out["metric"]
    lines = []
    for key, where in (("on_this_test", "this job's test split"), ("on_champion_test", "the champion's test split")):
        pair = out.get(key)
        if pair and metric in pair["challenger"]:
            lines.append(f"{where} ({pair['rows']} rows, {pair['left_out']} left out that the other model trained "
                         f"on): {metric} {pair['challenger'][metric]:.4g} here, {pair['champion'][metric]:.4g} for "
                         f"{who}")
    return lines


def _compare(job_dir: Path, recipe, spec: dict) -> dict:
    import datasets

    mine_dir, theirs_dir = job_dir / "model", Path(spec["model_dir"])
    theirs_prepared = Path(spec["prepared"])
    for d in (mine_dir, theirs_dir):
        if not (d / "config.json").exists():
            raise NotComparable(f"{d} holds no model (its job folder was removed or never finished)")
    if not (theirs_prepared / "data").exists():
        raise NotComparable(f"{theirs_prepared / 'data'} is gone: the rows the champion trained on are unknown")
    mine_tok, theirs_tok = _tokenizer(mine_dir), _tokenizer(theirs_dir)
    if mine_tok.get_vocab() != theirs_tok.get_vocab() or _pad(mine_tok) != _pad(theirs_tok):
        raise NotComparable("the champion's tokenizer is not this job's: their scores would be of different inputs")
    mine_labels, theirs_labels = _labels(mine_dir), _labels(theirs_dir)
    if recipe.task == "classification" and sorted(map(str, mine_labels)) != sorted(map(str, theirs_labels)):
        raise NotComparable(f"the champion's labels ({', '.join(map(str, theirs_labels))}) are not this job's "
                            f"({', '.join(map(str, mine_labels))})")
    here_data = datasets.load_from_disk(str(job_dir / "prepared" / "data"))
    there_data = datasets.load_from_disk(str(theirs_prepared / "data"))
    for data, whose in ((here_data, "this job's"), (there_data, "the champion's")):
        if "content" not in data["test"].column_names:
            raise NotComparable(f"{whose} prepared data was written by an earlier runner, without the row digests "
                                f"that tell which rows a model trained on; promote by hand where it is better "
                                f"(runner models promote)")
    here_names, there_names = _row_labels(job_dir / "prepared"), _row_labels(theirs_prepared)
    seed = recipe.train.seed
    here, left_here = _unseen(here_data["test"], _digests(there_data), seed)
    there, left_there = _unseen(there_data["test"], _digests(here_data), seed)
    if not here:
        raise NotComparable("every row of this job's test split is one the champion trained on")
    scores: dict[str, dict] = {}
    for who, model_dir in (("challenger", mine_dir), ("champion", theirs_dir)):  # one model in memory at a time
        scorer = _Scorer(model_dir, recipe.task)
        scores[who] = {"here": scorer.score(here, here_names),
                       "there": scorer.score(there, there_names) if there else None}
        del scorer
    out = {"on_this_test": {"rows": len(here), "left_out": left_here, "challenger": scores["challenger"]["here"],
                            "champion": scores["champion"]["here"]}}
    out["on_champion_test"] = {"rows": len(there), "left_out": left_there, "challenger": scores["challenger"]["there"],
                               "champion": scores["champion"]["there"]} if there else None
    return out


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _pad(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else 0


def _labels(model_dir: Path) -> list | None:
    path = model_dir / "labels.json"
    return json.loads(path.read_text()) if path.exists() else None


def _row_labels(prepared: Path) -> list | None:
    """The label names a prepared split's label ids index (None for a task without labels)."""
    path = prepared / "labels.json"
    return json.loads(path.read_text()) if path.exists() else None


def _digests(data):
    """The input digests (jobs.data.content_key) of a prepared dataset's train and validation rows: what its model
    trained on, as one Arrow array."""
    import pyarrow as pa

    cols = [data[split].with_format("arrow")["content"] for split in ("train", "validation")]
    return pa.concat_arrays([c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in cols])


def _unseen(ds, seen, seed: int) -> tuple[list[dict], int]:
    """The rows of ds whose inputs are not in `seen` (at most COMPARE_ROWS, a fixed sample), and how many were left
    out for being there. Matched in Arrow: a million rows cost no Python object each."""
    import pyarrow.compute as pc

    hit = pc.is_in(ds.with_format("arrow")["content"], value_set=seen).to_pylist()
    kept = [i for i, h in enumerate(hit) if not h]
    if len(kept) > COMPARE_ROWS:
        kept = sorted(random.Random(seed).sample(kept, COMPARE_ROWS))
    return list(ds.select(kept)), sum(1 for h in hit if h)


class _Scorer:
    """A saved model (a job's model/ folder) on this process's device, scored as the workers score a split."""

    def __init__(self, model_dir: Path, task: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        self.task = task
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32  # the same for both models
        self.model = cls.from_pretrained(str(model_dir), dtype=dtype).to(self.device).eval()
        self.pad_id = _pad(_tokenizer(model_dir))
        self.labels = _labels(model_dir)

    def score(self, rows: list[dict], row_labels: list | None) -> dict:
        """The task's metrics of this model on rows whose label ids index `row_labels` (mapped to this model's
        own label order by name)."""
        import contextlib

        from jobs.evaluation import metrics, score_records

        if self.task == "classification":
            mine = [str(x) for x in self.labels]
            unknown = sorted({str(name) for name in row_labels} - set(mine))
            if unknown:
                raise NotComparable(f"the rows have labels a model does not know: {', '.join(unknown[:5])}")
            to_mine = {i: mine.index(str(name)) for i, name in enumerate(row_labels)}
            rows = [{**r, "labels": to_mine[int(r["labels"])]} for r in rows]
        records = score_records(self.model, rows, self.task, self.pad_id, self.device, contextlib.nullcontext, 32)
        n_labels = len(self.labels) if self.labels else 0
        return metrics(records, [r["labels"] for r in rows], self.task, n_labels)
