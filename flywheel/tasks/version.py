"""Version: record the data stages in DVC and push the prepared data to the DVC remote.

The data version is DVC's own content hash of the prepared folder (the `md5` of
`data/prepared` in dvc.lock, e.g. `3f2a...9c.dir`), so a data version named in MLflow can be
fetched back with `dvc checkout` / `dvc pull`.
See docs/decisions/0002-data-versioning-and-caching.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel.config import Config
from flywheel.io import file_md5, write_json_atomic
from flywheel.retries import retry_on_io
from flywheel.stages import StageSpec
from flywheel.tasks.prepare import PrepareResult

STAGE = StageSpec(
    name="version",
    module=__name__,
    reads=("split.prepared_dir",),
    keyed_on=None,  # always runs: records the data version in dvc.lock and pushes it
)

log = logging.getLogger(__name__)

PENDING_FILE = "flywheel-pending-push.json"  # in .dvc/tmp: targets for the next run to push


@dataclass(frozen=True)
class DataVersion:
    """The prepared data's content hash and where DVC recorded it."""

    data_version: str
    pointer: Path | None  # dvc.lock (pipeline run) or data/runs/<key>/prepared.dvc (one-off run)
    pushed_files: int  # files sent to the DVC remote (0 when already there or no remote)
    remote: str | None
    note: str


def dir_md5(path: Path) -> str:
    """DVC 3's hash of a folder: md5 of the sorted JSON listing of its files' md5s, plus '.dir'."""
    entries = [
        {"md5": file_md5(f), "relpath": f.relative_to(path).as_posix()}
        for f in path.rglob("*")
        if f.is_file()
    ]
    entries.sort(key=lambda e: e["relpath"])
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"


def is_dvc_repo(root: Path) -> bool:
    return (root / ".dvc").is_dir() and (root / "dvc.yaml").is_file()


def record_data_version(root: Path, prepared_dir: Path, pipeline_run: bool) -> DataVersion:
    """Hash the prepared data, record that hash in DVC and push the data to the default remote.

    A pipeline run (config = params.yaml) commits the data stages to dvc.lock. A one-off run
    (CLI overrides, outputs under data/runs/) must not touch dvc.lock, which would then claim
    params.yaml made data it did not: its prepared folder is `dvc add`ed instead, and the
    .dvc file beside it is the pointer to keep (commit it to record the version in git).
    """
    version = dir_md5(prepared_dir)
    if not is_dvc_repo(root):
        return DataVersion(version, None, 0, None, f"{root} is not a DVC project: hash only")
    relative = prepared_dir.relative_to(root).as_posix()
    if pipeline_run:
        stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
        dvc(root, "commit", "--force", *(f"dvc.yaml:{stage}" for stage in stages))
        pointer, target = root / "dvc.lock", "dvc.yaml:prepare"
    else:
        dvc(root, "add", relative)
        pointer = root / f"{relative}.dvc"
        target = pointer.relative_to(root).as_posix()
    recorded = _recorded_md5(pointer, relative)
    if recorded != version:
        raise RuntimeError(f"{pointer} records {recorded} for {relative}, computed {version}")
    remote = default_remote(root)
    pushed, pushed_note = 0, "no remote"
    if remote:
        pushed, pushed_note = push_with_pending(root, target, remote)
    note = f"recorded in {pointer.relative_to(root)}; {pushed_note}"
    log.info("version: data version %s; %s", version, note)
    return DataVersion(version, pointer, pushed, remote, note)


def _push(root: Path, targets: list[str]) -> str:
    """`dvc push` of the targets; tried once more 2 s later (a blip is not an outage)."""
    try:
        return dvc(root, "push", *targets)
    except OSError:
        time.sleep(2)
        return dvc(root, "push", *targets)


def pending_path(root: Path) -> Path:
    """The DVC targets whose push failed, for the next run to push (inside .dvc/tmp: local)."""
    return root / ".dvc" / "tmp" / PENDING_FILE


def push_with_pending(root: Path, target: str, remote: str) -> tuple[int, str]:
    """Push `target` and every target an earlier run failed to push (still recorded); (files
    pushed, a note for the run summary). An unreachable remote does not fail the run: the data
    version is recorded locally, the targets are kept as pending and the note says so; so are
    they when the run is killed during the push."""
    path = pending_path(root)
    pending = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    # A pending one-off pointer that was since deleted has nothing left to push.
    earlier = [t for t in pending if t.startswith("dvc.yaml:") or (root / t).is_file()]
    targets = [*dict.fromkeys([*earlier, target])]
    # Written before the push: a run killed during it leaves them pending for the next run.
    write_json_atomic(path, targets)
    try:
        out = _push(root, targets)
    except OSError as exc:
        reason = str(exc).splitlines()[-1][-300:]
        log.warning("version: push to DVC remote %r failed: %s", remote, reason)
        return 0, (
            f"push to DVC remote {remote!r} FAILED ({reason}); the data is recorded locally "
            f"and the next run pushes it ({len(targets)} target(s) pending), or run `dvc push`"
        )
    path.unlink(missing_ok=True)
    match = re.search(r"(\d+) files? pushed", out)
    pushed = int(match.group(1)) if match else 0
    also = f", with {len(earlier)} target(s) an earlier run left unpushed" if earlier else ""
    return pushed, f"pushed {pushed} file(s) to DVC remote {remote!r}{also}"


def _run_dvc(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # DVC's Python API resolves targets against the working directory, not the repo; the CLI in
    # the project root has no such trap. This environment's dvc, never whatever is on PATH.
    executable = Path(sys.executable).with_name("dvc")
    return subprocess.run(
        [str(executable), *args], cwd=root, capture_output=True, text=True, check=False
    )


def dvc(root: Path, *args: str) -> str:
    """Run `dvc ARGS` in the project root; a failure raises (as I/O, so it is retried)."""
    done = _run_dvc(root, *args)
    if done.returncode != 0:
        raise OSError(f"dvc {' '.join(args)} failed in {root}: {done.stderr.strip()}")
    return done.stdout


def default_remote(root: Path) -> str | None:
    """The project's default DVC remote; None when none is set (`dvc remote default` exits 1)."""
    done = _run_dvc(root, "remote", "default")
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def _recorded_md5(pointer: Path, out_path: str) -> str | None:
    """The md5 that dvc.lock (prepare stage) or a .dvc file records for `out_path`."""
    recorded = yaml.safe_load(pointer.read_text(encoding="utf-8"))
    if pointer.name == "dvc.lock":
        outs = recorded["stages"]["prepare"]["outs"]
    else:
        outs = [
            {**o, "path": f"{Path(out_path).parent.as_posix()}/{o['path']}"}
            for o in recorded["outs"]
        ]
    return next((o["md5"] for o in outs if o["path"] == out_path), None)


@task(
    name="version",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_io,
    cache_policy=NO_CACHE,
)
def version_task(cfg: Config, prepared: PrepareResult, pipeline_run: bool) -> DataVersion:
    """Prefect task: hash the prepared data, record it in dvc.lock and push it (I/O: retried)."""
    return record_data_version(cfg.root, prepared.prepared_dir, pipeline_run)
