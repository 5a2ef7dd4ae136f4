"""Data influence (LESS): per-example LoRA gradients, reductions, feature store, scoring and selection."""
