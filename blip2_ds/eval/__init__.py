"""Evaluation: image-text retrieval (ITC, ITM re-ranking) and evaluation data from shards."""
