"""Local servers: ports, health deadlines, process-group stops, the state file, and `flywheel ui`
started and stopped for real on free ports."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flywheel import servers
from flywheel.cli import app
from tests.conftest import REPO

FLYWHEEL = str(Path(sys.prefix) / "bin" / "flywheel")


def spec_for(tmp_path: Path, code: str, timeout: float = 10.0) -> servers.ServerSpec:
    """A 'server' that runs `code` and never answers its health URL (nothing listens there)."""
    return servers.ServerSpec(
        name="Test",
        command=[sys.executable, "-c", code],
        env=servers.base_env(),
        url="http://127.0.0.1:9",
        health_url=f"http://127.0.0.1:{servers.free_port()}/health",
        log_path=tmp_path / "logs" / "test.log",
        start_timeout=timeout,
    )


def test_free_port_and_busy_port_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        assert not servers.port_is_free(busy)
        with pytest.raises(servers.ServerError, match=f"port {busy} .* in use: .*--mlflow-port"):
            servers.check_port(busy, "--mlflow-port")
    port = servers.free_port()
    assert servers.port_is_free(port)
    servers.check_port(port, "--prefect-port")


def test_a_server_that_dies_while_starting_is_reported_with_its_log(tmp_path):
    spec = spec_for(tmp_path, "import sys; print('cannot open the database'); sys.exit(3)")
    started = time.monotonic()
    with pytest.raises(servers.ServerError) as error, servers.running([spec]):
        pytest.fail("a dead server must not be yielded as running")
    assert time.monotonic() - started < 10
    message = str(error.value)
    assert "the Test server exited with code 3 while starting" in message
    assert "cannot open the database" in message
    assert str(spec.log_path) in message


def test_a_server_that_never_answers_times_out_and_is_stopped(tmp_path):
    code = "import os, time; print('still migrating', os.getpid(), flush=True); time.sleep(60)"
    spec = spec_for(tmp_path, code, timeout=2)
    started = time.monotonic()
    with pytest.raises(servers.ServerError) as error, servers.running([spec]):
        pytest.fail("a server that never answered must not be yielded as running")
    assert time.monotonic() - started < 15
    assert "did not answer" in str(error.value) and "within 2 s" in str(error.value)
    assert "still migrating" in str(error.value)
    pid = int(spec.log_path.read_text().split()[-1])
    assert not servers.group_alive(pid)


def test_stop_ends_the_whole_process_group_even_if_it_ignores_sigterm(tmp_path):
    # a leader and a child that both ignore SIGTERM: only the SIGKILL after the timeout ends them
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    server = servers.start(spec_for(tmp_path, code))
    deadline = time.monotonic() + 20
    while not server.spec.log_path.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(server.spec.log_path.read_text().split()[0])
    assert os.getpgid(child) == server.pid  # its own group, led by the server
    started = time.monotonic()
    server.stop(timeout=1.0)
    assert 1.0 <= time.monotonic() - started < 10
    assert server.exited() == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while servers.process_alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)  # the child is reaped by init
    assert not servers.process_alive(child)


def test_state_file_round_trip_and_stale_files_are_ignored(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = servers.UiState("http://127.0.0.1:1", "http://127.0.0.1:2", os.getpid(), os.getpid(), 1)
    path = servers.write_state(tmp_path, alive)
    assert json.loads(path.read_text())["prefect_url"] == "http://127.0.0.1:1"
    assert servers.read_state(tmp_path, check_health=False) == alive
    assert servers.read_state(tmp_path) is None  # nothing answers on port 1

    servers.write_state(tmp_path, servers.UiState("http://x", "http://y", gone.pid, gone.pid, 1))
    assert servers.read_state(tmp_path, check_health=False) is None  # its process is gone
    servers.remove_state(tmp_path, os.getpid())  # not ours: left alone
    assert path.exists()

    servers.write_state(tmp_path, alive)
    servers.remove_state(tmp_path, os.getpid())
    assert not path.exists()
    path.write_text("{not json")
    assert servers.read_state(tmp_path) is None


HEALTHY = """
import http.server, sys
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"true")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def test_flywheel_run_goes_to_the_running_ui_server(tmp_path, monkeypatch):
    """While `flywheel ui` runs (its state file names a live, answering server), `flywheel run`
    points Prefect at it for the run, and only for the run; PREFECT_API_URL still wins."""
    from flywheel.flows.limits import has_server

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    port = servers.free_port()
    health = subprocess.Popen([sys.executable, "-c", HEALTHY, str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while not servers.answers(f"{url}/api/health") and time.monotonic() < deadline:
            time.sleep(0.2)
        with servers.ui_server(tmp_path) as nothing:
            assert nothing is None  # no state file: Prefect as configured
        state = servers.UiState(url, "http://127.0.0.1:1", os.getpid(), health.pid, health.pid)
        servers.write_state(servers.prefect_home(tmp_path), state)
        with servers.ui_server(tmp_path) as api:
            assert api == f"{url}/api" == os.environ["PREFECT_API_URL"]
            assert has_server()  # the training slot is then the server's concurrency limit
        assert "PREFECT_API_URL" not in os.environ
        monkeypatch.setenv("PREFECT_API_URL", "http://team-server/api")
        with servers.ui_server(tmp_path) as api:
            assert api is None and os.environ["PREFECT_API_URL"] == "http://team-server/api"
    finally:
        health.kill()
        health.wait(timeout=10)


@pytest.mark.parametrize("command", ["ui", "schedule"])
def test_help(command):
    out = CliRunner().invoke(app, [command, "--help"])
    assert out.exit_code == 0
    assert "Usage:" in out.output and "--params" in out.output


def test_ui_refuses_a_busy_port_naming_the_option(tmp_path, monkeypatch):
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        out = CliRunner().invoke(
            app,
            ["ui", "--params", str(tmp_path / "params.yaml"), "--prefect-port", str(busy)],
        )
    assert out.exit_code == 2, out.output
    assert f"port {busy} on 127.0.0.1 is in use: pass another with --prefect-port" in out.output
    assert not (tmp_path / ".prefect" / servers.STATE_FILE).exists()


def get(url: str, timeout: float = 30) -> tuple[int, bytes, str]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read(), response.headers.get("content-type", "")


def post(url: str, body: dict, timeout: float = 30) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without a server or store of the developer's, plus `extra`."""
    drop = {"PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI", "PREFECT_UI_ENABLED"}
    return (
        {k: v for k, v in os.environ.items() if k not in drop} | {"PYTHONUNBUFFERED": "1"} | extra
    )


def read_until(proc: subprocess.Popen, pattern: str, timeout: float) -> tuple[re.Match, str]:
    """Read proc's output line by line until `pattern` matches; fail on exit or timeout."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            seen.append(line)
            if found := re.search(pattern, line):
                return found, "".join(seen)
            continue
        if proc.poll() is not None:
            seen.append(proc.stdout.read() or "")
            break
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} within {timeout} s; output:\n{''.join(seen)}")


@contextlib.contextmanager
def stopped_in_the_end(proc: subprocess.Popen, state_file: Path):
    """Whatever the test does, end the CLI and the servers it started, by their own ids."""
    pids: list[int] = []
    try:
        yield pids
    finally:
        if state_file.exists():
            state = json.loads(state_file.read_text())
            pids += [state["prefect_pid"], state["mlflow_pid"]]
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in pids:
            servers.signal_group(pid, signal.SIGKILL)


def start_ui(root: Path) -> tuple[subprocess.Popen, int, int]:
    """`flywheel ui` on free ports for the project at `root`, in its own session."""
    prefect_port, mlflow_port = servers.free_port(), servers.free_port()
    proc = subprocess.Popen(
        [FLYWHEEL, "ui", "--params", str(root / "params.yaml")]
        + ["--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)],
        cwd=root.parent,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return proc, prefect_port, mlflow_port


def test_flywheel_ui_starts_both_servers_shows_existing_runs_and_stops_on_ctrl_c(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    # a run made before the UI starts, in the project's own store (as `flywheel run` makes them)
    from flywheel import tracking

    uri, experiment = tracking.experiment_id(root)
    earlier = tracking.client(uri).create_run(experiment, run_name="earlier-run").info.run_id

    proc, prefect_port, mlflow_port = start_ui(root)
    state_file = root / ".prefect" / servers.STATE_FILE
    with stopped_in_the_end(proc, state_file) as pids:
        started = time.monotonic()
        found, output = read_until(proc, r"MLflow UI\s+(http://127\.0\.0\.1:\d+)", timeout=240)
        took = time.monotonic() - started
        prefect_url = re.search(r"Prefect UI\s+(http://127\.0\.0\.1:\d+)", output).group(1)
        assert prefect_url == f"http://127.0.0.1:{prefect_port}"
        assert found.group(1) == f"http://127.0.0.1:{mlflow_port}"

        assert get(f"{prefect_url}/api/health")[1] == b"true"
        assert get(f"http://127.0.0.1:{mlflow_port}/health")[0] == 200
        status, page, kind = get(f"{prefect_url}/")  # the UI is on (the CLI's default is off)
        assert status == 200 and "text/html" in kind and b"<html" in page.lower()
        ui_settings = json.loads(get(f"{prefect_url}/ui-settings")[1])
        assert ui_settings["api_url"] == f"{prefect_url}/api"  # not port 4200
        searched = post(
            f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/runs/search",
            {"experiment_ids": [experiment]},
        )
        assert [r["info"]["run_id"] for r in searched["runs"]] == [earlier]
        assert (root / ".prefect" / "prefect.db").is_file()  # the project's Prefect database

        state = json.loads(state_file.read_text())
        assert state["pid"] == proc.pid
        assert state["prefect_url"] == prefect_url
        pids += [state["prefect_pid"], state["mlflow_pid"]]
        for pid in pids:
            assert os.getpgid(pid) == pid  # each server leads its own process group

        # a second `flywheel ui` on the same project finds the first one
        again = subprocess.run(
            [FLYWHEEL, "ui", "--params", str(root / "params.yaml")],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert again.returncode == 2
        assert f"flywheel ui already runs (pid {proc.pid})" in again.stderr

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        rest = proc.stdout.read()
        assert "stopped the Prefect server and the MLflow UI" in rest
        for pid in pids:
            assert not servers.group_alive(pid)
        assert servers.port_is_free(prefect_port) and servers.port_is_free(mlflow_port)
        assert not state_file.exists()
    print(f"flywheel ui healthy after {took:.1f} s")


@pytest.mark.slow
def test_flywheel_ui_stops_prefect_and_fails_when_mlflow_dies(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    proc, _, mlflow_port = start_ui(root)
    state_file = root / ".prefect" / servers.STATE_FILE
    with stopped_in_the_end(proc, state_file) as pids:
        read_until(proc, r"Ctrl-C stops both", timeout=240)
        state = json.loads(state_file.read_text())
        pids += [state["prefect_pid"], state["mlflow_pid"]]
        os.killpg(state["mlflow_pid"], signal.SIGKILL)
        assert proc.wait(timeout=60) == 2
        rest = proc.stdout.read()
        assert "error: the MLflow server stopped by itself (exit code -9)" in rest
        assert f"Uvicorn running on http://127.0.0.1:{mlflow_port}" in rest  # its log tail
        assert not servers.group_alive(state["prefect_pid"])
        assert not state_file.exists()


def test_a_configured_prefect_api_is_used_and_nothing_started(tmp_path, monkeypatch):
    """PREFECT_API_URL set in Prefect's settings (as a test harness or a profile sets it, not in
    os.environ): prefect_api uses it and starts no server; without it, one is started."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(servers, "starting", lambda specs: pytest.fail("started a server"))
    configured = temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"})
    with configured, servers.prefect_api(tmp_path, print, wait=False) as api:
        assert (api.url, api.source) == ("http://127.0.0.1:9/api", "PREFECT_API_URL")
    unset = temporary_settings({PREFECT_API_URL: None})
    with unset, pytest.raises(pytest.fail.Exception), servers.prefect_api(tmp_path, print):
        pass


HOLDER = """
import sys, time
from pathlib import Path
from flywheel import locks
with locks.hold(Path(sys.argv[1]), "test", guards="test"):
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_server_with_a_start_lock_starts_only_once_another_process_lets_go(tmp_path):
    lock = tmp_path / "home" / servers.START_LOCK
    spec = replace(spec_for(tmp_path, "import time; time.sleep(60)"), start_lock=lock)
    started = time.monotonic()
    with servers.starting([spec]):  # nobody holds it: no wait
        assert time.monotonic() - started < 1
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock), "3"], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "holding"
    started = time.monotonic()
    with servers.starting([spec]):
        waited = time.monotonic() - started
        assert holder.poll() is not None or waited > 1.5
    assert holder.wait(timeout=30) == 0
    assert waited > 1.5


STARTER = """
import sys
from pathlib import Path
from flywheel import servers
spec = servers.prefect_spec(Path(sys.argv[1]), servers.free_port(), sys.argv[2], ui=False)
with servers.running([spec]):
    print("up", flush=True)
"""


def test_two_prefect_servers_starting_at_once_on_a_new_home_both_come_up(tmp_path):
    """Both would migrate the new database at once and one would fail ("Online migration
    expected to match one row", about every other time): the start lock lines them up."""
    home = tmp_path / "prefect-home"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", STARTER, str(home), f"p{i}.log"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert all("up" in output for output in outputs)
