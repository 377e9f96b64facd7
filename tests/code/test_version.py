import hashlib
import json

from flywheel.tasks.version import dir_md5, record_data_version


def test_dir_md5_follows_dvc_format(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("ay")
    listing = [
        {"md5": hashlib.md5(b"bee").hexdigest(), "relpath": "b.txt"},
        {"md5": hashlib.md5(b"ay").hexdigest(), "relpath": "sub/a.txt"},
    ]
    expected = hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"
    assert dir_md5(tmp_path) == expected
    (tmp_path / "b.txt").write_text("bee!")
    assert dir_md5(tmp_path) != expected


def test_outside_a_dvc_project_the_hash_is_still_the_version(tmp_path):
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "train.parquet").write_bytes(b"rows")
    version = record_data_version(tmp_path, tmp_path / "prepared", commit=True)
    assert version.data_version == dir_md5(tmp_path / "prepared")
    assert not version.committed
    assert "not a DVC project" in version.note
