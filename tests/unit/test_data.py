"""Data: each source kind, each format, masks, splits, and the pre-flight's messages (no Ray, no training)."""

import json
import re
from pathlib import Path

import pytest

from jobs import data as D
from jobs.modelfiles import resolve_model
from jobs.preflight import Report, preflight
from jobs.recipe import parse_recipe
from tiny import tiny_tokenizer

ROWS = [{"text": f"sentence number {i}", "label": "pos" if i % 3 else "neg"} for i in range(30)]


def recipe(tmp_path: Path, body: str, task: str = "classification", model: str = "some/model"):
    return parse_recipe(f"name: t\nmodel:\n  name: {model}\ntask: {task}\ndata:\n{body}", base_dir=tmp_path, env={})


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def errors(fn, *a) -> list[str]:
    with pytest.raises(D.DataError) as e:
        fn(*a)
    return [f"{p.path}: {p.message}" for p in e.value.problems]


# -- source kinds ---------------------------------------------------------------------------------------------------


def test_each_local_source_kind_reads_the_same_rows(tmp_path):
    import datasets

    (tmp_path / "a.jsonl").write_text(jsonl(ROWS))
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "a.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in ROWS))
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:10]),
                          "holdout": datasets.Dataset.from_list(ROWS[10:])}).save_to_disk(str(tmp_path / "dd"))
    for src in ("a.jsonl", "a.json", "a.csv", "a.parquet", "disk"):
        r = recipe(tmp_path, f"  train: {src}\n")
        sp = D.map_columns(r, D.read_source(r, "train", r.data.train))
        assert sp.dataset.to_list() == ROWS, src
    r = recipe(tmp_path, "  train: dd\n  test: {path: dd, split: holdout}\n")
    assert len(D.read_source(r, "train", r.data.train).dataset) == 10
    assert len(D.read_source(r, "test", r.data.test).dataset) == 20
    r = recipe(tmp_path, "  train: {path: dd, split: nope}\n")
    assert errors(D.read_source, r, "train", r.data.train) == [
        "data.train: dd: has no split 'nope'; it has train, holdout (choose one with split: NAME)"]


def test_a_local_file_is_read_without_a_request_to_the_hub(tmp_path, monkeypatch):
    """datasets' json/csv/parquet loaders count each load with a HEAD request to the hub; on a machine that cannot
    reach it that cost seconds a file (the fuzz found a 5 s pre-flight). The network edge records what is asked."""
    import datasets.load

    asked = []

    class Session:
        def head(self, url, **kw):
            asked.append(url)

    monkeypatch.delenv("HF_UPDATE_DOWNLOAD_COUNTS", raising=False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)  # datasets' default
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.load, "get_session", lambda: Session())
    for name, text in (("a.jsonl", jsonl(ROWS)), ("a.csv", "text,label\nx,pos\n")):
        (tmp_path / name).write_text(text)
        r = recipe(tmp_path, f"  train: {name}\n")
        assert len(D.read_source(r, "train", r.data.train).dataset) >= 1
    assert asked == []


def test_hub_source_passes_id_subset_split_revision(tmp_path, monkeypatch):
    import datasets

    seen = {}

    def fake_load(path, name=None, split=None, revision=None):  # the network edge: the hub itself
        seen.update(path=path, name=name, split=split, revision=revision)
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    r = recipe(tmp_path, "  train: {hub: org/topics, subset: en, revision: v2}\n")
    sp = D.read_source(r, "train", r.data.train)
    assert seen == {"path": "org/topics", "name": "en", "split": "train", "revision": "v2"}
    assert len(sp.dataset) == 30 and sp.origin == "org/topics[train]"


def test_hub_source_offline_miss_says_how_to_fetch(tmp_path):
    r = recipe(tmp_path, "  train: {hub: org/not-cached}\n")
    (msg,) = errors(D.read_source, r, "train", r.data.train)
    assert msg.startswith("data.train: hub dataset 'org/not-cached' (split 'train'): cannot be loaded: ")
    assert msg.endswith("; fetch it once with network: hf download --repo-type dataset org/not-cached")


# -- bad files name the file and line -------------------------------------------------------------------------------


def test_missing_file_with_suggestion(tmp_path):
    (tmp_path / "train.jsonl").write_text(jsonl(ROWS))
    r = recipe(tmp_path, "  train: trian.jsonl\n")
    assert errors(D.read_source, r, "train", r.data.train) == [
        f"data.train: trian.jsonl: no such file or folder (looked for {tmp_path / 'trian.jsonl'}) "
        f"(did you mean 'train.jsonl'?)"]


def test_malformed_rows_named_by_file_and_line(tmp_path):
    lines = jsonl(ROWS[:3]).splitlines()
    (tmp_path / "t.jsonl").write_text("\n".join([lines[0], "", '{"text": "x", "label": }', lines[1], "[1, 2]"]))
    r = recipe(tmp_path, "  train: t.jsonl\n")
    assert errors(D.read_source, r, "train", r.data.train) == [
        "data.train: t.jsonl:3: not valid JSON: Expecting value (column 24)",
        "data.train: t.jsonl:5: expected a JSON object, got list",
    ]
    # two objects on one line: Arrow's reader takes them as two rows; the row by row look names the line
    (tmp_path / "t.jsonl").write_text("\n".join([lines[0], lines[1] + lines[2], lines[0]]))
    assert errors(D.read_source, r, "train", r.data.train) == [
        f"data.train: t.jsonl:2: not valid JSON: Extra data (column {len(lines[1]) + 1})"]
    (tmp_path / "t.csv").write_text("text,label\nfine,pos\ntoo,many,fields\n")
    r = recipe(tmp_path, "  train: t.csv\n")
    assert errors(D.read_source, r, "train", r.data.train) == [
        "data.train: t.csv:3: 3 fields, the header has 2 (text, label)"]
    (tmp_path / "t.json").write_text('[\n  {"text": "a", "label": "x"},\n  {"text": "b" "label": "y"}\n]')
    r = recipe(tmp_path, "  train: t.json\n")
    assert errors(D.read_source, r, "train", r.data.train) == [
        "data.train: t.json:3: not valid JSON: Expecting ',' delimiter (column 16)"]
    (tmp_path / "t.parquet").write_text("not parquet")
    r = recipe(tmp_path, "  train: t.parquet\n")
    (msg,) = errors(D.read_source, r, "train", r.data.train)
    assert msg.startswith("data.train: t.parquet: not a readable Parquet file: ")
    (tmp_path / "t.txt").write_text("x")
    r = recipe(tmp_path, "  train: t.txt\n")
    assert errors(D.read_source, r, "train", r.data.train) == [
        "data.train: t.txt: cannot tell the format from the suffix '.txt'; accepted: .jsonl, .json, .csv, .parquet "
        "or a datasets save_to_disk folder"]


def test_missing_column_and_bad_values_name_rows(tmp_path):
    (tmp_path / "t.jsonl").write_text(jsonl([{"sentence": "a", "label": "x"}]))
    r = recipe(tmp_path, "  train: t.jsonl\n")
    assert errors(D.load_splits, r) == [
        "data.train: t.jsonl: no column 'text'; the task needs it as 'text'. Columns: sentence, label. "
        "Map one with data.columns.text: COLUMN"]
    rows = [{"review": f"r{i}", "stars": i} for i in range(20)] + [{"review": "bad", "stars": "five"}]
    (tmp_path / "reg.jsonl").write_text(jsonl(rows))
    r = recipe(tmp_path, "  train: reg.jsonl\n  columns: {text: review, label: stars}\n", task="regression")
    # a mixed column fails in datasets' own loader; a string column with a non-number is caught row by row
    (tmp_path / "reg2.jsonl").write_text(jsonl([{"review": f"r{i}", "stars": str(i)} for i in range(20)]
                                               + [{"review": "bad", "stars": "five"}, {"review": "", "stars": "1"}]))
    r = recipe(tmp_path, "  train: reg2.jsonl\n  columns: {text: review, label: stars}\n", task="regression")
    assert errors(D.load_splits, r) == [
        "data.train: reg2.jsonl:22: text: empty",
        "data.train: reg2.jsonl:21: label: 'five' is not a number (regression needs a numeric target)"]


def test_unknown_label_in_test(tmp_path):
    (tmp_path / "train.jsonl").write_text(jsonl(ROWS))
    (tmp_path / "test.jsonl").write_text(jsonl([{"text": "a", "label": "pos"}, {"text": "b", "label": "neutral"}]))
    r = recipe(tmp_path, "  train: train.jsonl\n  test: test.jsonl\n")
    assert errors(D.load_splits, r) == [
        "data.test: test.jsonl:2: label 'neutral' is not among the training labels (neg, pos)"]
    r = recipe(tmp_path, "  train: train.jsonl\n  labels: [pos, neutral]\n")
    msg, *others = errors(D.load_splits, r)
    assert all(m.startswith(("data.validation: ", "data.test: ")) for m in others)
    named = re.match(r"data\.train: ((?:train\.jsonl:\d+, ){0,4}train\.jsonl:\d+)(?: \(and \d+ more rows\))?: label "
                     r"'neg' is not among the labels listed in data\.labels \(pos, neutral\)$", msg)
    assert named, msg
    lines = [int(x.split(":")[1]) for x in named.group(1).split(", ")]
    assert lines == sorted(lines) and all(ROWS[n - 1]["label"] == "neg" for n in lines), lines  # file lines


def test_label_names_stable_and_classlabel_names_kept(tmp_path):
    import datasets

    (tmp_path / "t.jsonl").write_text(jsonl([{"text": f"x{i}", "label": i % 11} for i in range(44)]))
    r = recipe(tmp_path, "  train: t.jsonl\n")
    sp = D.load_splits(r)
    assert D.label_names(r, sp["train"]) == [str(i) for i in range(11)]  # numeric order, not "10" < "2"
    ds = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(20)], "label": [0, 1, 1, 0] * 5},
                                    features=datasets.Features({"text": datasets.Value("string"),
                                                                "label": datasets.ClassLabel(names=["neg", "pos"])}))
    ds.save_to_disk(str(tmp_path / "cl"))
    r = recipe(tmp_path, "  train: cl\n")
    sp = D.load_splits(r)
    assert D.label_names(r, sp["train"]) == ["neg", "pos"]


# -- splits ---------------------------------------------------------------------------------------------------------


def test_splits_reproducible_from_seed_and_disjoint(tmp_path):
    rows = [{"text": f"row {i}", "label": "ab"[i % 2]} for i in range(200)]
    (tmp_path / "t.jsonl").write_text(jsonl(rows))

    def texts(seed):
        r = recipe(tmp_path, f"  train: t.jsonl\n  split: {{validation: 0.1, test: 0.2, seed: {seed}}}\n")
        return {k: v.dataset["text"] for k, v in D.load_splits(r).items()}

    a, b, c = texts(1), texts(1), texts(2)
    assert a == b
    assert a != c
    for k, frac in (("validation", 0.1), ("test", 0.2)):  # each row independently: binomial, within 4 sigma
        assert abs(len(a[k]) - 200 * frac) <= 4 * (200 * frac * (1 - frac)) ** 0.5, (k, len(a[k]))
    sets = [set(a[k]) for k in ("train", "validation", "test")]
    assert sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2]) and sets[1].isdisjoint(sets[2])
    assert set().union(*sets) == {r["text"] for r in rows}
    (tmp_path / "t.jsonl").write_text(jsonl(rows))
    # the file grows: every row keeps its split (no row trained on becomes a test row), the new ones are placed alike
    (tmp_path / "t.jsonl").write_text(jsonl(rows + [{"text": f"row {i}", "label": "ab"[i % 2]} for i in range(200, 300)]))
    grown = texts(1)
    for k in ("train", "validation", "test"):
        assert set(a[k]) <= set(grown[k]), k
    assert abs(len(grown["test"]) - 60) <= 4 * (300 * 0.2 * 0.8) ** 0.5
    # copies of a row share its split, whatever their labels
    relabelled = [{**r, "label": "b" if r["label"] == "a" else "a"} for r in rows]
    (tmp_path / "t.jsonl").write_text(jsonl(rows + relabelled))
    doubled = texts(1)
    assert {k: set(v) for k, v in doubled.items()} == {k: set(v) for k, v in a.items()}
    # a row with a column the others lack (every other row then reads it as null) moves no other row
    (tmp_path / "t.jsonl").write_text(jsonl(rows + [{"text": "odd one", "text_pair": "more", "label": "a"}]))
    typed = texts(1)
    for k in ("train", "validation", "test"):
        assert set(a[k]) <= set(typed[k]), k
    (tmp_path / "t.jsonl").write_text(jsonl(rows))
    # a split given as a file is used as it is; only the missing one is carved from train
    (tmp_path / "v.jsonl").write_text(jsonl(rows[:7]))
    r = recipe(tmp_path, "  train: t.jsonl\n  validation: v.jsonl\n")
    s = D.load_splits(r)
    assert len(s["validation"].dataset) == 7 and len(s["test"].dataset) + len(s["train"].dataset) == 200
    assert abs(len(s["test"].dataset) - 20) <= 4 * (200 * 0.1 * 0.9) ** 0.5
    # rows of a derived split still point at their line in the original file
    n = int(s["test"].dataset["text"][3].split()[1])
    assert s["test"].where(3) == f"t.jsonl:{n + 1}"


def test_too_few_rows_to_split(tmp_path):
    (tmp_path / "t.jsonl").write_text(jsonl(ROWS[:2]))
    r = recipe(tmp_path, "  train: t.jsonl\n")
    assert errors(D.load_splits, r) == [
        "data.train: 2 rows are too few to split off test and validation; give them as files or add rows"]


# -- formats and loss masks -----------------------------------------------------------------------------------------


def _labelled_text(tok, ex) -> str:
    return tok.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l != -100])


def test_instruction_format_loss_only_on_response(tmp_path, tokenizer, shared_data):
    rows = json.loads((shared_data / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    r = recipe(tmp_path, f"  train: {shared_data / 'alpaca_en_demo.json'}\n  format: instruction\n"
                         f"  max_seq_len: 4096\n", task="causal_lm")
    splits = D.load_splits(r)
    assert sum(len(s.dataset) for s in splits.values()) == len(rows) == 999
    with_input = next(x for x in rows if x["input"].strip())
    for row in (rows[0], with_input, next(x for x in rows if any(ord(c) > 127 for c in x["output"]))):
        ex = D.tokenize_example(r, tokenizer, row)
        assert _labelled_text(tokenizer, ex) == row["output"] + tokenizer.eos_token
        prompt = tokenizer.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l == -100])
        assert row["instruction"] in prompt and "### Response:" in prompt
        assert row["output"] not in prompt
    assert "### Input:" in tokenizer.decode(D.tokenize_example(r, tokenizer, with_input)["input_ids"])
    tok = D.tokenize_split(r, tokenizer, splits["validation"])
    assert set(tok.column_names) == {"input_ids", "attention_mask", "labels", "n_tokens", "length", "units",
                                    "content"}


def test_instruction_truncation_keeps_prompt_masked(tmp_path, tokenizer, shared_data):
    r = recipe(tmp_path, "  train: x.jsonl\n  format: instruction\n  max_seq_len: 16\n", task="causal_lm")
    row = {"instruction": "Summarise the following long text for me please", "input": "", "output": "Short."}
    ex = D.tokenize_example(r, tokenizer, row)
    assert len(ex["input_ids"]) == 16 and ex["n_tokens"] > 16
    assert all(l == -100 for l in ex["labels"])  # the response fell off the end: nothing to learn


def test_chat_format_loss_only_on_assistant_turns(tmp_path, tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Sunny, 21 °C."}]
    r = recipe(tmp_path, "  train: x.jsonl\n  format: chat\n", task="causal_lm")
    ex = D.tokenize_example(r, tokenizer, {"messages": msgs})
    assert _labelled_text(tokenizer, ex) == "Hello! How can I help?<|im_end|>\nSunny, 21 °C.<|im_end|>\n"
    assert tokenizer.decode(ex["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_text_format_labels_every_token(tmp_path, tokenizer):
    r = recipe(tmp_path, "  train: x.jsonl\n  max_seq_len: 8\n", task="causal_lm")
    ex = D.tokenize_example(r, tokenizer, {"text": "The quick brown fox jumps over the lazy dog again and again."})
    assert ex["labels"] == ex["input_ids"] and len(ex["input_ids"]) == 8 and ex["n_tokens"] > 8


def test_classification_and_regression_examples(tmp_path, tokenizer):
    r = recipe(tmp_path, "  train: x.jsonl\n  max_seq_len: 8\n")
    ex = D.tokenize_example(r, tokenizer, {"text": "hello world", "label": "pos"}, {"neg": 0, "pos": 1})
    assert ex["labels"] == 1 and ex["input_ids"] == tokenizer("hello world")["input_ids"]
    r = recipe(tmp_path, "  train: x.jsonl\n", task="regression")
    assert D.tokenize_example(r, tokenizer, {"text": "ok", "label": "4.5"})["labels"] == 4.5


@pytest.mark.parametrize("task,pairs", [("classification", "none"), ("classification", "all"),
                                        ("classification", "some"), ("regression", "none"), ("causal_lm", "none")])
def test_batched_tokenizing_gives_each_row_what_one_row_at_a_time_gives(tmp_path, tokenizer, task, pairs):
    """tokenize_split tokenizes a batch at a time, each row once; the reference is tokenize_example, a row at a
    time and twice (truncated, and untruncated for n_tokens): the same columns, row for row, long rows included."""
    import datasets

    words = "the quick brown fox jumps over a lazy dog while seven green parrots sing".split()
    rows = []
    for i in range(120):
        row = {"text": " ".join(words[: 1 + (i * 7) % len(words)] * (1 + i % 3))}
        if pairs != "none":  # "some": a few rows' pair is "" (which one row at a time reads as no pair)
            row["text_pair"] = " ".join(words[(i % 5):(i % 5) + 1 + i % 4]) if pairs == "all" or i % 11 else ""
        if task != "causal_lm":
            row["label"] = ("neg", "pos", "mid")[i % 3] if task == "classification" else float(i % 7) / 2
        rows.append(row)
    r = recipe(tmp_path, "  train: x.jsonl\n  max_seq_len: 12\n", task=task)
    ids = {"neg": 0, "pos": 1, "mid": 2} if task == "classification" else None
    got = D.tokenize_split(r, tokenizer, D.Split("train", datasets.Dataset.from_list(rows), "x"), ids)
    want = [D.tokenize_example(r, tokenizer, row, ids) for row in rows]
    assert sum(w["n_tokens"] > 12 for w in want) > 20, "the rows include many that are truncated"
    for k in ("input_ids", "attention_mask", "labels", "n_tokens"):
        assert got[k] == [w[k] for w in want], k
    assert got["content"] == [D.content_key(row) for row in rows]
    assert got["length"] == [len(w["input_ids"]) for w in want]
    assert got["units"] == [sum(1 for x in w["labels"][1:] if x != -100) if task == "causal_lm" else 1 for w in want]


def test_fast_ids_are_the_tokenizers_own_whatever_it_was_set_to_before(tmp_path, minilm):
    """encode_ids calls the fast tokenizer's backend directly (no offsets): the ids must be what the tokenizer's own
    call gives, untruncated although all-MiniLM-L6-v2's tokenizer.json cuts at 128 and a truncating call came just
    before, special-token text included, pairs included, for WordPiece and byte-level BPE with added tokens; and
    tokenize_split gives each row what tokenize_example gives."""
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm)
    words = "the quick brown fox jumps over a lazy dog [SEP] while seven [CLS] green parrots sing".split()
    texts = [" ".join(words[: 1 + i % len(words)] * (1 + i % 40)) for i in range(200)]
    pairs = [" ".join(words[i % 5:]) for i in range(200)]
    assert max(len(x) for x in tok(texts)["input_ids"]) > 300, "rows past the 128 of the tokenizer.json"
    assert D._plain_fast(type(tok)), "the fast path is the one tested"
    for _ in range(2):
        tok(texts[:3], truncation=True, max_length=8)  # leaves the backend set to truncate
        assert D.encode_ids(tok, texts) == tok(texts)["input_ids"]
        assert D.encode_ids(tok, texts, pairs) == tok(texts, pairs)["input_ids"]
    # a byte-level BPE tokenizer with tokens added (special and not), splitting special-token text or not
    bpe = tiny_tokenizer()
    bpe.add_tokens(["quickbrown", "<extra>"])
    bpe.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    odd = [t.replace("seven", "<tool> seven quickbrown <extra>") + " <|endoftext|> ünïcödé 🦊" for t in texts]
    assert D._plain_fast(type(bpe))
    for split in (False, True):
        bpe.split_special_tokens = split
        assert D.encode_ids(bpe, odd) == bpe(odd)["input_ids"], split
        assert D.encode_ids(bpe, odd, pairs) == bpe(odd, pairs)["input_ids"], split
    with pytest.raises(ValueError, match="a text that is not text: 'None'"):  # the driver reports it by key
        D.encode_ids(tok, texts[:2] + [None])
    r = recipe(tmp_path, "  train: x.jsonl\n  max_seq_len: 64\n")
    rows = [{"text": t, "label": "ab"[i % 2]} for i, t in enumerate(texts)]
    got = D.tokenize_split(r, tok, D.Split("train", datasets.Dataset.from_list(rows), "x"), {"a": 0, "b": 1})
    want = [D.tokenize_example(r, tok, row, {"a": 0, "b": 1}) for row in rows]
    for k in ("input_ids", "n_tokens"):
        assert got[k] == [w[k] for w in want], k


def test_tokenizing_writes_into_the_scratch_folder_never_beside_the_users_data(tmp_path, tokenizer):
    """A save_to_disk folder as the source: datasets would write its cache-*.arrow files into it (the user's
    folder, growing with every job); with a scratch folder they go there. Two processes (spawned) give exactly
    the rows, in the order, that one gives."""
    import datasets

    data = tmp_path / "data"
    datasets.Dataset.from_list([{"text": f"row {i} " * (1 + i % 4), "label": "ab"[i % 2]}
                                for i in range(120)]).save_to_disk(str(data))
    before = sorted(p.name for p in data.iterdir())
    r = recipe(tmp_path, "  train: data\n  max_seq_len: 12\n")
    sp = D.map_columns(r, D.read_source(r, "train", r.data.train))
    got = {}
    for procs, scratch in ((1, tmp_path / "s1"), (2, tmp_path / "s2")):
        scratch.mkdir()
        D.PARALLEL_ROWS, old = 50, D.PARALLEL_ROWS  # so that 120 rows make two processes' worth
        try:
            got[procs] = D.tokenize_split(r, tokenizer, sp, {"a": 0, "b": 1}, processes=procs, scratch=scratch)
        finally:
            D.PARALLEL_ROWS = old
        assert len(got[procs]) == 120 and len(list(scratch.glob("*.arrow"))) == procs, procs
    assert got[2].to_dict() == got[1].to_dict()
    assert sorted(p.name for p in data.iterdir()) == before


def test_chat_rows_are_checked(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "yo"}]}
            for i in range(20)]
    rows += [{"messages": [{"role": "user", "content": "only me"}]}, {"messages": [{"role": "robot", "content": "x"}]}]
    (tmp_path / "c.jsonl").write_text(jsonl(rows))
    r = recipe(tmp_path, "  train: c.jsonl\n  format: chat\n", task="causal_lm")
    assert errors(D.load_splits, r) == [
        "data.train: c.jsonl:21: messages: no assistant message: nothing to learn from",
        "data.train: c.jsonl:22: message {'role': 'robot', 'content': 'x'} needs a role (system, user, assistant, "
        "tool) and text content"]


# -- pre-flight -----------------------------------------------------------------------------------------------------


def _messages(rep: Report) -> list[str]:
    return [f"{p.path}: {p.message}" for p in rep.problems]


def test_preflight_counts_truncation_and_refuses_when_none_fits(tmp_path, tiny_llama_dir):
    rows = [{"text": f"row {i} " + "word " * (i % 20)} for i in range(100)]
    (tmp_path / "t.jsonl").write_text(jsonl(rows))
    r = recipe(tmp_path, "  train: t.jsonl\n  max_seq_len: 20\n", task="causal_lm", model=str(tiny_llama_dir))
    rep = preflight(r)
    assert rep.ok, rep.problems
    assert sum(rep.rows.values()) == 100 and min(rep.rows.values()) >= 1
    assert any(n.startswith("train: ") and "longer than data.max_seq_len 20 and will be truncated" in n
               for n in rep.notes)
    (tmp_path / "long.jsonl").write_text(jsonl([{"text": "word " * (30 + i)} for i in range(40)]))
    r = recipe(tmp_path, "  train: long.jsonl\n  max_seq_len: 8\n", task="causal_lm", model=str(tiny_llama_dir))
    msgs = _messages(preflight(r))
    assert re.match(r"data\.max_seq_len: 8: none of \d+ train examples fits \(the longest has ", msgs[0]), msgs
    assert msgs[0].endswith("tokens); raise data.max_seq_len")


def test_preflight_model_resolution(tmp_path, minilm):
    (tmp_path / "t.jsonl").write_text(jsonl(ROWS))
    r = recipe(tmp_path, "  train: t.jsonl\n", model=minilm)
    assert resolve_model(r) == (minilm, None)
    rep = preflight(r)
    assert rep.ok and rep.labels == ["neg", "pos"]
    r = recipe(tmp_path, "  train: t.jsonl\n", model="nobody/not-a-model")
    _, problem = resolve_model(r)
    assert problem.message.startswith("'nobody/not-a-model' (revision 'main') is not in the local cache (")
    assert problem.message.endswith("and HF_HUB_OFFLINE=1; fetch it once with: hf download nobody/not-a-model")
    (tmp_path / "empty").mkdir()
    r = recipe(tmp_path, "  train: t.jsonl\n", model="./empty")
    assert resolve_model(r)[1].message == ("./empty: the folder has no config.json; point at a folder written by "
                                           "save_pretrained, or at a hub id")
    r = recipe(tmp_path, "  train: t.jsonl\n", model="./missing")
    assert resolve_model(r)[1].message == f"./missing: no such folder (looked for {tmp_path / 'missing'})"


def test_preflight_chat_needs_a_template(tmp_path, tokenizer):
    from tiny import tiny_model_dir

    tok = tokenizer.__class__.from_pretrained(str(tiny_model_dir(tmp_path / "m0", "llama", tokenizer)))
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text((tmp_path / "m0" / "config.json").read_text())
    for f in (tmp_path / "m").glob("chat_template*"):
        f.unlink()
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "yo"}]}
            for i in range(20)]
    (tmp_path / "c.jsonl").write_text(jsonl(rows))
    r = recipe(tmp_path, "  train: c.jsonl\n  format: chat\n", task="causal_lm", model="./m")
    assert _messages(preflight(r)) == [
        "data.format: the tokenizer of './m' has no chat template; give one in data.chat_template, or use format "
        "'instruction'"]
    from tiny import CHAT_TEMPLATE

    r = recipe(tmp_path, f"  train: c.jsonl\n  format: chat\n  chat_template: {json.dumps(CHAT_TEMPLATE)}\n",
               task="causal_lm", model="./m")
    assert preflight(r).ok


def test_preflight_reports_data_and_model_problems_together(tmp_path):
    r = recipe(tmp_path, "  train: nothing.jsonl\n", model="nobody/nothing")
    msgs = _messages(preflight(r))
    assert len(msgs) == 2
    assert msgs[0].startswith("model.name: 'nobody/nothing'") and msgs[1].startswith("data.train: nothing.jsonl: ")


def test_a_row_of_megabytes_is_measured_on_its_start_with_the_same_verdict(tmp_path, tiny_llama_dir):
    import time

    rows = [{"text": f"short row {i}"} for i in range(100)] + [{"text": "word " * 1_000_000}]
    (tmp_path / "t.jsonl").write_text(jsonl(rows))
    r = recipe(tmp_path, "  train: t.jsonl\n  max_seq_len: 16\n", task="causal_lm", model=str(tiny_llama_dir))
    t0 = time.perf_counter()
    rep = preflight(r, memory=False)
    assert time.perf_counter() - t0 < 5 and rep.ok, rep.problems
    assert any(n.startswith("train: 1 of ") and "longer than data.max_seq_len 16 and will be truncated" in n
               for n in rep.notes), rep.notes
    assert any("1 examples with a text longer than 1,024 characters were measured on their first 1,024" in n
               for n in rep.notes), rep.notes


def test_files_the_readers_take_are_read_with_each_row_at_its_line(tmp_path):
    """What datasets' readers accept, the scan accepts too, and names each row by its line: JSON Lines ending lines
    with a bare CR, a CSV with a blank line (pandas skips it) and one before its header, a CSV field of 200,000
    characters, and a .json file that holds JSON Lines (read a line at a time, not whole)."""
    cases = {
        "cr.jsonl": '{"text": "a", "label": "x"}\r{"text": "b", "label": "y"}\r{"text": "c", "label": "x"}',
        "blank.csv": "text,label\nhello,x\n   \nworld,y\n",
        "lead.csv": "\ntext,label\nhi,x\nyo,y\n",
        "long.csv": 'text,label\n"' + "w " * 100_000 + '",x\nshort,y\n',
        "lines.json": '{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n',
    }
    want_lines = {"cr.jsonl": [1, 2, 3], "blank.csv": [2, 4], "lead.csv": [3, 4], "long.csv": [2, 3],
                  "lines.json": [1, 3]}
    for name, text in cases.items():
        (tmp_path / name).write_text(text, newline="")
        r = recipe(tmp_path, f"  train: {name}\n")
        sp = D.read_source(r, "train", r.data.train)
        assert len(sp.dataset) == len(want_lines[name]), name
        assert [sp.where(i) for i in range(len(sp.dataset))] == [f"{name}:{n}" for n in want_lines[name]], name
