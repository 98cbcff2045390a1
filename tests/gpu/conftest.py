"""GPU tests: each strategy and precision through `runner run` on a real CUDA device. Skipped without one."""

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch, no CUDA
        cuda = False
    if cuda:
        return
    skip = pytest.mark.skip(reason="no CUDA device here; they run on a GPU machine (python -m pytest tests/gpu)")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
