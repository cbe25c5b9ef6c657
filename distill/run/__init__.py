"""Running a job: the training loop, DeepSpeed config, logs, fit-weights, eval, the memory plan, sweeps."""
