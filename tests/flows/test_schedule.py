"""`flywheel schedule add | serve | list | remove` against a real Prefect server on a free port:
serve, list, pause on Ctrl-C, remove; add to a work pool; bad cron expressions; the deprecated
flag form (`--cron`, `--list`, `--remove`) still working, with a note naming the subcommand."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flywheel import servers
from flywheel.cli import app
from flywheel.flows.pipeline import pipeline
from flywheel.flows.retrain import retrain
from flywheel.flows.schedule import FLOWS, parse_cron
from tests.code.test_servers import FLYWHEEL, clean_env, read_until
from tests.conftest import REPO, make_project


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> servers.Server:
    """A Prefect server of its own (not the test harness): 127.0.0.1, a free port, a tmp home."""
    home = tmp_path_factory.mktemp("prefect-home")
    with servers.running([servers.prefect_spec(home, servers.free_port())]) as (started,):
        yield started


@pytest.fixture
def project(tmp_path) -> Path:
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def cli(server: servers.Server, project: Path, *args: str, timeout: float = 120):
    return subprocess.run(
        [FLYWHEEL, "schedule", *args, "--params", str(project / "params.yaml")],
        env=env_for(server),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def env_for(server: servers.Server) -> dict[str, str]:
    return clean_env(
        PREFECT_API_URL=f"{server.spec.url}/api", PREFECT_HOME=server.spec.env["PREFECT_HOME"]
    )


FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def api(server: servers.Server, path: str, body: dict | None = None, tries: int = 5):
    """GET (or POST `body` to) the server's REST API, not through Flywheel.

    A 503 is the server saying its SQLite database was busy (another process, here the serving
    one, was writing): Prefect's own client retries it, and so does this.
    """
    request = urllib.request.Request(
        f"{server.spec.url}/api/{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    for attempt in range(1, tries + 1):
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == tries:
                raise
            time.sleep(attempt)


def deployments(server: servers.Server) -> dict[str, dict]:
    """The server's deployments by name."""
    return {d["name"]: d for d in api(server, "deployments/filter", {})}


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout} s")


def test_flow_names_match_the_flows():
    assert pipeline.name == FLOWS["pipeline"].flow_name and FLOWS["pipeline"].flow() is pipeline
    assert retrain.name == FLOWS["retrain"].flow_name and FLOWS["retrain"].flow() is retrain


@pytest.fixture
def no_server(project, monkeypatch) -> Path:
    """PREFECT_API_URL pointing at nothing: a command that looks for a server fails."""
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setenv("PREFECT_HOME", str(project / ".prefect"))
    return project


def schedule(project: Path, *args: str):
    return CliRunner().invoke(app, ["schedule", *args, "--params", str(project / "params.yaml")])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--cron", "0 3 * *"], "invalid cron expression '0 3 * *': expected 5 fields"),
        (["add", "--work-pool", "p", "--cron", "61 3 * * 1"], "invalid cron expression '61 3"),
        (
            ["add", "--work-pool", "p", "--cron", "0 3 * * 1", "--timezone", "Mars/Base"],
            "unknown time zone 'Mars/Base'",
        ),
        (["serve"], 'give --cron EXPR, e.g. --cron "0 3 * * 1"'),  # only retrain has a default
        (["add", "--cron", "0 3 * * 1"], "Missing option '--work-pool'"),
        (["remove"], "Missing argument"),
        (["--list", "list"], "options go after the subcommand: flywheel schedule list"),
        # the deprecated flag form keeps its checks
        (["--cron", "0 3 * *"], "invalid cron expression '0 3 * *': expected 5 fields"),
        (["--cron", "0 3 * * 1", "--timezone", "Mars/Base"], "unknown time zone 'Mars/Base'"),
        ([], "give one of --cron EXPR, --list or --remove NAME"),
        (["--list", "--remove", "x"], "give one of --cron EXPR, --list or --remove NAME"),
        (["--list", "--work-pool", "p"], "--work-pool goes with --cron"),
    ],
)
def test_bad_requests_fail_before_any_server_is_used(no_server, args, message):
    out = schedule(no_server, *args)
    assert out.exit_code == 2, out.output
    assert message in out.output


@pytest.mark.parametrize(
    ("args", "subcommand"),
    [
        (["--cron", "0 3 * *"], "`flywheel schedule serve` with the same options"),
        (["--flow", "retrain", "--timezone", "Mars/Base"], "`flywheel schedule serve`"),
        (["--cron", "0 3 * *", "--work-pool", "p"], "`flywheel schedule add` with the same"),
    ],
)
def test_the_flag_form_notes_its_subcommand_on_stderr(no_server, args, subcommand):
    out = schedule(no_server, *args)
    assert out.exit_code == 2  # the bad cron or time zone, after the note
    assert "the flag form of `flywheel schedule` is deprecated" in out.stderr
    assert subcommand in out.stderr
    assert "deprecated" not in out.stdout


def test_without_a_subcommand_or_flag_it_shows_the_subcommands():
    out = CliRunner().invoke(app, ["schedule"])
    assert out.exit_code == 2
    assert all(name in out.output for name in ("add", "serve", "list", "remove"))


def test_parse_cron_knows_the_next_run():
    spec = parse_cron("0 3 * * 1", "Europe/Berlin")
    assert spec.next_run.weekday() == 0 and spec.next_run.hour == 3
    assert str(spec) == "'0 3 * * 1' (Europe/Berlin)"


def test_schedule_create_run_list_pause_remove(server, tmp_path):
    """Serve a deployment, run it (data stages only, in a git + DVC project), list it, stop
    serving (paused), remove it."""
    project = make_project(tmp_path / "project", tmp_path / "remote")
    serving = subprocess.Popen(
        [FLYWHEEL, "schedule", "serve", "--params", str(project / "params.yaml")]
        + ["--cron", "0 3 * * 1", "--name", "nightly-test"],
        env=env_for(server),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        read_until(serving, r"serving flywheel-pipeline/nightly-test .*next run", timeout=120)
        made = wait_for(
            lambda: deployments(server).get("nightly-test"), 60, "the deployment 'nightly-test'"
        )
        schedule = made["schedules"][0]
        assert schedule["schedule"]["cron"] == "0 3 * * 1"
        assert schedule["schedule"]["timezone"] == "UTC"
        assert schedule["active"] and not made["paused"]
        assert made["parameters"] == {"params_path": str((project / "params.yaml").resolve())}
        assert made["entrypoint"] == "flywheel.flows.pipeline.pipeline"
        assert made["work_pool_name"] is None  # served by the process, no work pool

        listed = cli(server, project, "list")
        assert listed.returncode == 0, listed.stderr
        row = next(line for line in listed.stdout.splitlines() if "nightly-test" in line)
        assert (
            row.startswith("flywheel-pipeline")
            and "0 3 * * 1 (UTC)" in row
            and " yes " in row
            and "served" in row
        )
        assert "(PREFECT_API_URL)" in listed.stdout

        # what 03:00 on Monday would do, now and data stages only: the serving process runs it
        run = api(
            server, f"deployments/{made['id']}/create_flow_run", {"parameters": {"data_only": True}}
        )
        done = wait_for(
            lambda: (
                (state := api(server, f"flow_runs/{run['id']}")["state_type"]) in FINAL and state
            ),
            180,
            "the end of the deployment's flow run",
        )
        assert done == "COMPLETED", serving.stdout.read() if serving.poll() is not None else done
        assert (project / "data" / "prepared" / "train.parquet").is_file()
        assert api(server, f"flow_runs/{run['id']}")["parameters"]["params_path"] == str(
            (project / "params.yaml").resolve()
        )

        serving.send_signal(signal.SIGINT)  # Ctrl-C
        assert serving.wait(timeout=60) == 0
        assert "stopped serving flywheel-pipeline/nightly-test" in serving.stdout.read()
    finally:
        if serving.poll() is None:
            serving.kill()
            serving.wait()
    assert deployments(server)["nightly-test"]["paused"]  # nobody serves it: no runs pile up
    row = next(
        line for line in cli(server, project, "list").stdout.splitlines() if "nightly-test" in line
    )
    assert " paused " in row

    removed = cli(server, project, "remove", "nightly-test")
    assert removed.returncode == 0, removed.stderr
    assert "removed deployment flywheel-pipeline/nightly-test" in removed.stdout
    assert "deprecated" not in removed.stderr
    assert "nightly-test" not in deployments(server)
    again = cli(server, project, "remove", "nightly-test")
    assert again.returncode == 2
    assert "no deployment named 'nightly-test'" in again.stderr


def test_schedule_on_a_work_pool(server, project):
    """`add`, and the deprecated flags doing the same (each with a note naming its subcommand)."""
    made = cli(server, project, "--cron", "30 2 * * *", "--name", "pool-test", "--work-pool", "wp")
    assert made.returncode == 0, made.stderr
    assert "use `flywheel schedule add` with the same options" in made.stderr
    assert "created process work pool 'wp'" in made.stdout
    assert "prefect worker start --pool wp" in made.stdout
    deployment = deployments(server)["pool-test"]
    assert deployment["work_pool_name"] == "wp"
    assert deployment["schedules"][0]["schedule"]["cron"] == "30 2 * * *"
    assert deployment["job_variables"]["working_dir"] == str(project.resolve())
    assert deployment["job_variables"]["env"]["HF_HUB_OFFLINE"] == "1"
    assert deployment["entrypoint"] == "flywheel.flows.pipeline.pipeline"

    # the same name again updates the schedule (one deployment, new cron); the pool is reused
    updated = cli(
        server, project, "add", "--cron", "0 4 * * *", "--name", "pool-test", "--work-pool", "wp"
    )
    assert updated.returncode == 0, updated.stderr
    assert "deprecated" not in updated.stderr
    assert "created process work pool" not in updated.stdout
    assert [s["schedule"]["cron"] for s in deployments(server)["pool-test"]["schedules"]] == [
        "0 4 * * *"
    ]
    listed = cli(server, project, "--list")
    assert "use `flywheel schedule list`" in listed.stderr
    row = next(line for line in listed.stdout.splitlines() if "pool-test" in line)
    assert "pool wp" in row and "0 4 * * * (UTC)" in row

    # the retrain check on the same pool: hourly (retrain.cron) by default, if_needed on
    check = cli(server, project, "add", "--flow", "retrain", "--work-pool", "wp")
    assert check.returncode == 0, check.stderr
    assert "deployed flywheel-retrain/if-needed to work pool 'wp'" in check.stdout
    made = deployments(server)["if-needed"]
    assert made["entrypoint"] == "flywheel.flows.retrain.retrain"
    assert made["schedules"][0]["schedule"]["cron"] == "0 * * * *"
    assert made["parameters"] == {
        "params_path": str((project / "params.yaml").resolve()),
        "if_needed": True,
    }
    rows = cli(server, project, "list").stdout.splitlines()
    assert any(r.startswith("flywheel-retrain") and "if-needed" in r for r in rows)
    assert cli(server, project, "remove", "flywheel-retrain/if-needed").returncode == 0
    old = cli(server, project, "--remove", "pool-test")
    assert old.returncode == 0, old.stderr
    assert "use `flywheel schedule remove NAME`" in old.stderr
    assert {"pool-test", "if-needed"}.isdisjoint(deployments(server))


def test_without_a_server_a_temporary_one_keeps_deployments_in_the_project(project):
    """No PREFECT_API_URL, no `flywheel ui`: each command starts a server on the project's
    Prefect database and stops it; what one command deployed, the next one lists."""
    env = clean_env(PREFECT_HOME=str(project / ".prefect"))
    params = ["--params", str(project / "params.yaml")]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [FLYWHEEL, "schedule", *args, *params],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr
        started = re.search(
            r"starting one at http://127\.0\.0\.1:(\d+) for this command", done.stderr
        )
        assert started, done.stderr
        assert servers.port_is_free(int(started.group(1)))  # stopped again
        return done

    run("add", "--cron", "0 5 * * *", "--name", "kept", "--work-pool", "local")
    listed = run("list")
    assert re.search(
        r"^flywheel-pipeline\s+kept\s+0 5 \* \* \* \(UTC\)\s+yes\s+pool local", listed.stdout, re.M
    )
    assert (project / ".prefect" / "prefect.db").is_file()
    assert not list((project / ".prefect" / servers.LOG_DIR).glob("*.log"))  # clean stops
