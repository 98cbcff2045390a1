"""The bench scripts start as the README runs them (`python bench/X.py`): bench/ is then first on sys.path, so no
script may be named like a module of the standard library (bench/queue.py once stood in for `queue` in torch's and
concurrent.futures' imports)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if "argparse" in p.read_text())


def test_no_bench_script_stands_in_for_a_standard_module():
    names = {p.stem for p in BENCH.glob("*.py")}
    assert len(names) >= 10
    assert not names & set(sys.stdlib_module_names), names & set(sys.stdlib_module_names)


def test_each_bench_script_starts_as_the_readme_runs_it():
    assert len(SCRIPTS) >= 8
    started = {script: subprocess.Popen([sys.executable, str(script), "--help"], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, cwd="/") for script in SCRIPTS}
    for script, proc in started.items():  # all at once: most of each is importing torch and transformers
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0 and "usage:" in out, f"{script.name}: {err[-500:]}"
