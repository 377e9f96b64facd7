"""The registered model's code (`FlywheelClassifier`, MLflow models-from-code: nothing pickled)
and how a version is packaged (`save_pyfunc`: an export folder staged as a pyfunc model).

This file is copied into every version and runs the shared `OnnxPredictor` on the version's
`onnx` artifact; the predictor's modules travel as code paths, so loading needs onnxruntime and
transformers, not Flywheel. Usage: docs/registry.md; why:
docs/decisions/0006-model-registry-and-promotion.md.
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
