"""Orchestration: the CLI, the pipeline's stages, Ray Train / Tune adapters and MLflow tracking."""
