"""Fixtures of the integration tests."""

import pytest

from runners import runner_in


@pytest.fixture
def runner(tmp_path):
    """The real `runner` command with a RUNNER_HOME of its own for this test (runner_in)."""
    yield from runner_in(tmp_path)
