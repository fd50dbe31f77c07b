"""The embedded default: tiny backbones and a synthetic dataset, so the whole system runs with no downloads."""
