"""Evaluation: load a model or checkpoint, the WikiText-2 text, perplexity."""
