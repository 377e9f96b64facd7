"""prepare runs only on raw data that passed validation, and writes whole splits or nothing."""

import pandas as pd
import pytest

from flywheel.config import load_config
from flywheel.tasks.prepare import CleanedAwayError, EmptySplitError, prepare
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


def test_a_label_whose_texts_are_all_markup_is_an_error_and_writes_nothing(cfg):
    markup = labelled_frame(40, ("html",)).assign(text=[f"<p>{'<br>' * i}</p>" for i in range(40)])
    raw = write_raw(cfg, pd.concat([labelled_frame(200), markup], ignore_index=True))
    validate(cfg, raw)  # 'html' rows are not blank before cleaning: the gate lets them by
    with pytest.raises(CleanedAwayError) as info:
        prepare(cfg, raw)
    message = str(info.value)
    assert "cleaning left no rows of label 'html' (40 rows) (test)" in message
    assert "40 emptied by cleaning" in message
    assert "row sample.csv:1: '<p></p>'" in message
    assert not cfg.split.prepared_dir.exists()
    # A few markup-only rows beside real texts of their label are dropped and counted.
    some = pd.concat([labelled_frame(200), markup.head(3).assign(label="pos")], ignore_index=True)
    raw = write_raw(cfg, some)
    validate(cfg, raw)
    assert prepare(cfg, raw).report.emptied_by_cleaning == 3
