"""The training loop, its config, checkpoints and the DeepSpeed wiring."""
