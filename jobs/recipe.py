"""The recipe: one YAML file that says what to fine-tune, on what, how, and how to export it.

`load_recipe` and `parse_recipe` read it: YAML (with limits: no anchors, bounded size and depth), `${VAR}`
references, the schema (jobs/schema.py, the single home of every default), then the rules that span keys, and
report every problem at once, each with its dotted key path, its line in the file, the offending value and what
would be accepted. It imports no torch (the control plane imports it); the schema's names are importable from here.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from jobs.schema import GRID_MAX, SELECT_METRICS, SWEEP_SECTIONS, TUNING_MODES, Recipe, key_line, roles_for

# ----------------------------------------------------------------------------------------------------------------
# Loading: YAML -> interpolation -> schema -> cross-field checks, every problem at once
# ----------------------------------------------------------------------------------------------------------------


class Problem(typing.NamedTuple):
    path: str  # dotted key path, "" for the whole file
    message: str
    line: int | None = None

    def render(self, source: str = "recipe") -> str:
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class RecipeError(Exception):
    """A recipe that cannot run; `problems` lists every reason."""

    def __init__(self, source: str, problems: list[Problem], partial: "Recipe | None" = None):
        self.source = source
        self.problems = problems
        # the recipe with each section that has a problem left at its defaults, where what the data checks need
        # (task, data, model) is sound: pre-flight checks the data with it, so that every problem comes at once
        self.partial = partial
        self.reset = {p.path.split(".")[0] for p in problems}  # the sections `partial` has at their defaults
        super().__init__(self.render())

    def render(self) -> str:
        n = len(self.problems)
        head = f"{self.source}: {n} problem{'s' if n != 1 else ''}"
        return "\n".join([head] + ["  " + p.render(self.source) for p in self.problems])


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


ALLOWED_VARS = "RUNNER_RECIPE_VARS"  # the environment variable that lists the variables other fields may take
SECRET_FIELDS = (("model", "token"),)  # the fields a ${VAR} may always fill: their values are never shown
_REFUSED = " is not taken here"
SNAPSHOT = "snapshot"  # `allowed` for a job folder's recipe.yaml: its references were checked when it was queued


def allowed_vars(environ: typing.Mapping[str, str] | None = None) -> frozenset[str]:
    """The names RUNNER_RECIPE_VARS lists (commas or spaces between them), of this process's environment."""
    raw = (os.environ if environ is None else environ).get(ALLOWED_VARS, "")
    return frozenset(n for n in re.split(r"[,\s]+", raw) if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n))


def load_recipe(path: str | os.PathLike, env: typing.Mapping[str, str] | None = None,
                allowed: typing.Collection[str] | str | None = None) -> Recipe:
    """Read, interpolate and validate a recipe file. Raises RecipeError listing every problem."""
    p = Path(path)
    source = str(path)
    try:
        size = p.stat().st_size
        if p.exists() and not p.is_file():  # a folder, a pipe, a device: no recipe, and reading one may not end
            raise RecipeError(source, [Problem("", "not a file: give the recipe's YAML file")])
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(source, [Problem("", f"the file is {size:,} bytes; a recipe is at most "
                                                   f"{MAX_RECIPE_BYTES // 1024} KiB (is it the right file?)")])
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(source, [Problem("", "no such file")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(source, [Problem("", f"cannot read: {e}")]) from None
    return parse_recipe(text, source=source, base_dir=p.resolve().parent, env=env, allowed=allowed)


MAX_RECIPE_BYTES = 256 * 1024  # a recipe is a page of settings; far more is no recipe a person wrote
MAX_DEPTH = 16  # the schema nests 4 deep; a list of chat turns in a default a few more
MAX_NODES = 20_000
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where it is there: 10x faster, same results


def _yaml_limits(text: str) -> Problem | None:
    """What makes a text no recipe before anything is built from it: anchors and aliases (eight levels of aliases
    expand a 300-byte text to billions of values), nesting past MAX_DEPTH, more than MAX_NODES values, more than
    MAX_RECIPE_BYTES. Read as a stream of parser events: nothing is expanded, and nothing recurses."""
    size = len(text.encode("utf-8", "replace"))
    if size > MAX_RECIPE_BYTES:
        return Problem("", f"the recipe is {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES // 1024} KiB")
    depth = nodes = 0
    for ev in yaml.parse(text, Loader=_LOADER):
        line = ev.start_mark.line + 1 if ev.start_mark else None
        if isinstance(ev, yaml.AliasEvent) or getattr(ev, "anchor", None):
            return Problem("", "YAML anchors and aliases (&name, *name, <<: *name) are not accepted in a recipe: "
                               "write each value out", line)
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                return Problem("", f"nested more than {MAX_DEPTH} levels deep; a recipe's sections nest a few", line)
        elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        if isinstance(ev, yaml.NodeEvent):
            nodes += 1
            if nodes > MAX_NODES:
                return Problem("", f"more than {MAX_NODES:,} values; a recipe holds a few dozen", line)
    return None


def _python_yaml_error(text: str) -> yaml.YAMLError | None:
    try:
        for _ in yaml.parse(text, Loader=yaml.SafeLoader):
            pass
    except yaml.YAMLError as e:
        return e
    return None


def parse_recipe(text: str, source: str = "recipe", base_dir: Path | None = None,
                 env: typing.Mapping[str, str] | None = None,
                 allowed: typing.Collection[str] | str | None = None) -> Recipe:
    """env: the values of ${VAR} references (this process's environment by default).
    allowed: the variables a field other than a secret one may take: RUNNER_RECIPE_VARS of this process's own
    environment by default (never of `env`, which a client may send), or SNAPSHOT for a job folder's recipe.yaml."""
    env = os.environ if env is None else env
    allowed = allowed_vars() if allowed is None else allowed
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate (JSON's \ud800): no text a file or YAML can hold
        line = text[: e.start].count("\n") + 1
        raise RecipeError(source, [Problem("", f"not text: character {e.start + 1} is a lone surrogate "
                                               f"({e.object[e.start]!r})", line)]) from None
    try:
        limit = _yaml_limits(text)
        if limit is not None:
            raise RecipeError(source, [limit])
        node = yaml.compose(text, Loader=_LOADER)
        data = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as e:
        if "nesting depth" in str(getattr(e, "problem", "")):  # libyaml stops at 1,000 levels
            raise RecipeError(source, [Problem("", f"nested more than {MAX_DEPTH} levels deep; a recipe's sections "
                                                   "nest a few", getattr(e.problem_mark, "line", -1) + 1 or None)]) \
                from None
        e = _python_yaml_error(text) or e  # PyYAML's own words say more than libyaml's
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(source, [Problem("", f"not valid YAML: {problem}", line)]) from None
    lines: dict[tuple, int] = {}
    problems: list[Problem] = []
    if node is not None:
        _index_lines(node, (), lines, problems)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(source, [Problem("", f"the top level must be a mapping of keys, got {_tname(data)}")])

    secrets: dict[tuple, str] = {}
    data = _interpolate(data, (), env, secrets, problems, lines, allowed)

    def placed(r: Recipe) -> Recipe:
        r._base_dir = base_dir or Path.cwd()
        r._secrets = secrets
        r._lines = lines
        return r

    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        refused = {p.path for p in problems if _REFUSED in p.message}  # their "" fails again: one problem is enough
        problems += [q for q in (_problem(err, data, lines, secrets) for err in e.errors()) if q.path not in refused]
        problems = sorted(_dedupe(problems), key=lambda p: p.line or 0)
        raise RecipeError(source, problems, _partial(data, problems, placed)) from None
    if problems:
        raise RecipeError(source, sorted(problems, key=lambda p: p.line or 0))
    recipe = placed(recipe)
    problems = [Problem(path, msg, key_line(lines, key_path(path))) for path, msg in check_recipe(recipe)]
    if problems:
        raise RecipeError(source, problems, recipe if not any(_section(p) in DATA_SECTIONS for p in problems)
                          else None)
    return recipe


DATA_SECTIONS = ("task", "data", "model")  # what the data checks read: a problem there leaves nothing to check


def _section(p: Problem) -> str:
    return p.path.split(".")[0]


def _partial(data: dict, problems: list[Problem], placed) -> "Recipe | None":
    """The recipe with every other section that has a problem left at its defaults (an invalid name made 'recipe'),
    or None when a problem is in what the data checks need or at the top level itself."""
    sections = {_section(p) for p in problems}
    if "" in sections or sections & set(DATA_SECTIONS):
        return None
    kept = {k: v for k, v in data.items() if k not in sections}
    if "name" in sections:
        kept["name"] = "recipe"
    try:
        return placed(Recipe.model_validate(kept))
    except ValidationError:
        return None


# ----------------------------------------------------------------------------------------------------------------
# Helpers for errors
# ----------------------------------------------------------------------------------------------------------------


def _index_lines(node: yaml.Node, path: tuple, lines: dict, problems: list[Problem]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for k, v in node.value:
            key = k.value
            if key in seen:
                problems.append(Problem(_dotted(path + (key,)), f"duplicate key (first given at line {seen[key]})",
                                        k.start_mark.line + 1))
            seen[key] = k.start_mark.line + 1
            lines[path + (key,)] = k.start_mark.line + 1
            _index_lines(v, path + (key,), lines, problems)
            lines[path + (key,)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _index_lines(v, path + (str(i),), lines, problems)


def env_refs(text: str) -> set[str]:
    """The names of the environment variables a recipe's text refers to (`${VAR}`, `${VAR:-default}`)."""
    return {m.group(1) for m in _ENV_REF.finditer(text)}


def _interpolate(v: Any, path: tuple, env, secrets: dict, problems: list, lines: dict, allowed) -> Any:
    if isinstance(v, dict):
        return {k: _interpolate(x, path + (str(k),), env, secrets, problems, lines, allowed) for k, x in v.items()}
    if isinstance(v, list):
        return [_interpolate(x, path + (str(i),), env, secrets, problems, lines, allowed) for i, x in enumerate(v)]
    if isinstance(v, str) and "${" in v:
        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if path not in SECRET_FIELDS and allowed != SNAPSHOT and name not in allowed:
                listed = ", ".join(sorted(allowed)) or "none"
                problems.append(Problem(_dotted(path), (
                    f"${{{name}}}{_REFUSED}: a ${{VAR}} fills {', '.join(map(_dotted, SECRET_FIELDS))} from "
                    f"the environment; another field takes only the variables that {ALLOWED_VARS} lists (now: "
                    f"{listed}), so that no secret becomes a job's name or a message. Write the value, or add "
                    f"{name} to {ALLOWED_VARS} where the recipe is read"), key_line(lines, path)))
                return ""
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(Problem(_dotted(path), f"environment variable {name} is not set (export it, or "
                                                   f"write ${{{name}:-default}})", key_line(lines, path)))
            return ""
        secrets[path] = v
        return _ENV_REF.sub(sub, v)
    return v


class _Shown:
    """A value as an error message shows it: an interpolated one as its ${VAR} reference (never the value), a long
    one cut."""

    def __init__(self, value, reference: str | None = None):
        self.value, self.reference = value, reference

    def __repr__(self) -> str:
        if self.reference is not None:
            return self.reference
        text = repr(self.value)
        return text if len(text) <= 80 else text[:77] + "..."

    def __str__(self) -> str:
        return self.reference if self.reference is not None else str(self.value)[:80]


def _problem(err: dict, data: dict, lines: dict, secrets: dict | None = None) -> Problem:
    loc = tuple(str(x) for x in err["loc"])
    typ, ctx = err["type"], err.get("ctx") or {}
    # Drop the discriminator tag pydantic puts in the path of a union member ("tuning.lora.r" -> "tuning.r").
    shown = _display_loc(loc)
    line = key_line(lines, shown)
    raw = err.get("input")
    value = _Shown(raw, (secrets or {}).get(shown))
    if typ == "extra_forbidden":
        key = loc[-1]
        allowed = _fields_at(loc[:-1], data)
        hint = did_you_mean(key, allowed)
        return Problem(_dotted(shown), f"unknown key{hint}; allowed here: {', '.join(allowed)}", line)
    if typ == "missing":
        return Problem(_dotted(shown), "required key is missing", key_line(lines, shown[:-1]))
    if typ == "union_tag_invalid":
        tags = ", ".join(f"'{t}'" for t in TUNING_MODES)
        got = ctx.get("tag")
        return Problem(_dotted(shown + ("mode",)),
                       f"{got!r} is not a tuning mode{did_you_mean(str(got), TUNING_MODES)}; expected one of {tags}",
                       key_line(lines, shown + ("mode",)) or line)
    if typ == "union_tag_not_found":
        return Problem(_dotted(shown + ("mode",)), "required key is missing; expected one of "
                       + ", ".join(f"'{t}'" for t in TUNING_MODES), line)
    if typ == "literal_error":
        expected = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        hint = did_you_mean(str(value), expected)
        return Problem(_dotted(shown), f"{value!r} is not allowed{hint}; expected one of {ctx.get('expected')}", line)
    if typ in ("int_parsing", "float_parsing", "int_type", "float_type", "int_from_float"):
        what = "a whole number" if typ.startswith("int") else "a number"
        return Problem(_dotted(shown), f"{value!r} is not {what}", line)
    if typ in ("bool_parsing", "bool_type"):
        return Problem(_dotted(shown), f"{value!r} is not true or false", line)
    if typ in ("string_type",):
        return Problem(_dotted(shown), f"{value!r} is {_tname(raw)}; expected a string", line)
    if typ in ("model_type", "model_attributes_type", "dict_type"):
        return Problem(_dotted(shown), f"{value!r} is {_tname(raw)}; expected a mapping of keys", line)
    if typ == "list_type":
        return Problem(_dotted(shown), f"{value!r} is {_tname(raw)}; expected a list", line)
    if typ in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[typ]
        bound = next(iter(ctx.values()))
        return Problem(_dotted(shown), f"{value!r} is out of range; must be {op} {bound:g}", line)
    if typ == "value_error":
        said = str(ctx.get("error", err["msg"]))
        if value.reference is not None and isinstance(raw, str) and raw:
            said = said.replace(raw, value.reference)  # the value itself never: only its ${VAR} reference
        return Problem(_dotted(shown), said, line)
    return Problem(_dotted(shown), f"{err['msg']} (got {value!r})", line)


def _display_loc(loc: tuple) -> tuple:
    out = []
    for i, part in enumerate(loc):
        if i > 0 and loc[i - 1] == "tuning" and part in TUNING_MODES:
            continue
        if part in ("function-after[_one_location()]",) or part.startswith("function-"):
            continue
        out.append(part)
    return tuple(out)


def _fields_at(loc: tuple, data: dict) -> list[str]:
    """Field names of the model found at `loc` (pydantic's error location, union tags included)."""
    cls: Any = Recipe
    for part in loc:
        cls = unwrap(cls)
        if isinstance(cls, tuple):  # union of models: the tag picks one
            cls = next((c for c in cls if c.model_fields["mode"].default == part), None)
            if cls is None:
                return []
            continue
        if isinstance(cls, type) and issubclass(cls, BaseModel) and part in cls.model_fields:
            cls = cls.model_fields[part].annotation
        else:
            return []
    cls = unwrap(cls)
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return []


def _dotted(path: tuple) -> str:
    return ".".join(path)


def _tname(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "empty"}.get(type(v), type(v).__name__)


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if (p.path, p.message) not in seen:
            seen.add((p.path, p.message))
            out.append(p)
    return out


def check_recipe(r: Recipe) -> list[tuple[str, str]]:
    """Rules that span several keys. Returns (dotted path, message) pairs."""
    out: list[tuple[str, str]] = []
    d, res = r.data, r.resources
    if r.task == "causal_lm":
        if d.labels is not None:
            out.append(("data.labels", "applies to task 'classification' only (task is 'causal_lm')"))
        if d.chat_template and d.layout != "chat":
            out.append(("data.chat_template", f"applies to format 'chat' only (format is '{d.layout}')"))
    else:
        if d.format is not None:
            out.append(("data.format", f"applies to task 'causal_lm' only (task is '{r.task}')"))
        if d.chat_template is not None:
            out.append(("data.chat_template", "applies to task 'causal_lm' with format 'chat' only"))
        if r.task == "regression" and d.labels is not None:
            out.append(("data.labels", "applies to task 'classification' only (task is 'regression')"))
    if d.labels is not None and r.task == "classification":
        if len(d.labels) < 2:
            out.append(("data.labels", f"needs at least 2 labels, got {d.labels!r}"))
        dup = sorted({str(x) for x in d.labels if d.labels.count(x) > 1})
        if dup:
            out.append(("data.labels", f"repeats {', '.join(repr(x) for x in dup)}; each label once"))
    required, optional = roles_for(r.task, d.layout)
    allowed = required + optional
    for role in d.columns:
        if role not in allowed:
            hint = did_you_mean(role, allowed)
            fmt = f" format '{d.layout}'" if r.task == "causal_lm" else ""
            out.append((f"data.columns.{role}",
                        f"unknown role '{role}' for task '{r.task}'{fmt}{hint}; roles: {', '.join(allowed)}"))
    q = r.export.max_quality_drop
    if q is not None and r.task != "classification" and q < 1:
        metric = "perplexity" if r.task == "causal_lm" else "mean squared error"
        out.append(("export.max_quality_drop", f"{q:g}: for task '{r.task}' it is a ratio of the quantized model's "
                                               f"{metric} to PyTorch's, so 1 or more (1.05 allows 5% worse)"))
    if q is not None and r.task == "classification" and q > 100:
        out.append(("export.max_quality_drop", f"{q:g}: accuracy points, between 0 and 100"))
    if r.tuning.mode == "qlora" and not r.needs_gpu:
        out.append(("tuning.mode", "'qlora' quantizes the base model with bitsandbytes and needs GPUs; set "
                                   "resources.gpus_per_worker to 1 or more, or use mode 'lora' on CPUs"))
    if r.tuning.mode == "qlora" and res.strategy != "ddp":
        out.append(("resources.strategy", f"'{res.strategy}' with mode 'qlora' is not supported: the 4-bit base "
                                          f"weights cannot be sharded here; use 'ddp' (each GPU holds the small "
                                          f"4-bit model) or mode 'lora' with '{res.strategy}'"))
    if r.tuning.mode == "freeze" and r.task == "causal_lm" and r.tuning.train_last_layers == 0:
        out.append(("tuning.train_last_layers", "a causal LM's head is tied to its embeddings; with 0 layers "
                                                "nothing would train. Set 1 or more, or use mode 'lora'"))
    if not r.needs_gpu:
        if res.mixed_precision == "fp16":
            out.append(("resources.mixed_precision", "'fp16' needs GPUs; use 'bf16' or 'no' on CPUs, or set "
                                                     "resources.gpus_per_worker"))
        if res.strategy != "ddp":
            out.append(("resources.strategy", f"'{res.strategy}' needs GPUs; use 'ddp' on CPUs, or set "
                                              "resources.gpus_per_worker"))
    if res.zero_stage is not None and res.strategy != "deepspeed":
        out.append(("resources.zero_stage", f"applies to strategy 'deepspeed' only (strategy is '{res.strategy}')"))
    if res.gpus_per_worker > 1 and res.gpus_per_worker != int(res.gpus_per_worker):
        out.append(("resources.gpus_per_worker", f"{res.gpus_per_worker:g}: above 1, give a whole number of GPUs"))
    known = SELECT_METRICS[r.task]
    if r.train.select_metric is not None and r.train.select_metric not in known:
        out.append(("train.select_metric", f"{r.train.select_metric!r} is not a validation metric of task "
                                           f"'{r.task}'{did_you_mean(r.train.select_metric, known)}; expected one "
                                           f"of {', '.join(known)}"))
    if r.train.packing and r.task != "causal_lm":
        out.append(("train.packing", f"packs a causal LM's examples into sequences; task '{r.task}' has one label "
                                     "per row: set it false (train.group_by_length cuts padding there)"))
    if r.train.eval_every and r.train.checkpoint_every and r.train.checkpoint_every % r.train.eval_every:
        out.append(("train.checkpoint_every", f"{r.train.checkpoint_every} is not a multiple of train.eval_every "
                                              f"({r.train.eval_every}); the best checkpoint is chosen at evaluations"))
    if r.sweep is not None:
        out += check_sweep(r)
    return out


def key_path(dotted: str) -> tuple:
    """A dotted key path as the lines index keys it: a swept parameter's name is one key, dots and all."""
    head = "sweep.parameters."
    if dotted.startswith(head):
        return ("sweep", "parameters", dotted[len(head):])
    return tuple(dotted.split("."))


UNSWEPT = {  # keys a sweep cannot search, and why
    "tuning.mode": "the trials of one sweep share their tuning mode",
    "train.callbacks": "the trials of one sweep share their callbacks",
    "train.select_metric": "each trial's best weights are chosen by sweep.metric",
    "train.checkpoint_every": "a trial checkpoints at each evaluation (train.eval_every), where ASHA judges it",
    "train.packing": "the trials read the data the sweep prepared once, packed or not as the recipe says",
}


def _drawn_problems(r: Recipe, base: dict) -> list[tuple[str, str]]:
    """The first configuration of a grid or random search the recipe's cross-key rules refuse (values each
    allowed may not be together)."""
    seed = r.sweep.seed if r.sweep.seed is not None else r.train.seed
    for i, values in enumerate(r.sweep.drawn(seed, r.swept_values) or ()):
        trial = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
        for path, v in values.items():
            section, key = path.split(".", 1)
            trial[section][key] = v
        try:
            t = Recipe.model_validate(trial)
        except ValidationError as e:
            return [("sweep.parameters", f"trial {i} ({_values(values)}) is refused: {e.errors()[0]['msg']}")]
        rules = check_recipe(t)
        if rules:
            return [("sweep.parameters", f"trial {i} ({_values(values)}) is refused: {rules[0][0]}: {rules[0][1]}")]
    return []


def _values(values: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


def check_sweep(r: Recipe) -> list[tuple[str, str]]:
    """A sweep's parameters against the schema (each path, and each value a trial may get), its metric, its size."""
    sw, out = r.sweep, []
    base = r.model_dump(mode="python")
    base.pop("sweep", None)
    for path, spec in sw.parameters.items():
        key = f"sweep.parameters.{path}"
        parts = path.split(".")
        if parts[0] not in SWEEP_SECTIONS or len(parts) < 2:
            out.append((key, f"a sweep searches {' and '.join(f'{s}.*' for s in SWEEP_SECTIONS)} (e.g. train.lr, "
                             f"tuning.r); {path!r} is not there: a trial's data, model and resources are the "
                             "sweep's"))
            continue
        if path in UNSWEPT:
            out.append((key, f"{path} cannot be swept: {UNSWEPT[path]}"))
            continue
        if path == "train.eval_every" and sw.early_stop == "asha":
            out.append((key, "train.eval_every cannot be swept with early_stop asha: ASHA compares trials at their "
                             "n-th evaluation, which would fall at other steps in each"))
            continue
        section = base[parts[0]]
        if parts[-1] not in section or len(parts) != 2:
            known = sorted(k for k in section if k != "mode")
            where = f"tuning (mode {r.tuning.mode})" if parts[0] == "tuning" else parts[0]
            out.append((key, f"unknown key{did_you_mean(parts[-1], known)}; {where} has: {', '.join(known)}"))
            continue
        if spec.kind == "choice":
            tries = list(spec.values)
        else:  # the ends and a point between them: a whole-number key refuses the point of a real range
            lo, hi = spec.values
            tries = [lo, hi] if spec.kind == "randint" else [lo, hi, lo + (hi - lo) * 0.37]
        for v in tries:
            trial = {**base, parts[0]: {**base[parts[0]], parts[1]: v}}
            try:
                taken = getattr(getattr(Recipe.model_validate(trial), parts[0]), parts[1])
                if isinstance(v, bool) != isinstance(taken, bool):  # true as 1.0, or 1 as true: not what was meant
                    out.append((key, f"{v!r} is refused by {path}: it takes {_tname(taken)}, not {_tname(v)}"))
                    break
            except ValidationError as e:
                err = next((x for x in e.errors() if tuple(str(p) for p in x["loc"][:2]) == tuple(parts)),
                           e.errors()[0])
                if spec.kind in ("uniform", "loguniform") and err["type"].startswith("int"):
                    why = (f"{path} takes whole numbers; {spec.kind} draws fractions: use randint [low, high] or "
                           "choice")
                else:
                    why = f"{v!r} is refused by {path}: {err['msg']}"
                out.append((key, why))
                break
    if not out and sw.search in ("grid", "random"):  # every trial the sweep will run, whole, as it will run
        out += _drawn_problems(r, base)
    known = SELECT_METRICS[r.task]
    if sw.metric is not None and sw.metric not in known:
        out.append(("sweep.metric", f"{sw.metric!r} is not a validation metric of task '{r.task}'"
                                    f"{did_you_mean(sw.metric, known)}; expected one of {', '.join(known)}"))
    if sw.search == "grid":
        ranges = [p for p, s in sw.parameters.items() if s.kind != "choice"]
        if ranges:
            out.append(("sweep.search", f"grid takes every combination of `choice` lists; {', '.join(ranges)} "
                                        "is a range: give it as choice, or use search random or tpe"))
        elif sw.grid_size > GRID_MAX:
            out.append(("sweep.parameters", f"the grid has {sw.grid_size:,} combinations; at most {GRID_MAX}: "
                                            "fewer values, or search random with trials"))
        if sw.trials is not None and not ranges and sw.trials != sw.grid_size:
            out.append(("sweep.trials", f"{sw.trials}: search grid runs each of its {sw.grid_size} combinations "
                                        f"once; leave trials out, or set it to {sw.grid_size}"))
    if r.resources.preemptible:
        out.append(("resources.preemptible", "a sweep cannot be preempted (its trials stop and resume as one): "
                                             "set it false"))
    if r.schedule is not None:
        out.append(("schedule", "a scheduled retrain of a sweep is not supported: schedule the recipe without "
                                "`sweep`, with the values a sweep chose"))
    return out


def json_schema() -> dict:
    """JSON Schema of the recipe, for editors (`runner schema`)."""
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "runner recipe"
    # `tuning: lora` is shorthand for {mode: lora}.
    tuning = schema["properties"]["tuning"]
    schema["properties"]["tuning"] = {"description": tuning.pop("description", ""), "anyOf": [
        {"enum": list(TUNING_MODES), "description": "Shorthand for {mode: ...}."}, tuning]}
    # A plain string is shorthand for {path: ...}.
    for key, prop in schema["$defs"]["DataSpec"]["properties"].items():
        if key in ("train", "validation", "test"):
            prop.setdefault("anyOf", [{"$ref": prop.pop("$ref")}] if "$ref" in prop else prop.get("anyOf", []))
            prop["anyOf"].insert(0, {"type": "string", "description": "Shorthand for {path: ...}."})
    return schema


def unwrap(t: Any) -> Any:
    while True:
        origin = typing.get_origin(t)
        if origin is Annotated:
            t = typing.get_args(t)[0]
        elif origin in (Union, types.UnionType):
            models = tuple(a for a in typing.get_args(t) if isinstance(a, type) and issubclass(a, BaseModel))
            if len(models) == 1:
                t = models[0]
            else:
                return models
        else:
            return t


_SYNONYMS = {
    "rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs", "steps": "max_steps",
    "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "gradient_accumulation": "grad_accum",
    "warmup": "warmup_ratio", "lr_scheduler": "schedule", "lr_scheduler_type": "schedule", "scheduler": "schedule",
    "optim": "optimizer", "model_name": "name", "model_id": "name", "path": "name", "num_workers": "workers",
    "gpus": "gpus_per_worker", "num_gpus": "gpus_per_worker", "cpus": "cpus_per_worker", "precision": "mixed_precision",
    "max_length": "max_seq_len", "cutoff_len": "max_seq_len", "seq_len": "max_seq_len", "eval": "validation",
    "valid": "validation", "val": "validation", "dev": "validation", "target_modules": "target_modules",
    "method": "mode", "type": "mode", "stage": "zero_stage",
    "activation_checkpointing": "gradient_checkpointing", "gpu_memory": "gpu_memory_gib", "finetuning_type": "mode", "quantization": "quantize",
}


def did_you_mean(word: str, options) -> str:
    """' (did you mean X?)' for the closest option, knowing other tools' names for our keys; '' if none is close."""
    options = list(options)
    aliases = {a: t for a, t in _SYNONYMS.items() if t in options}
    close = difflib.get_close_matches(word, options + list(aliases), n=1, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean '{aliases.get(close[0], close[0])}'?)"
