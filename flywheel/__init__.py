"""Flywheel: a workflow-orchestrated MLOps pipeline for text classification."""
