"""The CLI's logging (flywheel/runtime.py): the console and the log file, Python warnings logged,
and library notes that mean nothing to a user kept off the console but in the file."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

from flywheel import runtime

# In a fresh interpreter, as a command starts: configure, then what libraries and users emit.
EMIT = textwrap.dedent(
    r"""
    import logging, sys, warnings
    from pathlib import Path
    from flywheel import runtime

    runtime.configure(Path(sys.argv[1]))
    warnings.simplefilter("always")
    site = "/venv/lib/python3.11/site-packages"
    warnings.warn_explicit(
        "`torch.nn.utils.weight_norm` is deprecated", FutureWarning,
        f"{site}/torch/nn/utils/weight_norm.py", 143, module="torch.nn.utils.weight_norm",
    )
    warnings.warn_explicit(  # seen in `flywheel run`'s export: torch, via the standard library
        "`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning,
        "/usr/lib/python3.11/copyreg.py", 105, module="copyreg",
    )
    warnings.warn_explicit(
        "\x1b[33mAdd type hints to the `predict` method to enable data validation\x1b[0m",
        UserWarning, f"{site}/mlflow/pyfunc/__init__.py", 3249, module="mlflow.pyfunc",
    )
    logging.getLogger("torch.onnx._internal.exporter._registration").warning(
        "torchvision is not installed. Skipping %s", "torchvision::nms"
    )
    warnings.warn_explicit(
        "the source has 3 empty rows", UserWarning, "/work/project/flywheel/sources.py", 80,
        module="flywheel.sources",
    )
    warnings.warn_explicit(
        "`old_option` is deprecated", FutureWarning, "/work/project/flywheel/config.py", 12,
        module="flywheel.config",
    )
    logging.getLogger("flywheel.tasks.train").info("train: 10 texts, 2 labels")
    """
)


def test_library_noise_stays_off_the_console_and_goes_to_the_log_file(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", EMIT, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    console = done.stderr
    logged = (tmp_path / runtime.LOG_FILE).read_text(encoding="utf-8")
    for noise in (
        "torch.nn.utils.weight_norm",
        "LeafSpec",
        "Add type hints",
        "torchvision is not installed",
    ):
        assert noise not in console, console
        assert noise in logged, logged
    for meant in (
        "WARNING py.warnings: /work/project/flywheel/sources.py:80: UserWarning: the source has "
        "3 empty rows",
        "WARNING py.warnings: /work/project/flywheel/config.py:12: FutureWarning: `old_option`",
        "INFO flywheel.tasks.train: train: 10 texts, 2 labels",
    ):
        assert meant in console, console
        assert meant in logged, logged
    assert "\x1b[" not in logged  # MLflow's colour codes are dropped
    assert "\n\n" not in logged  # and the blank line after each warning


def test_a_host_that_set_up_logging_keeps_it(tmp_path):
    """Under pytest (or an application embedding flywheel) the root logger has handlers: they
    stay as they are, and no log file is opened."""
    root = logging.getLogger()
    before = list(root.handlers)
    assert before  # pytest's
    runtime.configure_logging(tmp_path / "flywheel.log")
    assert root.handlers == before
    assert not (tmp_path / "flywheel.log").exists()


def test_a_library_that_logs_on_its_own_is_handed_to_the_root_logger_when_imported(
    tmp_path, monkeypatch
):
    """torch, transformers and MLflow give their loggers a stderr handler of their own on
    import (so their notes would miss the log file and the console filter)."""
    package = tmp_path / "selfish_lib"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import logging\n"
        "log = logging.getLogger('selfish_lib')\n"
        "log.addHandler(logging.StreamHandler())\n"
        "log.propagate = False\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    finder = runtime.RouteOnImport(("selfish_lib",))
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    try:
        import selfish_lib

        assert selfish_lib.log.handlers == []
        assert selfish_lib.log.propagate
    finally:
        sys.modules.pop("selfish_lib", None)
        logging.Logger.manager.loggerDict.pop("selfish_lib", None)


def test_the_console_filter_lets_errors_and_user_warnings_through():
    def record(name: str, level: int, message: str) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, message, (), None)

    noise = runtime.ConsoleNoise()
    torch_warning = "/x/site-packages/torch/serialization.py:1: FutureWarning: weights_only"
    assert not noise.filter(record("py.warnings", logging.WARNING, torch_warning))
    assert not noise.filter(record("mlflow.models", logging.INFO, "Unsupported type hint: X"))
    assert noise.filter(record("py.warnings", logging.ERROR, torch_warning))
    assert noise.filter(record("flywheel.tasks.train", logging.WARNING, "the best model is gone"))
