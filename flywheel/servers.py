"""Local servers as child processes: the Prefect server (API + UI) and the MLflow UI of
`flywheel ui`, and `flywheel serve` for the demo and the serving tests.

Each binds 127.0.0.1 in its own process group, logs to a file, is health-checked against a
deadline and stopped with SIGTERM, then SIGKILL. `prefect_api` picks the Prefect server a command
uses: PREFECT_API_URL, else the running `flywheel ui` (`<Prefect home>/flywheel-ui.json`), else a
temporary one. Why: docs/decisions/0008-schedules-and-local-servers.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from flywheel.errors import FlywheelError
from flywheel.locks import hold
from flywheel.tracking import default_uri, display_uri, tracking_uri

HOST = "127.0.0.1"
STATE_FILE = "flywheel-ui.json"
LOG_DIR = "flywheel-ui"  # under the Prefect home: one log file per server
START_LOCK = "server-start.lock"  # under the Prefect home: one server starts on it at a time
PREFECT_START_TIMEOUT = 120.0  # seconds; ~6 s on an idle 2-core machine, far more when busy
MLFLOW_START_TIMEOUT = 180.0  # ~18 s idle
SERVE_START_TIMEOUT = 180.0  # loading the champion from the registry: ~10 s idle
STOP_TIMEOUT = 15.0  # SIGTERM, then this long before SIGKILL


class ServerError(FlywheelError):
    """A server could not start, died, or its port is taken."""


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server and how to tell that it is up."""

    name: str  # "Prefect" or "MLflow": used in messages
    command: list[str]
    env: dict[str, str]
    url: str  # what to open in a browser
    health_url: str  # answers 200 once the server is ready
    log_path: Path
    start_timeout: float
    # Held from the start until the server answers: two Prefect servers starting at once on one
    # database both migrate it, and one fails ("Online migration expected to match one row").
    start_lock: Path | None = None


@dataclass
class Server:
    """A started server: its process (leader of its own process group) and how it was started."""

    spec: ServerSpec
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> int | None:
        """The exit code if the process has ended, else None."""
        return self.process.poll()

    def log_tail(self, lines: int = 25) -> str:
        """The last lines of the server's log, indented, for error messages."""
        try:
            text = self.spec.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "    (no log)"
        tail = text.rstrip().splitlines()[-lines:] or ["(empty)"]
        return "\n".join(f"    {line}" for line in tail)

    def failure(self, what: str) -> ServerError:
        """An error naming the server, what went wrong, and where its whole log is."""
        return ServerError(
            f"the {self.spec.name} server {what}; last lines of {self.spec.log_path}:\n"
            f"{self.log_tail()}"
        )

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM to the whole process group (the server and its workers); SIGKILL to what is
        left of it after `timeout` seconds. Returns once the leader is reaped."""
        signal_group(self.pid, signal.SIGTERM)
        self.reap(time.monotonic() + timeout)

    def reap(self, deadline: float) -> None:
        """Wait until the process group is gone, SIGKILL it at `deadline`; reap the leader."""
        # poll() first: it reaps the leader, which otherwise stays in the group as a zombie
        while (self.process.poll() is None or group_alive(self.pid)) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.1)
        if group_alive(self.pid):  # not after it is gone: the id may belong to another group
            signal_group(self.pid, signal.SIGKILL)
        self.process.wait()


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is left."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send `sig` to a process group that may already be gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether a server could bind 127.0.0.1:`port` now (as servers do, with SO_REUSEADDR: closed
    connections lingering in TIME_WAIT do not count, a listening socket does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def check_port(port: int, option: str) -> None:
    """Raise a ServerError naming `option` when `port` is taken."""
    if not port_is_free(port):
        raise ServerError(
            f"port {port} on {HOST} is in use: pass another with {option}, "
            f"e.g. {option} {free_port()}"
        )


def prefect_home(root: Path) -> Path:
    """The Prefect home in use: PREFECT_HOME (the CLI sets it to the project's .prefect/)."""
    return Path(os.environ.get("PREFECT_HOME") or root / ".prefect").resolve()


def base_env() -> dict[str, str]:
    """The environment of a server process: this one's, with Python output unbuffered so the
    log file is current when a server dies."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def prefect_spec(
    home: Path, port: int, log_name: str = "prefect-server.log", ui: bool = True
) -> ServerSpec:
    """`prefect server start` on 127.0.0.1:`port` with the database in `home`; `ui`: with the
    web UI (a server only a command talks to starts faster without it)."""
    url = f"http://{HOST}:{port}"
    env = base_env() | {
        "PREFECT_HOME": str(home),
        "PREFECT_UI_ENABLED": str(ui).lower(),  # the CLI's default is false
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The UI's API address comes from settings, not from --host/--port: without these it
        # would call port 4200, or whatever server PREFECT_API_URL names.
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_API_URL": f"{url}/api",
        "PREFECT_UI_API_URL": f"{url}/api",
        # Concurrency-slot leases on disk (in the home), not in memory: a server restarted while
        # a run held the training slot still expires that lease (flows/limits.py).
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": (
            "prefect.server.concurrency.lease_storage.filesystem"
        ),
    }
    return ServerSpec(
        name="Prefect",
        command=[sys.executable, "-m", "prefect", "server", "start"]
        + ["--host", HOST, "--port", str(port)],
        env=env,
        url=url,
        health_url=f"{url}/api/health",
        log_path=home / LOG_DIR / log_name,
        start_timeout=PREFECT_START_TIMEOUT,
        start_lock=home / START_LOCK,
    )


def mlflow_spec(root: Path, port: int, workers: int) -> ServerSpec:
    """`mlflow server` (tracking API + UI) on the project's store, 127.0.0.1:`port`.

    Runs keep the artifact location of their experiment (file:// in the project's store), which
    the server reads directly; --default-artifact-root gives experiments created from the UI the
    same place the pipeline uses.
    """
    uri = tracking_uri(root)
    if uri.startswith(("http://", "https://")):
        raise ServerError(
            f"MLFLOW_TRACKING_URI is a tracking server ({display_uri(uri)}): open it there, "
            "or unset MLFLOW_TRACKING_URI to look at the project's own store"
        )
    url = f"http://{HOST}:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    command += ["--host", HOST, "--port", str(port), "--workers", str(workers)]
    if uri == default_uri(root):
        artifacts = (root / "mlflow" / "artifacts").resolve()
        artifacts.mkdir(parents=True, exist_ok=True)
        command += ["--default-artifact-root", artifacts.as_uri()]
    return ServerSpec(
        name="MLflow",
        command=command,
        env=base_env(),
        url=url,
        health_url=f"{url}/health",
        log_path=prefect_home(root) / LOG_DIR / "mlflow-server.log",
        start_timeout=MLFLOW_START_TIMEOUT,
    )


def serve_spec(
    params: Path, port: int, reload_seconds: float, log_path: Path, env: dict[str, str]
) -> ServerSpec:
    """`flywheel serve` (this environment's) on 127.0.0.1:`port` for the project at `params`,
    checking the champion alias every `reload_seconds`; `env` on top of this process's."""
    url = f"http://{HOST}:{port}"
    command = [str(Path(sys.executable).parent / "flywheel"), "serve", "--params", str(params)]
    command += ["--port", str(port), "--reload-seconds", str(reload_seconds)]
    command += ["--log-level", "warning"]
    return ServerSpec(
        name="flywheel serve",
        command=command,
        env=base_env() | env,
        url=url,
        health_url=f"{url}/health",
        log_path=log_path,
        start_timeout=SERVE_START_TIMEOUT,
    )


def _terminate_with_parent() -> Callable[[], None] | None:
    """What the child runs before exec: ask for SIGTERM when the parent dies, even by SIGKILL
    (Linux), so a killed `flywheel ui` leaves no server bound to its port. libc is loaded here,
    in the parent: the child only makes the one system call."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


def start(spec: ServerSpec) -> Server:
    """Start the server in its own process group, output to its log file (truncated); it is
    stopped if this process dies."""
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    with spec.log_path.open("wb") as log:
        process = subprocess.Popen(
            spec.command,
            env=spec.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_terminate_with_parent(),
        )
    return Server(spec, process)


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether GET `url` returns 200 within `timeout` seconds."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_until_healthy(servers: list[Server], poll: float = 0.5) -> None:
    """Return once every server answers its health URL; raise (with its log tail) if one exits
    or misses its deadline."""
    started = time.monotonic()
    waiting = list(servers)
    while waiting:
        for server in list(waiting):
            code = server.exited()
            if code is not None:
                raise server.failure(f"exited with code {code} while starting")
            if answers(server.spec.health_url):
                waiting.remove(server)
            elif time.monotonic() - started > server.spec.start_timeout:
                raise server.failure(
                    f"did not answer {server.spec.health_url} within "
                    f"{server.spec.start_timeout:.0f} s"
                )
        if waiting:
            time.sleep(poll)


def stop_all(servers: list[Server], timeout: float = STOP_TIMEOUT) -> None:
    """Stop every server: SIGTERM to all at once, SIGKILL to what is left after `timeout`."""
    for server in servers:
        signal_group(server.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for server in servers:
        server.reap(deadline)


@contextlib.contextmanager
def running(specs: list[ServerSpec]) -> Iterator[list[Server]]:
    """Start the servers, wait until all are healthy, yield them; stop all on the way out
    (including when one fails to start or the caller is interrupted)."""
    with starting(specs) as ready:
        yield ready()


@contextlib.contextmanager
def starting(specs: list[ServerSpec]) -> Iterator[Callable[[], list[Server]]]:
    """Start the servers and yield at once a `ready()` that waits until all are healthy (and
    returns them): the caller does other work while they start. Stops all on the way out.
    A spec's start lock is held from before its start until `ready()` returns (or the block
    ends): a second process starting a server on the same database waits for it."""
    servers: list[Server] = []
    locks = contextlib.ExitStack()  # the specs' start locks (flywheel.locks: flock)

    def ready() -> list[Server]:
        try:
            wait_until_healthy(servers)
        finally:
            locks.close()
        return servers

    try:
        for spec in specs:
            if spec.start_lock is not None:
                where = spec.start_lock.parent
                guard = hold(
                    spec.start_lock,
                    f"{spec.name} server start",
                    guards=f"{spec.name} server starts on {where}",
                )
                locks.enter_context(guard)
            servers.append(start(spec))
        yield ready
    finally:
        locks.close()
        with interrupts_deferred():  # a second Ctrl-C must not leave servers behind
            stop_all(servers)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM for the block (main thread only: elsewhere signals cannot be
    handled, nor do they arrive)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --- the state file of a running `flywheel ui` ------------------------------------------------


@dataclass(frozen=True)
class UiState:
    """Where a running `flywheel ui` serves, and its processes."""

    prefect_url: str
    mlflow_url: str
    pid: int  # the `flywheel ui` process
    prefect_pid: int
    mlflow_pid: int

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"


def state_path(home: Path) -> Path:
    return home / STATE_FILE


def write_state(home: Path, state: UiState) -> Path:
    """Record a running `flywheel ui` (replaced atomically)."""
    path = state_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(asdict(state), indent=2) + "\n", encoding="utf-8")
    partial.replace(path)
    return path


def remove_state(home: Path, pid: int) -> None:
    """Remove the state file if it is `pid`'s (a newer `flywheel ui` may have replaced it)."""
    found = read_state(home, check_health=False)
    if found is not None and found.pid == pid:
        state_path(home).unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state(home: Path, check_health: bool = True) -> UiState | None:
    """The running `flywheel ui` of this Prefect home, or None: no file, an unreadable one, or a
    stale one (its processes are gone, or its Prefect server does not answer)."""
    try:
        state = UiState(**json.loads(state_path(home).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    if not (process_alive(state.pid) and process_alive(state.prefect_pid)):
        return None
    if check_health and not answers(f"{state.prefect_api_url}/health"):
        return None
    return state


# --- which Prefect server a command talks to --------------------------------------------------


def _up() -> None:
    """A server that is already up."""


@dataclass(frozen=True)
class PrefectApi:
    """The Prefect API a command uses, and where that choice came from."""

    url: str  # http://host:port/api
    source: str  # "PREFECT_API_URL", "flywheel ui" or "started for this command"
    ready: Callable[[], object] = _up  # waits until the server answers (one started now)


@contextlib.contextmanager
def prefect_api(
    root: Path, announce: Callable[[str], None], wait: bool = True
) -> Iterator[PrefectApi]:
    """Point Prefect at a server for the duration of the block: PREFECT_API_URL if set, else the
    running `flywheel ui`, else a server started now on a free port and stopped afterwards (it
    uses the project's Prefect database, so what it records stays for `flywheel ui`).
    `wait=False`: the block starts while that server starts (9-20 s, a new project's database
    is migrated): call the api's `ready()` before the first flow."""
    home = prefect_home(root)
    configured = configured_api_url()
    if configured:
        yield PrefectApi(configured, "PREFECT_API_URL")
        return
    with ui_server(root) as url:
        if url is not None:
            yield PrefectApi(url, "flywheel ui")
            return
    spec = prefect_spec(home, free_port(), f"prefect-server-{os.getpid()}.log", ui=False)
    announce(
        f"no Prefect server running (no PREFECT_API_URL, no `flywheel ui`): starting one at "
        f"{spec.url} for this command, on {home}"
    )
    with starting([spec]) as ready:
        if wait:
            ready()
        api = PrefectApi(f"{spec.url}/api", "started for this command", _up if wait else ready)
        with use_api(api.url):
            try:
                yield api
            finally:
                send_pending_to_prefect()
    spec.log_path.unlink(missing_ok=True)  # kept only when the server failed


def send_pending_to_prefect(timeout: float = 5.0) -> None:
    """Let Prefect's background workers send the logs and events they still hold, while the
    server is up: once it stops they would retry its dead address at exit for about a minute
    ("Error logging to API: All connection attempts failed")."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout)
    EventsWorker.drain_all(timeout=timeout)


def configured_api_url() -> str | None:
    """The Prefect API this process is configured for, else None: PREFECT_API_URL from the
    environment, a Prefect profile or a settings context (a test harness sets one)."""
    from prefect.settings import PREFECT_API_URL

    return os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value() or None


@contextlib.contextmanager
def ui_server(root: Path) -> Iterator[str | None]:
    """Point Prefect at the running `flywheel ui` of this project for the block and yield its API
    URL (a `flywheel run` then shows live there, on one server); None, changing nothing, when
    PREFECT_API_URL is set or no `flywheel ui` runs."""
    state = None if configured_api_url() else read_state(prefect_home(root))
    if state is None:
        yield None
        return
    with use_api(state.prefect_api_url):
        yield state.prefect_api_url


@contextlib.contextmanager
def use_api(url: str) -> Iterator[None]:
    """Prefect talks to `url` for the block: in this process's settings, and as PREFECT_API_URL
    in os.environ, which subprocesses (served flow runs) inherit."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def watch(servers: list[Server], poll: float = 1.0) -> Server:
    """Block until one of the servers exits; return it."""
    while True:
        for server in servers:
            if server.exited() is not None:
                return server
        time.sleep(poll)
