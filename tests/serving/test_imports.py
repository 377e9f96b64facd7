"""The server imports only what it serves with: a fresh process builds the app as `flywheel
serve` does (the registry's champion, loaded), answers a prediction and takes a feedback, and
then holds no Prefect, no pipeline stage or flow, and no evaluation or promotion code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SERVER = """
import json, sys
from fastapi.testclient import TestClient
from flywheel.config import load_config
from flywheel.serving.app import create_app, registry_slot

cfg = load_config(sys.argv[1])
slot = registry_slot(cfg, 0)
slot.reload()
with TestClient(create_app(cfg, slot, "token")) as client:
    answer = client.post("/predict", json={"text": "A wonderful, moving film."})
    about = answer.json()["predictions"][0]["id"]
    sent = client.post(
        "/feedback",
        json={"text": "Dull.", "label": "rotten", "prediction_id": about},
        headers={"Authorization": "Bearer token"},
    )
statuses = [answer.status_code, sent.status_code]
print(json.dumps({"statuses": statuses, "modules": sorted(sys.modules)}))
"""
# Not in the serving process: the orchestrator, the stages (evaluation among them), the flows,
# the CLI, and the metrics and promotion policy that only the pipeline and the CLI use.
ABSENT = (
    "prefect",
    "flywheel.tasks",
    "flywheel.flows",
    "flywheel.cli",
    "flywheel.metrics",
    "flywheel.promotion",
)


def test_the_server_process_imports_no_prefect_and_no_stage(project):
    root, registry = project
    done = subprocess.run(
        [sys.executable, "-c", SERVER, str(root / "params.yaml")],
        cwd=root,
        env=os.environ | {"MLFLOW_TRACKING_URI": registry.uri},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["statuses"] == [200, 201]  # it served, so its imports are the server's
    modules = out["modules"]
    assert {"flywheel.serving.app", "flywheel.registry", "fastapi"} <= set(modules)
    found = [m for m in modules if any(m == a or m.startswith(f"{a}.") for a in ABSENT)]
    assert found == []
