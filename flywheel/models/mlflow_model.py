"""The registered model's code and how a version is packaged (MLflow models-from-code, see
docs/decisions/0006): `save_pyfunc` stages an export folder as a pyfunc model whose code is this
file, copied into every version and run by `mlflow.pyfunc.load_model`, so nothing is pickled.

    model = mlflow.pyfunc.load_model("models:/flywheel-classifier@champion")
    model.predict(["A wonderful, moving film."])
    # [{"label": "fresh", "probabilities": {"fresh": 0.97, "rotten": 0.03}}]

The version's `onnx` artifact is an export folder (model.onnx, tokenizer, flywheel.json); the
shared `OnnxPredictor` reads it. flywheel's predictor modules travel with the version (code
paths), so loading needs onnxruntime and transformers, not this project.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

# The registered artifact: what the predictor reads, without the fp32 reference copy.
EXPORT_FILES_SKIPPED = ("fp32.onnx", ".flywheel-output")
# The predictor's modules, shipped with every version so that loading needs no flywheel install.
PREDICTOR_MODULES = (
    "__init__.py",
    "errors.py",
    "pii.py",
    "text.py",
    "models/__init__.py",
    "models/bundle.py",
    "models/predictor.py",
)
RUNTIME_REQUIREMENTS = ("mlflow", "onnxruntime", "transformers", "tokenizers", "numpy")


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


def save_pyfunc(export_dir: Path, staging: Path) -> Path:
    """The export folder as a local MLflow pyfunc model (models-from-code) in `staging/model`."""
    onnx_dir, code_dir = staging / "onnx", staging / "code" / "flywheel"
    onnx_dir.mkdir()
    for item in export_dir.iterdir():
        if item.is_file() and item.name not in EXPORT_FILES_SKIPPED:
            shutil.copy2(item, onnx_dir / item.name)
    package = Path(__file__).parents[1]
    for module in PREDICTOR_MODULES:
        (code_dir / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(package / module, code_dir / module)
    out = staging / "model"
    with warnings.catch_warnings():
        # The output maps labels to probabilities; MLflow notes that it cannot check `Any`.
        warnings.filterwarnings("ignore", message=".*Any type hint is inferred as AnyType")
        mlflow.pyfunc.save_model(
            str(out),
            python_model=str(package / "models" / "mlflow_model.py"),
            artifacts={"onnx": str(onnx_dir)},
            code_paths=[str(code_dir)],
            input_example=["A wonderful, moving film."],
            pip_requirements=[
                f"{name}=={importlib.metadata.version(name)}" for name in RUNTIME_REQUIREMENTS
            ],
        )
    return out


# MLflow's loader runs this file as a module of its own name (code_model_...), and models-from-code
# needs the model set then; imported as flywheel's module (to package a version) it sets nothing.
if __name__ != "flywheel.models.mlflow_model":
    mlflow.models.set_model(FlywheelClassifier())
