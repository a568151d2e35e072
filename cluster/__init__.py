"""Where processes run: local ranks through the elastic agent, or SLURM."""
