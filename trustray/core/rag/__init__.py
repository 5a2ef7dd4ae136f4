"""Retrieval-augmented generation: passages, dense index, prompts, answer metrics."""
