"""Cache keys, the ledger and the plan, without Prefect: what makes a stage run or be reused."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from flywheel import cache
from flywheel.config import load_config
from flywheel.flows.stages import (
    BY_NAME,
    MODEL_STAGES,
    Stage,
    UnknownStageError,
    forced_from,
    parse_stage,
)
from flywheel.stages import StageSpec
from tests.conftest import REPO

DATA = "5fdaaa57026da05c2e1c81f5e509d7e8.dir"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def config(root: Path, **overrides):
    return load_config(root / "params.yaml", overrides)


def result_of(stage: StageSpec, root: Path):
    """A stand-in for a stage's result: one real file behind each artifact attribute it
    declares, and the registry facts register and promote rely on."""
    folder = root / "out" / stage.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.bin").write_bytes(stage.name.encode() * 10)
    facts = {
        "register": {"model": "flywheel-classifier", "version": "1", "run_id": "r1"},
        "promote": {"champion": "1"},  # the decision: version 1 became champion
    }
    result = SimpleNamespace(cache_facts=lambda: facts.get(stage.name, {}))
    for name in stage.artifacts:  # "fit.model_path": result.fit.model_path
        *parents, leaf = name.split(".")
        holder = result
        for part in parents:
            if not hasattr(holder, part):
                setattr(holder, part, SimpleNamespace())
            holder = getattr(holder, part)
        setattr(holder, leaf, folder / "model.bin" if parents else folder)
    return result


def run_all(cfg, data: str, stages=MODEL_STAGES, **kw) -> cache.Plan:
    """Plan, then do what a run does after each stage that runs: persist a record, fill the
    ledger. Returns the plan."""
    plan = cache.make_plan(cfg, data, stages, **kw)
    ledger = plan.ledger
    for step in plan.steps.values():
        if step.runs:
            result = result_of(step.stage, cfg.root)
            files = cache.fingerprint(step.stage.files(result), cfg.root)
            ledger.record(step.key, files, step.stage.found(result), "flow")
            plan.results_dir.mkdir(parents=True, exist_ok=True)
            (plan.results_dir / step.key.record).write_text("persisted")
    return plan


def actions(plan: cache.Plan) -> dict[str, str]:
    return {str(s): step.action for s, step in plan.steps.items()}


def test_config_values_are_the_keys_a_stage_reads_minus_speed_only_ones(root):
    cfg = config(root)
    train = cache.config_values(cfg, BY_NAME["train"])
    assert train["train.lr"] == 1e-4 and train["seed"] == 42
    assert "train.threads" not in train  # speed, not output
    assert "evaluate.batch_size" not in train and "export.opset" not in train
    export = set(cache.config_values(cfg, BY_NAME["export"]))  # and the reference profile's bins
    assert export == {k for k in export if k.startswith(("export.", "monitor.reference."))}
    assert {"monitor.reference.bins", "export.opset"} <= export
    assert "monitor.window" not in export  # read when monitoring, not when exporting


def test_register_hashes_the_model_code_it_ships_and_package_inits():
    register = cache.code_hashes(*BY_NAME["register"].code)
    assert "flywheel/models/mlflow_model.py" in register  # loaded by path, not imported
    assert {"flywheel/__init__.py", "flywheel/models/__init__.py"} <= set(register)


def test_evaluation_batch_size_is_speed_only(root):
    base = cache.stage_key(config(root), BY_NAME["baseline"], DATA, {})
    batch = cache.stage_key(
        config(root, **{"evaluate.batch_size": 8}), BY_NAME["baseline"], DATA, {}
    )
    assert base.digest == batch.digest


def test_code_hash_follows_imports_but_not_type_checking_ones():
    train = cache.code_hashes(*BY_NAME["train"].code)
    assert "flywheel/tasks/train.py" in train
    assert "flywheel/models/bundle.py" in train  # imported by train
    assert "flywheel/config.py" in train  # imported transitively
    assert not any(p.startswith(("flywheel/cli/", "flywheel/flows/")) for p in train)
    evaluate = cache.code_hashes("flywheel/tasks/evaluate.py")  # TrainResult: TYPE_CHECKING only
    assert "flywheel/tasks/train.py" not in evaluate
    assert all(len(h) == 12 for h in train.values())


def test_key_digest_changes_with_each_component(root):
    cfg = config(root)
    base = cache.stage_key(cfg, BY_NAME["train"], DATA, {})
    assert base.digest == cache.stage_key(config(root), BY_NAME["train"], DATA, {}).digest
    assert base.digest != cache.stage_key(cfg, BY_NAME["train"], "other.dir", {}).digest
    lr = config(root, **{"train.lr": 2e-4})
    assert base.digest != cache.stage_key(lr, BY_NAME["train"], DATA, {}).digest
    threads = config(root, **{"train.threads": 1})
    assert base.digest == cache.stage_key(threads, BY_NAME["train"], DATA, {}).digest
    assert base.record == f"flywheel-train-{base.digest}"


def test_explain_names_what_changed():
    before = {
        "data": "a.dir",
        "config": {"train.lr": 1e-4, "train.epochs": 1},
        "code": {"flywheel/tasks/train.py": "1", "flywheel/io.py": "2"},
        "deps": {"torch": "2.13.0"},
        "upstream": {"train": "k1"},
        "state": {"champion": "3"},
    }
    now = {
        "data": "b.dir",
        "config": {"train.lr": 2e-4, "train.epochs": 1},
        "code": {"flywheel/tasks/train.py": "9", "flywheel/io.py": "2"},
        "deps": {"torch": "2.14.0"},
        "upstream": {"train": "k2"},
        "state": {"champion": "4"},
    }
    assert cache.explain(before, now) == [
        "data a.dir -> b.dir",
        "config train.lr 0.0001 -> 0.0002",
        "dependency torch 2.13.0 -> 2.14.0",
        "champion 3 -> 4",
        "code changed: flywheel/tasks/train.py",
        "train result is another one (key k1 -> k2)",
    ]
    assert cache.explain(now, now) == []


def test_fingerprint_notices_deleted_and_changed_files(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"a")
    (folder / "b.bin").write_bytes(b"b")
    recorded = cache.fingerprint([folder], tmp_path)
    assert set(recorded) == {"model/a.bin", "model/b.bin"}
    assert cache.stale_artifact(recorded, tmp_path) is None
    (folder / "b.bin").write_bytes(b"B")
    assert cache.stale_artifact(recorded, tmp_path) == "model/b.bin changed since it was cached"
    (folder / "a.bin").unlink()
    assert cache.stale_artifact(recorded, tmp_path) == "model/a.bin was deleted"
    assert cache.fingerprint([tmp_path / "nope"], tmp_path) == {"nope": "missing"}


def test_first_run_runs_everything_then_everything_is_reused(root):
    cfg = config(root)
    first = run_all(cfg, DATA)
    assert set(actions(first).values()) == {"run"}
    assert first.steps[Stage.BASELINE].reason == "no cached result yet"
    assert first.steps[Stage.EVALUATE].reason == "baseline, train runs"
    again = cache.make_plan(cfg, DATA, MODEL_STAGES)
    assert set(actions(again).values()) == {"reuse"}
    assert [s.key.digest for s in again.steps.values()] == [
        s.key.digest for s in first.steps.values()
    ]


def test_a_training_parameter_reruns_training_and_what_follows_only(root):
    run_all(config(root), DATA)
    plan = cache.make_plan(config(root, **{"train.lr": 2e-4}), DATA, MODEL_STAGES)
    assert actions(plan) == {
        "baseline": "reuse",
        "train": "run",
        "evaluate": "run",
        "export": "run",
        "register": "run",
        "promote": "run",
    }
    assert plan.steps[Stage.TRAIN].reason == "config train.lr 0.0001 -> 0.0002"
    assert plan.steps[Stage.EXPORT].reason == "train runs"


def test_an_export_parameter_keeps_training_and_evaluation(root):
    run_all(config(root), DATA)
    plan = cache.make_plan(config(root, **{"export.latency_texts": 50}), DATA, MODEL_STAGES)
    assert [s for s, a in actions(plan).items() if a == "run"] == ["export", "register", "promote"]


def test_new_data_reruns_everything(root):
    run_all(config(root), DATA)
    plan = cache.make_plan(config(root), "new.dir", MODEL_STAGES)
    assert set(actions(plan).values()) == {"run"}
    assert plan.steps[Stage.BASELINE].reason == f"data {DATA} -> new.dir"


def test_deleted_artifact_or_record_invalidates_instead_of_crashing(root):
    cfg = config(root)
    first = run_all(cfg, DATA)
    (root / "out" / "export" / "model.bin").unlink()
    plan = cache.make_plan(cfg, DATA, MODEL_STAGES)
    assert plan.steps[Stage.EXPORT].reason == "out/export/model.bin was deleted"
    assert [s for s, a in actions(plan).items() if a == "run"] == ["export", "register", "promote"]
    run_all(cfg, DATA)  # export runs again: everything cached again
    (first.results_dir / first.steps[Stage.TRAIN].key.record).unlink()
    plan = cache.make_plan(cfg, DATA, MODEL_STAGES)
    assert plan.steps[Stage.TRAIN].reason.startswith("cached result flywheel-train-")
    assert plan.steps[Stage.BASELINE].runs is False and plan.steps[Stage.EVALUATE].runs


def test_a_registration_that_is_gone_is_registered_again(root):
    cfg = config(root)
    run_all(cfg, DATA)
    seen = []

    def gone(stage, facts):
        seen.append((stage, dict(facts)))
        if stage == "register":
            return "flywheel-classifier version 1 is no longer registered"
        return None

    plan = cache.make_plan(cfg, DATA, MODEL_STAGES, check_facts=gone)
    assert seen == [
        (Stage.REGISTER, {"model": "flywheel-classifier", "version": "1", "run_id": "r1"})
    ]
    assert [s for s, a in actions(plan).items() if a == "run"] == ["register", "promote"]
    assert plan.steps[Stage.REGISTER].reason.endswith("is no longer registered")


def test_a_decision_undone_since_is_made_again(root):
    """A rollback after the run moved champion away from what the cached decision left."""
    cfg = config(root)
    run_all(cfg, DATA)

    def rolled_back(stage, facts):
        assert stage != "promote" or facts == {"champion": "1"}
        return "champion is none, not 1 as this decision left it" if stage == "promote" else None

    plan = cache.make_plan(cfg, DATA, MODEL_STAGES, check_facts=rolled_back)
    assert [s for s, a in actions(plan).items() if a == "run"] == ["promote"]
    assert plan.steps[Stage.PROMOTE].reason == "champion is none, not 1 as this decision left it"


def test_promote_is_keyed_on_the_champion(root):
    cfg = config(root)
    run_all(cfg, DATA, state={Stage.PROMOTE: {"champion": "none"}})
    plan = cache.make_plan(cfg, DATA, MODEL_STAGES, state={Stage.PROMOTE: {"champion": "1"}})
    assert [s for s, a in actions(plan).items() if a == "run"] == ["promote"]
    assert plan.steps[Stage.PROMOTE].reason == "champion none -> 1"


def test_force_from_runs_that_stage_and_every_later_one(root):
    cfg = config(root)
    run_all(cfg, DATA)
    plan = cache.make_plan(
        cfg, DATA, MODEL_STAGES, forced=forced_from("export"), force_from="export"
    )
    assert [s for s, a in actions(plan).items() if a == "run"] == ["export", "register", "promote"]
    assert plan.forced(Stage.EXPORT) and not plan.forced(Stage.TRAIN)
    assert plan.steps[Stage.EXPORT].reason == "forced (--force-from export)"
    everything = cache.make_plan(cfg, DATA, MODEL_STAGES, forced=forced_from("validate"))
    assert set(actions(everything).values()) == {"run"}
    assert forced_from(None) == frozenset()
    with pytest.raises(UnknownStageError, match="one of validate, prepare, baseline"):
        parse_stage("training")


def test_switching_back_to_an_earlier_config_reuses_its_result(root):
    run_all(config(root), DATA)
    run_all(config(root, **{"train.lr": 2e-4}), DATA)
    back = cache.make_plan(config(root), DATA, MODEL_STAGES)
    assert set(actions(back).values()) == {"reuse"}


def test_ledger_writers_do_not_lose_each_others_entries(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    ledger = cache.Ledger(tmp_path)
    keys = [cache.StageKey(Stage.TRAIN, {"data": str(n)}) for n in range(24)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: ledger.record(key, {}, {}, None), keys))
    assert set(ledger.entries(Stage.TRAIN)) == {key.digest for key in keys}
    assert not list(tmp_path.glob("*.tmp"))


def test_ledger_keeps_the_newest_entries_and_returns_the_dropped_records(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "KEEP_ENTRIES", 2)
    ledger = cache.Ledger(tmp_path)
    dropped = []
    for n in range(3):
        key = cache.StageKey(Stage.TRAIN, {"data": str(n)})
        dropped += ledger.record(key, {}, {}, None)
    assert len(ledger.entries(Stage.TRAIN)) == 2
    assert dropped == [cache.StageKey(Stage.TRAIN, {"data": "0"}).record]
    assert ledger.latest(Stage.TRAIN)["components"] == {"data": "2"}
    (tmp_path / "train.json").write_text("{not json")
    assert ledger.entries(Stage.TRAIN) == {}  # unreadable: treated as empty, not a crash
