"""Training: the loop, optimizers and schedules, the loss, checkpoints and metrics."""
