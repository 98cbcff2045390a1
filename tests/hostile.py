"""Hostile input, made from a seed: recipes mutated from the shipped ones, request bodies, and data files broken in
the ways real ones are. The suite's property tests (tests/unit/test_fuzz.py) draw from it with Hypothesis's seeds;
bench/fuzz.py draws ten thousand and more, and prints the figures."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
RECIPE_KINDS = ("drop", "rename", "type", "unicode", "number", "alias", "nest", "binary", "truncate", "duplicate",
                "env", "huge", "splice", "empty", "multidoc", "tabs")
DATA_KINDS = ("garbage_line", "nul_line", "not_object", "missing_label", "empty_text", "label_type", "empty_file",
              "blank_lines", "utf16", "latin1", "bom", "huge_line", "many_columns", "deep_value", "truncated",
              "binary", "one_label", "csv_ragged", "csv_no_header", "parquet_junk", "huge_label_set", "crlf")
NUMBERS = (1e308, -1e308, 2**64, -(2**63), -1, 0, float("nan"), float("inf"), 10**100, 1e-320, -0.0, 2**31)
TYPES = ([], {}, "x", 0, -1, 1.5, True, None, [1, 2], {"a": 1}, "", " ", "null", "~")
UNICODE = ("\u202e", "\u0000", "\u200b", "\ufeff", "\U0001f600", "\u4e2d\u6587", "e\u0301", "\x1b[31m", "\ud7ff",
           "Ω", "\u2028", "\\", "'", '"', "%s", "{0}", "../", "<script>", "${HF_TOKEN}", "\t", "\r")


def base_recipes() -> list[tuple[str, dict, str]]:
    """The shipped recipes: (file name, parsed, text)."""
    out = []
    for p in sorted(RECIPES.glob("*.yaml")):
        text = p.read_text(encoding="utf-8")
        out.append((p.name, yaml.safe_load(text), text))
    return out


def _paths(d, prefix=()) -> list[tuple]:
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            out.append(prefix + (k,))
            out += _paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out.append(prefix + (i,))
            out += _paths(v, prefix + (i,))
    return out


def _parent(d, path):
    for k in path[:-1]:
        d = d[k]
    return d


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(UNICODE) if rng.random() < 0.3 else chr(rng.randrange(32, 0x3000))
                   for _ in range(n))


def _dump(d) -> str:
    return yaml.safe_dump(d, sort_keys=False, allow_unicode=True, width=10**6)


def mutate_recipe(rng: random.Random, bases: list[tuple[str, dict, str]], kind: str | None = None) -> tuple[str, bytes]:
    """One hostile recipe: (kind, the file's bytes)."""
    kind = kind or rng.choice(RECIPE_KINDS)
    name, data, text = rng.choice(bases)
    d = copy.deepcopy(data)
    paths = _paths(d)
    path = rng.choice(paths)
    leaves = [p for p in paths if not isinstance(_parent(d, p)[p[-1]], (dict, list))]
    leaf = rng.choice(leaves)
    if kind == "drop":
        del _parent(d, path)[path[-1]]
        return kind, _dump(d).encode()
    if kind == "rename":
        parent = _parent(d, path)
        if isinstance(parent, dict):
            key = str(path[-1])
            i = rng.randrange(len(key) + 1)
            new = rng.choice([key[:i] + rng.choice("abcxyz_") + key[i:], key[:i] + key[i + 1:], key.upper(),
                              _text(rng, 5), key + " "])
            parent[new] = parent.pop(path[-1])
        return kind, _dump(d).encode()
    if kind == "type":
        _parent(d, path)[path[-1]] = copy.deepcopy(rng.choice(TYPES))
        return kind, _dump(d).encode()
    if kind == "unicode":
        _parent(d, leaf)[leaf[-1]] = _text(rng, rng.randrange(1, 200))
        return kind, _dump(d).encode("utf-8", "surrogatepass")
    if kind == "number":
        _parent(d, leaf)[leaf[-1]] = rng.choice(NUMBERS)
        return kind, _dump(d).encode()
    if kind == "alias":
        levels = rng.randrange(1, 10)
        bomb = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, levels + 1))
        where = rng.choice(["top", "value", "merge"])
        if where == "top":
            return kind, (bomb + text).encode()
        if where == "merge":
            return kind, (text + "base: &b {lr: 0.1}\ntrain:\n  <<: *b\n").encode()
        return kind, (f"x: &x {{lr: 1}}\n{text}\nextra: *x\n").encode()
    if kind == "nest":
        depth = rng.choice([5, 20, 100, 1000, 5000])
        opener, closer = rng.choice([("[", "]"), ("{a: ", "}")])
        value = opener * depth + "1" + closer * depth
        lines = text.splitlines()
        keyed = [i for i, ln in enumerate(lines) if ":" in ln and not ln.strip().startswith("#")]
        i = rng.choice(keyed)
        lines[i] = lines[i].split(":", 1)[0] + ": " + value
        return kind, "\n".join(lines).encode()
    if kind == "binary":
        raw = bytearray(text.encode())
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        at = rng.randrange(len(raw) + 1)
        return kind, bytes(raw[:at] + junk + raw[at:])
    if kind == "truncate":
        return kind, text.encode()[: rng.randrange(len(text) + 1)]
    if kind == "duplicate":
        lines = text.splitlines(keepends=True)
        tops = [ln for ln in lines if ln[:1].isalpha()]
        return kind, (text + rng.choice(tops)).encode()
    if kind == "env":
        ref = rng.choice(["${HF_TOKEN}", "${HOME}", "${NOPE}", "${NOPE:-}", "${A:-${B}}", "${", "${1BAD}", "$HOME",
                          "${PATH:-x}", "${" + "A" * 5000 + "}", "${X:-" + "y" * 1000 + "}"])
        _parent(d, leaf)[leaf[-1]] = ref
        return kind, _dump(d).encode()
    if kind == "huge":
        _parent(d, leaf)[leaf[-1]] = "x" * rng.choice([10**3, 10**4, 10**5, 3 * 10**5])
        return kind, _dump(d).encode()
    if kind == "splice":
        other = rng.choice(bases)[2]
        return kind, (text[: rng.randrange(len(text))] + other[rng.randrange(len(other)):]).encode()
    if kind == "empty":
        return kind, rng.choice([b"", b" ", b"\n\n", b"---\n", b"~\n", b"null", b"[]", b"{}", b"''", b"#only\n"])
    if kind == "multidoc":
        return kind, (text + "\n---\n" + text).encode()
    if kind == "tabs":
        return kind, text.replace("  ", "\t", rng.randrange(1, 4)).encode()
    raise ValueError(kind)


def bad_body(rng: random.Random, recipe_text: str) -> tuple[str, bytes, dict]:
    """A hostile POST /jobs body: (kind, bytes, headers)."""
    json_h = {"Content-Type": "application/json"}
    kind = rng.choice(("not_json", "json_list", "recipe_type", "extra_fields", "env_type", "priority", "name",
                       "base_dir", "nul", "deep_json"))
    if kind == "not_json":
        return kind, bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200))), json_h
    if kind == "json_list":
        return kind, json.dumps([recipe_text]).encode(), json_h
    if kind == "recipe_type":
        return kind, json.dumps({"recipe": rng.choice([1, None, [], {}, True])}).encode(), json_h
    if kind == "extra_fields":
        return kind, json.dumps({"recipe": recipe_text, "job_dir": "/etc", "state": "SUCCEEDED"}).encode(), json_h
    if kind == "env_type":
        env = rng.choice([[], "x", {"A": 1}, {"A": None}])
        return kind, json.dumps({"recipe": recipe_text, "env": env}).encode(), json_h
    if kind == "priority":
        return kind, json.dumps({"recipe": recipe_text, "priority": rng.choice([10**30, -10**30, "high", 1.5])}
                                ).encode(), json_h
    if kind == "name":
        return kind, json.dumps({"recipe": recipe_text, "name": rng.choice(["../x", "a/b", "", "x" * 500, "\u202e",
                                                                            ".", "..", "a\u0000b"])}).encode(), json_h
    if kind == "base_dir":
        return kind, json.dumps({"recipe": recipe_text, "base_dir": rng.choice(["/etc", "\u0000", "~root", "",
                                                                                 "x" * 5000])}).encode(), json_h
    if kind == "nul":
        return kind, json.dumps({"recipe": recipe_text.replace(":", ":\u0000", 1)}).encode(), json_h
    depth = rng.choice([100, 10_000, 100_000])
    return kind, ('{"recipe": "x", "env": ' + "[" * depth + "]" * depth + "}").encode(), json_h


def bad_data_file(rng: random.Random, folder: Path, rows: list[dict], kind: str | None = None) -> tuple[str, Path]:
    """A broken training file of a classification recipe (rows: good ones to break): (kind, its path)."""
    kind = kind or rng.choice(DATA_KINDS)
    rows = [dict(r) for r in rows]
    lines = [json.dumps(r) for r in rows]
    at = rng.randrange(len(lines))
    suffix, raw = ".jsonl", None
    if kind == "garbage_line":
        lines.insert(at, rng.choice(["{", "not json", "{'a': 1}", '{"text": "x", "label": }', "}{"]))
    elif kind == "nul_line":
        lines.insert(at, "\0" * rng.randrange(1, 100))
    elif kind == "not_object":
        lines.insert(at, rng.choice(["[1, 2]", "3", '"text"', "null", "true"]))
    elif kind == "missing_label":
        del rows[at]["label"]
        lines[at] = json.dumps(rows[at])
    elif kind == "empty_text":
        rows[at]["text"] = rng.choice(["", " ", None])
        lines[at] = json.dumps(rows[at])
    elif kind == "label_type":
        rows[at]["label"] = rng.choice([[1], {"a": 1}, None, 1.5, True, ""])
        lines[at] = json.dumps(rows[at])
    elif kind == "empty_file":
        raw = b""
    elif kind == "blank_lines":
        raw = b"\n \n\t\n"
    elif kind == "utf16":
        raw = "\n".join(lines).encode("utf-16")
    elif kind == "latin1":
        raw = "\n".join(lines).encode() + b'\n{"text": "caf\xe9 \xff", "label": "food"}\n'
    elif kind == "bom":
        raw = b"\xef\xbb\xbf" + "\n".join(lines).encode()
    elif kind == "huge_line":
        rows[at]["text"] = "word " * rng.choice([10**5, 10**6])
        lines[at] = json.dumps(rows[at])
    elif kind == "many_columns":
        rows[at].update({f"c{i}": i for i in range(rng.choice([100, 2000]))})
        lines[at] = json.dumps(rows[at])
    elif kind == "deep_value":
        depth = rng.choice([100, 1000, 100_000])
        lines.insert(at, '{"text": "x", "label": "food", "extra": ' + "[" * depth + "]" * depth + "}")
    elif kind == "truncated":
        raw = "\n".join(lines).encode()[: -rng.randrange(1, 20)]
    elif kind == "binary":
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 5000)))
    elif kind == "one_label":
        lines = [json.dumps({**r, "label": "food"}) for r in rows]
    elif kind == "csv_ragged":
        suffix = ".csv"
        raw = ("text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in rows)
               + "a,b,c,d\n\"unclosed,food\n").encode()
    elif kind == "csv_no_header":
        suffix = ".csv"
        raw = "".join(f'"{r["text"]}",{r["label"]}\n' for r in rows).encode()
    elif kind == "parquet_junk":
        suffix = ".parquet"
        raw = b"PAR1" + bytes(rng.randrange(256) for _ in range(200)) + b"PAR1"
    elif kind == "huge_label_set":
        lines = [json.dumps({**r, "label": f"label-{i}"}) for i, r in enumerate(rows)]
    elif kind == "crlf":
        raw = "\r\n".join(lines).encode()
    else:
        raise ValueError(kind)
    path = folder / f"{kind}-{rng.randrange(10**9)}{suffix}"
    path.write_bytes(raw if raw is not None else ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass"))
    return kind, path
