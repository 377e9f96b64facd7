"""prepare runs only on raw data that passed validation, and writes whole splits or nothing."""

import pandas as pd
import pytest

from flywheel.config import load_config
from flywheel.tasks.prepare import EmptySplitError, prepare
from flywheel.tasks.validate import DataNotValidatedError, DataValidationError, validate
from tests.conftest import REPO, labelled_frame


@pytest.fixture
def cfg(tmp_path):
    return load_config(
        REPO / "params.yaml",
        {
            "data.raw_path": str(tmp_path / "raw.parquet"),
            "validate.report_dir": str(tmp_path / "validation"),
            "split.prepared_dir": str(tmp_path / "prepared"),
            "validate.labels": None,
            "validate.min_rows_per_class": 2,
            "validate.max_class_imbalance": 1000.0,
        },
    )


def write_raw(cfg, frame: pd.DataFrame):
    frame.assign(source="test").to_parquet(cfg.data.raw_path, index=False)
    return cfg.data.raw_path


def test_unvalidated_raw_is_refused(cfg):
    raw = write_raw(cfg, labelled_frame(200))
    with pytest.raises(DataNotValidatedError, match="has not been validated"):
        prepare(cfg, raw)
    validate(cfg, raw)
    result = prepare(cfg, raw)
    assert sum(result.rows_per_split.values()) == 400


def test_validation_of_other_data_is_refused(cfg):
    raw = write_raw(cfg, labelled_frame(200))
    validate(cfg, raw)
    write_raw(cfg, labelled_frame(201))
    with pytest.raises(DataNotValidatedError, match="is for other data"):
        prepare(cfg, raw)
    assert not cfg.split.prepared_dir.exists()


def test_failed_validation_is_refused(cfg):
    frame = labelled_frame(200)
    frame.loc[3, "text"] = "   "
    raw = write_raw(cfg, frame)
    with pytest.raises(DataValidationError):
        validate(cfg, raw)
    with pytest.raises(DataNotValidatedError, match="failed validation"):
        prepare(cfg, raw)


def test_a_label_missing_from_a_split_is_an_error_and_writes_nothing(cfg):
    frame = pd.concat([labelled_frame(200), labelled_frame(2, ("rare",))], ignore_index=True)
    raw = write_raw(cfg, frame)
    validate(cfg, raw)
    with pytest.raises(EmptySplitError, match=r"label 'rare' has no rows in the .* split"):
        prepare(cfg, raw)
    assert not cfg.split.prepared_dir.exists()
