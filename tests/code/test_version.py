import subprocess
import sys
from pathlib import Path

import yaml

from flywheel.tasks.version import dir_md5, record_data_version

DVC = str(Path(sys.prefix) / "bin" / "dvc")


def test_dir_md5_equals_what_dvc_records(tmp_path):
    data = tmp_path / "prepared"
    (data / "sub").mkdir(parents=True)
    (data / "b.parquet").write_bytes(b"bee")
    (data / "sub" / "a.json").write_text('{"a": 1}\n')
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([DVC, "add", "-q", "prepared"], cwd=tmp_path, check=True)
    recorded = yaml.safe_load((tmp_path / "prepared.dvc").read_text())["outs"][0]["md5"]
    assert dir_md5(data) == recorded
    (data / "b.parquet").write_bytes(b"bee!")
    assert dir_md5(data) != recorded


def test_outside_a_dvc_project_the_hash_is_still_the_version(tmp_path):
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "train.parquet").write_bytes(b"rows")
    version = record_data_version(tmp_path, tmp_path / "prepared", pipeline_run=True)
    assert version.data_version == dir_md5(tmp_path / "prepared")
    assert version.pointer is None
    assert "not a DVC project" in version.note
