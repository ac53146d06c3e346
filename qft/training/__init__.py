"""Training: the loop and its objectives, evaluation, data, several processes."""
