"""The model registry: a named model (`register_as` in the recipe) gets a version for each SUCCEEDED job of the runner
server, with the job's id, test metrics, data fingerprints, recipe hash and artifact paths. Aliases point at
versions: `champion`, and any others a team names. Every move of an alias is an event.

The promotion gate: a new version becomes `champion` only when its export checks passed, it beats its trivial
baseline (eval.json: the majority class, the train mean, the base model), and its test metric
(`promotion.metric`, by default accuracy, mse or perplexity by task) beats the champion's by at least
`promotion.min_improvement` (any gain when 0) on the same rows:

- when both were tested on the same data (the same fingerprint), their own test figures are compared;
- otherwise (a schedule retraining on changed data cuts a new test split each time) on the figures of the job's
  like-for-like comparison (jobs.compare): both models scored on this version's test split, the data as it is
  now. The server asks for that comparison when it starts a job whose model has a champion (`champion.json` in the
  job folder, `champion_for`). The figures on the champion's own test split are recorded beside them.

Otherwise it is registered, not promoted, and the reason is recorded. A promotion moves the alias and writes its
event in one transaction; `rollback` moves it back to the version it pointed at before, in one command.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import time
from pathlib import Path

from jobs.recipe import SNAPSHOT, env_refs, parse_recipe
from runner.jobfiles import read_json
from runner.schedules import data_fingerprint
from runner.store import Store, StoreError

CHAMPION = "champion"


class UnknownModel(StoreError):
    pass


def _recipe(text: str):
    env = {k: os.environ.get(k, "unset") for k in env_refs(text)}  # only the data paths and the gate are read
    return parse_recipe(text, source="the job's recipe.yaml", env=env, allowed=SNAPSHOT)


def fingerprint_of_test_split(recipe) -> str:
    """What the test split is made of: the test files, or, when the test split is cut from train, the train files
    and how it is cut (so that two versions are compared on the same rows, or not at all)."""
    if recipe.data.test is not None:
        return data_fingerprint(recipe, ("test",))
    how = json.dumps({"split": recipe.data.split.model_dump(mode="json"), "seed": recipe.train.seed}, sort_keys=True)
    return hashlib.sha256((data_fingerprint(recipe, ("train",)) + how).encode()).hexdigest()


class Registry:
    def __init__(self, store: Store, clock=time.time):
        self.store, self.clock = store, clock

    # --- reading --------------------------------------------------------------------------------------------------

    def models(self, limit: int = -1, offset: int = 0) -> list[dict]:
        rows = self.store.db.execute("SELECT model, COUNT(*) AS versions, MAX(version) AS latest, MAX(created_at) AS "
                                     "updated_at FROM versions GROUP BY model ORDER BY model LIMIT ? OFFSET ?",
                                     (limit, offset)).fetchall()
        return [{**dict(r), "aliases": self.aliases(r["model"])} for r in rows]

    def count(self) -> int:
        return self.store.db.execute("SELECT COUNT(DISTINCT model) FROM versions").fetchone()[0]

    def aliases(self, model: str) -> dict[str, int]:
        return {r["alias"]: r["version"] for r in self.store.db.execute(
            "SELECT alias, version FROM aliases WHERE model = ? ORDER BY alias", (model,))}

    def versions(self, model: str) -> list[dict]:
        rows = self.store.db.execute("SELECT * FROM versions WHERE model = ? ORDER BY version", (model,)).fetchall()
        if not rows:
            raise UnknownModel(f"no model '{model}' in the registry (runner models list shows them)")
        return [_version(r) for r in rows]

    def version(self, model: str, version: int) -> dict:
        row = self.store.db.execute("SELECT * FROM versions WHERE model = ? AND version = ?",
                                    (model, version)).fetchone()
        if row is None:
            have = [v["version"] for v in self.versions(model)]
            raise UnknownModel(f"model '{model}' has no version {version} (it has {', '.join(map(str, have))})")
        return _version(row)

    def events(self, model: str) -> list[dict]:
        return [dict(r) for r in self.store.db.execute("SELECT * FROM model_events WHERE model = ? ORDER BY id",
                                                       (model,))]

    # --- registering and the gate ---------------------------------------------------------------------------------

    def champion_for(self, job) -> dict | None:
        """What a starting job of a registered model needs to meet its champion like for like (written by the
        server as the job folder's champion.json): the champion's version, job and folders; None when the recipe
        registers nothing or the model has no champion yet."""
        try:
            recipe = _recipe(job.recipe)
        except Exception:  # noqa: BLE001 - a recipe the store holds was checked when queued; no comparison then
            return None
        if recipe.register_as is None:
            return None
        version = self.aliases(recipe.register_as).get(CHAMPION)
        if version is None:
            return None
        champ = self.version(recipe.register_as, version)
        row = self.store.db.execute("SELECT job_dir FROM jobs WHERE id = ?", (champ["job_id"],)).fetchone()
        folder = Path(row[0]) if row else Path((champ["artifacts"] or {}).get("model", "")).parent
        return {"model": recipe.register_as, "version": version, "job_id": champ["job_id"],
                "model_dir": str(folder / "model"), "prepared": str(folder / "prepared")}

    def register(self, job) -> dict | None:
        """The version of a SUCCEEDED job whose recipe has `register_as` (None without it), with the gate's decision;
        the same version when asked again."""
        recipe = _recipe(job.recipe)
        if recipe.register_as is None:
            return None
        model = recipe.register_as
        row = self.store.db.execute("SELECT * FROM versions WHERE job_id = ?", (job.id,)).fetchone()
        if row is not None:
            return _version(row)
        job_dir = Path(job.job_dir)
        result = read_json(job_dir, "eval.json")
        if result is None:
            raise ValueError("the job's eval.json is missing or not a JSON object")
        test = result.get("test") if isinstance(result.get("test"), dict) else {}
        metric, higher = recipe.gate_metric
        export = export_summary(read_json(job_dir, "onnx/export_report.json"))
        try:
            data, test_data = data_fingerprint(recipe), fingerprint_of_test_split(recipe)
        except OSError as e:
            data = test_data = None
            unreadable = str(e)
        else:
            unreadable = None
        artifacts = {k: str(job_dir / k) for k in ("model", "adapter", "onnx", "eval.json", "manifest.json")
                     if (job_dir / k).exists()}
        now = self.clock()
        with self.store.transaction():
            if self.store.db.execute("SELECT 1 FROM jobs WHERE id = ?", (job.id,)).fetchone() is None:
                return None  # removed (runner rm) while its files were read: there is nothing to register
            version = self.store.db.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM versions WHERE model = ?",
                                            (model,)).fetchone()[0]
            champion = self.aliases(model).get(CHAMPION)
            champ = _version(self.store.db.execute("SELECT * FROM versions WHERE model = ? AND version = ?",
                                                   (model, champion)).fetchone()) if champion else None
            promote, decision = _gate(metric, higher, test.get(metric), test_data, export, champ,
                                      recipe.promotion.min_improvement, unreadable, result.get("baseline"),
                                      result.get("champion"))
            self.store.db.execute(
                "INSERT INTO versions (model, version, job_id, created_at, metric, value, higher, metrics, test_data, "
                "data, recipe_hash, export, artifacts, decision) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (model, version, job.id, now, metric, test.get(metric), int(higher), json.dumps(result), test_data,
                 data, hashlib.sha256(job.recipe.encode()).hexdigest(),
                 json.dumps(export) if export else None, json.dumps(artifacts), decision))
            self._event(model, None, None, version, "register", f"v{version} registered from job {job.id}: "
                                                                 f"{decision}", now)
            if promote:
                self._move(model, CHAMPION, version, "promote", decision, now)
        return self.version(model, version)

    # --- aliases --------------------------------------------------------------------------------------------------

    def promote(self, model: str, version: int, alias: str = CHAMPION, why: str = "promoted by hand") -> dict:
        """Point `alias` at `version` (by hand: no gate), as one event."""
        self.version(model, version)
        with self.store.transaction():
            self._move(model, alias, version, "promote", why, self.clock())
        return {"model": model, "alias": alias, "version": version}

    def rollback(self, model: str, alias: str = CHAMPION) -> dict:
        """Move `alias` back to the version it pointed at before the promotion that put it where it is."""
        self.versions(model)
        with self.store.transaction():
            current = self.aliases(model).get(alias)
            if current is None:
                raise StoreError(f"model '{model}' has no alias '{alias}'")
            row = self.store.db.execute(
                "SELECT from_version FROM model_events WHERE model = ? AND alias = ? AND to_version = ? AND kind = "
                "'promote' ORDER BY id DESC LIMIT 1", (model, alias, current)).fetchone()
            if row is None or row[0] is None:
                raise StoreError(f"{model}:{alias} is v{current}, its first version: there is nothing to roll back to")
            self._move(model, alias, row[0], "rollback", f"rolled back from v{current} to v{row[0]}", self.clock())
        return {"model": model, "alias": alias, "version": row[0], "from": current}

    def diff(self, model: str, a: int, b: int) -> dict:
        va, vb = self.version(model, a), self.version(model, b)
        keys = sorted(set(va["metrics"].get("test", {})) | set(vb["metrics"].get("test", {})))
        metrics = {k: {"a": va["metrics"].get("test", {}).get(k), "b": vb["metrics"].get("test", {}).get(k)}
                   for k in keys}
        for m in metrics.values():
            if isinstance(m["a"], (int, float)) and isinstance(m["b"], (int, float)):
                m["change"] = m["b"] - m["a"]
        recipes = {}
        for v in (va, vb):
            row = self.store.db.execute("SELECT recipe FROM jobs WHERE id = ?", (v["job_id"],)).fetchone()
            recipes[v["version"]] = row[0].splitlines(keepends=True) if row else []
        like = None  # b scored beside a on b's test split, when b's job met a as its champion (jobs.compare)
        for older, newer in ((va, vb), (vb, va)):
            cmp = (newer["metrics"] or {}).get("champion")
            pair = cmp.get("on_this_test") if isinstance(cmp, dict) and cmp.get("version") == older["version"] \
                else None
            if isinstance(pair, dict) and isinstance(pair.get("champion"), dict) and \
                    isinstance(pair.get("challenger"), dict):
                like = {"split": f"v{newer['version']}'s test split", "rows": pair.get("rows"),
                        "a": pair["champion"] if older is va else pair["challenger"],
                        "b": pair["challenger"] if older is va else pair["champion"]}
        return {"model": model, "a": a, "b": b, "metrics": metrics, "like_for_like": like,
                "same_test_data": va["test_data"] == vb["test_data"], "same_data": va["data"] == vb["data"],
                "same_recipe": va["recipe_hash"] == vb["recipe_hash"],
                "recipe_diff": "".join(difflib.unified_diff(recipes[a], recipes[b], f"v{a}/recipe.yaml",
                                                            f"v{b}/recipe.yaml"))}

    def _move(self, model: str, alias: str, version: int, kind: str, message: str, now: float) -> None:
        before = self.aliases(model).get(alias)
        self.store.db.execute("INSERT INTO aliases (model, alias, version, updated_at) VALUES (?, ?, ?, ?) ON CONFLICT "
                              "(model, alias) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
                              (model, alias, version, now))
        self._event(model, alias, before, version, kind, message, now)

    def _event(self, model, alias, before, after, kind, message, now) -> None:
        self.store.db.execute("INSERT INTO model_events (model, at, alias, from_version, to_version, kind, message) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?)", (model, now, alias, before, after, kind, message))


def export_summary(report: dict | None) -> dict | None:
    """What a version records of its export (onnx/export_report.json, a file the job wrote): whether it passed,
    and the variant it ships ("int8_dynamic", "int8_dynamic, 2 MatMuls kept in fp32", "int8_static", "fp32").
    It passed when the report says so, its fp32 parity passed, and the shipped variant met its bound: a quantized
    one its quality check, the fp32 model its parity. A report from before `shipped` existed: `passed` and parity."""
    if report is None:
        return None
    checks = report.get("checks") if isinstance(report.get("checks"), dict) else {}
    shipped = report.get("shipped")
    parity, quality = checks.get("fp32_parity"), checks.get("quantized_quality")
    parity_ok = isinstance(parity, dict) and parity.get("passed") is True
    passed = report.get("passed") is True and parity_ok
    if not isinstance(shipped, dict):  # an export from before `shipped`: its quantized model passed or it failed
        return {"passed": passed, "variant": None}
    quantized = shipped.get("quantized") is True
    met = (isinstance(quality, dict) and quality.get("passed") is True) if quantized else parity_ok
    variant = shipped.get("variant") if isinstance(shipped.get("variant"), str) else None
    return {"passed": passed and parity_ok and met, "variant": variant[:200] if variant else None,
            "quantized": quantized}


def _gate(metric: str, higher: bool, value, test_data, export, champ, min_gain: float, unreadable,
          baseline: dict | None = None, compared: dict | None = None) -> tuple[bool, str]:
    """(promote?, the reason in words). baseline: eval.json's (its verdict); compared: eval.json's `champion`
    section, the like-for-like figures of jobs.compare."""
    if value is None:
        return False, f"not promoted: the job's test metrics have no {metric}"
    if export is None:
        return False, "not promoted: no export checks ran (set export.onnx: true)"
    if not export.get("passed"):
        return False, "not promoted: its export checks failed"
    if baseline and baseline.get("beaten") is False:
        return False, f"not promoted: it does not beat its baseline ({baseline.get('verdict')})"
    if unreadable:
        return False, f"not promoted: its data could not be fingerprinted ({unreadable})"
    if champ is None:
        return True, f"promoted to champion: the first version ({metric} {value:.4g})"
    where = ""
    if champ["test_data"] != test_data:
        compared = compared if isinstance(compared, dict) else None
        pair = pair_figures(compared, "on_this_test", metric) if compared and \
            compared.get("version") == champ["version"] else None
        if pair is None:
            if compared and compared.get("note"):
                why = f"the like-for-like comparison could not be made: {compared['note']}"
            elif compared and compared.get("version") != champ["version"]:
                why = (f"it was compared with v{compared.get('version')} when it started; the champion is now "
                       f"v{champ['version']}")
            else:
                why = "no like-for-like comparison was made"
            return False, (f"not promoted: tested on other data than champion v{champ['version']} (test data "
                           f"fingerprint {str(test_data)[:12]} vs {str(champ['test_data'])[:12]}), and {why}")
        value, old, rows, left_out = pair
        left = f"; {left_out} left out that v{champ['version']} trained on" if left_out else ""
        where = f" on this version's test split ({rows} rows, both models scored{left})"
        theirs = pair_figures(compared, "on_champion_test", metric)
        if theirs:
            where += f"; on v{champ['version']}'s test split {theirs[0]:.4g} against {theirs[1]:.4g}"
    else:
        old = champ["value"]
    gain = value - old if higher else old - value
    words = f"{metric} {value:.4g} against champion v{champ['version']}'s {old:.4g}{where}"
    if gain > 0 and gain >= min_gain:
        return True, f"promoted to champion: {words} (better by {gain:.4g}, at least {min_gain:g} asked)"
    if gain <= 0:
        return False, f"not promoted: {words} ({f'worse by {-gain:.4g}' if gain < 0 else 'no better'})"
    return False, f"not promoted: {words} (better by only {gain:.4g}, less than the {min_gain:g} asked)"


def pair_figures(compared: dict | None, key: str, metric: str) -> tuple[float, float, int, int] | None:
    """(this version's figure, the champion's, rows, rows left out) of one split of eval.json's `champion` section
    (jobs.compare), or None where it has none or is not what jobs.compare writes."""
    pair = (compared or {}).get(key)
    if not isinstance(pair, dict) or not isinstance(pair.get("challenger"), dict) or \
            not isinstance(pair.get("champion"), dict):
        return None
    mine, theirs = pair["challenger"].get(metric), pair["champion"].get(metric)
    if not isinstance(mine, (int, float)) or not isinstance(theirs, (int, float)):
        return None
    rows, left_out = pair.get("rows"), pair.get("left_out", 0)
    return float(mine), float(theirs), rows if isinstance(rows, int) else 0, left_out if isinstance(left_out, int) \
        else 0


def _version(row) -> dict:
    out = dict(row)
    for k in ("metrics", "artifacts", "export"):
        out[k] = json.loads(out[k]) if out[k] else None
    out["higher"] = bool(out["higher"])
    out["promoted"] = out["decision"].startswith("promoted")
    return out
