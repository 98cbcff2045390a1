"""The bench scripts start as the README runs them (`python bench/X.py`), with bench/queue.py beside them."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def first_import(path: Path) -> str:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        if isinstance(node, ast.Import):
            return node.names[0].name
        if isinstance(node, ast.ImportFrom):
            return node.module
    return ""


def test_every_bench_script_takes_bench_off_the_path_first():
    scripts = [p for p in BENCH.glob("*.py") if p.name != "_paths.py"]
    assert len(scripts) >= 7
    late = {p.name: first_import(p) for p in scripts if first_import(p) != "_paths"}
    assert not late, f"bench scripts whose first import is not _paths: {late}"


def test_with_bench_first_on_the_path_queue_is_the_standard_librarys():
    # what `python bench/X.py` does: the script's folder first on sys.path; then X's first import, _paths
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import _paths; import queue, concurrent.futures; "
            "print(queue.__file__); print(queue.Queue.__name__); print(_paths.ROOT in sys.path)")
    out = subprocess.run([sys.executable, "-c", code, str(BENCH)], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    where, cls, root_on_path = out.stdout.split()
    assert Path(where).parent != BENCH and cls == "Queue" and root_on_path == "True"
    # and without it, bench/queue.py stands in (so the guard above is what makes the difference)
    bad = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import queue; "
                          "print(queue.__file__)", str(BENCH)], capture_output=True, text=True, cwd="/")
    assert Path(bad.stdout.strip()).parent == BENCH
