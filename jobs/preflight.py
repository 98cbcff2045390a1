"""Pre-flight: everything that can be checked before a GPU is spent, reported all at once.

`runner validate` runs this module as a subprocess (`python -m jobs.preflight RECIPE --json`), so that the control
plane never imports torch or datasets; the driver runs `preflight()` again on the cluster before training.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jobs.jobdir import first_line
from jobs.modelfiles import load_tokenizer, resolve_model
from jobs.recipe import Problem, RecipeError, load_recipe
from jobs.schema import Recipe

STATS_ROWS = 5000  # rows per split tokenized for the truncation figures
CHARS_PER_TOKEN_BOUND = 64  # no tokenizer's tokens average more characters than this over a text


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    labels: list[str] | None = None
    model_path: str | None = None
    memory: dict | None = None  # jobs.memory's estimate of each GPU's (or worker's) peak
    data_key: str | None = None  # the data's key (jobs.tokenized_cache.data_key), the same before and after reading

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        d = asdict(self)
        d["problems"] = [p._asdict() for p in self.problems]
        return d


def preflight(recipe: Recipe, lengths: bool = True, memory: bool = True, data: bool = True,
              key: bool = False) -> Report:
    """Check data, columns, labels, lengths, model and resources. Never raises for a user's mistake.

    lengths=False leaves out the truncation figures, for a caller that tokenizes every row next anyway (the
    driver: `jobs.driver.prepare_data` judges the lengths of all rows with `length_problems`). memory=False leaves
    out the memory estimate (for a recipe whose tuning, train or resources sections are defaults standing in for
    ones with problems: an estimate of those would be of another job). data=False leaves out reading the data (the
    driver: prepare_data reads and checks it once, as it tokenizes, or finds it tokenized already by content).
    key=True: the data's key in the report, where the files hashed before and after the read are the same (for a
    proof: jobs.tokenized_cache.prove).
    """
    from jobs import data as D

    report = Report()
    model_path, problem = resolve_model(recipe)
    report.model_path = model_path
    if problem:
        report.problems.append(problem)
    if recipe.train.callbacks:
        from jobs.callbacks import CallbackError, build

        try:
            build(recipe.train.callbacks)
        except CallbackError as e:
            report.problems.append(Problem(e.key, e.why))
    from jobs.tokenized_cache import data_key

    before = data_key(recipe) if data and key else None
    try:
        splits = D.load_splits(recipe) if data else {}
    except D.DataError as e:
        report.problems += e.problems
        return report
    if before is not None and data_key(recipe) == before:  # the files checked are the files hashed, none rewritten
        report.data_key = before
    report.rows = {k: len(v.dataset) for k, v in splits.items()}
    label_ids = None
    if recipe.task == "classification" and splits:
        report.labels = D.label_names(recipe, splits["train"])
        label_ids = {n: i for i, n in enumerate(report.labels)}
    if model_path is None:
        return report
    try:
        tok = load_tokenizer(recipe, model_path)
    except Exception as e:
        report.problems.append(Problem("model.name", f"the tokenizer of '{recipe.model.name}' cannot be loaded: "
                                                     f"{first_line(e, 500)}"))
        return report
    fmt = recipe.data.layout
    if recipe.task == "causal_lm" and fmt == "chat" and not tok.chat_template:
        report.problems.append(Problem("data.format", f"the tokenizer of '{recipe.model.name}' has no chat template; "
                                                      f"give one in data.chat_template, or use format 'instruction'"))
        return report
    for name, sp in splits.items() if lengths else ():
        report.problems += _length_check(recipe, tok, sp, label_ids, report.notes)
    if memory:
        _memory_check(recipe, model_path, report)
    return report


def _memory_check(recipe: Recipe, model_path: str, report: Report) -> None:
    """The memory estimate of a GPU job, as a note, or a problem when it will not fit the GPUs it asks for."""
    from jobs import memory

    if not recipe.needs_gpu:
        return
    try:
        est, problem, note = memory.check(recipe, model_path)
    except Exception as e:  # noqa: BLE001 - an architecture the meta device cannot build: say so, do not refuse
        report.notes.append(f"memory: no estimate for this model ({type(e).__name__}: {str(e)[:200]})")
        return
    report.memory = est.to_json()
    if problem:
        path = "resources.gpu_memory_gib" if recipe.resources.gpu_memory_gib else "resources"
        report.problems.append(Problem(path, f"will not fit: {problem}"))
    else:
        report.notes.append(f"memory: {est.words()}" + (f"; {note}" if note else ""))


def _length_check(recipe: Recipe, tok, sp, label_ids, notes: list[str]) -> list[Problem]:
    """Tokenize the first STATS_ROWS rows of a split, a batch at a time as the driver does (jobs.data.tokenize_batch),
    and judge their lengths."""
    from jobs.data import tokenize_batch

    n_rows = min(len(sp.dataset), STATS_ROWS)
    lengths, targets = [], []
    # a text far past what max_seq_len tokens can hold is measured on its start: enough to know it is truncated
    # (and what of it is kept), where tokenizing a 5 MB row whole took seconds
    most, cut = CHARS_PER_TOKEN_BOUND * recipe.data.max_seq_len, 0
    for batch in sp.dataset.select(range(n_rows)).iter(batch_size=1000):
        long = set()
        for values in batch.values():
            for i, v in enumerate(values):
                if isinstance(v, str) and len(v) > most:
                    values[i] = v[:most]
                    long.add(i)
        cut += len(long)
        try:
            cols = tokenize_batch(recipe, tok, batch, label_ids)
        except ValueError as e:
            return [Problem("data.format", str(e))]
        lengths += cols["n_tokens"]
        targets += cols["units"]
    scope = f"{n_rows}" if n_rows == len(sp.dataset) else f"the first {n_rows}"
    if cut:
        notes.append(f"{sp.name}: {cut} examples with a text longer than {most:,} characters were measured on their "
                     f"first {most:,} (their token counts below are at least that)")
    return length_problems(recipe, sp.name, lengths, targets, scope, notes)


def length_problems(recipe: Recipe, split: str, lengths: list[int], targets: list[int], scope: str,
                    notes: list[str]) -> list[Problem]:
    """Truncation figures of a split (notes), and a refusal when nothing fits or nothing is left to learn.

    lengths: each example's token count before truncation; targets: its predicted tokens after truncation.
    """
    import numpy as np

    max_len = recipe.data.max_seq_len
    lengths, targets = np.asarray(lengths, dtype=np.int64), np.asarray(targets, dtype=np.int64)
    n_rows = len(lengths)
    longer = int((lengths > max_len).sum())
    no_target = int((targets == 0).sum()) if recipe.task == "causal_lm" else 0
    longest = int(lengths.max(initial=0))
    if longer:
        notes.append(f"{split}: {longer} of {scope} examples ({100 * longer / n_rows:.0f}%) are longer than "
                     f"data.max_seq_len {max_len} and will be truncated; the longest has {longest} tokens")
    if n_rows and longer == n_rows:
        return [Problem("data.max_seq_len", f"{max_len}: none of {scope} {split} examples fits (the longest has "
                                            f"{longest} tokens); raise data.max_seq_len")]
    if n_rows and no_target == n_rows:
        return [Problem("data.max_seq_len", f"{max_len}: in all of {scope} {split} examples the response is "
                                            f"cut off entirely, leaving nothing to learn; raise data.max_seq_len")]
    if no_target:
        notes.append(f"{split}: {no_target} of {scope} examples lose their whole response to truncation and "
                     f"will not contribute to the loss")
    return []


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.preflight RECIPE [--json]`: exit 0 when the job can run, 2 with the problems."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m jobs.preflight", description="Check a recipe, its data and its "
                                 "model before anything is scheduled.")
    ap.add_argument("recipe")
    ap.add_argument("--json", action="store_true", help="One JSON object: the problems, notes, rows and labels.")
    a = ap.parse_args(argv)
    as_json, source = a.json, a.recipe
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # the length sample's batches over this process's CPUs (no fork)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        recipe = load_recipe(source)
    except RecipeError as e:  # the data is still checked where the sections it needs are sound: every problem at once
        report = preflight(e.partial, memory=not e.reset & {"tuning", "train", "resources"}) \
            if e.partial is not None else Report()
        found = [p._replace(line=p.line or e.partial.line_of(p.path)) for p in report.problems] if e.partial else []
        report.problems = e.problems + [p for p in found if p not in e.problems]
    else:
        artifacts = os.environ.get("RUNNER_VALIDATE_ARTIFACTS")  # where the jobs' folders go (the CLI says)
        report = preflight(recipe, key=bool(artifacts))
        report.problems = [p._replace(line=p.line or recipe.line_of(p.path)) for p in report.problems]
        if artifacts and report.ok and report.data_key:  # for the driver: what it need not check again
            from jobs.tokenized_cache import VALIDATED, prove

            prove(Path(artifacts) / VALIDATED, report.data_key, report.rows)
    if as_json:
        print(json.dumps(report.to_json()))
    else:
        for p in report.problems:
            print(p.render(source))
        for n in report.notes:
            print("note:", n)
    return 0 if report.ok else 2


if __name__ == "__main__":
    sys.exit(main())
