"""The registered model's code (MLflow models-from-code): copied into every registered version and
run by `mlflow.pyfunc.load_model`, so nothing is pickled.

    model = mlflow.pyfunc.load_model("models:/flywheel-classifier@champion")
    model.predict(["A wonderful, moving film."])
    # [{"label": "fresh", "probabilities": {"fresh": 0.97, "rotten": 0.03}}]

The version's `onnx` artifact is an export folder (model.onnx, tokenizer, flywheel.json); the
shared `OnnxPredictor` reads it. flywheel's predictor modules travel with the version (code
paths), so loading needs onnxruntime and transformers, not this project.

Only MLflow's loader imports this file: `set_model` below is what models-from-code requires.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class FlywheelClassifier(PythonModel):
    """Raw texts in; per text, the label and every label's probability out."""

    def load_context(self, context: Any) -> None:
        from flywheel.models.predictor import OnnxPredictor

        self.predictor = OnnxPredictor(Path(context.artifacts["onnx"]))

    def predict(
        self, model_input: list[str], params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        return [
            {"label": p.label, "probabilities": p.probabilities}
            for p in self.predictor.predict(model_input)
        ]


mlflow.models.set_model(FlywheelClassifier())
