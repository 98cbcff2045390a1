"""The recipe schema: exact error text, all problems at once, secrets, shipped recipes, the README reference."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.recipe import SNAPSHOT, RecipeError, allowed_vars, json_schema, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[2]

BASE = """\
name: t
model:
  name: some/model
task: classification
data:
  train: train.jsonl
"""


def problems(text: str, env=None, allowed=frozenset()) -> list[str]:
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, source="r.yaml", env=env or {}, allowed=allowed)
    return [p.render("r.yaml") for p in e.value.problems]


def test_minimal_recipe_fills_defaults():
    r = parse_recipe(BASE, env={})
    assert r.tuning.mode == "full"
    assert r.train.optimizer == "adamw" and r.train.batch_size == 8
    assert r.resources.workers == 1 and r.resources.mixed_precision == "no"
    assert r.data.train.path == "train.jsonl" and r.data.validation is None
    assert r.export.onnx is False


def test_unknown_key_with_suggestion():
    assert problems(BASE + "train:\n  learnig_rate: 0.1\n") == [
        "r.yaml:8: train.learnig_rate: unknown key (did you mean 'lr'?); allowed here: epochs, max_steps, optimizer, "
        "lr, schedule, warmup_ratio, warmup_steps, weight_decay, batch_size, grad_accum, max_grad_norm, seed, "
        "eval_every, checkpoint_every, keep_checkpoints, early_stopping, select_metric, group_by_length, packing, "
        "callbacks"
    ]


def test_unknown_key_spelling_suggestion_and_inside_a_tuning_mode():
    out = problems(BASE + "tuning:\n  mode: lora\n  alpah: 4\n  rank: 4\n")
    assert out == [
        "r.yaml:9: tuning.alpah: unknown key (did you mean 'alpha'?); allowed here: mode, r, alpha, dropout, "
        "target_modules",
        "r.yaml:10: tuning.rank: unknown key (did you mean 'r'?); allowed here: mode, r, alpha, dropout, "
        "target_modules",
    ]


def test_wrong_type_names_the_value():
    assert problems(BASE + "train:\n  batch_size: lots\n") == ["r.yaml:8: train.batch_size: 'lots' is not a whole number"]
    assert problems(BASE + "train: 3\n") == ["r.yaml:7: train: 3 is a number; expected a mapping of keys"]


def test_every_problem_at_once_in_file_order():
    text = BASE.replace("task: classification", "task: clasification") + (
        "tuning: lorra\n"
        "train:\n  optimizer: sdg\n  lr: -1\n"
        "resources:\n  workers: 0\n  gpus: 2\n"
    )
    assert problems(text) == [
        "r.yaml:4: task: 'clasification' is not allowed (did you mean 'classification'?); expected one of "
        "'classification', 'regression' or 'causal_lm'",
        "r.yaml:7: tuning.mode: 'lorra' is not a tuning mode (did you mean 'lora'?); expected one of 'full', 'lora', "
        "'qlora', 'freeze'",
        "r.yaml:9: train.optimizer: 'sdg' is not allowed (did you mean 'sgd'?); expected one of 'adamw', 'sgd' or "
        "'adafactor'",
        "r.yaml:10: train.lr: -1 is out of range; must be > 0",
        "r.yaml:12: resources.workers: 0 is out of range; must be >= 1",
        "r.yaml:13: resources.gpus: unknown key (did you mean 'gpus_per_worker'?); allowed here: workers, "
        "gpus_per_worker, cpus_per_worker, mixed_precision, strategy, zero_stage, gradient_checkpointing, gpu_memory_gib, "
        "max_failures, priority, max_minutes, preemptible",
    ]


def test_missing_required_keys():
    assert problems("name: t\n") == [
        "r.yaml: model: required key is missing",
        "r.yaml: task: required key is missing",
        "r.yaml: data: required key is missing",
    ]


def test_gpu_only_settings_without_gpus_are_refused():
    text = BASE + "tuning: qlora\nresources:\n  mixed_precision: fp16\n"
    assert problems(text) == [
        "r.yaml:7: tuning.mode: 'qlora' quantizes the base model with bitsandbytes and needs GPUs; set "
        "resources.gpus_per_worker to 1 or more, or use mode 'lora' on CPUs",
        "r.yaml:9: resources.mixed_precision: 'fp16' needs GPUs; use 'bf16' or 'no' on CPUs, or set "
        "resources.gpus_per_worker",
    ]
    assert problems(BASE + "tuning: lora\nresources:\n  strategy: deepspeed\n") == [
        "r.yaml:9: resources.strategy: 'deepspeed' needs GPUs; use 'ddp' on CPUs, or set resources.gpus_per_worker"]
    ok = parse_recipe(text + "  gpus_per_worker: 1\n", env={})
    assert ok.tuning.mode == "qlora" and ok.tuning.quant_type == "nf4"


def test_cross_key_rules():
    text = BASE + "  format: chat\n  columns:\n    txt: sentence\n"
    assert problems(text) == [
        "r.yaml:7: data.format: applies to task 'causal_lm' only (task is 'classification')",
        "r.yaml:9: data.columns.txt: unknown role 'txt' for task 'classification' (did you mean 'text'?); roles: "
        "text, label, text_pair",
    ]
    assert problems(BASE + "train:\n  warmup_ratio: 0.1\n  warmup_steps: 5\n") == [
        "r.yaml:7: train: give 'warmup_ratio' or 'warmup_steps', not both"
    ]
    assert problems(BASE + "  labels: [a, b, a]\n") == ["r.yaml:7: data.labels: repeats 'a'; each label once"]


def test_yaml_pitfalls():
    # YAML reads `no` as false; the user meant the string.
    assert parse_recipe(BASE + "resources:\n  mixed_precision: no\n", env={}).resources.mixed_precision == "no"
    assert problems(BASE + "name: again\n") == ["r.yaml:7: name: duplicate key (first given at line 1)"]
    assert problems("name: [unclosed\n") == ["r.yaml:2: not valid YAML: expected ',' or ']', but got '<stream end>'"]
    assert problems("- a list\n") == ["r.yaml: the top level must be a mapping of keys, got a list"]


def test_shorthands():
    r = parse_recipe(BASE + "  test: {hub: org/ds, split: test, revision: v1}\ntuning: lora\n", env={})
    assert r.tuning.mode == "lora" and r.tuning.r == 8 and r.tuning.target_modules == "auto"
    assert r.data.test.hub == "org/ds" and r.data.test.revision == "v1"
    assert problems(BASE + "  test: {path: a.csv, hub: b}\n") == [
        "r.yaml:7: data.test: give exactly one of 'path' (a local file or folder) or 'hub' (a hub dataset id)"
    ]


def test_secrets_are_interpolated_but_never_written_out(tmp_path):
    text = BASE.replace("  name: some/model\n", "  name: some/model\n  token: ${HF_TOKEN}\n") + (
        "  validation: ${DATA_DIR:-/data}/val.jsonl\n"
    )
    r = parse_recipe(text, env={"HF_TOKEN": "hf_s3cr3t_value"}, allowed={"DATA_DIR"})
    assert r.model.token.get_secret_value() == "hf_s3cr3t_value"
    assert r.data.validation.path == "/data/val.jsonl"
    out = r.to_yaml()
    assert "hf_s3cr3t_value" not in out and "hf_s3cr3t_value" not in repr(r) and "hf_s3cr3t_value" not in str(r)
    assert yaml.safe_load(out)["model"]["token"] == "${HF_TOKEN}"
    assert yaml.safe_load(out)["data"]["validation"]["path"] == "${DATA_DIR:-/data}/val.jsonl"
    # The written recipe loads again, to the same job.
    again = parse_recipe(out, env={"HF_TOKEN": "hf_s3cr3t_value"}, allowed={"DATA_DIR"})
    assert again.model_dump() == r.model_dump()
    # A token pasted into the file is masked on the way out, too.
    literal = parse_recipe(text.replace("${HF_TOKEN}", "hf_pasted"), env={}, allowed={"DATA_DIR"})
    assert "hf_pasted" not in literal.to_yaml()
    assert problems(text, allowed={"DATA_DIR"}) == [
        "r.yaml:4: model.token: environment variable HF_TOKEN is not set (export it, or write ${HF_TOKEN:-default})"
    ]


def test_a_variable_fills_a_secret_field_or_one_the_operator_allows_and_no_message_repeats_its_value():
    secret = "hf_CanaryValue0451"
    env = {"HF_TOKEN": secret, "EPOCHS": secret, "RUN": "nightly"}
    for where in ("name: ${HF_TOKEN:-nightly}\n", "train:\n  epochs: ${HF_TOKEN:-1}\n"):
        text = BASE.replace("name: t\n", "") if where.startswith("name") else BASE
        got = problems(where + text, env=env)
        assert len(got) == 1 and "${HF_TOKEN} is not taken here" in got[0] and secret not in got[0], got
        assert "RUNNER_RECIPE_VARS lists (now: none)" in got[0]
    assert parse_recipe(BASE.replace("name: t", "name: ${RUN}"), env=env, allowed={"RUN"}).name == "nightly"
    got = problems(BASE + "train:\n  epochs: ${EPOCHS}\n", env=env, allowed={"EPOCHS"})
    assert got == ["r.yaml:8: train.epochs: ${EPOCHS} is not a number"], "the reference, never the value"
    assert parse_recipe(BASE.replace("name: t", "name: ${RUN}"), env=env, allowed=SNAPSHOT).name == "nightly"
    assert allowed_vars({"RUNNER_RECIPE_VARS": "RUN, DATA_DIR bad-name"}) == {"RUN", "DATA_DIR"}


def test_show_defaults_never_prints_the_secret(write):
    p = write("r.yaml", BASE.replace("  name: some/model\n", "  name: some/model\n  token: ${HF_TOKEN}\n"))
    env = {"HF_TOKEN": "hf_s3cr3t_value", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "runner.cli", "validate", str(p), "--show-defaults", "--schema-only"],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "hf_s3cr3t_value" not in out.stdout + out.stderr
    assert yaml.safe_load(out.stdout)["model"]["token"] == "${HF_TOKEN}"


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "nope.yaml")
    assert e.value.render() == f"{tmp_path / 'nope.yaml'}: 1 problem\n  {tmp_path / 'nope.yaml'}: no such file"


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#"), "each recipe opens with a comment: what, how to run, hardware"
    r = load_recipe(path, env={})
    assert r.name
    # and it matches the JSON Schema that editors use
    import jsonschema

    jsonschema.validate(yaml.safe_load(text), json_schema())


def test_json_schema_rejects_unknown_keys():
    import jsonschema

    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "t", "model": {"name": "m"}, "task": "regression", "data": {"train": "a.csv"},
                             "bogus": 1}, json_schema())


def test_readme_reference_matches_schema():
    from jobs.recipe_doc import render, splice

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert splice(readme) == readme, "README is stale: python -m jobs.recipe_doc --write README.md"
    for key in ("`train.grad_accum`", "`tuning.train_last_layers`", "`export.quantize`", "`data.split.seed`"):
        assert key in render()


def test_cli_does_not_import_torch():
    code = "import sys, runner.cli; bad = [m for m in sys.modules if m.split('.')[0] in " \
           "('torch', 'transformers', 'datasets', 'ray')]; print(bad); sys.exit(1 if bad else 0)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def _imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module)
    return mods


def test_layering_rules():
    for f in (ROOT / "jobs").rglob("*.py"):
        assert not any(m.split(".")[0] == "runner" for m in _imports(f)), f"{f} imports runner"
    for f in (ROOT / "runner").rglob("*.py"):
        bad = [m for m in _imports(f) if m.split(".")[0] == "jobs" and m not in ("jobs.recipe", "jobs.schema",
                                                                                   "jobs.jobdir")]
        assert not bad, f"{f} imports {bad}; runner may import jobs.recipe, jobs.schema and jobs.jobdir only"
    assert not any(m.split(".")[0] == "torch" for m in _imports(ROOT / "jobs" / "recipe.py"))


def test_schema_command_prints_json_schema():
    out = subprocess.run([sys.executable, "-m", "runner.cli", "schema"], capture_output=True, text=True, cwd=ROOT)
    schema = json.loads(out.stdout)
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"name", "model", "task", "data"}


def test_select_metric_is_a_validation_metric_of_the_task():
    r = parse_recipe(BASE + "train:\n  select_metric: macro_f1\n", env={})
    assert r.select_metric == ("macro_f1", True)
    assert parse_recipe(BASE, env={}).select_metric == ("accuracy", True)
    assert problems(BASE + "train:\n  select_metric: mse\n") == [
        "r.yaml:8: train.select_metric: 'mse' is not a validation metric of task 'classification'; expected one of "
        "accuracy, macro_f1, loss"]


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    """Who imports whom among the project's own modules (at the top or inside a function: both are a dependency)."""
    files = [f for top in ("jobs", "runner") for f in (ROOT / top).rglob("*.py")]
    mods = {_module_of(f): f for f in files}
    graph = {}
    for m, f in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                named = [f"{node.module}.{a.name}" for a in node.names]
                deps |= {n for n in named if n in mods} or ({node.module} & mods.keys())
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names} & mods.keys()
        graph[m] = deps - {m}
    return graph


def test_no_import_cycle_in_jobs_or_runner():
    """A cycle made `python -m runner.cli submit` say 'No such command' (a second copy of the CLI module)."""
    graph, cycles = _graph(), []

    def visit(m, path):
        for d in graph[m]:
            if d in path:
                cycles.append(path[path.index(d):] + [d])
            elif d not in done:
                visit(d, path + [d])
        done.add(m)

    done: set[str] = set()
    for m in sorted(graph):
        if m not in done:
            visit(m, [m])
    # a package's __init__ joining its own rooms is not a cycle the rooms take part in
    cycles = [c for c in cycles if not any(c[i + 1].startswith(c[i] + ".") for i in range(len(c) - 1))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_another_modules_private_name():
    found = []
    for f in [f for top in ("jobs", "runner") for f in (ROOT / top).rglob("*.py")]:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("jobs", "runner"):
                found += [f"{f.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found


def test_python_m_runner_cli_and_the_installed_command_have_the_same_verbs():
    """The same app however it is started (a cycle once gave `python -m runner.cli` 6 verbs of 19)."""
    def verbs(cmd):
        out = subprocess.run(cmd + ["--help"], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "COLUMNS": "200", "TERM": "dumb"})
        assert out.returncode == 0, out.stderr
        section = out.stdout.split("Commands")[1]
        return [line.split()[1] for line in section.splitlines() if line.startswith("│ ") and line.split()[1:]
                and line[2] != " "]

    as_module = verbs([sys.executable, "-m", "runner.cli"])
    installed = verbs([str(Path(sys.executable).with_name("runner"))])
    assert as_module == installed
    assert {"validate", "run", "submit", "list", "status", "logs", "cancel", "retry", "rm", "server", "cluster",
            "models", "schedule"} <= set(as_module)
