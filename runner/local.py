"""The embedded defaults: a local Ray head and a local runner server, started in the background on first use.

With nothing configured (no RUNNER_SERVER), the CLI calls `ensure_local()`: it starts what is not running yet, both
bound to 127.0.0.1, and records them in <RUNNER_HOME>/local.json. Each runs in a session of its own, so it outlives
the CLI that started it: `runner server stop` stops the server, `runner cluster down` the Ray head (and with it
every job on it).

- Ray: `ray start --head --block` as one process whose SIGTERM stops exactly the Ray it started (`ray stop` would
  stop every Ray of the machine). Ray 2.60 turns token auth on for local clusters; the runner makes its own token
  (<RUNNER_HOME>/ray_token, mode 0600) and hands it to Ray, the server and, through Ray, to the job drivers, so no
  step depends on what ~/.ray holds. Ports are free ones, picked at start.
- The server: `python -m runner.server --ray <the dashboard>`; its output in <RUNNER_HOME>/server.log.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from jobs.jobdir import runner_home


class LocalError(Exception):
    """The local server or Ray could not be started or stopped; the message says why and where to look."""


def state_path(home: Path) -> Path:
    return home / "local.json"


def read_state(home: Path) -> dict:
    try:
        return json.loads(state_path(home).read_text())
    except (OSError, ValueError):
        return {}


def _write_state(home: Path, state: dict) -> None:
    tmp = state_path(home).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(state_path(home))


def alive(pid: int | None) -> bool:
    import psutil

    if not pid:
        return False
    try:  # a zombie (exited, not yet reaped by the CLI that started it) is not alive
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # another user's: there, whatever its state
        return True


def free_port(preferred: int | None = None) -> int:
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise LocalError("no free TCP port on 127.0.0.1")


def ray_token(home: Path) -> str:
    """The local Ray head's token (<RUNNER_HOME>/ray_token, 0600, made on first use)."""
    return _token_file(home, "ray_token", secrets.token_hex(32))


def server_token(home: Path) -> str:
    """The local runner server's token (<RUNNER_HOME>/server_token, 0600, made on first use): the server asks every
    request for it, the CLI sends it, and `runner dashboard` trades it for a one-time sign-in link. Without it any
    local user or process, or a page a proxy forwards to loopback, could drive the server."""
    return _token_file(home, "server_token", secrets.token_urlsafe(32))


def _token_file(home: Path, name: str, new: str) -> str:
    """The token kept in <home>/<name> (0600); `new` written whole (a temporary file renamed) where there is none
    or one cut short (a CLI killed while writing it), so that no server ever starts with an empty token."""
    path = home / name
    try:
        found = path.read_text().strip()
    except FileNotFoundError:
        found = ""
    if len(found) >= 32:
        return found
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / f"{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.replace(tmp, path)  # two CLIs at once: the later rename wins, and both then read that one
    return path.read_text().strip()


def healthy(url: str, timeout: float = 2.0) -> bool:
    if not url:
        return False
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


@contextmanager
def _lock(home: Path):
    """One CLI at a time starts or stops the local services (two `runner submit` at once start one server)."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "local.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _spawn(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, close_fds=True)


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no output"
    return " | ".join(lines[-n:])[-600:] or "no output"


def _wait(ok, proc: subprocess.Popen, what: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        if proc.poll() is not None:
            raise LocalError(f"{what} exited at start (code {proc.returncode}): {_tail(log)}; see {log}")
        time.sleep(0.3)
    raise LocalError(f"{what} did not come up in {timeout:.0f} s: {_tail(log)}; see {log}")


def _ray_env(home: Path) -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_token(home), "RUNNER_HOME": str(home),
            "RAY_USAGE_STATS_ENABLED": "0"}


def _nodes(url: str, token: str) -> list[dict] | None:
    """The ALIVE nodes Ray's dashboard at `url` lists, or None when it does not answer."""
    req = urllib.request.Request(f"{url}/api/v0/nodes?limit=100", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            nodes = json.loads(r.read())["data"]["result"]["result"]
    except (OSError, urllib.error.URLError, ValueError, KeyError, TypeError):
        return None
    return [n for n in nodes if n.get("state") == "ALIVE"]


def _dashboard_up(url: str, token: str) -> bool:
    """The dashboard answers and the head node has registered its CPUs (the queue needs them to place jobs)."""
    return any((n.get("resources_total") or {}).get("CPU") for n in _nodes(url, token) or [])


def start_ray(home: Path, num_cpus: int | None = None, num_gpus: int | None = None) -> dict:
    port, dash = free_port(), free_port(8265)
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           "--include-dashboard=true", f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats",
           f"--num-cpus={num_cpus or os.cpu_count() or 1}"]
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    log = home / "ray.log"
    proc = _spawn(cmd, log, _ray_env(home))
    url = f"http://127.0.0.1:{dash}"
    _wait(lambda: _dashboard_up(url, ray_token(home)), proc, "the local Ray head", log, 120)
    return {"pid": proc.pid, "address": f"127.0.0.1:{port}", "dashboard": url}


def start_server(home: Path, ray_dashboard: str, ray_gcs: str | None = None) -> dict:
    port = free_port(int(os.environ.get("RUNNER_PORT", "8642")))
    cmd = [sys.executable, "-m", "runner.server", "--host", "127.0.0.1", "--port", str(port), "--ray", ray_dashboard]
    cmd += ["--ray-gcs", ray_gcs] if ray_gcs else []
    log = home / "server.log"
    proc = _spawn(cmd, log, {**_ray_env(home), "RUNNER_TOKEN": server_token(home)})
    url = f"http://127.0.0.1:{port}"
    _wait(lambda: healthy(url), proc, "the runner server", log, 60)
    return {"pid": proc.pid, "url": url}


def ensure_local(home: Path, say=lambda m: None) -> str:
    """The local server's URL, starting the Ray head and the server where they are not running."""
    with _lock(home):
        state = read_state(home)
        ray = state.get("ray") or {}
        server = state.get("server") or {}
        if not (alive(ray.get("pid")) and _dashboard_up(ray.get("dashboard", ""), ray_token(home))):
            if alive(server.get("pid")):  # it follows the Ray that is gone; the new one has other ports
                _terminate(server["pid"])
            say("starting a local Ray head (runner cluster down stops it)")
            ray = start_ray(home)
            state, server = {"ray": ray}, {}
            _write_state(home, state)
        if not (alive(server.get("pid")) and healthy(server.get("url", ""))):
            say("starting the local runner server (runner server stop stops it)")
            server = start_server(home, ray["dashboard"], ray.get("address"))
            _write_state(home, {**state, "server": server})
        return server["url"]


def _terminate(pid: int, timeout: float = 30.0, group: bool = False) -> bool:
    """SIGTERM, then SIGKILL after `timeout`; whether it was running. group: to the whole process group the
    process leads (it was started in a session of its own), as `ray stop` signals every Ray process at once."""
    if not alive(pid):
        return False
    group = group and os.getpgid(pid) == pid  # it leads its group (else: only the process)
    send = (lambda sig: os.killpg(pid, sig)) if group else (lambda sig: os.kill(pid, sig))
    send(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.2)
    try:
        send(signal.SIGKILL)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + 10  # SIGKILL is not instant: whoever asks next must find it gone
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def stop(home: Path, which: str) -> bool:
    """Stop the local 'server' or 'ray'; whether it was running."""
    with _lock(home):
        state = read_state(home)
        part = state.pop(which, None) or {}
        # Ray's head (`ray start --block`) took 30 s to stop after Train jobs had run, signalled alone or with its
        # whole group; its state is nothing the runner keeps, so after 5 s it is killed
        was = _terminate(part.get("pid"), timeout=5 if which == "ray" else 30, group=which == "ray")
        _write_state(home, state)
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        try:  # what `ray stop` does: the next plain ray.init() must not look for the Ray that is gone
            port = part.get("address", "").rsplit(":", 1)[-1]
            if which == "ray" and port and current.read_text().strip().rsplit(":", 1)[-1] == port:
                current.unlink()
        except OSError:
            pass
        return was


# --- cluster/local.sh ---------------------------------------------------------------------------------------------


def _shape(nodes: list[dict]) -> str:
    cpus = sum((n.get("resources_total") or {}).get("CPU", 0) for n in nodes)
    gpus = sum((n.get("resources_total") or {}).get("GPU", 0) for n in nodes)
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}: {cpus:g} CPUs, {gpus:g} GPUs"


def main(argv: list[str] | None = None) -> int:
    """`python -m runner.local up [--cpus N] [--gpus N] | down | status`, what cluster/local.sh runs.

    up: the local Ray head that `runner submit` uses (its server starts on the first submit); --gpus N declares N
    GPUs to Ray, real or not, to try the queue and placement on a laptop. status: exit 0 when it runs, 3 when not.
    """
    import argparse

    ap = argparse.ArgumentParser(prog="cluster/local.sh")
    ap.add_argument("verb", choices=["up", "down", "status"])
    ap.add_argument("--cpus", type=int, help="CPUs the head offers (default: this machine's)")
    ap.add_argument("--gpus", type=int, help="GPUs the head declares (default: those Ray finds); fake ones "
                                             "schedule like real ones, and a job asking for them trains on CPUs")
    args = ap.parse_args(argv)
    home = runner_home()
    home.mkdir(parents=True, exist_ok=True)
    if args.verb == "down":
        server, ray = stop(home, "server"), stop(home, "ray")
        print(("runner server stopped; " if server else "") +
              ("local Ray head stopped" if ray else "no local Ray head was running"))
        return 0
    with _lock(home):
        state = read_state(home)
        ray = state.get("ray") or {}
        nodes = _nodes(ray.get("dashboard", ""), ray_token(home)) if alive(ray.get("pid")) else None
        if args.verb == "up":
            if nodes is not None:
                print(f"the local Ray head is already running at {ray['address']} ({_shape(nodes)}); "
                      f"`cluster/local.sh down` first to start it with other resources")
                return 0
            try:
                ray = start_ray(home, args.cpus, args.gpus)
            except LocalError as e:
                print(f"cluster/local.sh up: {e}", file=sys.stderr)
                return 1
            _write_state(home, {"ray": ray})
            nodes = _nodes(ray["dashboard"], ray_token(home)) or []
            print(f"local Ray head up at {ray['address']} ({_shape(nodes)}); dashboard {ray['dashboard']}")
            print(f"`runner submit recipe.yaml` queues on it (RUNNER_HOME={home}); `cluster/local.sh down` stops it")
            return 0
    if nodes is None:
        print("local Ray head: not running (`cluster/local.sh up` starts it)")
        return 3
    server = state.get("server") or {}
    print(f"local Ray head: running at {ray['address']} ({_shape(nodes)}), pid {ray['pid']}; "
          f"dashboard {ray['dashboard']}")
    print(f"runner server: {'running at ' + server['url'] if alive(server.get('pid')) else 'not running'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
