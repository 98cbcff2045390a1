"""The real `runner` command as the integration tests run it: a RUNNER_HOME of its own, nothing else configured."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from runner.local import free_port

RUNNER = str(Path(sys.executable).parent / "runner")


def runner_in(folder: Path):
    """runner(*args, timeout=300, **env) -> CompletedProcess: the real `runner` command run in `folder`, with a
    RUNNER_HOME of its own there, nothing else configured (it starts its own local server and Ray head); yields it,
    then stops whatever it left running."""
    home = folder / "home"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS", "RUNNER_SERVER", "RUNNER_TOKEN")}
    env.update(RUNNER_HOME=str(home), RUNNER_PORT=str(free_port()))

    def run(*args, timeout=300, **extra):
        return subprocess.run([RUNNER, *args], env={**env, **extra}, capture_output=True, text=True,
                              timeout=timeout, cwd=folder)

    run.home = home
    yield run
    state = json.loads((home / "local.json").read_text()) if (home / "local.json").exists() else {}
    for part in state.values():  # whatever a failed test left running
        try:
            os.kill(part["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
