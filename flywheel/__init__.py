"""Flywheel: a workflow-orchestrated MLOps pipeline for text classification."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flywheel")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"
