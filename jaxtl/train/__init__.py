"""Training: pure jitted steps, the loop, checkpoints, the feature cache."""
