"""Pure-PyTorch GAN core: config, data, models, losses, steps, loop, checkpoints, metrics (no ray, no mlflow)."""
