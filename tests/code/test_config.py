from pathlib import Path

import pytest
import yaml

from flywheel.config import (
    ConfigError,
    EmbeddedSource,
    PathSource,
    changes_data,
    load_config,
    parse_override,
    with_run_outputs,
)
from tests.conftest import REPO


def write_params(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_repo_params_load_with_defaults():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.root == REPO
    assert cfg.data.sources == [EmbeddedSource(kind="embedded", name="rotten_tomatoes")]
    assert cfg.validate_.labels == ["fresh", "rotten"]
    assert cfg.split.train + cfg.split.val + cfg.split.test == pytest.approx(1)
    assert cfg.resolve(cfg.split.prepared_dir) == REPO / "data" / "prepared"


@pytest.mark.parametrize(
    ("mutate", "key", "phrase"),
    [
        (lambda r: r.update(sead=1), "sead", "unknown key"),
        (lambda r: r["split"].update(trian=0.8), "split.trian", "unknown key"),
        (lambda r: r["split"].update(train=0.7), "split", "must sum to 1"),
        (lambda r: r["split"].update(train="most"), "split.train", "valid number"),
        (
            lambda r: r["validate"].update(min_rows_per_class=0),
            "validate.min_rows_per_class",
            "greater than or equal to 1",
        ),
        (
            lambda r: r["validate"].update(min_text_chars=10, max_text_chars=5),
            "validate",
            "min_text_chars must not exceed",
        ),
        (lambda r: r["validate"].update(labels=["a", "a"]), "validate.labels", "distinct"),
        (lambda r: r["data"].update(sources=[{"kind": "ftp"}]), "data.sources.0", "kind"),
        (lambda r: r["data"].update(sources=[]), "data.sources", "at least 1"),
        (lambda r: r["clean"].update(mask_pii=["ssn"]), "clean.mask_pii.0", "url"),
        (
            lambda r: r["validate"].update(min_rows_per_class=True),
            "validate.min_rows_per_class",
            "valid integer",
        ),
        (lambda r: r.update(seed="7"), "seed", "valid integer"),
        (lambda r: r["serve"].update(http="fast"), "serve.http", "'auto', 'httptools' or 'h11'"),
        (
            lambda r: r["data"]["feedback"].update(enabled="sometimes"),
            "data.feedback.enabled",
            "valid boolean",
        ),
    ],
)
def test_bad_config_names_the_key(tmp_path, mutate, key, phrase):
    path = write_params(tmp_path, mutate)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert f"  {key}" in message
    assert phrase in message


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("split: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_override_sets_one_value_and_is_validated():
    cfg = load_config(REPO / "params.yaml", {"seed": 7, "split.prepared_dir": "elsewhere"})
    assert cfg.seed == 7
    assert cfg.split.prepared_dir == Path("elsewhere")
    assert cfg.split.train == 0.8
    with pytest.raises(ConfigError, match="must sum to 1"):
        load_config(REPO / "params.yaml", {"split.train": 0.5})


def test_override_of_unknown_key_lists_known_keys():
    with pytest.raises(ConfigError, match=r"'splt' is not a key of the top level.*split"):
        load_config(REPO / "params.yaml", {"splt.train": 0.5})
    with pytest.raises(ConfigError, match=r"'trian' is not a key of split"):
        load_config(REPO / "params.yaml", {"split.trian": 0.5})


def test_parse_override_reads_yaml_values():
    assert parse_override("split.train=0.7") == ("split.train", 0.7)
    assert parse_override("validate.labels=[a, b]") == ("validate.labels", ["a", "b"])
    assert parse_override("validate.labels=null") == ("validate.labels", None)
    # YAML 1.1 would read these as strings; people (and DVC's YAML 1.2) mean numbers.
    assert parse_override("train.lr=2e-5") == ("train.lr", 2e-5)
    assert parse_override("train.lr=1E+3") == ("train.lr", 1e3)
    assert parse_override("train.lr=5.0e-5") == ("train.lr", 5e-5)
    assert parse_override("evaluate.positive_label=e5") == ("evaluate.positive_label", "e5")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("seed")


def test_path_source_defaults():
    source = PathSource(kind="path", path=Path("x.csv"))
    assert (source.text_col, source.label_col) == ("text", "label")


def test_gpu_profile_changes_training_only():
    base = load_config(REPO / "params.yaml")
    gpu = load_config(REPO / "params.yaml", profile="gpu")
    assert (gpu.train.epochs, gpu.train.batch_size, gpu.train.max_length) == (3, 64, 128)
    assert gpu.train.lr == 2e-5
    assert gpu.train.threads is None
    assert gpu.model_dump(exclude={"train"}) == base.model_dump(exclude={"train"})
    # --set still wins over the profile
    assert load_config(REPO / "params.yaml", {"train.epochs": 5}, profile="gpu").train.epochs == 5


def test_bad_profiles_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown profile 'tpu' \(profiles: gpu\)"):
        load_config(REPO / "params.yaml", profile="tpu")
    path = write_params(tmp_path, lambda r: r["profiles"].update(typo={"train": {"epohcs": 2}}))
    with pytest.raises(ConfigError, match=r"profile 'typo': unknown config key 'train.epohcs'"):
        load_config(path, profile="typo")
    path = write_params(tmp_path, lambda r: r["profiles"].update(big={"split": {"train": 0.9}}))
    with pytest.raises(ConfigError, match=r"profile 'big' sets split: profiles may only set"):
        load_config(path, profile="big")


def test_only_data_changing_overrides_move_the_outputs():
    assert with_run_outputs({}) == {}
    model_only = {"train.lr": 2e-5, "evaluate.batch_size": 8}
    assert with_run_outputs(model_only) == model_only
    assert not changes_data(model_only)
    mixed = with_run_outputs({"split.train": 0.7, "split.val": 0.2, "train.lr": 2e-5})
    assert changes_data(mixed)
    assert mixed["train.lr"] == 2e-5
    # The folder is keyed on the data overrides only: a new lr reuses the prepared data.
    same_data = with_run_outputs({"split.train": 0.7, "split.val": 0.2, "train.lr": 1e-3})
    assert mixed["split.prepared_dir"] == same_data["split.prepared_dir"]
    assert mixed["split.prepared_dir"].startswith("data/runs/")


def test_evaluate_polarity_labels_come_in_pairs():
    with pytest.raises(ConfigError, match="set both positive_label and negative_label"):
        load_config(REPO / "params.yaml", {"evaluate.negative_label": None})
    with pytest.raises(ConfigError, match="must differ"):
        load_config(REPO / "params.yaml", {"evaluate.negative_label": "fresh"})


def test_the_server_may_not_take_longer_texts_than_validation_allows():
    same = {"validate.max_text_chars": 1000, "serve.max_text_chars": 1000}
    assert load_config(REPO / "params.yaml", same).serve.max_text_chars == 1000
    shorter = {"validate.max_text_chars": 1000, "serve.max_text_chars": 200}
    assert load_config(REPO / "params.yaml", shorter).serve.max_text_chars == 200
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "params.yaml", {"validate.max_text_chars": 1000})
    message = str(info.value)
    assert "serve.max_text_chars (5,000) is over validate.max_text_chars (1,000)" in message
    assert "lower serve.max_text_chars or raise validate.max_text_chars" in message


def test_a_retired_gate_key_says_what_replaced_it(tmp_path):
    params = tmp_path / "params.yaml"
    text = (REPO / "params.yaml").read_text()
    old = "  model_name: flywheel-classifier\n"
    assert old in text
    params.write_text(text.replace(old, old + "  max_macro_f1_drop: 0.005\n"))
    with pytest.raises(ConfigError, match=r"registry.max_macro_f1_drop: no longer a setting"):
        load_config(params)
