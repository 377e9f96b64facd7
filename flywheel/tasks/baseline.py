"""Baseline: TF-IDF (word 1-2-grams, sublinear tf) + logistic regression on the same split.

Every report sets the transformer against it, so the cost of fine-tuning is always weighed
against what a linear model gets for free. Same interface as the transformer bundle:
`labels` and `predict_proba(texts)`, over the same preprocessing (flywheel.text + flywheel.pii).
Its figures on the default data: docs/training.md.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import tracking
from flywheel.config import Config
from flywheel.io import read_parquet, write_atomic
from flywheel.metrics import label_ids, macro_f1
from flywheel.models.bundle import Preprocessing
from flywheel.stages import StageSpec
from flywheel.tasks.evaluate import EvaluationReport, check_polarity_labels, evaluate_model
from flywheel.tasks.prepare import PrepareResult

STAGE = StageSpec(
    name="baseline",
    module=__name__,
    reads=("seed", "clean.mask_pii", "train.max_length", "train.checkpoint_dir", "evaluate"),
    artifacts=("fit.model_path",),
)


class BaselineModel:
    """A fitted TF-IDF + logistic regression pipeline with its label order and preprocessing."""

    def __init__(self, pipeline, preprocessing: Preprocessing):
        self.pipeline = pipeline
        self.preprocessing = preprocessing

    @property
    def labels(self) -> list[str]:
        return [str(c) for c in self.pipeline.classes_]

    def predict_proba(self, texts: Sequence[str], batch_size: int = 0) -> np.ndarray:
        """Class probabilities, columns in `labels` order (`batch_size` is ignored)."""
        return self.pipeline.predict_proba([self.preprocessing.normalise(t) for t in texts])

    def save(self, path: Path) -> None:
        """Write beside `path`, then rename: a killed run leaves no half-written file."""
        import joblib

        payload = {"pipeline": self.pipeline, "preprocessing": self.preprocessing}
        write_atomic(path, lambda tmp: joblib.dump(payload, tmp))

    @classmethod
    def load(cls, path: Path) -> BaselineModel:
        import joblib

        saved = joblib.load(path)
        return cls(saved["pipeline"], saved["preprocessing"])


@dataclass(frozen=True)
class BaselineResult:
    model_path: Path
    seconds: float
    vocabulary_size: int
    chosen: dict[str, float]  # C, min_df and the validation macro-F1 that chose them


# Small grid, chosen on the validation split: a weak baseline would flatter the transformer.
GRID = [{"C": c, "min_df": m} for c in (1.0, 4.0, 16.0, 32.0) for m in (1, 2)]


def fit_baseline(
    train_frame: pd.DataFrame, val_frame: pd.DataFrame, preprocessing: Preprocessing, seed: int
) -> tuple[BaselineModel, dict[str, float]]:
    """Fit each grid point on train, keep the best by validation macro-F1 (never the test)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    truth = val_frame["label"].tolist()
    # macro-F1 over the labels of both splits, as the transformer is selected (train.fit)
    labels = sorted(set(train_frame["label"]) | set(truth))
    best, best_score, best_params = None, -1.0, {}
    for params in GRID:
        pipeline = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=params["min_df"]),
            LogisticRegression(max_iter=3000, C=params["C"], random_state=seed),
        )
        pipeline.fit(train_frame["text"].tolist(), train_frame["label"].tolist())
        predicted = pipeline.predict(val_frame["text"].tolist())
        score = macro_f1(label_ids(truth, labels), label_ids(predicted, labels), len(labels))
        if score > best_score:
            best, best_score, best_params = pipeline, score, params
    return BaselineModel(best, preprocessing), {**best_params, "val_macro_f1": float(best_score)}


def train_baseline(
    train_frame: pd.DataFrame,
    val_frame: pd.DataFrame,
    preprocessing: Preprocessing,
    seed: int,
    path: Path,
) -> tuple[BaselineModel, BaselineResult]:
    """Fit, select and save the baseline; report the chosen settings and fitting time."""
    started = time.perf_counter()
    model, chosen = fit_baseline(train_frame, val_frame, preprocessing, seed)
    model.save(path)
    vocabulary = len(model.pipeline.steps[0][1].vocabulary_)
    return model, BaselineResult(path, time.perf_counter() - started, vocabulary, chosen)


@dataclass(frozen=True)
class BaselineReport:
    """The baseline as the pipeline ran it: fit, test report, MLflow run."""

    fit: BaselineResult
    evaluation: EvaluationReport
    report_dir: Path
    run_id: str


@task(name="baseline", cache_policy=NO_CACHE)
def baseline_task(cfg: Config, prepared: PrepareResult, parent: tracking.RunRef) -> BaselineReport:
    """Fit the baseline on train (selected on val), evaluate it on test, track it in MLflow."""
    splits = {name: read_parquet(path) for name, path in prepared.split_paths.items()}
    check_polarity_labels(cfg, sorted(set(splits["train"]["label"])))
    data_key = parent.lineage.data_version.removesuffix(".dir")[:12]
    path = cfg.resolve(cfg.train.checkpoint_dir) / "baseline" / data_key / "model.joblib"
    with tracking.stage_run(cfg, "baseline", parent) as run:
        tracking.log_dataset(run, splits["train"], prepared.split_paths["train"], "train")
        model, fitted = train_baseline(
            splits["train"], splits["val"], Preprocessing.of(cfg), cfg.seed, path
        )
        report, folder = evaluate_model(cfg, model, splits["test"], "baseline")
        tracking.log_params_and_tags(
            run, {f"baseline.{k}": str(v) for k, v in fitted.chosen.items()}
        )
        tracking.log_scalars(
            run,
            {
                **report.scalars(),
                "val_macro_f1": fitted.chosen["val_macro_f1"],
                "fit_seconds": fitted.seconds,
                "vocabulary_size": fitted.vocabulary_size,
            },
        )
        tracking.log_artifacts(run, folder)
        tracking.log_artifacts(run, path, "model")
    return BaselineReport(fitted, report, folder, run.run_id)
