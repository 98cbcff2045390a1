"""Like-for-like with the champion: the registered model's current champion and this job's model scored on the same
rows, so that the promotion gate can decide on the data as it is now.

A schedule that retrains when its data changes cuts a new test split from the new data each time; the champion's
test figure was measured on other rows and cannot be held against the new version's. So when the runner server
starts a job of a registered model that has a champion, it writes `champion.json` into the job folder (which model,
version, job, and where its `model/` and `prepared/` are), and after training the driver scores, on the CPU (or the
driver's GPU), in one process:

- both models on this job's test split (the current data), and
- both models on the champion's own test split, where its job folder still holds it (`prepared/data`).

Each pair is scored by the same code on the same rows (at most COMPARE_ROWS of a split, a fixed sample), so the
figures differ only by the weights. The result goes into eval.json under `champion`; `runner.registry` decides.
Nothing is compared when the two models do not share a tokenizer or labels: the section says why instead.
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
    """champion.json as the server wrote it, checked (another process's file): None when there is none."""
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
        found = _compare(job_dir, recipe, spec)
    except NotComparable as e:
        found = {"note": str(e)}
    except Exception as e:  # noqa: BLE001 - a comparison that broke must not fail a trained job; it says why
        found = {"note": f"the comparison failed: {type(e).__name__}: {str(e)[:300]}"}
    out = {**({k: spec[k] for k in ("model", "version", "job_id")} if spec else {}), **found}
    result_file = job_dir / "eval.json"
    result = json.loads(result_file.read_text())
    result["champion"] = out
    tmp = result_file.with_name("eval.json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(result_file)
    for line in describe(out, recipe):
        log(line)
    return out


def describe(out: dict, recipe) -> list[str]:
    """The comparison in words, for the job's log."""
    who = f"champion {out.get('model')} v{out.get('version')}"
    if "note" in out:
        return [f"no like-for-like comparison with {who}: {out['note']}"]
    metric = recipe.gate_metric[0]
    lines = []
    for key, where in (("on_this_test", "this job's test split"), ("on_champion_test", "the champion's test split")):
        pair = out.get(key)
        if pair:
            lines.append(f"{where} ({pair['rows']} rows): {metric} {pair['challenger'][metric]:.4g} here, "
                         f"{pair['champion'][metric]:.4g} for {who}")
    return lines


def _compare(job_dir: Path, recipe, spec: dict) -> dict:
    import datasets

    mine = _Scorer(job_dir / "model", recipe.task)
    theirs = _Scorer(Path(spec["model_dir"]), recipe.task)
    if mine.tokenizer.get_vocab() != theirs.tokenizer.get_vocab() or mine.pad_id != theirs.pad_id:
        raise NotComparable("the champion's tokenizer is not this job's: their scores would be of different inputs")
    if recipe.task == "classification" and sorted(mine.labels) != sorted(theirs.labels):
        raise NotComparable(f"the champion's labels ({', '.join(map(str, theirs.labels))}) are not this job's "
                            f"({', '.join(map(str, mine.labels))})")
    seed = recipe.train.seed
    here = datasets.load_from_disk(str(job_dir / "prepared" / "data"))["test"]
    out = {"on_this_test": _pair(mine, theirs, here, _row_labels(job_dir / "prepared"), seed)}
    theirs_data = Path(spec["prepared"]) / "data"
    if theirs_data.exists():
        there = datasets.load_from_disk(str(theirs_data))["test"]
        out["on_champion_test"] = _pair(mine, theirs, there, _row_labels(Path(spec["prepared"])), seed)
    else:
        out["on_champion_test"] = None
        out["champion_test_missing"] = f"{theirs_data} is gone"
    return out


def _row_labels(prepared: Path) -> list | None:
    """The label names a prepared split's label ids index (None for a task without labels)."""
    path = prepared / "labels.json"
    return json.loads(path.read_text()) if path.exists() else None


def _pair(mine: "_Scorer", theirs: "_Scorer", ds, row_labels: list | None, seed: int) -> dict:
    """Both models on the same rows of `ds`, whose labels are ids into `row_labels`."""
    idx = list(range(len(ds)))
    if len(idx) > COMPARE_ROWS:
        idx = sorted(random.Random(seed).sample(idx, COMPARE_ROWS))
    rows = [ds[i] for i in idx]
    return {"rows": len(rows), "challenger": mine.score(rows, row_labels), "champion": theirs.score(rows, row_labels)}


class _Scorer:
    """A saved model (a job's model/ folder) on the driver's device, scored as the workers score a split."""

    def __init__(self, model_dir: Path, task: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        if not (model_dir / "config.json").exists():
            raise NotComparable(f"{model_dir} holds no model (its job folder was removed or never finished)")
        self.task = task
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
        self.model = cls.from_pretrained(str(model_dir), dtype=torch.float32).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        labels_file = model_dir / "labels.json"
        self.labels = json.loads(labels_file.read_text()) if labels_file.exists() else None

    def score(self, rows: list[dict], row_labels: list | None) -> dict:
        """The task's metrics of this model on rows whose label ids index `row_labels` (mapped to this model's
        own label order by name)."""
        import contextlib

        from jobs.train import metrics, score_records

        if self.task == "classification":
            unknown = sorted(set(map(str, row_labels)) - set(map(str, self.labels)))
            if unknown:
                raise NotComparable(f"the rows have labels a model does not know: {', '.join(unknown[:5])}")
            to_mine = {i: self.labels.index(name) for i, name in enumerate(row_labels)}
            rows = [{**r, "labels": to_mine[int(r["labels"])]} for r in rows]
        records = score_records(self.model, rows, self.task, self.pad_id, self.device, contextlib.nullcontext, 32)
        n_labels = len(self.labels) if self.labels else 0
        return metrics(records, [r["labels"] for r in rows], self.task, n_labels)
