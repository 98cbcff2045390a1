"""Test set-up shared by every test: no hub, a private HF cache seeded with the packaged MiniLM, real data paths."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Nothing may reach a model hub from the tests; a private cache keeps the developer's own untouched.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("RUNNER_TEST_HF_HOME", tempfile.mkdtemp(prefix="runner-test-hf-"))
os.environ["HF_HOME"] = os.environ["RUNNER_TEST_HF_HOME"]
os.environ.pop("HF_HUB_CACHE", None)
# a runner command run by a test leaves nothing in the user's ~/.runner (runner validate writes its proofs there)
os.environ["RUNNER_HOME"] = tempfile.mkdtemp(prefix="runner-test-home-")
atexit.register(shutil.rmtree, os.environ["RUNNER_HOME"], ignore_errors=True)
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="session")
def minilm() -> str:
    """The real all-MiniLM-L6-v2, seeded into the test HF cache from the PyPI package."""
    from jobs.seed_cache import PACKAGED, seed

    repo, pkg = next(iter(PACKAGED.items()))
    if seed(repo, pkg) is None:
        pytest.skip(f"package {pkg} is not installed (make install installs it)")
    return repo


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "alpaca_en_demo.json").exists():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer():
    from tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    from tiny import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama", "llama", tokenizer)


@pytest.fixture
def write(tmp_path):
    """write(name, text) -> path, in this test's folder."""

    def _write(name: str, text: str) -> Path:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
        return p

    return _write


@pytest.fixture
def server(tmp_path):
    """server(token=None, **create_app options) -> URL of a real runner server (uvicorn, in a thread) over
    <tmp_path>/home; stopped after the test."""
    from contextlib import ExitStack

    from runner.server import create_app
    from web import served

    with ExitStack() as running:
        def start(token=None, **kwargs):
            return running.enter_context(served(create_app(tmp_path / "home", token, **kwargs)))

        yield start
