"""Sweeps over many runs, the paper's scaling-law fits and the reproduction report."""
