"""blip2_ds: BLIP-2 Q-Former training at scale (DeepSpeed ZeRO-2, streaming shards, fused kernels)."""

__version__ = "0.1.0"
