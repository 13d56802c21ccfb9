"""The training data: reading and checking a dataset, cleaning, mixing, measuring, and distilling new entries."""
