"""Training: one loop, the stage jobs, checkpoints, engine construction, typed configs."""
