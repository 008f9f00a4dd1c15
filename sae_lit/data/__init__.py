"""Activations: text sources, the subject model stopped at a hookpoint, the WebDataset shard
cache and the data modules that stream it."""
