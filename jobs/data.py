"""Data: read each split, map columns to roles, split off what is missing, render and tokenize.

Reading goes through the `datasets` library; before a local file is handed to it, a quick scan of our own finds the
first malformed rows and names their file and line, which `datasets` would not. Every problem found is collected
and raised at once as a DataError.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import itertools
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from jobs.jobdir import first_line
from jobs.recipe import Problem
from jobs.schema import Recipe, Source, roles_for

SPLITS = ("train", "validation", "test")
FILE_KINDS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
MAX_ROWS_NAMED = 5


class DataError(Exception):
    """Data that cannot be used; `problems` lists every reason."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(p.render("data") for p in problems))


@dataclass
class Split:
    """One split's rows, with its origin for messages: `where(i)` names the file and line of row i."""

    name: str
    dataset: Any  # datasets.Dataset with the role columns only
    origin: str
    where: Callable[[int], str] = field(repr=False, default=lambda i: f"row {i + 1}")
    parent: Any = field(repr=False, default=None)  # a derived split: the dataset its rows were cut from
    rows: Any = field(repr=False, default=None)  # ... and their positions there (numpy)


def column(ds, name: str):
    """A whole column of a dataset as a numpy array, read through Arrow (no Python object per row)."""
    return ds.with_format("arrow")[name].to_numpy()


def predicted_tokens(labels: list[int]) -> int:
    """A causal LM example's predicted tokens: its labels after the first that are not -100 (what its loss is
    averaged over; the first token is predicted by nothing)."""
    return sum(1 for x in labels[1:] if x != -100)


def arrow_column(sp: Split, name: str):
    """A split's column as Arrow: a derived split's rows taken from its parent's column in one call (datasets would
    turn its index mapping into a Python list at each read)."""
    import pyarrow as pa

    if sp.parent is not None:
        return sp.parent.with_format("arrow")[name].take(pa.array(sp.rows))
    return sp.dataset.with_format("arrow")[name]


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def read_source(recipe: Recipe, split: str, src: Source, proven: bool = False) -> Split:
    """Read one source into a Dataset. Raises DataError naming the key, file and line. proven: the file passed
    `runner validate` as it is (jobs.tokenized_cache.proven): its lines are not scanned again."""
    key = f"data.{split}"
    if src.hub is not None:
        return _read_hub(key, split, src)
    path = recipe.resolve_path(src.path)
    try:
        path.stat()
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:  # a name too long, a loop of links
        raise DataError([Problem(key, f"{src.path[:200]}: cannot be read ({e.strerror or e})")]) from None
    if not path.exists():
        hint = _nearby(path)
        raise DataError([Problem(key, f"{src.path}: no such file or folder (looked for {path}){hint}")])
    if path.is_dir():
        return _read_disk(key, split, src, path)
    kind = FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise DataError([Problem(key, f"{src.path}: cannot tell the format from the suffix '{path.suffix}'; "
                                      f"accepted: {', '.join(FILE_KINDS)} or a datasets save_to_disk folder")])
    lines = None if proven else _scan(key, path, strict=False)
    import datasets

    # datasets counts each load of its json/csv/parquet loader with a request to the hub: a local file must not
    # phone home, and where the hub cannot be reached the request waited seconds for each file (3 s + DNS)
    if "HF_UPDATE_DOWNLOAD_COUNTS" not in os.environ:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps pyarrow errors in several types; the message is what helps
        _scan(key, path, strict=True)  # a row by row look names the malformed rows, where it finds them
        raise DataError([Problem(key, f"{src.path}: cannot be loaded: {first_line(e)}")]) from None
    if lines is not None and len(lines) != len(ds):  # e.g. two objects on one line, which the reader takes
        _scan(key, path, strict=True)
        raise DataError([Problem(key, f"{src.path}: the reader found {len(ds)} rows where a line by line look "
                                      f"found {len(lines)}; check the file's line endings and quoting")])
    if lines is not None:
        return Split(split, ds, str(path), lambda i, p=path, ls=lines: f"{p.name}:{ls[i]}")
    return Split(split, ds, str(path), lambda i, p=path: f"{p.name} row {i + 1}")


def _scan(key: str, path: Path, strict: bool = True):
    """The line number of each row of a local file, where lines mean something (an array), read a line at a time.
    Raises DataError for a file that is empty or not UTF-8, and (strict) for malformed rows, each named by its line:
    the row by row look that runs when the file's reader failed (a million JSON lines parsed in Python cost more
    than the reader itself)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pq.read_schema(path)
        except Exception as e:
            raise DataError([Problem(key, f"{path.name}: not a readable Parquet file: {first_line(e)}")]) from None
        return None
    if suffix == ".csv":
        return _scan_csv(key, path, strict)
    if suffix == ".json" and _first_char(path) == "[":  # a JSON list is one value: read whole
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError([Problem(key, _not_utf8(path))]) from None
        if not text.strip():
            raise DataError([Problem(key, f"{path.name}: the file is empty")])
        try:
            rows = json.loads(text)
        except RecursionError:
            raise DataError([Problem(key, f"{path.name}: nested deeper than a JSON reader takes (about 1,000 "
                                          f"levels); an example is an object of texts and labels")]) from None
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" means one object a line: JSON Lines in a .json file
                raise DataError([Problem(key, f"{path.name}:{e.lineno}: not valid JSON: {e.msg} "
                                              f"(column {e.colno})")]) from None
        else:
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise DataError([Problem(key, f"{path.name}: expected a JSON list of objects, one per example, "
                                              f"or one JSON object a line")])
            if not rows:
                raise DataError([Problem(key, f"{path.name}: the list is empty")])
            return None
    return _scan_jsonl(key, path, strict)


def _first_char(path: Path) -> str:
    """The first character of a file that is not white space (or a BOM), from its first 64 KB."""
    with path.open("rb") as f:
        head = f.read(1 << 16).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1].decode("latin-1")


DEEP = 900  # brackets on one JSON line past which it is parsed in Python first (which refuses ~1,000 levels)


def _lines(key: str, path: Path):
    """(line number, text) of each line of a file, read a line at a time, split where the readers split (\\n, \\r\\n or
    \\r); a file that is not UTF-8 is a DataError naming the line."""
    try:
        with path.open(encoding="utf-8", newline=None) as f:
            yield from enumerate(f, start=1)
    except UnicodeDecodeError:
        raise DataError([Problem(key, _not_utf8(path))]) from None


def _not_utf8(path: Path) -> str:
    """Where a file stops being UTF-8, in words (read a line at a time)."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{path.name}:{n}: not UTF-8 text ({e.reason})"
    return f"{path.name}: not UTF-8 text"


def _scan_jsonl(key: str, path: Path, strict: bool):
    from array import array

    lines, bad, deep = array("q"), [], False
    for n, line in _lines(key, path):
        if not line.strip():
            continue
        if not strict:
            lines.append(n)
            # nesting far past what Python's reader takes crashes pyarrow's (a segfault at 100,000 levels): a
            # line with that many brackets gets the row by row look, which refuses it by name
            deep = deep or (len(line) > DEEP and line.count("[") + line.count("{") > DEEP)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append(Problem(key, f"{path.name}:{n}: not valid JSON: {e.msg} (column {e.colno})"))
            continue
        except RecursionError:
            bad.append(Problem(key, f"{path.name}:{n}: nested deeper than a JSON reader takes (about 1,000 levels)"))
            continue
        if not isinstance(obj, dict):
            bad.append(Problem(key, f"{path.name}:{n}: expected a JSON object, got {type(obj).__name__}"))
        lines.append(n)
    if not lines and not bad:
        raise DataError([Problem(key, f"{path.name}: the file is empty")])
    if deep:
        return _scan_jsonl(key, path, strict=True)
    if bad:
        raise DataError(_cap(bad))
    return lines


def _scan_csv(key: str, path: Path, strict: bool):
    from array import array

    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # a long document is one field
    lines, bad, header = array("q"), [], None
    try:
        with path.open(encoding="utf-8", newline="") as f:  # csv's own line handling (a quoted field may span)
            reader = csv.reader(f)
            for row in reader:
                if len(row) <= 1 and not "".join(row).strip():  # a blank line, which the reader (pandas) skips
                    continue
                if header is None:
                    header = row
                    continue
                if strict and len(row) != len(header):
                    bad.append(Problem(key, f"{path.name}:{reader.line_num}: {len(row)} fields, the header has "
                                            f"{len(header)} ({', '.join(header)})"))
                lines.append(reader.line_num)
    except UnicodeDecodeError:
        raise DataError([Problem(key, _not_utf8(path))]) from None
    except csv.Error as e:
        raise DataError([Problem(key, f"{path.name}:{reader.line_num}: not valid CSV: {e}")]) from None
    if header is None:
        raise DataError([Problem(key, f"{path.name}: the file is empty")])
    if bad:
        raise DataError(_cap(bad))
    return lines


def _read_disk(key: str, split: str, src: Source, path: Path) -> Split:
    import datasets

    if not any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError([Problem(key, f"{src.path}: a folder, but not one written by datasets' save_to_disk "
                                      f"(no dataset_info.json or dataset_dict.json in it)")])
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError([Problem(key, f"{src.path}: cannot be loaded: {first_line(e)}")]) from None
    if isinstance(ds, datasets.DatasetDict):
        want = src.split or split
        if want not in ds:
            raise DataError([Problem(key, f"{src.path}: has no split '{want}'; it has {', '.join(ds)} "
                                          f"(choose one with split: NAME)")])
        ds = ds[want]
    return Split(split, ds, str(path))


def _read_hub(key: str, split: str, src: Source) -> Split:
    import datasets

    want = src.split or split
    try:
        ds = datasets.load_dataset(src.hub, src.subset, split=want, revision=src.revision)
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        fix = (f"; fetch it once with network: hf download --repo-type dataset {src.hub}"
               if offline else "")
        raise DataError([Problem(key, f"hub dataset '{src.hub}' (split '{want}'): cannot be loaded: "
                                      f"{first_line(e)}{fix}")]) from None
    return Split(split, ds, f"{src.hub}[{want}]")


# ----------------------------------------------------------------------------------------------------------------
# Columns, checks, splits
# ----------------------------------------------------------------------------------------------------------------


def map_columns(recipe: Recipe, sp: Split) -> Split:
    """Keep the columns the task reads, renamed to their roles. Raises DataError for a missing column."""
    import datasets

    required, optional = roles_for(recipe.task, recipe.data.layout)
    cols = recipe.data.columns
    have = list(sp.dataset.column_names)
    keep: dict[str, str] = {}
    problems = []
    for role in required + optional:
        col = cols.get(role, role)
        if col in have:
            keep[col] = role
        elif role in required:
            from jobs.recipe import did_you_mean

            hint = did_you_mean(col, have)
            how = f"data.columns.{role}: COLUMN" if role not in cols else f"data.columns.{role}"
            problems.append(Problem(f"data.{sp.name}", f"{Path(sp.origin).name}: no column '{col}'{hint}; the task "
                                    f"needs it as '{role}'. Columns: {', '.join(have)}. Map one with {how}"))
    if problems:
        raise DataError(problems)
    ds = sp.dataset.select_columns(list(keep))
    label_col = next((c for c, r in keep.items() if r == "label"), None)
    if label_col and isinstance(ds.features[label_col], datasets.ClassLabel):
        names = ds.features[label_col].names
        ds = ds.cast_column(label_col, datasets.Value("int64"))
        ds = ds.map(lambda b: {label_col: [names[i] for i in b[label_col]]}, batched=True,
                    features=datasets.Features({**ds.features, label_col: datasets.Value("string")}))
    renames = {c: r for c, r in keep.items() if c != r}
    if renames:
        ds = ds.rename_columns(renames)
    return Split(sp.name, ds, sp.origin, sp.where)


def check_rows(recipe: Recipe, sp: Split) -> list[Problem]:
    """Each row holds what the task needs, of the right type."""
    key, fmt = f"data.{sp.name}", recipe.data.layout
    checks: dict[str, Callable[[Any], str | None]] = {}
    if recipe.task == "classification":
        checks["text"] = _need_text
        checks["label"] = lambda v: None if isinstance(v, (str, int)) and not isinstance(v, bool) and v != "" else \
            f"label {v!r} is not a string or whole number"
    elif recipe.task == "regression":
        checks["text"] = _need_text
        checks["label"] = _need_number
    elif fmt == "text":
        checks["text"] = _need_text
    elif fmt == "instruction":
        checks["instruction"] = _need_text
        checks["output"] = _need_text
        checks["input"] = lambda v: None if v is None or isinstance(v, str) else f"input {v!r} is not a string"
    else:
        checks["messages"] = _need_messages
    bad: dict[str, list[int]] = {}
    for role, check in checks.items():
        if role not in sp.dataset.column_names:
            continue
        for i, v in enumerate(iter_column(sp.dataset, role)):
            msg = check(v)
            if msg:
                bad.setdefault(f"{role}: {msg}" if "{" not in msg else msg, []).append(i)
    out = []
    for msg, rows in bad.items():
        named = ", ".join(sp.where(i) for i in rows[:MAX_ROWS_NAMED])
        more = f" (and {len(rows) - MAX_ROWS_NAMED} more rows)" if len(rows) > MAX_ROWS_NAMED else ""
        out.append(Problem(key, f"{named}{more}: {msg}"))
    return out


def _need_text(v: Any) -> str | None:
    if v is None or (isinstance(v, str) and not v.strip()):
        return "empty"
    return None if isinstance(v, str) else f"{v!r} is not text"


def _need_number(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            float(v)
            return None
        except (TypeError, ValueError):
            return f"{v!r} is not a number (regression needs a numeric target)"
    return None if v == v else "NaN is not a target"


def _need_messages(v: Any) -> str | None:
    if not isinstance(v, list) or not v:
        return "messages is not a non-empty list of {role, content}"
    for m in v:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant", "tool"):
            return f"message {m!r} needs a role (system, user, assistant, tool) and text content"
    if not any(m["role"] == "assistant" for m in v):
        return "no assistant message: nothing to learn from"
    return None


def label_names(recipe: Recipe, train: Split) -> list[str]:
    """Classification labels in a stable order: as listed in the recipe, else sorted (numerically if whole)."""
    if recipe.data.labels is not None:
        return [str(x) for x in recipe.data.labels]
    import pyarrow.compute as pc

    values = set(pc.unique(arrow_column(train, "label")).to_pylist())
    if all(isinstance(v, int) for v in values):
        return [str(v) for v in sorted(values)]
    return sorted(str(v) for v in values)


def check_labels(recipe: Recipe, names: list[str], sp: Split, listed: bool) -> list[Problem]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    known = set(names)
    unknown: dict[str, list[int]] = {}
    col = arrow_column(sp, "label")
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_integer(col.type):
        # in Arrow, as str() would read each value: only the rows whose label is unknown come to Python
        texts = pc.cast(col, pa.string())
        odd = np.flatnonzero(~pc.fill_null(pc.is_in(texts, value_set=pa.array(names)), False).to_numpy(
            zero_copy_only=False))
        suspects = zip(odd.tolist(), texts.take(pa.array(odd)).to_pylist())
    else:
        suspects = enumerate(iter_column(sp.dataset, "label"))
    for i, v in suspects:
        if str(v) not in known:
            unknown.setdefault(str(v), []).append(i)
    out = []
    src = "the labels listed in data.labels" if listed else "the training labels"
    for label, rows in unknown.items():
        named = ", ".join(sp.where(i) for i in rows[:MAX_ROWS_NAMED])
        more = f" (and {len(rows) - MAX_ROWS_NAMED} more rows)" if len(rows) > MAX_ROWS_NAMED else ""
        out.append(Problem(f"data.{sp.name}", f"{named}{more}: label '{label}' is not among {src} "
                                              f"({', '.join(names)})"))
    return out


def load_splits(recipe: Recipe, proven: bool = False) -> dict[str, Split]:
    """Read, map and check train, validation and test; split off the ones not given. Raises DataError.

    proven: the data passed `runner validate` as it is now (jobs.tokenized_cache.proven): its lines and rows are
    not checked again (the labels, checked in Arrow, still are)."""
    given: dict[str, Split] = {}
    problems: list[Problem] = []
    for name in SPLITS:
        src = getattr(recipe.data, name)
        if src is None:
            continue
        try:
            sp = map_columns(recipe, read_source(recipe, name, src, proven))
        except DataError as e:
            problems += e.problems
            continue
        problems += [] if proven else check_rows(recipe, sp)
        given[name] = sp
    if problems:
        raise DataError(problems)
    splits = derive_splits(recipe, given)
    if recipe.task == "classification":
        names = label_names(recipe, splits["train"])
        listed = recipe.data.labels is not None
        for name in SPLITS if listed else ("validation", "test"):
            problems += check_labels(recipe, names, splits[name], listed)
        if len(names) < 2:
            problems.append(Problem("data.train", f"only one label ({names[0]!r}) in the training data; "
                                                  f"classification needs two or more"))
    if problems:
        raise DataError(problems)
    return splits


def derive_splits(recipe: Recipe, given: dict[str, Split]) -> dict[str, Split]:
    """Split validation and test off train where the recipe gives none.

    Each row's split follows from a hash of its content and `data.split.seed` alone (stable hashing, as TFDS does):
    the same row lands in the same split whatever else the file holds. So when a file grows between two versions of
    a model, the rows the earlier one was tested on are still test rows and the rows it trained on never become
    test rows (the like-for-like promotion gate relies on it), and a row that occurs twice cannot be in train and in
    test at once. The fractions hold on average (each row independently), not to the row; each split gets at least
    one row."""
    spec = recipe.data.split
    train = given["train"]
    ds = train.dataset
    out = dict(given)
    need = [s for s in ("test", "validation") if s not in given]
    if not need:
        return out
    too_few = DataError([Problem("data.train", f"{len(ds)} rows are too few to split off {' and '.join(need)}; "
                                               f"give them as files or add rows")])
    if len(ds) <= len(need):
        raise too_few
    u = [split_unit(spec.seed, row) for row in iter_rows(ds)]
    members: dict[str, list[int]] = {s: [] for s in need}
    rest: list[int] = []
    for i, x in enumerate(u):
        lo = 0.0
        for s in need:
            lo += getattr(spec, s)
            if x < lo:
                members[s].append(i)
                break
        else:
            rest.append(i)
    for s in need:  # a tiny file: a split that came out empty takes the rows of one input (its copies too) from
        if members[s]:  # train, or from a holdout that has more than one input
            continue
        donors = [rest] + [members[o] for o in need if o != s]
        donor = next((d for d in donors if len({u[i] for i in d}) >= 2), None)
        if donor is None:
            raise too_few
        smallest = min(u[i] for i in donor)
        members[s] = [i for i in donor if u[i] == smallest]
        donor[:] = [i for i in donor if u[i] != smallest]
    if not rest:
        raise too_few
    for s, rows in (*members.items(), ("train", rest)):
        # a fingerprint of our own: datasets would hash the whole list of indices (4 s for a million rows)
        out[s] = Split(s, ds.select(rows, new_fingerprint=uuid.uuid4().hex), train.origin,
                       lambda i, r=rows, w=train.where: w(r[i]), parent=ds, rows=rows)
    return {s: out[s] for s in SPLITS}


BATCH_ROWS = 10_000  # rows a pass over a split reads from Arrow at a time


def iter_column(ds, name: str):
    """A column's values a batch of rows at a time (a million-row column is never one Python list)."""
    for batch in ds.select_columns([name]).iter(batch_size=BATCH_ROWS):
        yield from batch[name]


def iter_rows(ds):
    """Rows as dicts, read a batch at a time (reading rows one by one costs datasets a formatting pass each)."""
    for batch in ds.iter(batch_size=BATCH_ROWS):
        keys = list(batch)
        for values in zip(*batch.values()):
            yield dict(zip(keys, values))


def content_key(row: dict) -> str:
    """A row's inputs as a digest (32 hex digits): every role but `label`, with empty fields left out and values as
    text, so that it does not depend on how the whole file was typed (an int label column that one row turns into
    floats, a column some rows lack). Copies of an input share it whatever their labels."""
    inputs = {k: v if type(v) is str else _canon(v) for k, v in sorted(row.items())
              if k != "label" and v is not None and v != ""}
    return hashlib.sha256(json.dumps(inputs, ensure_ascii=False).encode()).hexdigest()[:32]


def _canon(v):
    if isinstance(v, dict):
        return {str(k): _canon(x) for k, x in sorted(v.items()) if x is not None}
    if isinstance(v, (list, tuple)):
        return [_canon(x) for x in v]
    return str(v)


def split_unit(seed: int, row: dict) -> float:
    """A row's place in [0, 1), from its inputs (content_key) and the seed: where derive_splits puts it."""
    digest = hashlib.sha256(f"{seed}\0{content_key(row)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# ----------------------------------------------------------------------------------------------------------------
# Rendering and tokenization
# ----------------------------------------------------------------------------------------------------------------

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def render_instruction(row: dict) -> tuple[str, list[tuple[int, int]]]:
    """Alpaca prompt + output; the span of the output is where the loss goes."""
    inp = row.get("input") or ""
    prompt = (ALPACA_WITH_INPUT if inp.strip() else ALPACA_NO_INPUT).format(instruction=row["instruction"], input=inp)
    return prompt + row["output"], [(len(prompt), len(prompt) + len(row["output"]))]


def render_chat(messages: list[dict], tokenizer, template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The conversation through the chat template; spans cover each assistant turn with its end-of-turn marker."""
    kw = {"chat_template": template} if template else {}

    def render(msgs, gen=False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **kw)

    full = render(messages)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix, upto = render(messages[:i], gen=True), render(messages[: i + 1])
        if full.startswith(upto) and upto.startswith(prefix):
            spans.append((len(prefix), len(upto)))
            cursor = len(upto)
        else:  # a template that rewrites earlier turns: find the content itself
            start = full.find(m["content"], cursor)
            if start < 0:
                raise ValueError("the chat template drops assistant content; cannot place the loss")
            spans.append((start, start + len(m["content"])))
            cursor = start + len(m["content"])
    return full, spans


def tokenize_example(recipe: Recipe, tokenizer, row: dict, label_ids: dict[str, int] | None = None) -> dict:
    """One row -> input_ids, attention_mask, labels (and the untruncated length, `n_tokens`)."""
    max_len = recipe.data.max_seq_len
    if recipe.task in ("classification", "regression"):
        enc = tokenizer(row["text"], row.get("text_pair"), truncation=True, max_length=max_len)
        n = len(tokenizer(row["text"], row.get("text_pair"))["input_ids"])
        label = label_ids[str(row["label"])] if recipe.task == "classification" else float(row["label"])
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": label,
                "n_tokens": n}
    fmt = recipe.data.layout
    if fmt == "text":
        ids = tokenizer(row["text"])["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        n = len(ids)
        ids = ids[:max_len]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids), "n_tokens": n}
    if fmt == "instruction":
        text, spans = render_instruction(row)
        add_special, add_eos = True, True
    else:
        text, spans = render_chat(row["messages"], tokenizer, recipe.data.chat_template)
        add_special, add_eos = False, False  # the template writes its own special tokens
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [tid if e > s and any(a <= s < b for a, b in spans) else -100
              for tid, (s, e) in zip(ids, enc["offset_mapping"])]
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    n = len(ids)
    ids, labels = ids[:max_len], labels[:max_len]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "n_tokens": n}


def tokenize_batch(recipe: Recipe, tokenizer, batch: dict[str, list],
                   label_ids: dict[str, int] | None = None) -> dict[str, list]:
    """A batch of rows (columns of lists, as `datasets.map(batched=True)` hands them) -> the columns of
    `tokenize_example`, row for row the same. Classification, regression and plain text go through one tokenizer
    call per batch (the fast tokenizer splits it over its threads), untruncated, so each row is tokenized once: the
    untruncated length is `n_tokens`, and only the rows longer than `max_seq_len` are tokenized again with
    truncation (which keeps the closing special tokens a cut would lose). Instruction and chat rows, whose loss
    masks come from character offsets, go a row at a time."""
    n_rows = len(next(iter(batch.values()))) if batch else 0
    rows = [{k: batch[k][i] for k in batch} for i in range(n_rows)]
    pairs = batch.get("text_pair")
    plain = recipe.task in ("classification", "regression") or recipe.data.layout == "text"
    if not plain or (pairs is not None and any(not p for p in pairs)):  # a row's empty pair: a text alone
        out = [tokenize_example(recipe, tokenizer, row, label_ids) for row in rows]
        cols: dict[str, list] = {k: [o[k] for o in out] for k in ("input_ids", "attention_mask", "labels", "n_tokens")}
    else:
        max_len, texts = recipe.data.max_seq_len, batch["text"]
        ids = encode_ids(tokenizer, texts, pairs)
        if recipe.task == "causal_lm":  # plain text: the EOS, then a cut (no closing token to keep)
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            full = [list(x) + eos for x in ids]
            n = [len(x) for x in full]
            ids = [x[:max_len] for x in full]
            labels: list = [list(x) for x in ids]
        else:
            n = [len(x) for x in ids]
            long = [i for i, k in enumerate(n) if k > max_len]
            if long:
                cut = tokenizer([texts[i] for i in long], [pairs[i] for i in long] if pairs is not None else None,
                                truncation=True, max_length=max_len)["input_ids"]
                ids = list(ids)
                for i, x in zip(long, cut):
                    ids[i] = x
            label = batch["label"]
            labels = [label_ids[str(v)] for v in label] if recipe.task == "classification" else \
                [float(v) for v in label]
        cols = {"input_ids": [list(x) for x in ids], "attention_mask": [[1] * len(x) for x in ids],
                "labels": labels, "n_tokens": n}
    # `length`: tokens fed (after truncation); `units`: what the row's loss is averaged over (1, or a causal LM's
    # predicted tokens): read as Arrow columns by the loop and the length checks, never rebuilt row by row
    cols["length"] = [len(x) for x in cols["input_ids"]]
    cols["units"] = [predicted_tokens(y) for y in cols["labels"]] if recipe.task == "causal_lm" else [1] * n_rows
    # `content`: the row's input digest (content_key), by which another job knows the rows this one trained on
    cols["content"] = [content_key(row) for row in rows]
    return cols


def encode_ids(tokenizer, texts: list[str], pairs: list[str] | None = None) -> list[list[int]]:
    """`tokenizer(texts, pairs)["input_ids"]`, the same ids: untruncated, with the special tokens. A fast
    tokenizer whose class calls its backend as transformers' own does is called the same way (truncation and
    padding off, special tokens in the text split as the tokenizer says) but without the character offsets, which
    cost a third of the time; any other tokenizer goes through its own call. ValueError for a value that is not
    text."""
    for v in itertools.chain(texts, pairs or ()):
        if type(v) is not str:
            raise ValueError(f"a text that is not text: {str(v)[:60]!r} ({type(v).__name__})")
    backend = getattr(tokenizer, "_tokenizer", None)
    encode = getattr(backend, "encode_batch_fast", None)
    if encode is None or not _plain_fast(type(tokenizer)) or hasattr(tokenizer, "_switch_to_input_mode"):
        return tokenizer(texts, pairs)["input_ids"]
    if backend.truncation is not None:  # a tokenizer.json may carry one (all-MiniLM-L6-v2's cuts at 128)
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    if backend.encode_special_tokens != split:
        backend.encode_special_tokens = split
    return [e.ids for e in encode(list(zip(texts, pairs)) if pairs is not None else list(texts))]


@functools.cache
def _plain_fast(cls) -> bool:
    """A fast tokenizer class that neither overrides how a call reaches the backend nor adds to it (LUKE's
    entities, LayoutLM's boxes, remote code that does)."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    return issubclass(cls, TokenizersBackend) and cls.__call__ is PreTrainedTokenizerBase.__call__ and \
        cls._encode_plus is TokenizersBackend._encode_plus and \
        cls.set_truncation_and_padding is TokenizersBackend.set_truncation_and_padding


# rows a further process must have to pay for its start (~2 s): below that, one process whose fast tokenizer
# threads its batches over the CPUs is as fast (2 cores: 25,000-31,000 rows/s threaded, 40,000 in 2 processes)
PARALLEL_ROWS = 200_000


def tokenize_split(recipe: Recipe, tokenizer, sp: Split, label_ids: dict[str, int] | None = None,
                   processes: int = 1, scratch: Path | None = None):
    """The split as model inputs, a batch of rows at a time (`tokenize_batch`), over up to `processes` processes
    (at least PARALLEL_ROWS rows each). `n_tokens` keeps each example's length before truncation.

    scratch: a folder for the result's Arrow files (else datasets writes them beside the source's own, which may be
    the user's save_to_disk folder or the shared datasets cache). The processes are spawned, never forked: the
    driver tokenizes while another thread starts Ray, and a fork copies whatever lock a thread holds."""
    if recipe.task == "causal_lm" and (recipe.data.layout) != "text" and not tokenizer.is_fast:
        raise ValueError("instruction and chat formats need a fast tokenizer (offsets place the loss)")
    procs = max(1, min(processes, len(sp.dataset) // PARALLEL_ROWS))
    import multiprocess

    where = {"cache_file_name": str(Path(scratch) / f"{sp.name}.arrow")} if scratch is not None else {}
    method = multiprocess.get_start_method(allow_none=True)
    threads = os.environ.get("TOKENIZERS_PARALLELISM")
    if procs > 1:
        multiprocess.set_start_method("spawn", force=True)  # datasets makes its Pool with the default method
        # its processes inherit it: one thread each, a process per CPU (datasets would set it, and say so)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return sp.dataset.map(_Tokenize(recipe, tokenizer, label_ids), batched=True, batch_size=1000,
                              remove_columns=sp.dataset.column_names, desc=f"tokenizing {sp.name}",
                              load_from_cache_file=False, num_proc=procs if procs > 1 else None,
                              new_fingerprint=uuid.uuid4().hex, **where)  # not a hash of the tokenizer: 2 s
    finally:
        if procs > 1:
            multiprocess.set_start_method(method, force=True)
            # datasets puts back a copy of os.environ, not the process's environment: the driver's own value put
            # back (an existing variable overwritten in place, which a thread reading the environment survives)
            if threads is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = threads


class _Tokenize:
    """tokenize_batch as a picklable callable (datasets hands it to its worker processes)."""

    def __init__(self, recipe: Recipe, tokenizer, label_ids: dict[str, int] | None):
        self.recipe, self.tokenizer, self.label_ids = recipe, tokenizer, label_ids

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        return tokenize_batch(self.recipe, self.tokenizer, batch, self.label_ids)


PACK_CHUNK_TOKENS = 1 << 23  # packs are built this many tokens at a time (bounded memory, 32-bit list offsets)


def pack(ds, max_len: int, seed: int, scratch: Path | None = None):
    """A causal LM's tokenized examples packed whole into rows of at most `max_len` tokens, best fit by decreasing
    length (ties in a seeded order), in Arrow: no Python object per token.

    Each packed row's `position_ids` restart at 0 at every example, which is how transformers tells the examples
    apart (attention within an example only: masking_utils.find_packed_sequence_indices); each example's first
    label is -100 (nothing before it in its example predicts it, as unpacked); `units` and `length` are summed,
    `examples` counts them and `content` lists their digests. The packs are built a chunk at a time, each written
    to `scratch` (and memory-mapped back) where it is given. Returns (packed dataset, rows per pack)."""
    import datasets
    import numpy as np
    import pyarrow as pa

    if len(ds) == 0:
        raise ValueError("the train split has no examples to pack")
    table = ds.select_columns(["input_ids", "labels", "length", "units", "content"]).with_format("arrow")[:]
    lengths = table.column("length").to_numpy()
    bins = _best_fit(lengths, max_len, seed)
    parts, chunk, tokens = [], [], 0

    def flush() -> None:
        part = _pack_table(table, lengths, chunk)
        if scratch is None:
            parts.append(datasets.Dataset(part))
            return
        path = Path(scratch) / f"packed-{len(parts):05d}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, part.schema) as writer:
            writer.write_table(part)
        parts.append(datasets.Dataset.from_file(str(path)))

    for b in bins:  # whole packs to a chunk, each chunk under PACK_CHUNK_TOKENS tokens
        chunk.append(b)
        tokens += int(lengths[b].sum())
        if tokens >= PACK_CHUNK_TOKENS:
            flush()
            chunk, tokens = [], 0
    if chunk:
        flush()
    sizes = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
    return (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), sizes


def _pack_table(table, lengths, bins: list[list[int]]):
    """The Arrow table of these packs (pack's columns), from the examples' table."""
    import numpy as np
    import pyarrow as pa

    order = np.fromiter((j for b in bins for j in b), dtype=np.int64)
    sizes = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
    taken = table.take(pa.array(order))

    def flat(name: str) -> np.ndarray:
        return taken.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)

    ids, labels = flat("input_ids"), flat("labels").copy()
    ex_len = lengths[order]
    ex_start = np.concatenate([[0], np.cumsum(ex_len)[:-1]])
    labels[ex_start[ex_len > 0]] = -100
    positions = np.arange(len(ids)) - np.repeat(ex_start, ex_len)
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # each pack's first example
    per_pack = np.add.reduceat(ex_len, first)
    tok_off = pa.array(np.concatenate([[0], np.cumsum(per_pack)]).astype(np.int32))
    ex_off = pa.array(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32))
    return pa.table({
        "input_ids": pa.ListArray.from_arrays(tok_off, pa.array(ids)),
        "labels": pa.ListArray.from_arrays(tok_off, pa.array(labels)),
        "position_ids": pa.ListArray.from_arrays(tok_off, pa.array(positions.astype(np.int32))),
        "length": pa.array(per_pack),
        "units": pa.array(np.add.reduceat(taken.column("units").to_numpy(), first)),
        "examples": pa.array(sizes),
        "content": pa.ListArray.from_arrays(ex_off, taken.column("content").combine_chunks()),
    })


def _best_fit(lengths, max_len: int, seed: int) -> list[list[int]]:
    """Rows into bins of at most max_len tokens: longest first, each into the fullest bin it fits (bins kept by
    their free room; the rooms that some bin has, sorted, found by bisection)."""
    import bisect

    import numpy as np

    tie = np.random.default_rng(seed).permutation(len(lengths))
    order = np.lexsort((tie, -np.asarray(lengths)))
    bins: list[list[int]] = []
    by_free: dict[int, list[int]] = {}  # free tokens -> bins with that much room
    rooms: list[int] = []  # the keys of by_free with a bin, sorted
    for j in order.tolist():
        k = int(lengths[j])
        at = bisect.bisect_left(rooms, k)
        if at == len(rooms):
            bins.append([j])
            b, left = len(bins) - 1, max_len - k
        else:
            free = rooms[at]
            b = by_free[free].pop()
            if not by_free[free]:
                rooms.pop(at)
            bins[b].append(j)
            left = free - k
        if left > 0:
            if not by_free.get(left):
                by_free[left] = []
                bisect.insort(rooms, left)
            by_free[left].append(b)
    return bins


# ----------------------------------------------------------------------------------------------------------------


def _cap(problems: list[Problem]) -> list[Problem]:
    if len(problems) <= MAX_ROWS_NAMED:
        return problems
    extra = len(problems) - MAX_ROWS_NAMED
    return problems[:MAX_ROWS_NAMED] + [Problem(problems[0].path, f"... and {extra} more malformed rows")]


def _nearby(path: Path) -> str:
    parent = path.parent
    if not parent.is_dir():
        return f"; the folder {parent} does not exist either"
    import difflib

    close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
