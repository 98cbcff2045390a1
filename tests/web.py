"""A runner server app on a real uvicorn, in a thread of the test process (no Ray unless the app has one)."""

import threading
import time
from contextlib import contextmanager


@contextmanager
def served(app):
    """The app served on 127.0.0.1 and a free port; its URL. Stopped on leaving."""
    import uvicorn

    from runner.local import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


CHROMIUM = __import__("os").environ.get("RUNNER_CHROMIUM", "/usr/bin/chromium")  # Debian's; .ci/run installs it
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]


def wait_for(what: str, check, timeout: float, every: float = 0.5, show=None):
    """check()'s first truthy answer within timeout seconds, else an AssertionError naming what was awaited (and
    show()'s account of how things stood)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f": {show()}" if show else ""))
