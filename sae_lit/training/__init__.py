"""Training with Lightning: SAEModule, split-level metrics, the eval callbacks, the CLI."""
