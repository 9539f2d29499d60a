"""Training: data, loop, metrics, losses, splits and checkpoints for attention-MIL heads."""
