"""What runs on each rank: model, data, methods, the loop, checkpoints, metrics."""
