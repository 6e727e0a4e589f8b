"""Streaming image-text data: tar shards, decoding, augmentation, captions."""
