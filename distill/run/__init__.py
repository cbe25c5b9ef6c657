"""Running a job: the training loop, checkpoints, DeepSpeed config, logs, fit-weights, on-policy samples."""
