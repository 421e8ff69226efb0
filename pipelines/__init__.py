"""Orchestration: the CLI, the pipeline's stages, Ray Train / Tune adapters and MLflow tracking."""

import time

LOADED_AT = time.time()
"""When this process imported the package: the first trial a Tune trial process runs counts its start-up from here
(its trainable is unpickled, importing torch and Ray Train, before the trial function starts)."""
