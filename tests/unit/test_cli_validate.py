"""`runner validate` as a user runs it: exit codes, one clear line a problem, no traceback, JSON output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CPU_RECIPES = ["quickstart.yaml", "classifier-full.yaml", "regression.yaml"]


def runner(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "runner.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


@pytest.mark.parametrize("name", CPU_RECIPES)
def test_cpu_recipes_pass_preflight(name, minilm):
    out = runner("validate", f"recipes/{name}")
    assert out.returncode == 0, out.stderr
    assert f"recipes/{name}: ready to run (train " in out.stdout
    assert out.stdout.rstrip().endswith(f"next: runner submit recipes/{name}   |   runner run recipes/{name}   "
                                        "(in the foreground, without a server)")


def test_gpu_recipes_validate_schema_only():
    for name in ("instruct-lora-gpu.yaml", "chat-lora-gpu.yaml"):
        out = runner("validate", f"recipes/{name}", "--schema-only")
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"recipes/{name}: recipe is valid")


def test_data_problems_exit_2_with_key_file_and_line(tmp_path, minilm):
    (tmp_path / "train.jsonl").write_text("".join(f'{{"text": "a {i}", "label": "x"}}\n{{"text": "b {i}", "label": "y"}}\n'
                                                 for i in range(10)))
    (tmp_path / "test.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "z"}\n')
    (tmp_path / "r.yaml").write_text(f"name: t\nmodel:\n  name: {minilm}\ntask: classification\ndata:\n"
                                     "  train: train.jsonl\n  test: test.jsonl\n")
    out = runner("validate", tmp_path / "r.yaml")
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.splitlines() == [
        f"{tmp_path / 'r.yaml'}: 1 problem",
        f"  {tmp_path / 'r.yaml'}:7: data.test: test.jsonl:2: label 'z' is not among the training labels (x, y)",
    ]
    assert "Traceback" not in out.stderr


def test_a_schema_problem_does_not_hide_the_data_problems(tmp_path, minilm):
    """Three mistakes in one recipe, in three sections: a misspelt key, an invalid value, and a test label the
    training data lacks. All three come at once; where the data section itself is broken, its check cannot run."""
    (tmp_path / "train.jsonl").write_text("".join(f'{{"text": "a {i}", "label": "x"}}\n{{"text": "b {i}", "label": "y"}}\n'
                                                 for i in range(10)))
    (tmp_path / "test.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "z"}\n')
    (tmp_path / "r.yaml").write_text(f"name: t\nmodel:\n  name: {minilm}\ntask: classification\ndata:\n"
                                     "  train: train.jsonl\n  test: test.jsonl\ntrain:\n  learnig_rate: 0.1\n"
                                     "resources:\n  workers: 0\n")
    out = runner("validate", tmp_path / "r.yaml")
    r = tmp_path / "r.yaml"
    assert out.returncode == 2 and out.stderr.splitlines()[0] == f"{r}: 3 problems", out.stderr
    assert out.stderr.splitlines()[1:] == [
        f"  {r}:9: train.learnig_rate: unknown key (did you mean 'lr'?); allowed here: " + ", ".join(
            ["epochs", "max_steps", "optimizer", "lr", "schedule", "warmup_ratio", "warmup_steps", "weight_decay",
             "batch_size", "grad_accum", "max_grad_norm", "seed", "eval_every", "checkpoint_every",
             "keep_checkpoints", "early_stopping", "select_metric", "group_by_length", "packing",
             "callbacks"]),
        f"  {r}:11: resources.workers: 0 is out of range; must be >= 1",
        f"  {r}:7: data.test: test.jsonl:2: label 'z' is not among the training labels (x, y)"]
    report = json.loads(runner("validate", r, "--json").stdout)
    assert [p["path"] for p in report["problems"]] == ["train.learnig_rate", "resources.workers", "data.test"]
    assert [p["path"] for p in json.loads(runner("validate", r, "--json", "--schema-only").stdout)["problems"]] == \
        ["train.learnig_rate", "resources.workers"]
    (tmp_path / "r.yaml").write_text(r.read_text().replace("  test: test.jsonl", "  tset: test.jsonl"))
    report = json.loads(runner("validate", r, "--json").stdout)  # data broken: its own problem only
    assert [p["path"] for p in report["problems"]] == ["data.tset", "train.learnig_rate", "resources.workers"]


def test_schema_problems_json(tmp_path):
    (tmp_path / "r.yaml").write_text("name: t\nmodel: {name: m}\ntask: regresion\ndata: {train: a.csv}\n")
    out = runner("validate", tmp_path / "r.yaml", "--json")
    assert out.returncode == 2
    report = json.loads(out.stdout)
    assert report["ok"] is False
    assert report["problems"] == [{"path": "task", "line": 3, "message": "'regresion' is not allowed (did you mean "
                                   "'regression'?); expected one of 'classification', 'regression' or 'causal_lm'"}]


def test_missing_recipe_is_one_line(tmp_path):
    out = runner("validate", tmp_path / "nope.yaml")
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"{tmp_path / 'nope.yaml'}: 1 problem", f"  {tmp_path / 'nope.yaml'}: no such file"]


def test_show_defaults_prints_a_loadable_recipe(tmp_path):
    out = runner("validate", "recipes/regression.yaml", "--show-defaults", "--schema-only")
    assert out.returncode == 0
    (tmp_path / "data").symlink_to(ROOT / "recipes" / "data")
    (tmp_path / "full.yaml").write_text(out.stdout)
    from jobs.recipe import load_recipe

    a, b = load_recipe(ROOT / "recipes" / "regression.yaml"), load_recipe(tmp_path / "full.yaml")
    assert a.model_dump() == b.model_dump()
    assert "keep_checkpoints: 2" in out.stdout and "mixed_precision: 'no'" in out.stdout


def test_run_arguments_and_unknown_job_get_one_clear_line(tmp_path):
    import os

    env = {**os.environ, "RUNNER_HOME": str(tmp_path / "home")}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "runner.cli", "run", *args], capture_output=True, text=True,
                              cwd=ROOT, env=env)

    for args in ([], ["recipes/quickstart.yaml", "--resume", "x"]):
        out = run(*args)
        assert out.returncode == 2 and out.stderr.startswith("give a recipe file (runner run recipe.yaml) or a job")
    (tmp_path / "home" / "artifacts" / "a-20260101-000000-beef").mkdir(parents=True)
    (tmp_path / "home" / "artifacts" / "a-20260101-000000-beef" / "recipe.yaml").write_text("name: a\n")
    out = run("--resume", "nope")
    assert out.returncode == 2
    assert out.stderr.strip() == (f"no job 'nope': not a job folder, nor a job id under {tmp_path / 'home' / 'artifacts'}"
                                  f"; the latest there: a-20260101-000000-beef")
    assert "Traceback" not in out.stderr
