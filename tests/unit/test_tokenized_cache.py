"""The tokenized-data cache (jobs/tokenized_cache.py) through jobs.driver.prepare_data, as a retry, a resume or a
schedule's fire reaches it: the same files, tokenizer and data settings are tokenized once; anything that changes
the result misses; the cache stays within its bound, the entries used least recently going first."""

import json
import os
import time
from pathlib import Path

import datasets
import pytest

from jobs import tokenized_cache as cache
from jobs.driver import prepare_data
from jobs.recipe import parse_recipe
from tiny import keyword_rows, tiny_model_dir


@pytest.fixture
def world(tmp_path, tokenizer):
    model = tiny_model_dir(tmp_path / "model", "bert", tokenizer)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in keyword_rows(120)))
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    return tmp_path, model, data, artifacts


def _recipe(tmp_path: Path, data: Path, max_seq_len: int = 32):
    return parse_recipe(f"name: c\nmodel:\n  name: m\ntask: classification\ndata:\n  train: {data}\n"
                        f"  max_seq_len: {max_seq_len}\n", base_dir=tmp_path, env={})


def _job(artifacts: Path, name: str) -> Path:
    d = artifacts / name
    d.mkdir()
    return d


def _said(job: Path) -> list[str]:
    """The job's log lines (train.log), without their times."""
    path = job / "train.log"
    return [x.split(" ", 1)[1] for x in path.read_text().splitlines()] if path.exists() else []


def _columns(job: Path) -> dict:
    d = datasets.load_from_disk(str(job / "prepared" / "data"))
    return {split: {c: d[split][c] for c in d[split].column_names} for split in d}


def test_the_same_rows_are_tokenized_once_and_anything_that_changes_them_misses(world):
    tmp_path, model, data, artifacts = world
    first = _job(artifacts, "a")
    rows, notes = prepare_data(_recipe(tmp_path, data), first, str(model))
    assert not any("reused" in m for m in _said(first))
    entries = [e for e in (artifacts / ".tokenized").iterdir() if not e.name.startswith(".")]
    assert len(entries) == 1

    retry = _job(artifacts, "b")  # a retry, a resume, an unchanged schedule fire: the same recipe and files
    assert prepare_data(_recipe(tmp_path, data), retry, str(model)) == (rows, notes)
    assert f"tokenized data reused from {entries[0]} (the same files, tokenizer and data settings)" in _said(retry)
    assert _columns(retry) == _columns(first), "what the workers read is what tokenizing gave"
    arrow = next((retry / "prepared" / "data" / "train").glob("*.arrow"))
    assert os.stat(arrow).st_nlink >= 2, "linked, not copied"

    other_len = _job(artifacts, "c")
    prepare_data(_recipe(tmp_path, data, max_seq_len=16), other_len, str(model))
    assert not any("reused" in m for m in _said(other_len)), "a setting that changes the tokens is a new key"
    data.write_text(data.read_text().replace("good", "fine", 1))  # one word of one row, same size
    edited = _job(artifacts, "d")
    prepare_data(_recipe(tmp_path, data), edited, str(model))
    assert not any("reused" in m for m in _said(edited)), "the file's content is the key, not its name"
    assert len([e for e in (artifacts / ".tokenized").iterdir() if not e.name.startswith(".")]) == 3


def test_an_entry_that_is_not_whole_is_not_used_and_is_stored_anew(world):
    tmp_path, model, data, artifacts = world
    first = _job(artifacts, "a")
    prepare_data(_recipe(tmp_path, data), first, str(model))
    (entry,) = [e for e in (artifacts / ".tokenized").iterdir() if not e.name.startswith(".")]
    next((entry / "data" / "train").glob("*.arrow")).unlink()  # half evicted, or damaged
    second = _job(artifacts, "b")
    prepare_data(_recipe(tmp_path, data), second, str(model))
    assert any(m.startswith(f"the cached tokenized data at {entry} could not be used (its files are not those it "
                            f"was stored with): tokenizing") for m in _said(second))
    assert _columns(second) == _columns(first)
    third = _job(artifacts, "c")
    prepare_data(_recipe(tmp_path, data), third, str(model))
    assert any(m.startswith("tokenized data reused from") for m in _said(third)), "stored whole again"
    assert _columns(third) == _columns(first)


def test_a_hub_model_is_keyed_by_its_cached_snapshot_and_one_not_there_is_not_cached(world, minilm):
    tmp_path, model, data, artifacts = world
    assert cache.key(_recipe(tmp_path, data), "org/not-in-the-cache") is None
    local = cache.key(_recipe(tmp_path, data), str(model))
    hub = cache.key(_recipe(tmp_path, data), minilm)  # the packaged MiniLM, seeded into the test HF cache
    assert local is not None and hub is not None and hub != local, "another tokenizer, another key"


def test_the_cache_can_be_turned_off(world, monkeypatch):
    tmp_path, model, data, artifacts = world
    monkeypatch.setenv("RUNNER_TOKENIZED_CACHE_GB", "0")
    for name in ("a", "b"):
        job = _job(artifacts, name)
        prepare_data(_recipe(tmp_path, data), job, str(model))
        assert not any("reused" in m for m in _said(job))
    assert not (artifacts / ".tokenized").exists()


def test_eviction_removes_the_least_recently_used_first(tmp_path):
    root = tmp_path / ".tokenized"
    now = time.time()
    for i, name in enumerate(("old", "mid", "new")):
        e = root / name
        e.mkdir(parents=True)
        (e / "meta.json").write_text("{}")
        (e / "blob").write_bytes(b"x" * 1000)
        (e / cache.USED).touch()
        os.utime(e / cache.USED, (now - 100 + i * 10, now - 100 + i * 10))
    (root / ".half.tmp").mkdir()  # another job's entry being written: not the eviction's
    os.utime(root / "old" / cache.USED, (now, now))  # 'old' was just reused: 'mid' is now the least recent
    assert cache.evict(root, bound=2100) == ["mid"]
    assert sorted(p.name for p in root.iterdir()) == [".half.tmp", "new", "old"]
    assert cache.evict(root, bound=0, keep=root / "old") == ["new"]
