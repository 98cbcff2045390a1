"""The tokenized-data cache (jobs/tokenized_cache.py) through jobs.driver.prepare_data, as a retry, a resume or a
schedule's fire reaches it: the same files, tokenizer and data settings are tokenized once; anything that changes
the result misses; the cache stays within its bound, the entries used least recently going first."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

from jobs import tokenized_cache as cache
from jobs.driver import JobFailed, prepare_data
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


def _validate(recipe_file: Path, artifacts: Path, **env) -> subprocess.CompletedProcess:
    """`runner validate` as a user runs it, with the job folders in `artifacts`."""
    return subprocess.run([sys.executable, "-m", "runner.cli", "validate", str(recipe_file)], capture_output=True,
                          text=True, cwd=recipe_file.parent,
                          env={**os.environ, "RUNNER_ARTIFACTS": str(artifacts), **env})


def _as_the_driver_reads_it(recipe_file: Path, job: Path):
    """The job's recipe.yaml as the server writes it (paths made absolute), loaded as the driver loads it."""
    from jobs.recipe import SNAPSHOT, load_recipe

    (job / "recipe.yaml").write_text(load_recipe(recipe_file).snapshot_yaml())
    return load_recipe(job / "recipe.yaml", allowed=SNAPSHOT)


def test_what_validate_proved_is_not_checked_again_and_changed_data_is(world, monkeypatch):
    from jobs import data as D

    tmp_path, model, data, artifacts = world
    monkeypatch.setenv("RUNNER_TOKENIZED_CACHE_GB", "0")  # every job reads the data: the proof is what is tested
    recipe_file = tmp_path / "recipe.yaml"  # the data path relative, as users write it
    recipe_file.write_text(f"name: c\nmodel:\n  name: {model}\ntask: classification\ndata:\n  train: {data.name}\n"
                           f"  max_seq_len: 32\n")
    out = _validate(recipe_file, artifacts)
    assert out.returncode == 0, out.stderr
    (proof,) = (artifacts / ".validated").glob("*.json")
    held = json.loads(proof.read_text())
    assert sum(held["rows"].values()) == 120 and set(held["rows"]) == {"train", "validation", "test"}

    checked = []  # the row checks that ran: a spy on the real functions, which still do their work
    for name in ("check_rows", "_scan"):
        real = getattr(D, name)
        monkeypatch.setattr(D, name, lambda *a, _real=real, _name=name, **k: (checked.append(_name), _real(*a, **k))[1])
    job = _job(artifacts, "a")
    recipe = _as_the_driver_reads_it(recipe_file, job)
    assert held["key"] == cache.data_key(recipe) and proof.name == f"{held['key']}.json"
    rows, _ = prepare_data(recipe, job, str(model))
    assert checked == [] and rows == held["rows"], checked
    assert any(m.startswith("data checks reused from runner validate at ") and "(the same files by sha256; train "
               in m for m in _said(job)), _said(job)

    # a proof that says other counts than the rows read (written by something else): every check runs
    proof.write_text(json.dumps({**held, "rows": {**held["rows"], "train": held["rows"]["train"] + 1}}))
    job = _job(artifacts, "b")
    assert prepare_data(recipe, job, str(model))[0] == rows and "check_rows" in checked and "_scan" in checked
    assert "the data is not what runner validate saw (changed since, or as it was read): checking it" in _said(job)
    checked.clear()
    garbage_proofs = ("not json", "[]", json.dumps({**held, "key": "0" * 32}), json.dumps({**held, "rows": {}}),
                      json.dumps(held) + " " * 70_000)  # the proof, but past the bytes a proof may have
    for i, garbage in enumerate(garbage_proofs):
        proof.write_text(garbage)
        job = _job(artifacts, f"g{i}")
        prepare_data(recipe, job, str(model))
        assert "check_rows" in checked and not any("data checks reused" in m for m in _said(job)), garbage[:40]
        checked.clear()
    proof.unlink()
    os.mkfifo(proof)  # a FIFO where the proof should be: not waited on, not read
    job = _job(artifacts, "fifo")
    prepare_data(recipe, job, str(model))
    assert "check_rows" in checked
    proof.unlink()
    proof.symlink_to(tmp_path / "elsewhere.json")  # a link: never followed
    (tmp_path / "elsewhere.json").write_text(json.dumps(held))
    assert cache.proven(artifacts / ".validated", recipe) is None

    # the file changed after validate: no proof of it; a malformed line is found and named as ever
    proof.unlink()
    proof.write_text(json.dumps(held))
    with data.open("a") as f:
        f.write('{"text": "broken\n')
    job = _job(artifacts, "changed")
    with pytest.raises(JobFailed, match=r"rows\.jsonl:121"):
        prepare_data(_as_the_driver_reads_it(recipe_file, job), job, str(model))
    # validate of the broken file refuses it and proves nothing
    assert _validate(recipe_file, artifacts).returncode == 2
    assert list((artifacts / ".validated").glob("*.json")) == [proof]


def test_rows_a_proof_let_through_unchecked_are_named_by_line_when_they_fail(world, monkeypatch):
    """A proof that does not hold for the rows (planted, or a same-count rewrite): where the unchecked rows fail
    to tokenize, the checked read runs and names the row."""
    tmp_path, model, data, artifacts = world
    monkeypatch.setenv("RUNNER_TOKENIZED_CACHE_GB", "0")
    lines = data.read_text().splitlines()
    lines[6] = json.dumps({"text": None, "label": "pos"})  # read as a null text, which tokenizing refuses
    data.write_text("\n".join(lines) + "\n")
    recipe = _recipe(tmp_path, data)
    job = _job(artifacts, "a")
    from jobs import data as D

    rows = {n: len(sp.dataset) for n, sp in D.load_splits(recipe, proven=True).items()}
    cache.prove(artifacts / ".validated", cache.data_key(recipe), rows)
    with pytest.raises(JobFailed, match=r"data\.train: rows\.jsonl:7: text: empty"):
        prepare_data(recipe, job, str(model))
    assert any(m.startswith("data checks reused from runner validate") for m in _said(job))


def test_validate_proves_only_the_files_it_checked(world, monkeypatch):
    """A file rewritten while pre-flight reads it (same rows, other content): the report carries no key, so no
    proof is written of content nobody checked."""
    from jobs import data as D
    from jobs.preflight import preflight

    tmp_path, model, data, artifacts = world
    recipe = parse_recipe(f"name: c\nmodel:\n  name: {model}\ntask: classification\ndata:\n  train: {data}\n",
                          base_dir=tmp_path, env={})
    assert preflight(recipe).data_key is None, "no key asked for: no file hashed"
    assert preflight(recipe, key=True).data_key == cache.data_key(recipe) is not None
    real = D.load_splits

    def read_then_rewritten(*a, **k):
        out = real(*a, **k)
        data.write_text(data.read_text().replace("good", "fine"))
        return out

    monkeypatch.setattr(D, "load_splits", read_then_rewritten)
    report = preflight(recipe, key=True)
    assert report.ok and report.data_key is None


def test_proofs_are_bounded_and_only_proofs_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "PROOFS_KEPT", 2)
    root = tmp_path / "proofs"
    root.mkdir()
    (root / "mine.json").write_text("{}")  # a user's file, in a folder a user named
    keys = [f"{i:032x}" for i in range(4)]
    for i, k in enumerate(keys):
        assert cache.prove(root, k, {"train": 1}) == root / f"{k}.json"
        os.utime(root / f"{k}.json", (1000 + i, 1000 + i))
    assert sorted(p.name for p in root.iterdir()) == sorted(["mine.json", f"{keys[2]}.json", f"{keys[3]}.json"])
    assert cache.prove(root, "../../etc/passwd", {"train": 1}) is None


def test_validate_leaves_no_proof_where_the_driver_would_not_look(world):
    tmp_path, model, data, artifacts = world
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(f"name: c\nmodel:\n  name: {model}\ntask: classification\ndata:\n  train: {data}\n")
    # a remote server (RUNNER_SERVER) whose artifacts this machine does not name: its drivers read other storage
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "RUNNER_ARTIFACTS"}
    out = subprocess.run([sys.executable, "-m", "runner.cli", "validate", str(recipe_file)], capture_output=True,
                         text=True, env={**env, "RUNNER_HOME": str(home), "RUNNER_SERVER": "http://10.9.9.9:1",
                                         "RUNNER_VALIDATE_ARTIFACTS": str(tmp_path / "elsewhere")})
    assert out.returncode == 0, out.stderr
    assert not (home / "artifacts").exists() and not (tmp_path / "elsewhere").exists()
