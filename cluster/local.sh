#!/usr/bin/env bash
# A local Ray head for the runner on this machine: the one `runner submit` uses (state in $RUNNER_HOME, default
# ~/.runner), bound to 127.0.0.1, with a token of the runner's own.
#
#   cluster/local.sh up [--cpus N] [--gpus N]   start it; --gpus N declares N GPUs (fake ones try the queue)
#   cluster/local.sh status                     what runs (exit 0), or exit 3 when nothing does
#   cluster/local.sh down                       stop the runner server and the Ray head, and the jobs on it
#
# PYTHON picks the interpreter; default: the project's .venv, else python3.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m runner.local "$@"
